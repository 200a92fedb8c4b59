"""Exporting a trained model: adapter, merged full model, EMA weights, model card, Hub push.

The Hub token is handed to ``huggingface_hub.HfApi`` and nowhere else: it is never logged,
never written into a file, and a folder whose text files contain it is refused before upload.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hf_optcore.wrapping import is_peft_model

logger = logging.getLogger(__name__)

__all__ = ["VARIANTS", "is_peft_model", "push_folder_to_hub", "save_model_variant", "render_model_card"]

VARIANTS = ("adapter", "merged", "ema")
_TEXT_SUFFIXES = {".json", ".md", ".yaml", ".yml", ".txt", ".jinja", ".cfg"}
_SECRET_KEYS = ("token", "password", "secret", "api_key")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")


def save_model_variant(model: Any, tokenizer: Any, output_dir: str | Path, variant: str = "adapter",
                       inplace_merge: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``output_dir`` as one export variant.

    Args:
        model: a ``PeftModel``, a ``PreTrainedModel``, or (``variant="ema"``) a folder already
            written by the EMA helper, which is copied.
        tokenizer: saved beside the weights when given.
        output_dir: destination folder (created).
        variant: ``adapter`` (the adapter alone; a full model when there is no adapter),
            ``merged`` (adapters merged into the base weights, a plain transformers model) or
            ``ema`` (EMA weights, saved like ``adapter``; pass the model inside
            ``with ema.applied():`` or the EMA folder).
        inplace_merge: merge into ``model`` itself instead of a copy (saves memory; the model
            loses its adapters).

    Returns:
        The output folder.
    """
    _check_variant(variant)
    out = Path(output_dir)
    if isinstance(model, (str, Path)):
        src = Path(model)
        if variant != "ema":
            raise ValueError(f"a folder ({str(src)!r}) can only be exported as variant='ema', got {variant!r}")
        if not (src / "config.json").is_file() and not (src / "adapter_config.json").is_file():
            raise FileNotFoundError(f"EMA folder {str(src)!r} holds no saved model (no config.json or adapter_config.json)")
        if src.resolve() != out.resolve():
            shutil.copytree(src, out, dirs_exist_ok=True)
    elif variant == "merged" and is_peft_model(model):
        merged = (model if inplace_merge else copy.deepcopy(model)).merge_and_unload()
        merged.save_pretrained(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("<redacted>" if any(s in str(k).lower() for s in _SECRET_KEYS) and v else _redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def render_model_card(*, base_model: str, base_model_hub_id: str | None, variant: str, library: str,
                      config: Any = None, metrics: dict | None = None, data_description: str | None = None,
                      lora_table: str | None = None) -> str:
    """The text of a model card (README.md with Hub metadata front matter)."""
    import yaml

    from hf_optcore import __version__

    meta = {"library_name": library, "tags": ["hf_optcore", "causal-lm", "fine-tuned"] + (["lora"] if library == "peft" else [])}
    if base_model_hub_id:
        meta["base_model"] = base_model_hub_id
    if config is not None and dataclasses.is_dataclass(config):
        config = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {variant} export of `{base_model}`", "",
             f"Fine-tuned with hf_optcore {__version__} on {_dt.date.today().isoformat()}.", "",
             "| | |", "|---|---|",
             f"| base model | `{base_model}`" + (f" (`{base_model_hub_id}`)" if base_model_hub_id and base_model_hub_id != base_model else "") + " |",
             f"| variant | {variant} |", f"| hf_optcore version | {__version__} |", "",
             "## Data", "", data_description or "Not described.", ""]
    lines += ["## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("None reported.")
    if lora_table:
        lines += ["", "## LoRA targets", "", "```", lora_table, "```"]
    if config is not None:
        lines += ["", "## Configuration", "", "```yaml",
                  yaml.safe_dump(_redact(config), sort_keys=False, allow_unicode=True).rstrip(), "```"]
    how = {"peft": "from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"<this folder or repo>\")",
           "transformers": "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"<this folder or repo>\")"}[library]
    lines += ["", "## Loading", "", "```python", how, "```", ""]
    return "\n".join(lines)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def push_folder_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None,
                       commit_message: str | None = None, revision: str | None = None,
                       ignore_patterns: list[str] | None = None) -> Any:
    """Create ``repo_id`` if needed and upload every file of ``folder`` in one commit.

    Args:
        folder: the exported folder.
        repo_id: ``owner/name`` on the Hub.
        token: a Hub token; when None, huggingface_hub's own login (``HF_TOKEN``, cached login).
            It is passed to ``HfApi`` only, never logged.
        private: create the repository private.
        commit_message: defaults to ``"Upload <n> files with hf_optcore"``.
        revision: branch to push to.
        ignore_patterns: files not uploaded (fnmatch on the relative path, as huggingface_hub applies them;
            ``["*/*"]`` keeps only the folder's top-level files).

    Returns:
        ``huggingface_hub.CommitInfo`` of the upload.
    """
    import fnmatch

    from huggingface_hub import HfApi

    folder = Path(folder)
    files = [f for f in _files(folder) if not any(fnmatch.fnmatch(f, pat) for pat in ignore_patterns or [])]
    if not files:
        raise FileNotFoundError(f"push_to_hub: folder {str(folder)!r} is empty; nothing to upload")
    if token:
        for rel in files:
            p = folder / rel
            if p.suffix in _TEXT_SUFFIXES and p.stat().st_size < 5_000_000 and token in p.read_text(errors="ignore"):
                raise ValueError(f"push_to_hub: refusing to upload {rel!r}: it contains the Hub token")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("Pushing %d files from %s to the Hub repository %s", len(files), folder, repo_id)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             commit_message=commit_message or f"Upload {len(files)} files with hf_optcore",
                             ignore_patterns=ignore_patterns)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8", suffix=".tmp") as fh:
        fh.write(text)
    Path(fh.name).replace(path)


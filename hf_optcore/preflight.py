"""Preflight: every failure that can be known before the model loads, found before it loads.

:func:`preflight` looks at a validated :class:`~hf_optcore.config.TrainerConfig` and the files it
names, and returns every problem at once, one line each, naming the dotted key or the file:

- ``output_dir`` can be written (an existing one is a writable directory, else its nearest
  existing ancestor is); nothing is created to find out;
- the data files exist and are regular files (a directory or a FIFO is named as such, never opened); their
  rows are what the recipe's data loading checks before tokenizing (:meth:`DataManager.check_datasets
  <hf_optcore.data_manager.DataManager.check_datasets>`: readable, every row well-formed for the format, not
  every completion empty); an evaluation (``training.eval_strategy``, ``eval_on_start``,
  ``load_best_model_at_end``) has an eval set to run on;
- ``training.metric_for_best_model`` is a metric evaluation will produce;
- the packages the optimizer, scheduler and options need are installed; ``hardware.dataloader_num_workers``
  is at most 4 per CPU of this machine;
- the model loads without running code of its own, unless ``model.trust_remote_code``
  (:func:`remote_code_needed`, from its ``config.json``);
- ``data.max_seq_len`` fits the model's positions, read from its config only (never the weights);
- ``checkpoint.resume_from`` is present and intact (``auto`` with nothing to resume is fine), and the
  checkpoint is compatible with this run: the same optimizer, and the same per-device batch,
  accumulation and world size unless ``checkpoint.allow_topology_change`` (which still needs the same
  examples per optimizer step);
- with ``checkpoint.own_output_dir``, the run may start in ``output_dir``
  (:mod:`hf_optcore.checkpoint_manager.ownership`): no other run holds its lock, it holds no other run's
  checkpoints (unless ``checkpoint.overwrite``), ``auto`` finds this directory's own run, and a resume
  changes no config field that ``checkpoint.allow_changes`` does not list (whose entries must be keys).

The recipe (and ``hf-optcore train``) runs it after config validation and before the tokenizer and
the model load; ``hf-optcore validate`` runs the same checks through the same function
(:func:`hf_optcore.recipes.sft.check_before_loading`). Non-finite numbers are rejected earlier,
by config validation itself.
"""

from __future__ import annotations

import getpass
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from hf_optcore import allocator
from hf_optcore.errors import not_a_file

logger = logging.getLogger(__name__)

__all__ = ["EVAL_METRICS", "check_preflight", "model_max_positions", "preflight", "remote_code_needed"]

REPO_ROOT = Path(__file__).resolve().parents[1]
# What hf_optcore's evaluation reports (prefixed ``eval_``); with EMA also ``eval_ema_*`` except label_tokens.
EVAL_METRICS = ("loss", "perplexity", "token_accuracy", "label_tokens")
# More dataloader workers than this many per CPU only fight over the CPUs (and a huge number forks the machine
# to a halt); torch's DataLoader already warns above one per CPU.
_WORKERS_PER_CPU = 4


def preflight(config: Any, *, world_size: int | None = None) -> list[str]:
    """Every problem of ``config`` that can be known before the model loads (empty when none).

    Args:
        config: a validated :class:`~hf_optcore.config.TrainerConfig`.
        world_size: the number of training processes (default: ``$WORLD_SIZE``, else 1), compared
            with a resumed checkpoint's.

    Returns:
        One line per problem, each starting with the dotted key (or naming the file) it is about.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    problems: list[str] = []
    problems += _output_dir_problems(config.output_dir)
    problems += _data_problems(config)
    problems += _metric_problems(config)
    problems += _package_problems(config)
    problems += _model_problems(config)
    problems += _resume_problems(config, world_size)
    return problems


def check_preflight(config: Any, *, world_size: int | None = None) -> None:
    """Raise one :class:`~hf_optcore.config.ConfigError` listing every :func:`preflight` problem."""
    problems = preflight(config, world_size=world_size)
    if problems:
        from hf_optcore.config import ConfigError

        raise ConfigError(problems)


# ---- output_dir ---------------------------------------------------------------------------


def _writable(path: Path) -> bool:
    # access() asks the kernel with this process's ids; a read-only mount answers yes for root.
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        return not (os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # pragma: no cover - platforms without statvfs
        return True


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # pragma: no cover - a uid without a passwd entry
        return str(os.getuid())


def _output_dir_problems(output_dir: str) -> list[str]:
    path = Path(output_dir).expanduser()
    try:
        if path.exists():
            if not path.is_dir():
                return [f"output_dir: {output_dir!r} exists and is not a directory"]
            if not _writable(path):
                return [f"output_dir: {output_dir!r} is not writable by user {_user()!r}"]
            return []
        ancestor = path.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as exc:
        return [f"output_dir: {output_dir!r} cannot be inspected ({exc.strerror or exc})"]
    if not ancestor.is_dir():
        return [f"output_dir: {output_dir!r} cannot be created: {str(ancestor)!r} is a file, not a directory"]
    if not _writable(ancestor):
        return [f"output_dir: {output_dir!r} cannot be created: {str(ancestor)!r} is not writable by user {_user()!r}"]
    return []


# ---- data and evaluation ------------------------------------------------------------------


def _data_problems(config: Any) -> list[str]:
    d, t = config.data, config.training
    problems = []
    if not d.train_path:
        problems.append("data.train_path: no training data given (a file path or 'hub:<dataset id>')")
    resolved = {}
    for key in ("train_path", "eval_path"):
        value = getattr(d, key)
        if not value or value.startswith("hub:"):
            continue
        # The recipe tries a relative path against the working directory, then the repository.
        if d.streaming and any(c in value for c in "*?["):
            continue  # a glob of shards: resolved (and refused when it matches nothing) by the stream
        path = Path(value).expanduser()
        if not path.exists() and (REPO_ROOT / value).exists():
            path = REPO_ROOT / value
        what = None if d.streaming and path.is_dir() else not_a_file(path)  # a stream reads a folder of shards
        if not path.exists():
            problems.append(f"data.{key}: file {value!r} not found")
        elif what is not None:
            problems.append(f"data.{key}: {value!r} is {what}, not a data file")
        else:
            resolved[key] = str(path)
    if not problems and resolved:
        problems += _data_content_problems(config, resolved)
    if not d.eval_path and d.eval_split_ratio == 0:
        no_eval = "there is no eval set (data.eval_path is unset and data.eval_split_ratio is 0)"
        fix = "set data.eval_path or data.eval_split_ratio"
        if t.eval_strategy != "no":
            problems.append(f"training.eval_strategy: {t.eval_strategy!r} evaluates during training, but {no_eval}; "
                            f"{fix}, or training.eval_strategy=no")
        if t.eval_on_start:
            problems.append(f"training.eval_on_start: evaluates before training, but {no_eval}; {fix}")
        if t.load_best_model_at_end:
            problems.append(f"training.load_best_model_at_end: ranks checkpoints by evaluation, but {no_eval}; {fix}")
    return problems


def _data_content_problems(config: Any, resolved: dict[str, str]) -> list[str]:
    """What the recipe's data loading would refuse before tokenizing (rows, format, empty completions), read
    without a tokenizer; ``hub:`` datasets are not read."""
    import dataclasses

    from hf_optcore.data_manager import DataManager
    from hf_optcore.errors import DataError

    data = dataclasses.replace(config.data, **resolved)
    try:
        DataManager(config.training, config.hardware, None, data_config=data).check_datasets()
    except DataError as exc:
        return [str(exc)]
    return []


def _metric_name(spec: Any) -> str:
    name = str(getattr(spec, "name", spec))
    return Path(name).stem if name.endswith(".py") or "/" in name else name


def _metric_problems(config: Any) -> list[str]:
    t, e = config.training, config.ema
    wanted = t.metric_for_best_model
    if not wanted:
        return []
    produced = set(EVAL_METRICS)
    if e.enabled and e.evaluate:
        produced |= {f"ema_{m}" for m in EVAL_METRICS if m != "label_tokens"}
    extra = [_metric_name(m) for m in t.eval_metrics]
    # As in transformers.Trainer, a name without the eval_ prefix means the eval_ metric.
    key = wanted.removeprefix("eval_")
    if key in produced or any(key.startswith(m) or key.startswith(f"ema_{m}") for m in extra):
        return []
    valid = sorted(f"eval_{m}" for m in produced) + [f"eval_{m}..." for m in extra]
    hint = ""
    if key.startswith("ema_") and not (e.enabled and e.evaluate):
        hint = " (EMA metrics need ema.enabled and ema.evaluate)"
    return [f"training.metric_for_best_model: evaluation does not produce {wanted!r}{hint}; "
            f"valid: {', '.join(valid)}"]


# ---- packages -----------------------------------------------------------------------------


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _package_problems(config: Any) -> list[str]:
    from hf_optcore import optim

    t, h, m = config.training, config.hardware, config.model
    problems = []
    try:
        info = optim.get_optimizer_info(t.optimizer)
    except KeyError:
        info = None  # an unknown name is a validation error, reported before preflight runs
    if info is not None and not info.is_available():
        problems.append(f"training.optimizer: {t.optimizer!r} needs the package {info.package!r}, which is not "
                        f"installed; pip install {info.pip_name or info.package}, or choose another optimizer "
                        f"(hf-optcore list-optimizers --available)")
    try:
        sched = optim.get_scheduler_info(t.scheduler)
    except KeyError:
        sched = None
    package = getattr(sched, "package", None)
    if package and not _installed(package):
        problems.append(f"training.scheduler: {t.scheduler!r} needs the package {package!r}, which is not installed; "
                        f"pip install {getattr(sched, 'pip_name', None) or package}")
    if m.lora.load_in_4bit and not _installed("bitsandbytes"):
        problems.append("model.lora.load_in_4bit: 4-bit loading needs the package 'bitsandbytes', which is not "
                        "installed; pip install bitsandbytes")
    if h.use_liger_kernel and not _installed("liger_kernel"):
        problems.append("hardware.use_liger_kernel: needs the package 'liger_kernel', which is not installed; "
                        "pip install liger-kernel")
    try:
        allocator.plan(h.cpu_allocator)
    except ValueError as exc:
        problems.append(str(exc))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if h.dataloader_num_workers > _WORKERS_PER_CPU * cpus:
        problems.append(f"hardware.dataloader_num_workers: {h.dataloader_num_workers} worker processes per training "
                        f"process on a machine with {cpus} CPU(s); use at most {_WORKERS_PER_CPU * cpus}")
    return problems


# ---- the model's positions, from its config only --------------------------------------------


def _positions_of(model_config: Any) -> int | None:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _auto_config(path: str, model: Any, **kw: Any) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code,
                                          **kw)
    except Exception as exc:  # noqa: BLE001 - no config to read is not preflight's to report; the loader will
        logger.debug("preflight: cannot read the config of %s (%s)", path, exc)
        return None


def _gguf_context_length(path: str) -> int | None:
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        # The reader memory-maps the file and parses its header; no tensor data is read.
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        field = reader.fields.get(f"{arch}.context_length")
        return int(field.parts[field.data[0]][0]) if field is not None else None
    except Exception as exc:  # noqa: BLE001 - an unreadable GGUF is reported by the loader, with its own message
        logger.debug("preflight: cannot read GGUF metadata of %s (%s)", path, exc)
        return None


def model_max_positions(model_config: Any) -> int | None:
    """The number of positions of ``model.name_or_path``, from its config only, or None when unknown.

    ``tiny:<arch>``: :func:`hf_optcore.tiny.tiny_config`; a local folder: its ``config.json``; a Hub
    id: its cached ``config.json`` (nothing is downloaded); a GGUF file or ``bundled:`` model: the
    converted model's cached ``config.json`` when there is one, else the GGUF's ``context_length``.

    Raises:
        ModelLoadError: ``model.name_or_path`` names nothing that exists.
    """
    from hf_optcore.model_manager.loading import default_cache_root, resolve_source

    src = resolve_source(model_config.name_or_path, model_config.gguf_file, model_config.revision)
    if src.kind == "tiny":
        from hf_optcore.tiny import tiny_config

        return _positions_of(tiny_config(src.tiny_arch))
    if src.kind == "gguf":
        converted = default_cache_root(model_config.cache_dir) / src.cache_name
        if (converted / "config.json").is_file():
            cfg = _auto_config(str(converted), model_config)
            return _positions_of(cfg) if cfg is not None else None
        return _gguf_context_length(src.path)
    cfg = _auto_config(src.path, model_config, local_files_only=True)
    return _positions_of(cfg) if cfg is not None else None


def _saved_config(src: Any, revision: str | None) -> dict | None:
    """The ``config.json`` of a local or cached Hub model as a dict (nothing is downloaded), else None."""
    import json

    if src.kind == "local":
        path = Path(src.path) / "config.json"
    elif src.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(src.path, "config.json", revision=revision)
        path = Path(cached) if isinstance(cached, str) else None
    else:
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


def remote_code_needed(model_config: Any) -> str | None:
    """The class a model's own code defines (``auto_map`` of its ``config.json``) when loading it runs that code,
    i.e. transformers has no class of its own for its ``model_type``; None when it loads without (or is unknown).

    Raises:
        ModelLoadError: ``model.name_or_path`` names nothing that exists.
    """
    from hf_optcore.model_manager.loading import resolve_source

    src = resolve_source(model_config.name_or_path, model_config.gguf_file, model_config.revision)
    saved = _saved_config(src, model_config.revision)
    auto_map = (saved or {}).get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if saved.get("model_type") in CONFIG_MAPPING_NAMES:
        return None  # transformers' own class is used unless trust_remote_code
    target = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoConfig") or next(iter(auto_map.values()))
    return str(target[0] if isinstance(target, (list, tuple)) and target else target)


def _chat_template_problems(config: Any) -> list[str]:
    """A ``model.chat_template`` that the tokenizer would refuse (see :func:`~hf_optcore.model_manager.
    check_chat_template`), rendered by transformers' own renderer without loading the tokenizer."""
    template = config.model.chat_template
    if not template:
        return []
    from transformers.utils.chat_template_utils import render_jinja_template

    from hf_optcore.errors import ModelLoadError
    from hf_optcore.model_manager import check_chat_template

    try:
        check_chat_template(lambda conv: render_jinja_template([conv], chat_template=template), "model.chat_template")
    except ModelLoadError as exc:
        return [str(exc)]
    return []


def _model_problems(config: Any) -> list[str]:
    from hf_optcore.errors import ModelLoadError

    problems = _chat_template_problems(config)
    if problems:
        return problems

    try:
        code = None if config.model.trust_remote_code else remote_code_needed(config.model)
        positions = model_max_positions(config.model) if code is None else None
    except ModelLoadError as exc:
        return [str(exc)]
    if code is not None:
        return [f"model.trust_remote_code: model {config.model.name_or_path!r} is defined by its own code ({code}), "
                f"which runs when it loads; set model.trust_remote_code=true only if you trust that code"]
    n = config.data.max_seq_len
    if positions is not None and n > positions:
        return [f"data.max_seq_len: {n} is more than the {positions} positions of model "
                f"{config.model.name_or_path!r} (from its config); use data.max_seq_len <= {positions}"]
    return []


# ---- resume -------------------------------------------------------------------------------


def _resume_problems(config: Any, world_size: int) -> list[str]:
    """What stands against the resume, all at once, as the Trainer will find it (the same functions decide)."""
    from hf_optcore.checkpoint_manager import resume
    from hf_optcore.checkpoint_manager.resume_changes import allow_changes_problems
    from hf_optcore.checkpoint_manager.topology import Topology
    from hf_optcore.errors import CheckpointError

    problems = allow_changes_problems(config)
    topology = Topology.of_config(config, world_size)
    spec = config.checkpoint.resume_from
    if config.checkpoint.own_output_dir:
        from hf_optcore.checkpoint_manager.ownership import plan_run
        from hf_optcore.checkpoint_manager.run_identity import in_use_message, lock_holder

        holder = lock_holder(config.output_dir)
        if holder is not None:
            problems.append(in_use_message(config.output_dir, holder))
        return problems + plan_run(config, spec, verify=True, topology=topology).problems
    if not spec:
        return problems
    try:
        target = resume.find(spec, config.output_dir)
    except CheckpointError as exc:
        return problems + [str(exc)]
    return problems + resume.objections(config, target, topology, compare_config=False)[1]

"""Preflight: every failure that can be known before the model loads, found before it loads.

:func:`preflight` looks at a validated :class:`~hf_optcore.config.TrainerConfig` and the files it
names, and returns every problem at once, one line each, naming the dotted key or the file:

- ``output_dir`` can be written (an existing one is a writable directory, else its nearest
  existing ancestor is); nothing is created to find out;
- the data files exist; an evaluation (``training.eval_strategy``, ``eval_on_start``,
  ``load_best_model_at_end``) has an eval set to run on;
- ``training.metric_for_best_model`` is a metric evaluation will produce;
- the packages the optimizer, scheduler and options need are installed;
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
the model load; ``hf-optcore validate`` runs the same checks. Non-finite numbers are rejected earlier,
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

logger = logging.getLogger(__name__)

__all__ = ["EVAL_METRICS", "check_preflight", "model_max_positions", "preflight"]

REPO_ROOT = Path(__file__).resolve().parents[1]
# What hf_optcore's evaluation reports (prefixed ``eval_``); with EMA also ``eval_ema_*`` except num_tokens.
EVAL_METRICS = ("loss", "perplexity", "token_accuracy", "num_tokens")
_TOPOLOGY = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")


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
    for key in ("train_path", "eval_path"):
        value = getattr(d, key)
        if not value or value.startswith("hub:"):
            continue
        # The recipe tries a relative path against the working directory, then the repository.
        if d.streaming and any(c in value for c in "*?["):
            continue  # a glob of shards: resolved (and refused when it matches nothing) by the stream
        if not Path(value).expanduser().exists() and not (REPO_ROOT / value).exists():
            problems.append(f"data.{key}: file {value!r} not found")
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
        produced |= {f"ema_{m}" for m in EVAL_METRICS if m != "num_tokens"}
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


def _model_problems(config: Any) -> list[str]:
    from hf_optcore.errors import ModelLoadError

    try:
        positions = model_max_positions(config.model)
    except ModelLoadError as exc:
        return [str(exc)]
    n = config.data.max_seq_len
    if positions is not None and n > positions:
        return [f"data.max_seq_len: {n} is more than the {positions} positions of model "
                f"{config.model.name_or_path!r} (from its config); use data.max_seq_len <= {positions}"]
    return []


# ---- resume -------------------------------------------------------------------------------


def _resume_target(config: Any) -> tuple[Path | None, dict | None, list[str]]:
    """The checkpoint ``checkpoint.resume_from`` resumes, its manifest, or the problems found."""
    from hf_optcore.checkpoint_manager import storage
    from hf_optcore.errors import CheckpointError

    spec = config.checkpoint.resume_from
    if spec == "auto":
        complete = storage.list_complete(config.output_dir)
        errors = []
        for info in reversed(complete):  # as the checkpoint manager: the newest intact one
            try:
                return info.path, storage.verify(info.path), []
            except CheckpointError as exc:
                errors.append(str(exc))
        if errors:
            return None, None, [f"checkpoint.resume_from: 'auto' finds no intact checkpoint in "
                                f"{config.output_dir!r}: {'; '.join(errors)}"]
        return None, None, []  # nothing to resume: a fresh start
    path = Path(spec).expanduser()
    if not path.exists():
        return None, None, [f"checkpoint.resume_from: {spec!r} does not exist"]
    if not path.is_dir():
        return None, None, [f"checkpoint.resume_from: {spec!r} is not a checkpoint directory"]
    try:
        return path, storage.verify(path), []
    except CheckpointError as exc:
        inside = [c.path.name for c in storage.list_complete(path)]
        hint = f" (it holds {', '.join(inside)}: name one of them, or use 'auto')" if inside else ""
        return None, None, [f"checkpoint.resume_from: {exc}{hint}"]


def _saved_optimizer(path: Path) -> str | None:
    import yaml

    try:
        saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        return str(saved["training"]["optimizer"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None


def _canonical_optimizer(name: str) -> str:
    from hf_optcore import optim

    try:
        return optim.get_optimizer_info(name).name
    except KeyError:
        return name


def _run_dir_target(config: Any) -> tuple[Path | None, dict | None, list[str]]:
    """The checkpoint the run resumes as the run that owns ``output_dir`` would resolve it, and why it may not start."""
    from hf_optcore.checkpoint_manager.ownership import plan_run
    from hf_optcore.checkpoint_manager.run_identity import in_use_message, lock_holder

    problems = []
    holder = lock_holder(config.output_dir)
    if holder is not None:
        problems.append(in_use_message(config.output_dir, holder))
    plan = plan_run(config, config.checkpoint.resume_from, verify=True)
    return plan.resume, plan.manifest, problems + plan.problems


def _resume_problems(config: Any, world_size: int) -> list[str]:
    from hf_optcore.checkpoint_manager.resume_changes import allow_changes_problems, step_size_problem

    problems = allow_changes_problems(config)
    if config.checkpoint.own_output_dir:
        path, manifest, found = _run_dir_target(config)
    elif config.checkpoint.resume_from:
        path, manifest, found = _resume_target(config)
    else:
        return problems
    problems += found
    if path is None:
        return problems
    t = config.training
    saved_opt = _saved_optimizer(path)
    if saved_opt is not None and _canonical_optimizer(saved_opt) != _canonical_optimizer(t.optimizer):
        problems.append(f"training.optimizer: {t.optimizer!r}, but checkpoint {str(path)!r} holds the state of "
                        f"{saved_opt!r}; resume with training.optimizer={saved_opt}, or start a new run")
    saved = (manifest or {}).get("topology") or {}
    now = {"world_size": world_size, "per_device_train_batch_size": t.per_device_train_batch_size,
           "gradient_accumulation_steps": t.gradient_accumulation_steps}
    if config.checkpoint.allow_topology_change:
        step = step_size_problem(saved, now, config.data.batching, path)
        return problems + ([step] if step and config.data.batching != "hf" else [])
    exact = "resuming would not be exact. Use the same, or set checkpoint.allow_topology_change=true"
    for key in _TOPOLOGY:
        if key not in saved or saved[key] == now[key]:
            continue
        if key == "world_size":
            problems.append(f"checkpoint.resume_from: {str(path)!r} was saved by {saved[key]} process(es), this run "
                            f"has {now[key]}; {exact}")
        else:
            problems.append(f"training.{key}: {now[key]}, but checkpoint {str(path)!r} was saved with {saved[key]}; "
                            f"{exact}")
    return problems

"""A resume whose config differs from its checkpoint's: which fields changed, which may, and making the new values run.

A checkpoint records the config of the run that wrote it (``config.yaml``, its sha256 in the manifest as
``config_hash``). Resuming it with another config is refused unless every changed field is listed in
``checkpoint.allow_changes`` (a dotted key, or a section such as ``training.extra_args``). Fields that only say
where and how often things are written or reported are never compared (``output_dir``, the ``checkpoint``
section, ``training.logging_steps``, ``report_to``, the Hub push); ``training.optimizer``, the per-device batch
and the accumulation have checks of their own (an optimizer state cannot change kind; a topology change needs
``checkpoint.allow_topology_change``); ``training.seed`` and ``training.data_seed`` cannot change at all, since a
resume restores the checkpoint's random state and data order.

A checkpoint records the values that ran, some of which transformers or hf_optcore derive per process rather than
take from the user: ``hardware.use_cpu`` is switched on for a multi-process launch on a machine without an
accelerator (:func:`~hf_optcore.distributed.prepare_process_group`), and transformers turns
``dataloader_pin_memory`` off under ``use_cpu``. Both sides of a comparison are read as what they amount to on
this machine (:func:`_as_run_here`), so a run resumed with its own command is never refused for them.

When changes are allowed, transformers still restores the optimizer's ``param_groups`` (``lr``,
``initial_lr``, ``weight_decay``, ``betas``, ``eps``) and the scheduler's state (``base_lrs``, and the
attributes of a scheduler's callable lambdas) from the checkpoint. :func:`reapply`, called at
``on_train_begin`` (after transformers loaded them), builds this run's optimizer and scheduler the way
the Trainer builds them, as a throwaway, and puts their values for the changed fields into the live
ones; the current learning rate is recomputed at the resumed step of the new schedule, so the first
resumed step, the logs and everything after run the new values.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["Change", "allow_changes_problems", "compared_fingerprint", "config_changes", "diff_configs", "reapply"]

Change = tuple  # (dotted key, the checkpoint's value, this run's value)

_SECTIONS = {"model", "training", "hardware", "data", "checkpoint", "ema", "model.lora"}
# Where and how often things are written, logged or reported: never part of the comparison.
_NOT_COMPARED = ("output_dir", "checkpoint", "training.logging_steps", "training.report_to", "training.run_name",
                 "training.push_to_hub", "training.hub_model_id", "training.push_variant")
_NOT_COMPARED_EXTRA = ("disable_tqdm", "logging_", "log_level", "log_on_each_node", "report_to", "run_name",
                       "project", "trackio_", "push_to_hub", "hub_", "save_", "overwrite_output_dir",
                       "resume_from_checkpoint")
# Checked on their own (preflight and the topology check), not through allow_changes.
_OWN_CHECK = {"training.optimizer", "training.per_device_train_batch_size", "training.gradient_accumulation_steps"}
_FIXED = {
    "training.seed": "a resume restores the checkpoint's random state, so another seed would not take effect",
    "training.data_seed": "a resume continues the checkpoint's data order, so another data seed would not take effect",
}
_DATA_PATHS = {"data.train_path", "data.eval_path"}


# ---- what changed -----------------------------------------------------------------------------


def _flatten(raw: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and (dotted in _SECTIONS or dotted == "training.extra_args"):
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _compared(key: str) -> bool:
    if any(key == p or key.startswith(f"{p}.") for p in _NOT_COMPARED) or key in _OWN_CHECK:
        return False
    if key.startswith("training.extra_args."):
        name = key[len("training.extra_args."):]
        return not name.startswith(_NOT_COMPARED_EXTRA)
    return True


def _data_path(value: Any) -> Any:
    """A data file as the recipe resolves it (the working directory, then the repository), for comparison."""
    if not isinstance(value, str) or not value or value.startswith("hub:"):
        return value
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = (base / value).expanduser()
        if candidate.exists():
            return str(candidate.resolve())
    return value


def _same(key: str, old: Any, new: Any) -> bool:
    if key in _DATA_PATHS:
        old, new = _data_path(old), _data_path(new)
    if isinstance(old, float) or isinstance(new, float):
        try:
            return math.isclose(float(old), float(new), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(old) == list(new)
    return old == new


def _as_run_here(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with the per-process derived values replaced by what they amount to on this machine."""
    from hf_optcore.distributed import _accelerator_available

    out = dict(flat)
    if "hardware.use_cpu" not in out:
        return out
    cpu = bool(out["hardware.use_cpu"]) or not _accelerator_available()
    out["hardware.use_cpu"] = cpu  # without an accelerator, a run is on the CPU whatever use_cpu says
    if cpu and "hardware.dataloader_pin_memory" in out:
        out["hardware.dataloader_pin_memory"] = False  # transformers' own rule under use_cpu; inert on the CPU
    return out


def compared_fingerprint(config: Any) -> str:
    """sha256 of the fields a resume compares (not where or how often things are written or reported)."""
    import hashlib
    import json

    from hf_optcore.config import TrainerConfig

    canonical = _as_run_here(_flatten(TrainerConfig.from_dict(config.to_dict(), validate=False).to_dict()))
    kept = {k: v for k, v in canonical.items() if _compared(k) or k in _OWN_CHECK}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def diff_configs(saved: dict, config: Any) -> list[Change]:
    """Every compared dotted field whose value in ``saved`` (a checkpoint's ``config.yaml``) differs from ``config``'s.

    Only fields the checkpoint recorded are compared (a field added to hf_optcore since is not a change).
    """
    from hf_optcore.config import ConfigError, TrainerConfig

    recorded = _flatten(saved)
    try:
        # Coerced to the declared types (1e-2 written as a string, 10 for a float field).
        coerced = _flatten(TrainerConfig.from_dict(saved, validate=False).to_dict())
    except (ConfigError, TypeError, ValueError):
        coerced = recorded
    coerced = _as_run_here(coerced)
    now = _as_run_here(_flatten(config.to_dict()))
    changes = []
    for key in sorted(recorded):
        if not _compared(key):
            continue
        old = coerced.get(key, recorded[key])
        if key.startswith("training.extra_args."):
            new = config.training.extra_args.get(key.split(".", 2)[2])
        elif key in now:
            new = now[key]
        else:
            continue  # a field this hf_optcore no longer has
        if not _same(key, old, new):
            changes.append((key, old, new))
    for name, new in config.training.extra_args.items():  # an extra argument the checkpoint's run did not set
        key = f"training.extra_args.{name}"
        if key not in recorded and _compared(key) and "training.extra_args" in {k.rsplit(".", 1)[0] for k in recorded}:
            changes.append((key, None, new))
    return changes


def _known_keys() -> set[str]:
    from hf_optcore.config import TrainerConfig

    keys = set(_flatten(TrainerConfig().to_dict()))
    return keys | _SECTIONS | {"training.extra_args"}


def _allowed(key: str, allowed: list[str]) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in allowed)


def allow_changes_problems(config: Any) -> list[str]:
    """``checkpoint.allow_changes`` entries that name no config key (with a did-you-mean), or cannot be allowed."""
    from hf_optcore.errors import did_you_mean

    known = _known_keys()
    problems = []
    for entry in config.checkpoint.allow_changes:
        entry = str(entry)
        if entry in _FIXED:
            problems.append(f"checkpoint.allow_changes: {entry} cannot change on resume: {_FIXED[entry]}")
        elif entry not in known and not entry.startswith("training.extra_args."):
            problems.append(f"checkpoint.allow_changes: unknown key {entry!r}{did_you_mean(entry, sorted(known))}; "
                            f"entries are dotted config keys (training.learning_rate) or sections (hardware)")
    return problems


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)


def saved_config(path: str | Path) -> dict | None:
    """The parsed ``config.yaml`` of checkpoint ``path``, or None when it has none (or it is unreadable)."""
    import yaml

    try:
        raw = yaml.safe_load((Path(path) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def config_changes(config: Any, path: str | Path, manifest: dict | None) -> tuple[list[Change], list[str]]:
    """``(allowed changes, problems)`` of resuming checkpoint ``path`` with ``config``.

    Every changed field not covered by ``checkpoint.allow_changes`` is listed in one problem; a change of
    ``training.seed`` / ``data_seed`` is a problem whatever is allowed. A checkpoint without a manifest or
    ``config.yaml`` (a plain transformers one) records no config: nothing to compare.
    """
    if manifest is None:
        return [], []
    saved = saved_config(path)
    if saved is None:
        return [], []
    changes = diff_configs(saved, config)
    allowed = [str(a) for a in config.checkpoint.allow_changes]
    fixed = [c for c in changes if c[0] in _FIXED]
    refused = [c for c in changes if c[0] not in _FIXED and not _allowed(c[0], allowed)]
    problems = []
    where = f"checkpoint {str(path)!r}"
    new_run = "start a new run instead (another output_dir, or checkpoint.overwrite=true without resume_from)"
    for key, old, new in fixed:
        problems.append(f"{key}: {_show(old)} in {where}, {_show(new)} now; it cannot change on resume: "
                        f"{_FIXED[key]}. Use {_show(old)}, or {new_run}")
    if refused:
        listed = "; ".join(f"{k}: {_show(o)} -> {_show(n)}" for k, o, n in refused)
        keys = ", ".join(k for k, _, _ in refused)
        problems.append(f"checkpoint.allow_changes: resuming {where} with another config ({listed}); allow "
                        f"{'this change' if len(refused) == 1 else 'these changes'} with "
                        f"checkpoint.allow_changes=[{keys}] (the new values then run), or {new_run}")
    return [c for c in changes if c not in fixed and c not in refused], problems


# ---- making the allowed new values run -----------------------------------------------------------

_LR = {"training.learning_rate", "training.lr_multipliers", "training.lora_plus_ratio"}
_SCHEDULE = {"training.scheduler", "training.scheduler_kwargs", "training.warmup_steps", "training.max_steps",
             "training.num_train_epochs"}
_GROUP_KEYS = {"training.weight_decay": ("weight_decay",), "training.no_decay_patterns": ("weight_decay",),
               "training.adam_beta1": ("betas",), "training.adam_beta2": ("betas",), "training.adam_epsilon": ("eps",),
               "training.warmup_steps": ("warmup_steps",)}


def _inner(obj: Any, attr: str) -> Any:
    """The object inside Accelerate's wrappers (``AcceleratedOptimizer.optimizer``, ``AcceleratedScheduler.scheduler``)."""
    while hasattr(obj, attr) and getattr(obj, attr) is not obj and getattr(obj, attr) is not None:
        obj = getattr(obj, attr)
    return obj


def _fresh_optimizer_and_scheduler(trainer: Any) -> tuple[Any, Any]:
    """This run's optimizer and scheduler as the Trainer builds them (its own create_* methods), as throwaways.

    The live objects are set aside meanwhile and put back; no optimizer state is allocated (that happens at step).
    The Trainer built its own scheduler in this train() (an optimizer passed in is never rebuilt), so the flags
    that record it are already set and building another one leaves them as they are.
    """
    names = ("optimizer", "lr_scheduler", "optimizer_manager", "_optcore_scheduler_built")
    missing = object()
    saved = {name: trainer.__dict__.get(name, missing) for name in names}
    try:
        trainer.optimizer, trainer.lr_scheduler = None, None
        trainer.__dict__.pop("optimizer_manager", None)
        optimizer = trainer.create_optimizer()
        scheduler = trainer.create_scheduler(num_training_steps=trainer.state.max_steps, optimizer=optimizer)
        return optimizer, scheduler
    finally:
        for name, value in saved.items():
            if value is missing:
                trainer.__dict__.pop(name, None)
            else:
                setattr(trainer, name, value)


def _scheduled_lrs(scheduler: Any, base_lrs: list[float]) -> list[float] | None:
    """The learning rates ``scheduler`` gives at its current step for ``base_lrs`` (None when not closed-form)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None:
        return [base * fn(scheduler.last_epoch) for fn, base in zip(lambdas, base_lrs)]
    if hasattr(scheduler, "_get_closed_form_lr"):
        return list(scheduler._get_closed_form_lr())
    return None


def reapply(trainer: Any, changes: list[Change], optimizer_given: bool = False) -> list[str]:
    """Put the new values of the allowed ``changes`` into the optimizer and scheduler transformers just restored.

    Args:
        trainer: the ``OptCoreTrainer``, after transformers loaded the checkpoint's optimizer and scheduler.
        changes: the allowed changes (:func:`config_changes`).
        optimizer_given: the optimizer was passed to the Trainer (its hyperparameters cannot be rebuilt).

    Returns:
        One line per adjusted hyperparameter (also logged).
    """
    keys = {k for k, _, _ in changes}
    group_keys: set[str] = set()
    for key, old, new in changes:
        group_keys.update(_GROUP_KEYS.get(key, ()))
        if key == "training.optimizer_kwargs":
            group_keys.update(set(old or {}) | set(new or {}))
    lr_changed = bool(keys & _LR) or "lr" in group_keys
    schedule_changed = lr_changed or bool(keys & _SCHEDULE)
    group_keys.discard("lr")
    if not (group_keys or schedule_changed) or trainer.optimizer is None:
        return []
    if optimizer_given or getattr(trainer, "is_deepspeed_enabled", False):
        logger.warning("resumed with changed %s, but the optimizer %s: its hyperparameters are the checkpoint's",
                       ", ".join(sorted(keys)), "was passed to the Trainer" if optimizer_given else "is DeepSpeed's")
        return []
    fresh_opt, fresh_sched = _fresh_optimizer_and_scheduler(trainer)
    live_groups = _inner(trainer.optimizer, "optimizer").param_groups
    fresh_groups = _inner(fresh_opt, "optimizer").param_groups
    if len(live_groups) != len(fresh_groups):
        from hf_optcore.errors import CheckpointError

        raise CheckpointError(f"resumed with changed {', '.join(sorted(keys))}: this config makes "
                              f"{len(fresh_groups)} optimizer parameter groups, the checkpoint has {len(live_groups)}")
    notes = []
    for name in sorted(group_keys):
        before = [g.get(name) for g in live_groups]
        for live, fresh in zip(live_groups, fresh_groups):
            if name in live and name in fresh:
                live[name] = fresh[name]
        after = [g.get(name) for g in live_groups]
        if after != before:
            notes.append(f"{name}: {before} -> {after}")
    scheduler = _inner(trainer.lr_scheduler, "scheduler")
    fresh_scheduler = _inner(fresh_sched, "scheduler")
    if schedule_changed and scheduler is not None and hasattr(scheduler, "base_lrs"):
        before = [g["lr"] for g in live_groups]
        state = fresh_scheduler.state_dict()
        for progress in ("last_epoch", "_step_count"):
            if progress in scheduler.__dict__:
                state[progress] = scheduler.__dict__[progress]
        old_base = list(scheduler.base_lrs)
        scheduler.load_state_dict(state)  # the new base learning rates and schedule, at the resumed step
        lrs = _scheduled_lrs(scheduler, list(scheduler.base_lrs))
        if lrs is None:  # a chainable scheduler: its current rate scales with the base rate
            lrs = [lr * (new / old if old else 1.0) for lr, new, old in zip(before, scheduler.base_lrs, old_base)]
        for group, base, lr in zip(live_groups, scheduler.base_lrs, lrs):
            group["initial_lr"] = base
            group["lr"] = lr
        scheduler._last_lr = [g["lr"] for g in live_groups]
        if before != scheduler._last_lr:
            notes.append(f"lr: {before} -> {scheduler._last_lr} (base {old_base} -> {list(scheduler.base_lrs)})")
    if notes:
        logger.info("resumed with the changed config (%s): %s", ", ".join(sorted(keys)), "; ".join(notes))
    return notes

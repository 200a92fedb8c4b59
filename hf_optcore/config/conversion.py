"""TrainerConfig <-> the Trainer's arguments, both ways, derived from the field links of ``training_args``.

- :func:`config_to_args`: a ``TrainerConfig`` -> ``OptCoreTrainingArguments`` (lossless);
- :func:`args_to_config`: plain ``TrainingArguments`` or ours -> the nested view (plain arguments get the
  extension values under which the Trainer behaves as transformers');
- :func:`merge_arguments`: a user's ``TrainingArguments`` plus a ``TrainerConfig`` -> the arguments the Trainer
  holds, with every field both set differently reported at once.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from typing import Any

from hf_optcore.config.sections import ConfigError
from hf_optcore.config.training_args import (
    _CONVERTED,
    _NOT_COPIED,
    _SECRET_SUFFIX,
    _SPECIAL,
    _cls,
    _get,
    _hf_fields,
    _plain,
    _set,
    _set_attr,
    field_links,
)

__all__ = ["args_to_config", "config_to_args", "merge_arguments", "resolve_arguments"]

def config_to_args(config: Any, **extra: Any) -> Any:
    """``TrainerConfig`` -> ``OptCoreTrainingArguments`` (lossless: :func:`args_to_config` inverts it).

    Args:
        config: a :class:`~hf_optcore.config.TrainerConfig`.
        **extra: TrainingArguments fields set on top (``hub_token``, ``disable_tqdm``, ...).
    """
    kwargs: dict[str, Any] = {"output_dir": config.output_dir, "remove_unused_columns": False}
    for link in field_links():
        if link.path not in _SPECIAL:
            kwargs[link.arg] = copy.deepcopy(_get(config, link.path))
    every = config.checkpoint.every_n_steps
    kwargs["save_strategy"], kwargs["save_steps"] = ("steps", every) if every > 0 else ("no", 500)
    if config.model.gradient_checkpointing:
        kwargs["activation_checkpointing"] = True
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    kwargs.update(copy.deepcopy(config.training.extra_args))
    kwargs.update(extra)
    return _cls()(**kwargs)


_FAITHFUL = {"data.batching": "hf", "training.chunked_loss": False, "training.write_report": False,
             "checkpoint.on_nonfinite": "ignore", "checkpoint.verify": False, "checkpoint.save_at_end": False,
             "checkpoint.keep_best": 0,
             "checkpoint.own_output_dir": False, "checkpoint.overwrite": True,
             "checkpoint.allow_topology_change": True}


def _faithful_defaults(args: Any) -> dict[str, Any]:
    """Extension values under which the Trainer behaves exactly as transformers' own with ``args``."""
    return {**_FAITHFUL, "checkpoint.keep_best": 1 if args.metric_for_best_model else 0}


def args_to_config(args: Any, overrides: list[str] | None = None, validate: bool = True) -> Any:
    """TrainingArguments (plain or ``OptCoreTrainingArguments``) -> ``TrainerConfig``.

    Plain ``TrainingArguments`` get the extension values under which the Trainer behaves as
    transformers' own (``data.batching='hf'``, retention from ``save_total_limit``, no extra final
    checkpoint); ``overrides`` (dotted ``key=value``) switch extensions on. Every other non-default
    TrainingArguments field lands in ``training.extra_args``; ``hub_token`` never does.
    """
    from hf_optcore.config.parsing import deep_merge, parse_overrides
    from hf_optcore.config.trainer_config import TrainerConfig

    ours = isinstance(args, _cls())
    faithful = {} if ours else _faithful_defaults(args)
    raw: dict[str, Any] = {"output_dir": args.output_dir}
    linked_hf = set()
    for link in field_links():
        if link.path in _SPECIAL:
            continue
        if link.hf:
            linked_hf.add(link.arg)
            value = _plain(getattr(args, link.arg))
        elif ours:
            value = copy.deepcopy(getattr(args, link.arg))
        else:
            value = faithful.get(link.path, copy.deepcopy(link.default))
        if link.path == "training.report_to" and value in ([], ["none"]):
            value = "none"
        if value is None and (link.type is dict or typing.get_origin(link.type) is dict):
            value = {}  # transformers' None for an empty kwargs dict
        _set(raw, link.path, value)
    strategy = _plain(args.save_strategy)
    _set(raw, "checkpoint.every_n_steps", int(args.save_steps) if strategy == "steps" else 0)
    _set(raw, "model.gradient_checkpointing", bool(args.activation_checkpointing))
    # Every other field that differs from transformers' default travels in training.extra_args.
    extra = {}
    for name in _hf_fields():
        if name in linked_hf or name in _NOT_COPIED or name.endswith(_SECRET_SUFFIX) or name in _CONVERTED:
            continue
        value = _plain(getattr(args, name))
        if name == "remove_unused_columns":
            if not (ours and value is False):  # False is what config_to_args sets
                extra[name] = value
        elif name == "activation_checkpointing_kwargs" and value in (None, {"use_reentrant": False}):
            continue
        elif name == "do_eval" and value and _plain(args.eval_strategy) != "no":
            continue  # transformers derives it from eval_strategy
        elif not _is_hf_default(name, value):
            extra[name] = copy.deepcopy(value)
    if strategy not in ("steps", "no"):
        extra["save_strategy"] = strategy  # epoch / best: not expressible as checkpoint.every_n_steps
    _set(raw, "training.extra_args", extra)
    if overrides:
        raw = deep_merge(raw, parse_overrides(list(overrides)))
    config = TrainerConfig.from_dict(raw, validate=False)
    if validate:
        _validate_view(config, args)
    return config


def _is_hf_default(name: str, value: Any) -> bool:
    """Whether ``value`` (plain) is TrainingArguments' default for ``name`` as it reads after ``__post_init__``.

    Never builds a TrainingArguments to find out: each one initialises Accelerate's process-wide
    state (its device), which a launched multi-process run must not get from a stray instance.
    """
    f = _hf_fields()[name]
    raw = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if _plain(raw) == value:
        return True
    if name == "accelerator_config" and raw is None:
        from transformers.trainer_pt_utils import AcceleratorConfig

        return value == _plain(AcceleratorConfig())
    # transformers normalises these defaults: report_to "none" -> [], debug "" -> [], None -> False flags.
    return (raw in ("none", "") and value == []) or (raw is None and value is False)


def _default_view(ours: bool) -> Any:
    """The TrainerConfig view of default arguments (ours, or transformers' plain ones), built without them."""
    from hf_optcore.config.trainer_config import TrainerConfig

    view = TrainerConfig()
    for link in field_links():
        if link.hf and link.path not in _SPECIAL:
            f = _hf_fields()[link.arg]
            raw = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            _set_attr(view, link.path, {} if raw is None and isinstance(link.default, dict) else _plain(raw))
    view.output_dir = "trainer_output"
    view.training.report_to = "none"
    view.checkpoint.every_n_steps = _hf_fields()["save_steps"].default
    view.model.gradient_checkpointing = False
    if not ours:
        for path, value in _FAITHFUL.items():
            _set_attr(view, path, value)
    return view


def _validate_view(config: Any, args: Any) -> None:
    """Validate ``config``, leaving to transformers the values it already accepted in ``args``."""
    from hf_optcore._validation import collect_problems

    accepted = {link.path for link in field_links() if link.hf and _get(config, link.path) == _plain(getattr(args, link.arg))}
    problems = [p for p in collect_problems(config) if p.split(":", 1)[0] not in accepted]
    if problems:
        raise ConfigError(problems)


def merge_arguments(args: Any, config: Any) -> Any:
    """The Trainer's arguments for ``OptCoreTrainer(model, args, optcore_config=config)``.

    ``args`` wins wherever ``config`` holds its own default; a field that ``config`` sets to another
    value than one ``args`` set is a conflict. One :class:`ConfigError` names every conflicting field.
    """
    from hf_optcore.config.trainer_config import TrainerConfig

    ours = isinstance(args, _cls())
    view = args_to_config(args, validate=False)
    their_defaults = _default_view(ours)
    my_defaults = TrainerConfig()
    merged = copy.deepcopy(view)
    conflicts = []
    for path in ["output_dir"] + [link.path for link in field_links() if link.path != "training.extra_args"]:
        mine, theirs = _get(config, path), _get(view, path)
        if mine == theirs or mine == _get(my_defaults, path):
            continue
        if theirs != _get(their_defaults, path):
            conflicts.append(f"{path}: the TrainingArguments say {theirs!r}, the TrainerConfig says {mine!r}")
        else:
            _set_attr(merged, path, copy.deepcopy(mine))
    for key, mine in config.training.extra_args.items():
        theirs = merged.training.extra_args.get(key, mine)
        if mine != theirs:
            conflicts.append(f"training.extra_args.{key}: the TrainingArguments say {theirs!r}, "
                             f"the TrainerConfig says {mine!r}")
        merged.training.extra_args[key] = copy.deepcopy(mine)
    if conflicts:
        raise ConfigError([f"{c} (set each value in one place)" for c in conflicts])
    keep = {name: getattr(args, name) for name in _hf_fields()
            if name.endswith(_SECRET_SUFFIX) and getattr(args, name, None) is not None}
    # Where a transformers field ends as the caller set it, the caller's own value goes through as it was
    # (10 stays an int, None stays None): the arguments compare equal to theirs field by field.
    for link in field_links():
        if link.hf and link.path not in _SPECIAL and _get(merged, link.path) == _get(view, link.path):
            keep[link.arg] = copy.deepcopy(getattr(args, link.arg))
    for key, value in merged.training.extra_args.items():
        if key in _hf_fields() and _plain(getattr(args, key, None)) == value:
            keep[key] = copy.deepcopy(getattr(args, key))
    return config_to_args(merged, **keep)


def _trainer_config() -> type:
    from hf_optcore.config.trainer_config import TrainerConfig

    return TrainerConfig


def resolve_arguments(args: Any, optcore_config: Any) -> Any:
    """The arguments ``OptCoreTrainer(model, args, optcore_config=...)`` holds: ours when any extension is asked
    for (a TrainerConfig as ``args``, or an ``optcore_config``), else the caller's own."""
    if isinstance(args, _trainer_config()):
        if optcore_config is not None:
            raise ConfigError(["pass the TrainerConfig either as args or as optcore_config, not both"])
        return args.to_training_arguments()
    if optcore_config is None:
        return args
    if args is None:
        return optcore_config.to_training_arguments()
    return merge_arguments(args, optcore_config)

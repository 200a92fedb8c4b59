"""TrainerConfig <-> the Trainer's arguments, both ways, along the links of ``field_map``.

- :func:`config_to_args`: a ``TrainerConfig`` -> hf_optcore's arguments (lossless for every field that is an
  argument; recipe fields are not arguments);
- :func:`args_to_config`: plain ``TrainingArguments`` (or TRL's configs, or ours) -> the nested view (plain
  arguments get the extension values under which the Trainer behaves as transformers');
- :func:`merge_arguments`: a user's ``TrainingArguments`` plus a ``TrainerConfig`` -> the arguments the Trainer
  holds; a field both set to different values is a conflict, and every conflict is reported at once.

These functions take the ``TrainerConfig`` class from their caller (its methods), so this module sits below
``trainer_config.py`` and imports nothing above it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from transformers import TrainingArguments

from hf_optcore._validation import collect_problems
from hf_optcore.config.field_map import SPECIAL, field_links, hf_fields
from hf_optcore.config.parsing import deep_merge, parse_overrides
from hf_optcore.config.sections import ConfigError
from hf_optcore.config.training_args import (
    SECRET_SUFFIX,
    OptCoreArguments,
    arguments_class_for,
    arguments_to_raw,
    base_class_of,
    plain,
)

__all__ = ["FAITHFUL", "args_to_config", "config_to_args", "merge_arguments"]

FAITHFUL = {"data.batching": "hf", "training.chunked_loss": False, "training.write_report": False,
            "checkpoint.on_nonfinite": "ignore", "checkpoint.verify": False, "checkpoint.save_at_end": False,
            "checkpoint.keep_best": 0, "checkpoint.own_output_dir": False, "checkpoint.overwrite": True,
            "checkpoint.allow_topology_change": True}
"""Extension values under which the Trainer behaves exactly as transformers' own (plain TrainingArguments)."""


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _faithful(args: Any) -> dict[str, Any]:
    return {**FAITHFUL, "checkpoint.keep_best": 1 if args.metric_for_best_model else 0}


def config_to_args(config: Any, args_class: type | None = None, **extra: Any) -> Any:
    """``TrainerConfig`` -> hf_optcore's arguments (:func:`args_to_config` inverts it).

    Args:
        config: a :class:`~hf_optcore.config.TrainerConfig`.
        args_class: the arguments class, or the ``TrainingArguments`` subclass to extend (TRL's ``SFTConfig``);
            default: the class the config was read from, else ``TrainingArguments``.
        **extra: fields set on top (``hub_token``, ``disable_tqdm``, ...).
    """
    base = args_class or getattr(config, "arguments_base", None) or TrainingArguments
    cls = arguments_class_for(base)
    kwargs: dict[str, Any] = {"output_dir": config.output_dir, "remove_unused_columns": False}
    for link in field_links():
        if link.path not in SPECIAL and link.kind != "recipe":
            kwargs[link.arg] = copy.deepcopy(_get(config, link.path))
    every = config.checkpoint.every_n_steps
    kwargs["save_strategy"], kwargs["save_steps"] = ("steps", every) if every > 0 else ("no", 500)
    if config.model.gradient_checkpointing:
        kwargs["activation_checkpointing"] = True
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    kwargs.update(copy.deepcopy(config.training.extra_args))
    kwargs.update(extra)
    unknown = sorted(k for k in kwargs if k not in hf_fields(cls))
    if unknown:
        raise ConfigError([f"training.extra_args.{k}: not a field of {cls.__name__}"
                           f"{_did_you_mean(k, hf_fields(cls))}" for k in unknown])
    return cls(**kwargs)


def _did_you_mean(name: str, valid: Any) -> str:
    from hf_optcore.errors import did_you_mean

    return did_you_mean(name, list(valid))


def args_to_config(args: Any, config_cls: type, overrides: list[str] | None = None, validate: bool = True) -> Any:
    """``TrainingArguments`` (plain, a subclass such as TRL's ``SFTConfig``, or hf_optcore's) -> ``config_cls``.

    Plain arguments get the extension values under which the Trainer behaves as transformers' own
    (``data.batching='hf'``, retention from ``save_total_limit``, no extra final checkpoint); ``overrides``
    (dotted ``key=value``) switch extensions on. Every other non-default field of ``args``' class lands in
    ``training.extra_args``; ``hub_token`` never does. Recipe fields keep their defaults.
    """
    ours = isinstance(args, OptCoreArguments)
    raw = arguments_to_raw(args, None if ours else _faithful(args))
    if overrides:
        raw = deep_merge(raw, parse_overrides(list(overrides)))
    config = config_cls.from_dict(raw, validate=False)
    config._arguments_base = base_class_of(args)  # to_training_arguments() rebuilds the same class
    if validate:
        _validate_view(config, args)
    return config


def _validate_view(config: Any, args: Any) -> None:
    """Validate ``config``, leaving to transformers the values it already accepted in ``args``."""
    accepted = {link.path for link in field_links()
                if link.hf and link.path not in SPECIAL and _get(config, link.path) == plain(getattr(args, link.arg))}
    problems = [p for p in collect_problems(config) if p.split(":", 1)[0] not in accepted]
    if problems:
        raise ConfigError(problems)


def _default_view(config_cls: type, base: type, ours: bool) -> Any:
    """The view of default arguments of class ``base`` (ours, or plain ones), built without constructing them."""
    view = config_cls()
    fields = hf_fields(base)
    for link in field_links():
        if link.hf and link.path not in SPECIAL:
            f = fields[link.arg]
            raw = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            _set_attr(view, link.path, {} if raw is None and isinstance(link.default, dict) else plain(raw))
    view.output_dir = "trainer_output"
    view.training.report_to = "none"
    view.checkpoint.every_n_steps = fields["save_steps"].default
    view.model.gradient_checkpointing = False
    if not ours:
        for path, value in FAITHFUL.items():
            _set_attr(view, path, value)
    return view


def merge_arguments(args: Any, config: Any) -> Any:
    """The Trainer's arguments for ``OptCoreTrainer(model, args, optcore_config=config)``.

    A field the ``config`` set explicitly (in its YAML, dict, overrides or code; see
    :meth:`TrainerConfig.explicit_keys`) wins where ``args`` holds its class's default; one both set to different
    values is a conflict; a field the config did not set keeps ``args``' value. One :class:`ConfigError` names
    every conflict.
    """
    ours = isinstance(args, OptCoreArguments)
    base = base_class_of(args)
    view = args_to_config(args, type(config), validate=False)
    their_defaults = _default_view(type(config), base, ours)
    explicit = config.explicit_keys()
    merged = copy.deepcopy(view)
    conflicts = []
    for path in ["output_dir"] + [link.path for link in field_links()
                                  if link.kind != "recipe" and link.path != "training.extra_args"]:
        mine, theirs = _get(config, path), _get(view, path)
        if mine == theirs or path not in explicit:
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
    fields = hf_fields(base)
    keep = {name: getattr(args, name) for name in fields
            if name.endswith(SECRET_SUFFIX) and getattr(args, name, None) is not None}
    # Where a field ends as the caller set it, the caller's own value goes through as it was (10 stays an int,
    # None stays None): the arguments compare equal to theirs field by field.
    for link in field_links():
        if link.hf and link.path not in SPECIAL and _get(merged, link.path) == _get(view, link.path):
            keep[link.arg] = copy.deepcopy(getattr(args, link.arg))
    for key, value in merged.training.extra_args.items():
        if key in fields and plain(getattr(args, key, None)) == value:
            keep[key] = copy.deepcopy(getattr(args, key))
    return config_to_args(merged, base, **keep)

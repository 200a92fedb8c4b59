"""``OptCoreTrainingArguments``: ``transformers.TrainingArguments`` plus hf_optcore's fields.

The arguments the Trainer holds are the single source of truth of a run: every hyperparameter
that runs is a field here, so trackers (tensorboard, trackio, W&B), ``training_args.bin`` and
``trainer.args`` all name what actually ran. :class:`~hf_optcore.config.TrainerConfig` is the
nested YAML view of the same values. The map between the two is derived from the section
dataclasses (``hf_optcore.config.sections``), never written by hand:

- a section field whose name is a ``TrainingArguments`` field is that field
  (``training.learning_rate`` is ``learning_rate``), or names its field in ``metadata["hf"]``
  (``training.optimizer`` is ``optim``, ``training.scheduler`` is ``lr_scheduler_type``);
- every other field is a flat extension field here, prefixed by its section
  (``ema.decay`` is ``ema_decay``, ``data.batching`` is ``data_batching``, ``model.lora.r`` is
  ``lora_r``; the ``training`` and ``hardware`` sections need no prefix: ``fused_optimizer``),
  so an ``HfArgumentParser`` script takes them as flat ``--flags``;
- ``training.extra_args`` carries any other ``TrainingArguments`` field by its own name.

``optim`` and ``lr_scheduler_type`` accept hf_optcore's registry names as well as transformers'
own. ``hub_token`` never leaves the process: pickles of these arguments (``training_args.bin``)
drop it.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import json
import typing
from dataclasses import dataclass
from typing import Any, Union

from hf_optcore.config.sections import NESTED, SECTIONS, ConfigError

__all__ = ["FieldLink", "OptCoreTrainingArguments", "args_to_config", "config_to_args", "field_links", "merge_arguments"]  # noqa: F822 - built on first use (module __getattr__)

_PREFIX = {"model": "model_", "model.lora": "lora_", "training": "", "hardware": "", "data": "data_",
           "checkpoint": "checkpoint_", "ema": "ema_"}
# Linked by a conversion of their own (values that change shape on the way), not one to one.
_SPECIAL = {"checkpoint.every_n_steps", "model.gradient_checkpointing", "training.extra_args"}
# TrainingArguments fields never copied into a TrainerConfig: secrets, deprecated aliases of linked
# fields, and what the launcher decides per process.
_NOT_COPIED = {"hub_token", "gradient_checkpointing", "gradient_checkpointing_kwargs", "local_rank", "output_dir"}
_SECRET_SUFFIX = "_token"
# Read into checkpoint.every_n_steps / model.gradient_checkpointing by their own conversion.
_CONVERTED = {"save_strategy", "save_steps", "activation_checkpointing"}


@dataclass(frozen=True)
class FieldLink:
    """One TrainerConfig field and the TrainingArguments field that holds it.

    Attributes:
        path: dotted TrainerConfig path (``"training.optimizer"``).
        arg: the field name in the Trainer's arguments (``"optim"``).
        hf: True when ``arg`` is a ``transformers.TrainingArguments`` field, False for an extension field.
        default: the TrainerConfig default.
        type: the resolved field type.
        help: the help text.
    """

    path: str
    arg: str
    hf: bool
    default: Any
    type: Any
    help: str


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


@functools.lru_cache(maxsize=1)
def _hf_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


@functools.lru_cache(maxsize=1)
def field_links() -> tuple[FieldLink, ...]:
    """Every TrainerConfig field with its TrainingArguments name, in section order."""
    hf = _hf_fields()
    links: list[FieldLink] = []

    def walk(cls: type, path: str, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dotted = f"{path}.{f.name}"
            nested = NESTED.get((cls, f.name))
            if nested is not None:
                walk(nested, dotted, _PREFIX[dotted])
                continue
            target = f.metadata.get("hf") or (f.name if f.name in hf and path in ("training", "hardware") else None)
            links.append(FieldLink(dotted, target or f"{prefix}{f.name}", target is not None, _default_of(f),
                                   hints[f.name], f.metadata.get("help", "")))

    for name, cls in SECTIONS.items():
        walk(cls, name, _PREFIX[name])
    return tuple(links)


def _plain(value: Any) -> Any:
    """A TrainingArguments value as a plain YAML-able value (enums to their value, dataclasses to dicts)."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(raw: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


# --------------------------------------------------------------------------------------------
# The arguments class
# --------------------------------------------------------------------------------------------


def _arg_type(tp: Any) -> Any:
    """The type an extension field gets: dicts also accept a JSON string (HfArgumentParser gives strings)."""
    if tp is dict or typing.get_origin(tp) is dict:
        return Union[dict, str, None]  # HfArgumentParser then reads a string (JSON), as for lr_scheduler_kwargs
    return tp


def _make_class() -> type:
    from transformers import TrainingArguments

    fields = []
    for link in field_links():
        if link.hf or link.path in _SPECIAL:
            continue
        default = link.default
        f = (dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata={"help": link.help})
             if isinstance(default, (list, dict)) else dataclasses.field(default=default, metadata={"help": link.help}))
        fields.append((link.arg, _arg_type(link.type), f))
    # optim / lr_scheduler_type take hf_optcore's registry names too (transformers' field types list only its own).
    hf = _hf_fields()
    for name, help_text in (("optim", "Optimizer: a transformers name or an hf_optcore registry name "
                                      "(`hf-optcore list-optimizers`)."),
                            ("lr_scheduler_type", "Scheduler: a transformers name or an hf_optcore registry name.")):
        fields.append((name, str, dataclasses.field(default=_plain(hf[name].default), metadata={"help": help_text})))
    # Constructed directly, these arguments keep transformers' defaults for transformers' fields;
    # TrainerConfig's own defaults come in through config_to_args.
    namespace = {k: v for k, v in vars(_Methods).items() if k not in ("__dict__", "__weakref__")}
    namespace.update(__module__=__name__, __qualname__="OptCoreTrainingArguments")
    return dataclasses.make_dataclass("OptCoreTrainingArguments", fields, bases=(TrainingArguments,),
                                      namespace=namespace)


class _Methods:
    """Methods of OptCoreTrainingArguments (a dataclass built from the config sections)."""

    __doc__ = __doc__
    _optcore_validate = True

    def __post_init__(self):
        from transformers import TrainingArguments
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        from hf_optcore import optim

        for link in field_links():
            if link.hf or link.path in _SPECIAL:
                continue
            value = getattr(self, link.arg)
            if isinstance(value, str) and _arg_type(link.type) is not link.type and value.strip().startswith("{"):
                setattr(self, link.arg, json.loads(value))  # a JSON object from the command line
            elif link.path == "model.lora.target_modules" and isinstance(value, list) and value in (["auto"], ["all-linear"]):
                setattr(self, link.arg, value[0])  # `--lora_target_modules auto` parses as a one-item list
        # transformers validates optim / lr_scheduler_type against its own names; hf_optcore's registries
        # know more. A registry-only name is kept aside while transformers checks the rest.
        own_optim = own_sched = None
        if str(getattr(self.optim, "value", self.optim)) not in {o.value for o in OptimizerNames}:
            own_optim, self.optim = str(self.optim), OptimizerNames.ADAMW_TORCH
        if str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) not in {s.value for s in SchedulerType}:
            own_sched, self.lr_scheduler_type = str(self.lr_scheduler_type), SchedulerType.CONSTANT
        problems = []
        for name, kind, valid in ((own_optim, "optimizer", optim.list_optimizers),
                                  (own_sched, "scheduler", optim.list_schedulers)):
            if name is not None and name not in valid():
                from hf_optcore.errors import did_you_mean

                problems.append(f"{'optim' if kind == 'optimizer' else 'lr_scheduler_type'}: unknown {kind} {name!r}"
                                f"{did_you_mean(name, valid(), 0.5)}; registered: {', '.join(sorted(valid()))}")
        if problems:
            raise ConfigError(problems)
        TrainingArguments.__post_init__(self)
        if own_optim is not None:
            self.optim = own_optim
        if own_sched is not None:
            self.lr_scheduler_type = own_sched
        if self._optcore_validate:
            args_to_config(self)  # validates every section (values transformers accepted are not re-judged)

    def __getstate__(self):
        # training_args.bin (torch.save of these arguments) and any other pickle carry no token.
        state = dict(self.__dict__)
        for key in list(state):
            if key.endswith(_SECRET_SUFFIX) and state[key] is not None:
                state[key] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __deepcopy__(self, memo):
        # A deep copy inside the process keeps the token (a push still needs it); only pickles drop it.
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def to_optcore_config(self, validate: bool = True):
        """The nested :class:`~hf_optcore.config.TrainerConfig` view of these arguments."""
        return args_to_config(self, validate=validate)


@functools.lru_cache(maxsize=1)
def _cls() -> type:
    return _make_class()


def __getattr__(name: str) -> Any:
    # Built on first use: it subclasses TrainingArguments, and importing transformers is slow.
    if name == "OptCoreTrainingArguments":
        return _cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------


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


def _set_attr(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)

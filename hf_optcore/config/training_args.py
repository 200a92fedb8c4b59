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
            from hf_optcore.config.conversion import args_to_config

            args_to_config(self)  # validates every section  # validates every section (values transformers accepted are not re-judged)

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
        from hf_optcore.config.conversion import args_to_config

        return args_to_config(self, validate=validate)


@functools.lru_cache(maxsize=1)
def _cls() -> type:
    return _make_class()


def __getattr__(name: str) -> Any:
    # Built on first use: it subclasses TrainingArguments, and importing transformers is slow.
    if name == "OptCoreTrainingArguments":
        return _cls()
    if name in ("args_to_config", "config_to_args", "merge_arguments"):
        from hf_optcore.config import conversion

        return getattr(conversion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _set_attr(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)

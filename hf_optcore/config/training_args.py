"""``OptCoreTrainingArguments``: ``transformers.TrainingArguments`` plus hf_optcore's fields, as a class statement.

The arguments the Trainer holds are the single source of truth of a run: every hyperparameter that runs is a
field here, so trackers (tensorboard, trackio, W&B), ``training_args.bin`` and ``trainer.args`` name what actually
ran. :class:`~hf_optcore.config.TrainerConfig` is the nested YAML view of the same values (``field_map.py`` is the
map between the two). Fields only the recipe acts on (``model.*``, ``data.train_path``, ...) are not arguments: an
``HfArgumentParser`` script never sees them, so its flags cannot clash with run_clm's ``ModelArguments`` or TRL's
``ModelConfig``, and trackers never record a LoRA rank for a full fine-tune.

- :class:`OptCoreArguments` holds hf_optcore's fields and their checks. It is a dataclass mixin for any
  ``TrainingArguments`` subclass: ``OptCoreTrainingArguments(OptCoreArguments, TrainingArguments)`` here,
  ``OptCoreSFTConfig(OptCoreArguments, SFTConfig)`` in :mod:`hf_optcore.trl`.
- ``optim`` and ``lr_scheduler_type`` accept hf_optcore's registry names as well as transformers' own.
- ``hub_token`` never leaves the process: pickles of these arguments (``training_args.bin``) drop it.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from transformers import TrainingArguments

from hf_optcore._validation import collect_problems
from hf_optcore.config.field_map import SPECIAL, extension_links, field_links, hf_fields
from hf_optcore.config.parsing import build_section
from hf_optcore.config.sections import SECTIONS, ConfigError
from hf_optcore.errors import did_you_mean

__all__ = ["OptCoreArguments", "OptCoreTrainingArguments", "arguments_class_for", "arguments_to_raw", "plain"]

# TrainingArguments fields never copied into a TrainerConfig: secrets, deprecated aliases of linked fields, and what
# the launcher decides per process.
NOT_COPIED = frozenset({"hub_token", "gradient_checkpointing", "gradient_checkpointing_kwargs", "local_rank",
                        "output_dir"})
SECRET_SUFFIX = "_token"
# Read into checkpoint.every_n_steps / model.gradient_checkpointing by their own conversion.
CONVERTED = frozenset({"save_strategy", "save_steps", "activation_checkpointing"})


class RegistryName(str):
    """An hf_optcore registry name (``"lion"``, ``"wsd"``) where transformers keeps an enum member.

    transformers reads ``args.lr_scheduler_type.value`` (the model card, ``push_to_hub``); a registry name has
    no enum member, so it answers ``.value`` with itself.
    """

    @property
    def value(self) -> str:
        return str(self)


def plain(value: Any) -> Any:
    """A TrainingArguments value as a plain YAML-able value (enums to their value, dataclasses to dicts)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, str):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _is_dict_type(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


@dataclass
class OptCoreArguments:
    """hf_optcore's extension fields, for any ``TrainingArguments`` subclass (put it first among the bases).

    Each field below is one TrainerConfig key (named in its comment); the section prefix keeps the flags of an
    ``HfArgumentParser`` script apart from other libraries' (``--ema_decay``, ``--data_batching``,
    ``--checkpoint_keep_best``; the ``training`` and ``hardware`` fields have none: ``--chunked_loss``).
    The field block is generated from ``hf_optcore/config/sections.py`` by ``scripts/sync_training_args.py``.
    """

    # BEGIN GENERATED FIELDS (scripts/sync_training_args.py)
    # ---- training (no prefix) ----
    optimizer_kwargs: Union[dict, str, None] = field(default_factory=dict, metadata={  # training.optimizer_kwargs
        "help": "Extra keyword arguments for the optimizer.",
    })
    no_decay_patterns: list[str] = field(default_factory=lambda: ['bias', 'norm', 'embed'], metadata={  # training.no_decay_patterns
        "help": "Parameter-name substrings that get no weight decay.",
    })
    lr_multipliers: Union[dict, str, None] = field(default_factory=dict, metadata={  # training.lr_multipliers
        "help": "{name pattern: multiplier} per-module learning-rate multipliers.",
    })
    lora_plus_ratio: Optional[float] = field(default=None, metadata={  # training.lora_plus_ratio
        "help": "LoRA+: lora_B learning rate = ratio x learning_rate.",
    })
    chunked_loss: bool = field(default=True, metadata={  # training.chunked_loss
        "help": "Causal-LM loss and evaluation without whole-batch [tokens, vocabulary] logits: the head applied "
                "loss_chunk_size label tokens at a time, each chunk's gradient taken as soon as its logits exist; "
                "only where it equals the model's own loss (else the model's loss runs).",
    })
    loss_chunk_size: int = field(default=1024, metadata={  # training.loss_chunk_size
        "help": "Label tokens per output-head call of the chunked loss.",
    })
    eval_metrics: list[str] = field(default_factory=list, metadata={  # training.eval_metrics
        "help": "Extra `evaluate` metrics on next-token predictions, by name or local script path (names need "
                "network once).",
    })
    trust_metric_code: bool = field(default=False, metadata={  # training.trust_metric_code
        "help": "Allow a metric of training.eval_metrics that is a local script or folder, or a Hub metric outside "
                "the evaluate-metric organisation, to run: its code executes when it loads (as "
                "model.trust_remote_code).",
    })
    write_report: bool = field(default=True, metadata={  # training.write_report
        "help": "Write report.png / report.md (loss, evaluations, throughput) into output_dir at the end of "
                "training.",
    })
    # ---- hardware (no prefix) ----
    fused_optimizer: Literal["auto", "fused", "foreach", "for-loop"] = field(default='auto', metadata={  # hardware.fused_optimizer
        "help": "Optimizer kernel; auto: fused where the optimizer has one (GPU and CPU), else foreach.",
    })
    cpu_allocator: Literal["system", "jemalloc"] = field(default='system', metadata={  # hardware.cpu_allocator
        "help": "malloc of CPU tensors: system (the C library's) or jemalloc (less heap fragmentation: LoRA 0.75x "
                "full fine-tuning's peak on 8x512-token steps, but 15% slower on short ones); the recipe re-starts "
                "itself to preload it.",
    })
    # ---- data (data_) ----
    data_max_seq_len: int = field(default=1024, metadata={  # data.max_seq_len
        "help": "Maximum tokens per example.",
    })
    data_batching: Literal["random", "bucket", "token_budget", "multipack", "hf"] = field(default='random', metadata={  # data.batching
        "help": "Batching strategy; 'hf' leaves batching to transformers "
                "(TrainingArguments.train_sampling_strategy).",
    })
    data_max_tokens_per_batch: Optional[int] = field(default=None, metadata={  # data.max_tokens_per_batch
        "help": "Padded-token budget per batch (token_budget).",
    })
    data_pad_to_multiple_of: Optional[int] = field(default=None, metadata={  # data.pad_to_multiple_of
        "help": "Pad batch lengths to a multiple of this (bounds compiled shapes).",
    })
    data_padding_side: Literal["right", "left"] = field(default='right', metadata={  # data.padding_side
        "help": "Side on which batches are padded.",
    })
    data_bucket_size_multiplier: int = field(default=64, metadata={  # data.bucket_size_multiplier
        "help": "bucket: batches per length-sorted mega-batch (more: less padding, less mixing).",
    })
    data_streaming: bool = field(default=False, metadata={  # data.streaming
        "help": "Read train_path / eval_path lazily (JSONL/CSV/Parquet/text shards: a file, a directory or a glob),"
                " tokenize on the fly, never hold the data: for data larger than memory. Needs training.max_steps.",
    })
    data_buffer_size: int = field(default=1024, metadata={  # data.buffer_size
        "help": "Streamed data: examples in the look-ahead window batches are planned from (per reader: rank x "
                "dataloader worker); random shuffles, bucket and token_budget group by length, multipack packs "
                "within it. 0: the stream's own order (random only).",
    })
    data_on_bad_row: Literal["error", "skip"] = field(default='error', metadata={  # data.on_bad_row
        "help": "Streamed data: a row failing the data checks stops the run with an error naming file and line "
                "(error), or is skipped and counted (skip; bad_rows_skipped in the logs).",
    })
    # ---- checkpoint (checkpoint_) ----
    checkpoint_save_at_end: bool = field(default=True, metadata={  # checkpoint.save_at_end
        "help": "With every_n_steps=0, still save one checkpoint at the last step.",
    })
    checkpoint_keep_best: int = field(default=1, metadata={  # checkpoint.keep_best
        "help": "Also keep the top-k checkpoints by metric_for_best_model.",
    })
    checkpoint_keep_every_n_steps: Optional[int] = field(default=None, metadata={  # checkpoint.keep_every_n_steps
        "help": "Milestones: never prune checkpoints at multiples of N.",
    })
    checkpoint_allow_topology_change: bool = field(default=False, metadata={  # checkpoint.allow_topology_change
        "help": "Allow resuming with another world size / per-device batch / accumulation that keeps the examples "
                "per optimizer step (the sampler re-cuts the interrupted epoch by examples consumed); another step "
                "size is refused.",
    })
    checkpoint_own_output_dir: bool = field(default=True, metadata={  # checkpoint.own_output_dir
        "help": "The run owns output_dir: it records its identity (run.json), holds run.lock while it trains, and "
                "refuses a directory holding another run's checkpoints, a second concurrent run and a resume whose "
                "config differs (false: transformers' behaviour, none of this).",
    })
    checkpoint_overwrite: bool = field(default=False, metadata={  # checkpoint.overwrite
        "help": "Start from step 0 in an output_dir holding another run's checkpoints: they are replaced step by "
                "step as this run saves its own, never deleted wholesale; resume_from=auto never resumes them.",
    })
    checkpoint_allow_changes: list[str] = field(default_factory=list, metadata={  # checkpoint.allow_changes
        "help": "Dotted config keys (or whole sections) a resume may change, e.g. [training.learning_rate, "
                "training.max_steps]; the new values run. Any other changed field refuses the resume.",
    })
    checkpoint_verify: bool = field(default=True, metadata={  # checkpoint.verify
        "help": "Check a checkpoint against its manifest before resuming from it (each file's size and sha256, "
                "nothing read unlisted, torch files weights_only-loadable); false checks only that the manifest is "
                "valid.",
    })
    checkpoint_on_nonfinite: Literal["skip", "stop", "ignore"] = field(default='skip', metadata={  # checkpoint.on_nonfinite
        "help": "A non-finite loss or gradient: skip the step, or stop; 'ignore' takes every step as transformers "
                "does, logs such a loss as nan, and ends a run with non-finite weights as divergence.",
    })
    checkpoint_max_consecutive_nonfinite: int = field(default=5, metadata={  # checkpoint.max_consecutive_nonfinite
        "help": "Stop after this many consecutive non-finite steps.",
    })
    checkpoint_save_on_preemption: bool = field(default=True, metadata={  # checkpoint.save_on_preemption
        "help": "On SIGTERM/SIGUSR1 (exit 0) or Ctrl-C (exit 130) finish the step, save and stop.",
    })
    # ---- ema (ema_) ----
    ema_enabled: bool = field(default=False, metadata={  # ema.enabled
        "help": "Keep an EMA of the trainable weights.",
    })
    ema_decay: float = field(default=0.999, metadata={  # ema.decay
        "help": "EMA decay in (0, 1) (the cap when warmup is on).",
    })
    ema_warmup: bool = field(default=False, metadata={  # ema.warmup
        "help": "timm-style warmup: decay = 1 - (1 + step/gamma)^-power, capped by decay.",
    })
    ema_warmup_gamma: float = field(default=1.0, metadata={  # ema.warmup_gamma
        "help": "Warmup gamma.",
    })
    ema_warmup_power: float = field(default=0.75, metadata={  # ema.warmup_power
        "help": "Warmup power.",
    })
    ema_half_life_steps: Optional[float] = field(default=None, metadata={  # ema.half_life_steps
        "help": "Set decay from a half-life in optimizer steps instead.",
    })
    ema_update_every: int = field(default=1, metadata={  # ema.update_every
        "help": "Update every N optimizer steps.",
    })
    ema_start_step: int = field(default=0, metadata={  # ema.start_step
        "help": "First optimizer step that updates the EMA (copies weights before).",
    })
    ema_include_buffers: bool = field(default=False, metadata={  # ema.include_buffers
        "help": "Also average floating-point buffers.",
    })
    ema_offload_to_cpu: bool = field(default=False, metadata={  # ema.offload_to_cpu
        "help": "Keep shadows on CPU.",
    })
    ema_evaluate: bool = field(default=True, metadata={  # ema.evaluate
        "help": "Report EMA metrics beside the live ones at every evaluation.",
    })
    ema_use_for_final_model: bool = field(default=False, metadata={  # ema.use_for_final_model
        "help": "Make the EMA weights the final saved (and pushed) model.",
    })
    # END GENERATED FIELDS

    # transformers' field types list only its own names; these also take hf_optcore's registry names.
    optim: str = field(default="adamw_torch_fused", metadata={  # training.optimizer
        "help": "Optimizer: a transformers name or an hf_optcore registry name (`hf-optcore list-optimizers`).",
    })
    lr_scheduler_type: str = field(default="linear", metadata={  # training.scheduler
        "help": "Scheduler: a transformers name or an hf_optcore registry name (`hf-optcore list-schedulers`).",
    })

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base = next((b for b in cls.__mro__[1:] if issubclass(b, TrainingArguments)
                     and not issubclass(b, OptCoreArguments)), None)
        if base is not None:
            _BY_BASE.setdefault(base, cls)

    def __post_init__(self) -> None:
        problems = self._read_json_fields()
        # transformers checks optim / lr_scheduler_type against its own enums; a registry name is kept aside
        # while it checks the rest, then put back.
        own_optim = own_sched = None
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        from hf_optcore import optim

        if str(plain(self.optim)) not in {o.value for o in OptimizerNames}:
            own_optim, self.optim = str(plain(self.optim)), OptimizerNames.ADAMW_TORCH
        if str(plain(self.lr_scheduler_type)) not in {s.value for s in SchedulerType}:
            own_sched, self.lr_scheduler_type = str(plain(self.lr_scheduler_type)), SchedulerType.CONSTANT
        for name, flag, kind, valid in ((own_optim, "optim", "optimizer", optim.list_optimizers),
                                        (own_sched, "lr_scheduler_type", "scheduler", optim.list_schedulers)):
            if name is not None and name not in valid():
                problems.append(f"--{flag}: unknown {kind} {name!r}{did_you_mean(name, valid(), 0.5)}; "
                                f"registered: {', '.join(sorted(valid()))}")
        if problems:
            raise ConfigError(problems)
        super().__post_init__()  # type: ignore[misc]  # TrainingArguments (or TRL's config) checks its fields
        if own_optim is not None:
            self.optim = RegistryName(own_optim)
        if own_sched is not None:
            self.lr_scheduler_type = RegistryName(own_sched)
        self._check_extensions()

    def _read_json_fields(self) -> list[str]:
        """A dict field given as a JSON string (a command-line flag) becomes the dict; a bad one is a problem."""
        problems = []
        for link in extension_links():
            value = getattr(self, link.arg)
            if not _is_dict_type(link.type):
                continue
            if value is None:
                setattr(self, link.arg, {})
            elif isinstance(value, str):
                try:
                    parsed = json.loads(value) if value.strip() else {}
                except json.JSONDecodeError as exc:
                    problems.append(f"--{link.arg}: not valid JSON ({exc.msg} at character {exc.pos}), got {value!r}; "
                                    f"expected an object such as '{{\"lm_head\": 0.1}}'")
                    continue
                if not isinstance(parsed, dict):
                    problems.append(f"--{link.arg}: expected a JSON object, got {value!r}")
                    continue
                setattr(self, link.arg, parsed)
        return problems

    def _check_extensions(self) -> None:
        """Range and combination checks of the extension fields, naming each by its flag (values transformers
        accepted in its own fields are not judged again)."""
        problems: list[str] = []
        raw = arguments_to_raw(self)
        view = types.SimpleNamespace(output_dir=raw["output_dir"])
        for name, cls in SECTIONS.items():
            setattr(view, name, build_section(cls, raw.get(name, {}), name, problems))
        problems += collect_problems(view)
        flags = {link.path: link.arg for link in extension_links()}
        out = []
        for problem in problems:
            path, _, rest = problem.partition(":")
            if path in flags:
                out.append(f"--{flags[path]}:{rest} (config key {path})")
        if out:
            raise ConfigError(out)

    def __getstate__(self) -> dict:
        # training_args.bin (torch.save of these arguments) and any other pickle carry no token.
        state = dict(self.__dict__)
        for key in list(state):
            if key.endswith(SECRET_SUFFIX) and state[key] is not None:
                state[key] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __reduce__(self):
        # A class that arguments_class_for() composed at run time is no module attribute pickle could look up:
        # such an instance is pickled by its base class and rebuilt through arguments_class_for() on load.
        cls = type(self)
        key = (base_class_of(self), True) if cls.__dict__.get("_optcore_composed") else (cls, False)
        return (_rebuild_arguments, key, self.__getstate__())

    def __deepcopy__(self, memo: dict) -> OptCoreArguments:
        # A deep copy inside the process keeps the token (a push still needs it); only pickles drop it.
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __copy__(self) -> OptCoreArguments:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new


_BY_BASE: dict[type, type] = {}


def _rebuild_arguments(cls: type, composed: bool) -> OptCoreArguments:
    """Unpickling: an empty instance of ``cls`` (of ``arguments_class_for(cls)`` when it was composed at run time);
    its state is set next."""
    return object.__new__(arguments_class_for(cls) if composed else cls)


@dataclass
class OptCoreTrainingArguments(OptCoreArguments, TrainingArguments):
    """``transformers.TrainingArguments`` with hf_optcore's extension fields (see :class:`OptCoreArguments`).

    Constructed directly (or by ``HfArgumentParser``) it keeps transformers' defaults for transformers' fields;
    :meth:`TrainerConfig.to_training_arguments <hf_optcore.config.TrainerConfig.to_training_arguments>` fills in
    hf_optcore's defaults instead (learning rate 2e-4, cosine, ...). ``TrainerConfig.from_training_arguments(args)``
    is the nested view.
    """


def arguments_class_for(base: type) -> type:
    """The arguments class holding hf_optcore's fields over ``base`` (a ``TrainingArguments`` subclass).

    ``TrainingArguments`` -> :class:`OptCoreTrainingArguments`; TRL's ``SFTConfig`` -> ``OptCoreSFTConfig`` (once
    :mod:`hf_optcore.trl` is imported). A class that already holds them is returned as is; any other
    ``TrainingArguments`` subclass gets ``OptCore<Name>(OptCoreArguments, <Name>)``, made once and remembered.
    """
    if issubclass(base, OptCoreArguments):
        return base
    if not (isinstance(base, type) and issubclass(base, TrainingArguments)):
        raise TypeError(f"expected a TrainingArguments subclass, got {base!r}")
    if base not in _BY_BASE:
        # A class of the user's (or a library's) that hf_optcore has no class statement for: compose the two.
        _BY_BASE[base] = dataclasses.make_dataclass(f"OptCore{base.__name__}", [], bases=(OptCoreArguments, base),
                                                    namespace={"__module__": base.__module__, "_optcore_composed": True,
                                                               "__doc__": f"{base.__name__} with hf_optcore's fields."})
    return _BY_BASE[base]


def _is_base_default(cls: type, name: str, value: Any) -> bool:
    """Whether ``value`` (plain) is ``cls``'s default for ``name`` as it reads after ``__post_init__``.

    Never builds arguments to find out: each one initialises Accelerate's process-wide state (its device), which a
    launched multi-process run must not get from a stray instance.
    """
    f = hf_fields(cls)[name]
    raw = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if plain(raw) == value:
        return True
    if name == "accelerator_config" and raw is None:
        from transformers.trainer_pt_utils import AcceleratorConfig

        return value == plain(AcceleratorConfig())
    # transformers normalises these defaults: report_to "none" -> [], debug "" -> [], None -> False flags.
    return (raw in ("none", "") and value == []) or (raw is None and value is False)


def base_class_of(args: Any) -> type:
    """The ``TrainingArguments`` class ``args`` extends (``SFTConfig`` for an ``OptCoreSFTConfig``)."""
    cls = type(args)
    if not isinstance(args, OptCoreArguments):
        return cls
    return next(b for b in cls.__mro__[1:] if issubclass(b, TrainingArguments) and not issubclass(b, OptCoreArguments))


def arguments_to_raw(args: Any, extension_values: dict[str, Any] | None = None) -> dict:
    """The nested config dict of ``args`` (plain ``TrainingArguments``, a subclass, or hf_optcore's arguments).

    Linked fields are read from ``args``; extension fields from ``args`` when it holds them, else from
    ``extension_values`` (dotted path -> value), else their defaults; recipe fields are left out. Every other field
    of ``args``' class that differs from that class's default lands in ``training.extra_args`` (TRL's ``max_length``
    and ``packing`` included); ``hub_token`` never does.
    """
    ours = isinstance(args, OptCoreArguments)
    extension_values = extension_values or {}
    base = base_class_of(args)
    raw: dict[str, Any] = {"output_dir": args.output_dir}
    linked = set()
    for link in field_links():
        if link.path in SPECIAL or link.kind == "recipe":
            continue
        if link.kind == "hf" or (ours and link.path in ("training.optimizer", "training.scheduler")):
            linked.add(link.arg)
            value = plain(getattr(args, link.arg))
        elif ours:
            value = copy.deepcopy(getattr(args, link.arg))
        else:
            value = copy.deepcopy(extension_values.get(link.path, link.default))
        if link.path == "training.report_to" and value in ([], ["none"]):
            value = "none"
        if value is None and _is_dict_type(link.type):
            value = {}  # transformers' None for an empty kwargs dict
        _set(raw, link.path, value)
    strategy = plain(args.save_strategy)
    _set(raw, "checkpoint.every_n_steps", int(args.save_steps) if strategy == "steps" else 0)
    _set(raw, "model.gradient_checkpointing", bool(args.activation_checkpointing))
    ext_args = {link.arg for link in extension_links()}
    extra = {}
    for name in hf_fields(base):
        if name in linked or name in ext_args or name in NOT_COPIED or name.endswith(SECRET_SUFFIX) or name in CONVERTED:
            continue
        value = plain(getattr(args, name))
        if name == "remove_unused_columns":
            if not (ours and value is False):  # False is what TrainerConfig.to_training_arguments sets
                extra[name] = value
        elif name == "activation_checkpointing_kwargs" and value in (None, {"use_reentrant": False}):
            continue
        elif name == "do_eval" and value and plain(args.eval_strategy) != "no":
            continue  # transformers derives it from eval_strategy
        elif not _is_base_default(base, name, value):
            extra[name] = copy.deepcopy(value)
    if strategy not in ("steps", "no"):
        extra["save_strategy"] = strategy  # epoch / best: not expressible as checkpoint.every_n_steps
    _set(raw, "training.extra_args", extra)
    return raw


def _set(raw: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


# Names used in the generated field block's annotations.
_ANNOTATION_NAMES = (Literal, Optional, Union)

"""Layered, validated configuration for hf_optcore.

``TrainerConfig`` composes six section dataclasses (``model``, ``training``, ``hardware``,
``data``, ``checkpoint``, ``ema``) plus a top-level ``output_dir``. It is built from a dict, a
YAML file and dotted ``section.key=value`` overrides, and validated *before* any model or data
is touched: every problem is collected and raised at once in one :class:`ConfigError`, each
line naming the dotted path, the value given and what would be valid.

Fields that have a :class:`transformers.TrainingArguments` counterpart keep its exact name;
:meth:`TrainerConfig.to_training_arguments` maps them across.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "HardwareConfig",
    "LoRAConfig",
    "ModelConfig",
    "TrainerConfig",
    "TrainingConfig",
    "parse_overrides",
    "render_reference",
]


class ConfigError(ValueError):
    """All problems found in a configuration, one per line, each with its dotted path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the configuration:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:  # noqa: A002 - HF's word
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class LoRAConfig:
    """LoRA adapters through peft (``model.lora``)."""

    enabled: bool = _f(True, "Train LoRA adapters instead of all weights.")
    r: int = _f(16, "LoRA rank.")
    alpha: float = _f(32.0, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = _f(0.05, "Dropout on the LoRA input, in [0, 1).")
    target_modules: Union[str, list[str]] = _f(
        "auto",
        "'auto' (attention and MLP linears of the decoder stack, chosen per architecture), "
        "'all-linear', or an explicit list of module names.",
    )
    modules_to_save: list[str] = _f([], "Modules trained in full and saved beside the adapter (e.g. lm_head).")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha / sqrt(r).")
    bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases are trained.")
    load_in_4bit: bool = _f(False, "QLoRA: load the base model in 4-bit through bitsandbytes (needs CUDA).")


@dataclass
class ModelConfig:
    """What model and tokenizer to load, and how (``model``)."""

    name_or_path: str = _f(
        "bundled:smollm2-135m-instruct",
        "Hub id, local folder, GGUF file, 'bundled:smollm2-135m-instruct' (offline demo model) "
        "or 'tiny:<arch>' (a tiny model built from config, for tests and smoke runs).",
    )
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) to pin.")
    tokenizer_name_or_path: Optional[str] = _f(None, "Tokenizer source when it differs from the model.")
    gguf_file: Optional[str] = _f(None, "GGUF file name inside name_or_path (dequantized into trainable weights).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f("auto", "Weight dtype at load time.")
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = _f(
        "sdpa", "Attention kernel."
    )
    trust_remote_code: bool = _f(False, "Allow model code from the Hub to run.")
    cache_dir: Optional[str] = _f(None, "Where converted models (GGUF -> safetensors) are cached.")
    gradient_checkpointing: bool = _f(False, "Activation checkpointing (non-reentrant; works with LoRA).")
    chat_template: Optional[str] = _f(None, "Jinja chat template overriding the tokenizer's.")
    lora: LoRAConfig = _f(None, "LoRA settings.")

    def __post_init__(self):
        if self.lora is None:
            self.lora = LoRAConfig()


@dataclass
class TrainingConfig:
    """Optimisation and loop settings (``training``)."""

    learning_rate: float = _f(2e-4, "Peak learning rate.")
    per_device_train_batch_size: int = _f(8, "Examples per device per micro-batch (fixed-size batching).")
    per_device_eval_batch_size: int = _f(8, "Examples per device per evaluation batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    num_train_epochs: float = _f(1.0, "Epochs to train when max_steps <= 0.")
    max_steps: int = _f(-1, "Total optimizer steps; overrides num_train_epochs when > 0.")
    optimizer: str = _f("adamw", "Optimizer registry name (see `hf-optcore list-optimizers`).")
    optimizer_kwargs: dict = _f({}, "Extra keyword arguments for the optimizer.")
    scheduler: str = _f("cosine", "Learning-rate scheduler registry name.")
    scheduler_kwargs: dict = _f({}, "Extra keyword arguments for the scheduler.")
    warmup_steps: float = _f(0.0, "Warmup as steps (>= 1) or as a ratio of total steps (in [0, 1)).")
    weight_decay: float = _f(0.0, "Decoupled weight decay (not applied to biases, norms, embeddings).")
    no_decay_patterns: list[str] = _f(
        ["bias", "norm", "embed"], "Parameter-name substrings that get no weight decay."
    )
    lr_multipliers: dict = _f({}, "{name pattern: multiplier} per-module learning-rate multipliers.")
    lora_plus_ratio: Optional[float] = _f(None, "LoRA+: lora_B learning rate = ratio x learning_rate.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    label_smoothing_factor: float = _f(0.0, "Label smoothing in [0, 1).")
    seed: int = _f(42, "Seed for model init, dropout and data order.")
    data_seed: Optional[int] = _f(None, "Separate seed for the data order (defaults to seed).")
    logging_steps: float = _f(10, "Log every N optimizer steps.")
    eval_strategy: Literal["no", "steps", "epoch"] = _f("no", "When to evaluate during training.")
    eval_steps: Optional[float] = _f(None, "Optimizer steps between evaluations (eval_strategy=steps).")
    eval_on_start: bool = _f(False, "Evaluate once before the first step.")
    load_best_model_at_end: bool = _f(False, "Reload the best checkpoint when training ends.")
    metric_for_best_model: Optional[str] = _f(None, "Metric that ranks checkpoints (e.g. eval_loss, eval_ema_loss).")
    greater_is_better: Optional[bool] = _f(None, "Whether a larger metric is better (default: not for *loss*).")
    eval_metrics: list[str] = _f(
        [], "Extra `evaluate` metrics on next-token predictions, by name or local script path (names need network once)."
    )
    report_to: Union[str, list[str]] = _f("none", "Trackers: none, tensorboard, trackio, ...")
    run_name: Optional[str] = _f(None, "Name of the run in trackers and reports.")
    push_to_hub: bool = _f(False, "Push the final model to the Hub.")
    hub_model_id: Optional[str] = _f(None, "Hub repository id for push_to_hub.")


@dataclass
class HardwareConfig:
    """Devices, precision, kernels and dataloader workers (``hardware``)."""

    use_cpu: bool = _f(False, "Force CPU (also what makes multi-process CPU runs form a gloo group).")
    bf16: bool = _f(False, "bfloat16 mixed precision.")
    fp16: bool = _f(False, "float16 mixed precision with a gradient scaler (GPU only).")
    tf32: Optional[bool] = _f(None, "Allow TF32 matmuls on Ampere+ GPUs.")
    fused_optimizer: Literal["auto", "fused", "foreach", "for-loop"] = _f(
        "auto", "Optimizer kernel; auto: fused where the optimizer has one (GPU and CPU), else foreach."
    )
    torch_compile: bool = _f(False, "Compile the model with torch.compile.")
    torch_compile_mode: Optional[str] = _f(None, "torch.compile mode (default, reduce-overhead, max-autotune).")
    use_liger_kernel: bool = _f(False, "Use Liger kernels when installed.")
    dataloader_num_workers: int = _f(0, "Dataloader worker processes.")
    dataloader_pin_memory: bool = _f(True, "Pin host memory for faster host-to-device copies.")
    dataloader_persistent_workers: bool = _f(False, "Keep workers alive between epochs.")
    dataloader_prefetch_factor: Optional[int] = _f(None, "Batches prefetched per worker.")
    ddp_backend: Optional[str] = _f(None, "Process-group backend (nccl, gloo, ...); Accelerate picks when unset.")
    ddp_find_unused_parameters: Optional[bool] = _f(None, "DDP find_unused_parameters.")


@dataclass
class DataConfig:
    """Where the data comes from and how it is batched (``data``)."""

    train_path: Optional[str] = _f(None, "Training data: JSON/JSONL/CSV/Parquet/text file, or 'hub:<dataset id>'.")
    eval_path: Optional[str] = _f(None, "Evaluation data (same forms); else eval_split_ratio of train is held out.")
    format: Literal["auto", "text", "instruction", "chat"] = _f("auto", "Example format; auto detects from columns.")
    text_field: str = _f("text", "Column holding plain text (format=text).")
    instruction_field: str = _f("instruction", "Instruction column (format=instruction).")
    input_field: str = _f("input", "Optional input column (format=instruction).")
    response_field: str = _f("response", "Response column (format=instruction).")
    messages_field: str = _f("messages", "Messages column (format=chat).")
    completion_only_loss: bool = _f(True, "Mask prompt tokens (-100) so loss is on completions only.")
    max_seq_len: int = _f(1024, "Maximum tokens per example.")
    truncation: Literal["truncate", "drop"] = _f("truncate", "What to do with longer examples.")
    batching: Literal["random", "bucket", "token_budget", "multipack"] = _f("random", "Batching strategy.")
    max_tokens_per_batch: Optional[int] = _f(None, "Padded-token budget per batch (token_budget).")
    pad_to_multiple_of: Optional[int] = _f(None, "Pad batch lengths to a multiple of this (bounds compiled shapes).")
    padding_side: Literal["right", "left"] = _f("right", "Side on which batches are padded.")
    eval_split_ratio: float = _f(0.05, "Fraction of train held out for eval when eval_path is unset.")
    max_train_samples: Optional[int] = _f(None, "Use only the first N training examples.")
    max_eval_samples: Optional[int] = _f(None, "Use only the first N eval examples.")
    hub_config_name: Optional[str] = _f(None, "Configuration name of a 'hub:' dataset.")
    hub_train_split: str = _f("train", "Split of a 'hub:' train_path to train on.")
    hub_eval_split: Optional[str] = _f(None, "Split of a 'hub:' eval_path (default: hub_train_split's held-out part).")
    bucket_size_multiplier: int = _f(64, "bucket: batches per length-sorted mega-batch (more: less padding, less mixing).")


@dataclass
class CheckpointConfig:
    """Checkpoint cadence, retention, resume and fault handling (``checkpoint``)."""

    every_n_steps: int = _f(0, "Save a checkpoint every N optimizer steps (0: only at the end).")
    keep_last: int = _f(2, "Keep the newest K checkpoints (by step).")
    keep_best: int = _f(1, "Also keep the top-k checkpoints by metric_for_best_model.")
    keep_every_n_steps: Optional[int] = _f(None, "Milestones: never prune checkpoints at multiples of N.")
    resume_from: Optional[str] = _f(None, "'auto' (latest complete checkpoint, else a fresh start) or a path.")
    allow_topology_change: bool = _f(False, "Allow resuming with another world size / batch size / accumulation.")
    on_nonfinite: Literal["skip", "stop"] = _f("skip", "A non-finite loss or grad norm: skip the step or stop.")
    max_consecutive_nonfinite: int = _f(5, "Stop after this many consecutive non-finite steps.")
    save_on_preemption: bool = _f(True, "On SIGTERM/SIGUSR1 finish the step, save and exit 0.")


@dataclass
class EMAConfig:
    """Exponential moving average of the trainable weights (``ema``)."""

    enabled: bool = _f(False, "Keep an EMA of the trainable weights.")
    decay: float = _f(0.999, "EMA decay in (0, 1) (the cap when warmup is on).")
    warmup: bool = _f(False, "timm-style warmup: decay = 1 - (1 + step/gamma)^-power, capped by decay.")
    warmup_gamma: float = _f(1.0, "Warmup gamma.")
    warmup_power: float = _f(0.75, "Warmup power.")
    half_life_steps: Optional[float] = _f(None, "Set decay from a half-life in optimizer steps instead.")
    update_every: int = _f(1, "Update every N optimizer steps.")
    start_step: int = _f(0, "First optimizer step that updates the EMA (copies weights before).")
    include_buffers: bool = _f(False, "Also average floating-point buffers.")
    offload_to_cpu: bool = _f(False, "Keep shadows on CPU.")
    evaluate: bool = _f(True, "Report EMA metrics beside the live ones at every evaluation.")
    use_for_final_model: bool = _f(False, "Make the EMA weights the final saved (and pushed) model.")


_SECTIONS = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "hardware": HardwareConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "ema": EMAConfig,
}
_NESTED = {(ModelConfig, "lora"): LoRAConfig}


# --------------------------------------------------------------------------------------------
# Type checking and coercion of raw values (YAML, CLI)
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return ``(ok, value)`` with ``value`` converted to ``tp`` where that is lossless."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return (value in typing.get_args(tp)), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_tp,) = typing.get_args(tp) or (Any,)
        out = []
        for item in value:
            ok, v = _coerce(item, item_tp)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``raw``; append every problem found to ``problems``."""
    if raw is None:
        raw = {}
    if dataclasses.is_dataclass(raw):
        raw = _asdict(raw)
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping of keys to values, got {type(raw).__name__} {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(f"{where}: unknown key{_suggest(str(key), names)}; valid keys: {', '.join(names)}")
            continue
        nested = _NESTED.get((cls, key))
        if nested is not None:
            kwargs[key] = _build(nested, value, where, problems)
            continue
        ok, coerced = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{where}: expected {_type_name(hints[key])}, got {value!r}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def _asdict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _asdict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_asdict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _asdict(v) for k, v in obj.items()}
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["training.learning_rate=1e-4", "model.lora.r=8"]`` into a nested dict.

    Values are parsed as YAML scalars (``true``, ``8``, ``[q_proj, v_proj]``); a malformed item
    raises :class:`ConfigError` naming it.
    """
    out: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as exc:
            problems.append(f"override {key}: cannot parse value {text!r}: {exc}")
            continue
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {key}: {part} is both a value and a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return out


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------------------------
# TrainerConfig
# --------------------------------------------------------------------------------------------


@dataclass
class TrainerConfig:
    """The whole configuration: six sections plus ``output_dir``.

    Build it with :meth:`from_dict`, :meth:`from_yaml` or :meth:`from_sources` (YAML + dotted
    overrides); each validates and raises one :class:`ConfigError` listing every problem.
    """

    output_dir: str = _f("outputs/sft", "Where checkpoints, the final model, metrics and reports go.")
    model: ModelConfig = _f(None, "Model section.")
    training: TrainingConfig = _f(None, "Training section.")
    hardware: HardwareConfig = _f(None, "Hardware section.")
    data: DataConfig = _f(None, "Data section.")
    checkpoint: CheckpointConfig = _f(None, "Checkpoint section.")
    ema: EMAConfig = _f(None, "EMA section.")

    def __post_init__(self):
        for name, cls in _SECTIONS.items():
            if getattr(self, name) is None:
                setattr(self, name, cls())

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict | None, validate: bool = True) -> TrainerConfig:
        """Build from a nested dict (as loaded from YAML); unknown keys and bad values are errors."""
        problems: list[str] = []
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError([f"config: expected a mapping of sections, got {type(raw).__name__}"])
        raw = dict(raw or {})
        top = ["output_dir", *_SECTIONS]
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "output_dir":
                if not isinstance(value, str) or not value:
                    problems.append(f"output_dir: expected a non-empty string, got {value!r}")
                else:
                    kwargs["output_dir"] = value
            elif key in _SECTIONS:
                kwargs[key] = _build(_SECTIONS[key], value, key, problems)
            else:
                problems.append(f"{key}: unknown section{_suggest(str(key), top)}; valid: {', '.join(top)}")
        config = cls(**kwargs)
        if validate:
            from hf_optcore._validation import collect_problems

            # Range checks run on the fields that parsed, so one error lists every problem.
            problems += collect_problems(config)
        if problems:
            raise ConfigError(problems)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainerConfig:
        """Load a YAML file, apply dotted overrides, validate. Errors name the file."""
        return cls.from_sources(path, overrides or [])

    @classmethod
    def from_sources(
        cls, path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
    ) -> TrainerConfig:
        """``base`` dict, then the YAML file at ``path``, then ``overrides``; validated once."""
        raw = dict(base or {})
        if path is not None:
            raw = _deep_merge(raw, load_yaml(path))
        if overrides:
            raw = _deep_merge(raw, parse_overrides(overrides))
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """A plain nested dict; ``from_dict(to_dict())`` gives an equal config."""
        return _asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text of :meth:`to_dict`; written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        return text

    def fingerprint(self) -> str:
        """sha256 of the resolved config (recorded in checkpoint manifests)."""
        # The round trip coerces values to their declared types (10 -> 10.0 for a float field).
        canonical = TrainerConfig.from_dict(self.to_dict(), validate=False).to_dict()
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()

    # ---- validation ---------------------------------------------------------------------

    def validate(self, cuda_available: bool | None = None) -> TrainerConfig:
        """Check ranges and combinations; raise one :class:`ConfigError` with every problem."""
        from hf_optcore._validation import collect_problems

        problems = collect_problems(self, cuda_available=cuda_available)
        if problems:
            raise ConfigError(problems)
        return self

    # ---- TrainingArguments --------------------------------------------------------------

    def to_training_arguments(self, **extra: Any):
        """Map onto :class:`transformers.TrainingArguments` (same-named fields carry over).

        The optimizer and scheduler named here are built by hf_optcore's registries, so
        ``optim`` / ``lr_scheduler_type`` are left at values TrainingArguments accepts.
        """
        from transformers import TrainingArguments

        t, h, c = self.training, self.hardware, self.checkpoint
        kwargs: dict[str, Any] = {
            "output_dir": self.output_dir,
            "learning_rate": t.learning_rate,
            "per_device_train_batch_size": t.per_device_train_batch_size,
            "per_device_eval_batch_size": t.per_device_eval_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "num_train_epochs": t.num_train_epochs,
            "max_steps": t.max_steps,
            "warmup_steps": t.warmup_steps,
            "weight_decay": t.weight_decay,
            "adam_beta1": t.adam_beta1,
            "adam_beta2": t.adam_beta2,
            "adam_epsilon": t.adam_epsilon,
            "max_grad_norm": t.max_grad_norm,
            "label_smoothing_factor": t.label_smoothing_factor,
            "seed": t.seed,
            "data_seed": t.data_seed,
            "logging_steps": t.logging_steps,
            "eval_strategy": t.eval_strategy,
            "eval_steps": t.eval_steps,
            "eval_on_start": t.eval_on_start,
            "load_best_model_at_end": t.load_best_model_at_end,
            "metric_for_best_model": t.metric_for_best_model,
            "greater_is_better": t.greater_is_better,
            "report_to": t.report_to,
            "run_name": t.run_name,
            "push_to_hub": False,  # hf_optcore pushes itself (adapter / merged / EMA variants)
            "hub_model_id": t.hub_model_id,
            "use_cpu": h.use_cpu,
            "bf16": h.bf16,
            "fp16": h.fp16,
            "tf32": h.tf32,
            "torch_compile": h.torch_compile,
            "torch_compile_mode": h.torch_compile_mode,
            "use_liger_kernel": h.use_liger_kernel,
            "dataloader_num_workers": h.dataloader_num_workers,
            "dataloader_pin_memory": h.dataloader_pin_memory,
            "dataloader_persistent_workers": h.dataloader_persistent_workers,
            "dataloader_prefetch_factor": h.dataloader_prefetch_factor,
            "ddp_backend": h.ddp_backend,
            "ddp_find_unused_parameters": h.ddp_find_unused_parameters,
            "activation_checkpointing": self.model.gradient_checkpointing,
            "activation_checkpointing_kwargs": {"use_reentrant": False} if self.model.gradient_checkpointing else None,
            "save_strategy": "steps" if c.every_n_steps > 0 else "no",
            "save_steps": c.every_n_steps if c.every_n_steps > 0 else 500,
            # Columns are produced by DataManager; the model never sees the raw text.
            "remove_unused_columns": False,
            "optim": "adamw_torch",
            "lr_scheduler_type": "constant",
        }
        kwargs.update(extra)
        return TrainingArguments(**kwargs)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or malformed YAML is a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} not found"])
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"config file {str(p)!r}: malformed YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config file {str(p)!r}: expected a mapping of sections, got {type(raw).__name__}"])
    return raw


def render_reference() -> str:
    """Markdown table of every config key, its default and help (kept in the README by a test)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls: type, prefix: str):
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            nested = _NESTED.get((cls, f.name))
            if nested is not None:
                walk(nested, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(f"| `{key}` | `{json.dumps(default)}` | {f.metadata.get('help', '')} |")

    rows.append(f"| `output_dir` | `{json.dumps(TrainerConfig.output_dir)}` | "
                f"{TrainerConfig.__dataclass_fields__['output_dir'].metadata['help']} |")
    for name, cls in _SECTIONS.items():
        walk(cls, name + ".")
    return "\n".join(rows)


def _is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)

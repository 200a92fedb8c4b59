"""The six section dataclasses of :class:`~hf_optcore.config.TrainerConfig` (plus ``model.lora``).

Every field carries its help text (``metadata["help"]``, rendered into the README's config
reference). A field that is a :class:`transformers.TrainingArguments` field under another name
says so in ``metadata["hf"]`` (``training.optimizer`` is ``optim``); a field whose name *is* a
TrainingArguments field maps to it as is. Everything else becomes a flat extension field of
:class:`~hf_optcore.config.training_args.OptCoreTrainingArguments`. These definitions are the only
map between the nested YAML view and the arguments the Trainer holds.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "HardwareConfig",
    "LoRAConfig",
    "ModelConfig",
    "SECTIONS",
    "TrainingConfig",
    "tracked",
]


class ConfigError(ValueError):
    """All problems found in a configuration, one per line, each with its dotted path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the configuration:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


def _f(default: Any = dataclasses.MISSING, help: str = "", hf: str | None = None, recipe: bool = False,
       **kw) -> Any:  # noqa: A002
    """A config field with its help text.

    Args:
        default: the default (a list or dict is copied per instance).
        help: the help text (README config reference, ``--help`` of the arguments).
        hf: the ``TrainingArguments`` field holding it, when its name differs (``training.optimizer`` is ``optim``).
        recipe: True for a field only the recipe acts on (which model, which files, how to tokenize): it is not a
            Trainer argument, so an ``HfArgumentParser`` script never sees it and trackers never record it.
    """
    metadata = {"help": help, **({"hf": hf} if hf else {}), **({"recipe": True} if recipe else {})}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


class _Tracked:
    """Base of the config dataclasses: remembers which fields were set explicitly.

    A field counts as set when it was given to the constructor (``from_dict`` passes exactly the keys of the
    YAML, dict or overrides) or assigned afterwards (``cfg.training.learning_rate = 2e-4``), even to a value
    equal to its default. Merging a TrainerConfig with a user's ``TrainingArguments`` decides on this, never on
    equality with the default.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        explicit = self.__dict__.get("_explicit")
        if explicit is not None and not name.startswith("_"):
            explicit.add(name)

    def explicit_fields(self) -> frozenset[str]:
        """Names of the fields of this object set explicitly (see the class docstring)."""
        return frozenset(self.__dict__.get("_explicit") or ())


def tracked(cls: type) -> type:
    """Class decorator (after ``@dataclass``): record the fields the constructor was given as explicit."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_explicit", None)  # defaults and __post_init__ are not the user's doing
        init(self, *args, **kwargs)
        object.__setattr__(self, "_explicit", set(names[: len(args)]) | set(kwargs))

    cls.__init__ = __init__
    return cls


@tracked
@dataclass
class LoRAConfig(_Tracked):
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


@tracked
@dataclass
class ModelConfig(_Tracked):
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
    gradient_checkpointing: bool = _f(False, "Activation checkpointing (non-reentrant; works with LoRA).",
                                      hf="activation_checkpointing")
    chat_template: Optional[str] = _f(None, "Jinja chat template overriding the tokenizer's.")
    lora: LoRAConfig = _f(None, "LoRA settings.")

    def __post_init__(self):
        if self.lora is None:
            self.lora = LoRAConfig()


@tracked
@dataclass
class TrainingConfig(_Tracked):
    """Optimisation and loop settings (``training``)."""

    learning_rate: float = _f(2e-4, "Peak learning rate.")
    per_device_train_batch_size: int = _f(8, "Examples per device per micro-batch (fixed-size batching).")
    per_device_eval_batch_size: int = _f(8, "Examples per device per evaluation batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    num_train_epochs: float = _f(1.0, "Epochs to train when max_steps is negative (the default -1).")
    max_steps: int = _f(-1, "Total optimizer steps; overrides num_train_epochs when > 0 (-1: train the epochs; 0 "
                            "is refused).")
    optimizer: str = _f("adamw", "Optimizer registry name (see `hf-optcore list-optimizers`).", hf="optim")
    optimizer_kwargs: dict = _f({}, "Extra keyword arguments for the optimizer.")
    scheduler: str = _f("cosine", "Learning-rate scheduler registry name.", hf="lr_scheduler_type")
    scheduler_kwargs: dict = _f({}, "Extra keyword arguments for the scheduler.", hf="lr_scheduler_kwargs")
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
    chunked_loss: bool = _f(
        True, "Causal-LM loss and evaluation without whole-batch [tokens, vocabulary] logits: the head applied "
              "loss_chunk_size label tokens at a time, each chunk's gradient taken as soon as its logits exist; only "
              "where it equals the model's own loss (else the model's loss runs).")
    loss_chunk_size: int = _f(1024, "Label tokens per output-head call of the chunked loss.")
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
    trust_metric_code: bool = _f(
        False, "Allow a metric of training.eval_metrics that is a local script or folder, or a Hub metric outside the "
               "evaluate-metric organisation, to run: its code executes when it loads (as model.trust_remote_code).")
    report_to: Union[str, list[str]] = _f("none", "Trackers: none, tensorboard, trackio, ...")
    run_name: Optional[str] = _f(None, "Name of the run in trackers and reports.")
    push_to_hub: bool = _f(False, "Push the final model to the Hub.")
    hub_model_id: Optional[str] = _f(None, "Hub repository id for push_to_hub.")
    write_report: bool = _f(True, "Write report.png / report.md (loss, evaluations, throughput) into output_dir at "
                                  "the end of training.")
    push_variant: Literal["adapter", "merged", "ema"] = _f(
        "adapter", "What the recipe pushes: the LoRA adapter, the merged model, or the EMA weights.", recipe=True)
    extra_args: dict = _f(
        {}, "Any other transformers.TrainingArguments field by its own name (e.g. {save_only_model: true}); "
            "passed through to the Trainer's arguments.")


@tracked
@dataclass
class HardwareConfig(_Tracked):
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
    dataloader_multiprocessing_context: Optional[str] = _f(
        None, "How workers start: fork, spawn or forkserver (default: the platform's).")
    dataloader_in_order: bool = _f(True, "Deliver batches in order (False: whichever worker is ready first).")
    dataloader_drop_last: bool = _f(False, "Drop the incomplete last batch of every epoch (of every pass of a stream).")
    ddp_backend: Optional[str] = _f(None, "Process-group backend (nccl, gloo, ...); Accelerate picks when unset.")
    ddp_find_unused_parameters: Optional[bool] = _f(None, "DDP find_unused_parameters.")
    cpu_allocator: Literal["system", "jemalloc"] = _f(
        "system", "malloc of CPU tensors: system (the C library's) or jemalloc (less heap fragmentation: LoRA 0.75x "
                  "full fine-tuning's peak on 8x512-token steps, but 15% slower on short ones); the recipe re-starts "
                  "itself to preload it."
    )


@tracked
@dataclass
class DataConfig(_Tracked):
    """Where the data comes from and how it is batched (``data``)."""

    train_path: Optional[str] = _f(None, "Training data: JSON/JSONL/CSV/Parquet/text file, or 'hub:<dataset id>'.", recipe=True)
    eval_path: Optional[str] = _f(None, "Evaluation data (same forms); else eval_split_ratio of train is held out.", recipe=True)
    format: Literal["auto", "text", "instruction", "chat"] = _f("auto", "Example format; auto detects from columns.", recipe=True)
    text_field: str = _f("text", "Column holding plain text (format=text).", recipe=True)
    instruction_field: str = _f("instruction", "Instruction column (format=instruction).", recipe=True)
    input_field: str = _f("input", "Optional input column (format=instruction).", recipe=True)
    response_field: str = _f("response", "Response column (format=instruction).", recipe=True)
    messages_field: str = _f("messages", "Messages column (format=chat).", recipe=True)
    completion_only_loss: bool = _f(True, "Mask prompt tokens (-100) so loss is on completions only.", recipe=True)
    max_seq_len: int = _f(1024, "Maximum tokens per example.")
    truncation: Literal["truncate", "drop"] = _f("truncate", "What to do with longer examples.", recipe=True)
    batching: Literal["random", "bucket", "token_budget", "multipack", "hf"] = _f(
        "random", "Batching strategy; 'hf' leaves batching to transformers (TrainingArguments.train_sampling_strategy).")
    max_tokens_per_batch: Optional[int] = _f(None, "Padded-token budget per batch (token_budget).")
    pad_to_multiple_of: Optional[int] = _f(None, "Pad batch lengths to a multiple of this (bounds compiled shapes).")
    padding_side: Literal["right", "left"] = _f("right", "Side on which batches are padded.")
    eval_split_ratio: float = _f(0.05, "Fraction of train held out for eval when eval_path is unset.", recipe=True)
    max_train_samples: Optional[int] = _f(None, "Use only the first N training examples.", recipe=True)
    max_eval_samples: Optional[int] = _f(None, "Use only the first N eval examples.", recipe=True)
    hub_config_name: Optional[str] = _f(None, "Configuration name of a 'hub:' dataset.", recipe=True)
    hub_train_split: str = _f("train", "Split of a 'hub:' train_path to train on.", recipe=True)
    hub_eval_split: Optional[str] = _f(None, "Split of a 'hub:' eval_path (default: hub_train_split's held-out part).", recipe=True)
    bucket_size_multiplier: int = _f(64, "bucket: batches per length-sorted mega-batch (more: less padding, less mixing).")
    streaming: bool = _f(False, "Read train_path / eval_path lazily (JSONL/CSV/Parquet/text shards: a file, a directory "
                                "or a glob), tokenize on the fly, never hold the data: for data larger than memory. "
                                "Needs training.max_steps.")
    buffer_size: int = _f(1024, "Streamed data: examples in the look-ahead window batches are planned from (per "
                                "reader: rank x dataloader worker); random shuffles, bucket and token_budget group by "
                                "length, multipack packs within it. 0: the stream's own order (random only).")
    on_bad_row: Literal["error", "skip"] = _f(
        "error", "Streamed data: a row failing the data checks stops the run with an error naming file and line "
                 "(error), or is skipped and counted (skip; bad_rows_skipped in the logs).")


@tracked
@dataclass
class CheckpointConfig(_Tracked):
    """Checkpoint cadence, retention, resume and fault handling (``checkpoint``)."""

    every_n_steps: int = _f(0, "Save a checkpoint every N optimizer steps (0: none during training).", hf="save_steps")
    save_at_end: bool = _f(True, "With every_n_steps=0, still save one checkpoint at the last step.")
    keep_last: Optional[int] = _f(2, "Keep the newest K checkpoints (by step); null keeps all. Applied by hf_optcore "
                                     "after each checkpoint is complete.", hf="save_total_limit")
    keep_best: int = _f(1, "Also keep the top-k checkpoints by metric_for_best_model.")
    keep_every_n_steps: Optional[int] = _f(None, "Milestones: never prune checkpoints at multiples of N.")
    resume_from: Optional[str] = _f(None, "'auto' (latest intact checkpoint, else a fresh start) or the path of a "
                                          "checkpoint-N (a run's output directory is refused, naming its checkpoints).",
                                    hf="resume_from_checkpoint")
    allow_topology_change: bool = _f(
        False, "Allow resuming with another world size / per-device batch / accumulation that keeps the examples per "
               "optimizer step (the sampler re-cuts the interrupted epoch by examples consumed); another step size "
               "is refused.")
    own_output_dir: bool = _f(
        True, "The run owns output_dir: it records its identity (run.json), holds run.lock while it trains, and "
              "refuses a directory holding another run's checkpoints, a second concurrent run and a resume whose "
              "config differs (false: transformers' behaviour, none of this).")
    overwrite: bool = _f(
        False, "Start from step 0 in an output_dir holding another run's checkpoints: they are replaced step by step "
               "as this run saves its own, never deleted wholesale; resume_from=auto never resumes them.")
    allow_changes: list[str] = _f(
        [], "Dotted config keys (or whole sections) a resume may change, e.g. [training.learning_rate, "
            "training.max_steps]; the new values run. Any other changed field refuses the resume.")
    verify: bool = _f(True, "Check a checkpoint against its manifest before resuming from it (each file's size and "
                            "sha256, nothing read unlisted, torch files weights_only-loadable); false checks only "
                            "that the manifest is valid.")
    on_nonfinite: Literal["skip", "stop", "ignore"] = _f(
        "skip", "A non-finite loss or gradient: skip the step, or stop; 'ignore' takes every step as transformers "
                "does, logs such a loss as nan, and ends a run with non-finite weights as divergence.")
    max_consecutive_nonfinite: int = _f(5, "Stop after this many consecutive non-finite steps.")
    save_on_preemption: bool = _f(True, "On SIGTERM/SIGUSR1 (exit 0) or Ctrl-C (exit 130) finish the step, save "
                                        "and stop.")


@tracked
@dataclass
class EMAConfig(_Tracked):
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


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "hardware": HardwareConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "ema": EMAConfig,
}
"""YAML section name -> dataclass."""

NESTED: dict[tuple[type, str], type] = {(ModelConfig, "lora"): LoRAConfig}
"""(section, field) -> dataclass of a nested section."""

RECIPE_SECTIONS = frozenset({"model", "model.lora"})
"""Sections only the recipe acts on (which model, how it is loaded, its adapters): their fields are not Trainer
arguments, except those linked to a ``TrainingArguments`` field (``model.gradient_checkpointing``)."""

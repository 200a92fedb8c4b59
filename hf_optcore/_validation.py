"""Range and cross-field checks of a TrainerConfig (called by ``TrainerConfig.validate``).

Each check appends ``"<dotted.path>: <what is wrong>, got <value>; <what is valid>"`` so that
the user sees every problem of a config in one error, before anything heavy runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_optcore.config import TrainerConfig


def _registry_problem(path: str, name: str, valid: list[str], kind: str) -> str | None:
    from hf_optcore.optim.registry import unknown_name_message

    return None if name in valid else f"{path}: {unknown_name_message(kind, name, valid)}"


def collect_problems(cfg: TrainerConfig, cuda_available: bool | None = None) -> list[str]:
    """Every problem of ``cfg`` as a list of one-line messages (empty when valid)."""
    p: list[str] = []
    t, h, d, c, e, m = cfg.training, cfg.hardware, cfg.data, cfg.checkpoint, cfg.ema, cfg.model

    def need(cond: bool, msg: str):
        if not cond:
            p.append(msg)

    # ---- model ----
    need(bool(m.name_or_path), f"model.name_or_path: must name a model, got {m.name_or_path!r}")
    lora = m.lora
    if lora.enabled:
        need(lora.r >= 1, f"model.lora.r: must be >= 1, got {lora.r}")
        need(lora.alpha > 0, f"model.lora.alpha: must be > 0, got {lora.alpha}")
        need(0 <= lora.dropout < 1, f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
        if isinstance(lora.target_modules, str):
            need(
                lora.target_modules in ("auto", "all-linear"),
                f"model.lora.target_modules: expected 'auto', 'all-linear' or a list of module names, "
                f"got {lora.target_modules!r}",
            )
        else:
            need(len(lora.target_modules) > 0, "model.lora.target_modules: an explicit list must not be empty")
    need(not (lora.load_in_4bit and not lora.enabled),
         "model.lora.load_in_4bit: 4-bit loading (QLoRA) needs model.lora.enabled=true")

    # ---- training ----
    need(t.learning_rate > 0, f"training.learning_rate: must be > 0, got {t.learning_rate}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        val = getattr(t, key)
        need(val >= 1, f"training.{key}: must be >= 1, got {val}")
    need(t.max_steps != 0,
         f"training.max_steps: 0 would train no step; use a number of optimizer steps > 0, or -1 (the default) to "
         f"train training.num_train_epochs ({t.num_train_epochs:g})")
    need(t.max_steps > 0 or t.num_train_epochs > 0,
         f"training.max_steps / training.num_train_epochs: one must be > 0, got {t.max_steps} and {t.num_train_epochs}")
    need(t.warmup_steps >= 0, f"training.warmup_steps: must be >= 0 (steps) or in [0, 1) (ratio), got {t.warmup_steps}")
    need(t.warmup_steps < 1 or float(t.warmup_steps).is_integer(),
         f"training.warmup_steps: a value >= 1 counts steps and must be whole, got {t.warmup_steps}")
    need(t.weight_decay >= 0, f"training.weight_decay: must be >= 0, got {t.weight_decay}")
    need(0 <= t.adam_beta1 < 1, f"training.adam_beta1: must be in [0, 1), got {t.adam_beta1}")
    need(0 <= t.adam_beta2 < 1, f"training.adam_beta2: must be in [0, 1), got {t.adam_beta2}")
    need(t.adam_epsilon > 0, f"training.adam_epsilon: must be > 0, got {t.adam_epsilon}")
    need(t.max_grad_norm >= 0, f"training.max_grad_norm: must be >= 0 (0 disables), got {t.max_grad_norm}")
    need(0 <= t.label_smoothing_factor < 1,
         f"training.label_smoothing_factor: must be in [0, 1), got {t.label_smoothing_factor}")
    need(t.logging_steps > 0, f"training.logging_steps: must be > 0, got {t.logging_steps}")
    if t.lora_plus_ratio is not None:
        need(t.lora_plus_ratio > 0, f"training.lora_plus_ratio: must be > 0, got {t.lora_plus_ratio}")
        need(lora.enabled, "training.lora_plus_ratio: LoRA+ needs model.lora.enabled=true")
    for pat, mult in t.lr_multipliers.items():
        need(isinstance(mult, (int, float)) and not isinstance(mult, bool) and mult >= 0,
             f"training.lr_multipliers.{pat}: must be a number >= 0, got {mult!r}")
    if t.eval_strategy == "steps":
        need(t.eval_steps is not None and t.eval_steps > 0,
             f"training.eval_steps: must be > 0 when training.eval_strategy is 'steps', got {t.eval_steps}")
    if t.load_best_model_at_end:
        need(t.eval_strategy != "no",
             "training.load_best_model_at_end: needs evaluation, but training.eval_strategy is 'no'")
        need(c.every_n_steps > 0,
             "training.load_best_model_at_end: needs checkpoints, but checkpoint.every_n_steps is 0")
        if t.eval_strategy == "steps" and t.eval_steps and c.every_n_steps > 0:
            need(c.every_n_steps % int(t.eval_steps) == 0,
                 f"checkpoint.every_n_steps: must be a multiple of training.eval_steps ({int(t.eval_steps)}) "
                 f"so that every checkpoint has a metric for best-model tracking, got {c.every_n_steps}")
    if t.metric_for_best_model and t.metric_for_best_model.startswith("eval_ema_"):
        need(e.enabled and e.evaluate,
             f"training.metric_for_best_model: {t.metric_for_best_model!r} needs ema.enabled and ema.evaluate")
    if t.push_to_hub:
        need(bool(t.hub_model_id), "training.hub_model_id: required when training.push_to_hub is true")
    if t.push_variant == "ema":
        need(e.enabled, "training.push_variant: 'ema' pushes the EMA weights, which needs ema.enabled=true")
    for key in ("seed", "data_seed"):
        val = getattr(t, key)
        if val is not None:  # numpy's generator, which transformers seeds, takes 32-bit unsigned seeds only
            need(0 <= val < 2**32, f"training.{key}: must be in [0, 2**32 - 1], got {val}")
    p.extend(_extra_args_problems(t.extra_args, getattr(cfg, "arguments_base", None)))
    p.extend(_metric_code_problems(t.eval_metrics, t.trust_metric_code))
    for key in t.extra_args:
        need(not str(key).endswith("_token"),
             f"training.extra_args.{key}: a secret does not belong in a config (it would be written to config.yaml "
             f"and checkpoints); use the HF_TOKEN environment variable or `hf auth login`")

    try:
        from hf_optcore import optim

        msg = _registry_problem("training.optimizer", t.optimizer, optim.list_optimizers(), "optimizer")
        if msg:
            p.append(msg)
        else:
            info = optim.get_optimizer_info(t.optimizer)
            kernel_ok = {"fused": info.supports_fused, "foreach": info.supports_foreach}
            need(kernel_ok.get(h.fused_optimizer, True),
                 f"hardware.fused_optimizer: {h.fused_optimizer!r} is not supported by optimizer {t.optimizer!r}; "
                 f"use 'auto' or 'for-loop'")
        msg = _registry_problem("training.scheduler", t.scheduler, optim.list_schedulers(), "scheduler")
        if msg:
            p.append(msg)
    except ImportError as exc:  # pragma: no cover - broken install
        p.append(f"training.optimizer: the optimizer registry cannot be imported ({exc})")

    # ---- hardware ----
    probe_devices = cuda_available is None
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if h.bf16 and not h.use_cpu:
        # transformers.TrainingArguments refuses bf16 on a machine without a bf16 GPU (or XLA) unless use_cpu.
        bf16_device = cuda_available
        if probe_devices:
            from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

            bf16_device = is_torch_bf16_gpu_available() or is_torch_xla_available()
        need(bf16_device, "hardware.bf16: this machine has no GPU that runs bfloat16; set hardware.use_cpu=true to "
                          "train in bfloat16 on the CPU, or hardware.bf16=false")
    need(not (h.bf16 and h.fp16), "hardware.bf16 / hardware.fp16: choose one mixed-precision mode, got both true")
    if h.fp16:
        need(cuda_available and not h.use_cpu,
             "hardware.fp16: float16 mixed precision needs a CUDA GPU (use hardware.bf16 on CPU)")
    need(h.dataloader_num_workers >= 0,
         f"hardware.dataloader_num_workers: must be >= 0, got {h.dataloader_num_workers}")
    if h.dataloader_prefetch_factor is not None:
        need(h.dataloader_num_workers > 0,
             "hardware.dataloader_prefetch_factor: needs hardware.dataloader_num_workers > 0")
    if h.dataloader_persistent_workers:
        need(h.dataloader_num_workers > 0,
             "hardware.dataloader_persistent_workers: needs hardware.dataloader_num_workers > 0")
    if lora.load_in_4bit:
        need(cuda_available, "model.lora.load_in_4bit: QLoRA 4-bit loading needs CUDA and bitsandbytes")

    # ---- data ----
    need(d.max_seq_len >= 8, f"data.max_seq_len: must be >= 8, got {d.max_seq_len}")
    need(0 <= d.eval_split_ratio < 1, f"data.eval_split_ratio: must be in [0, 1), got {d.eval_split_ratio}")
    if d.batching == "token_budget":
        need(d.max_tokens_per_batch is not None,
             "data.max_tokens_per_batch: required when data.batching is 'token_budget'")
    if d.max_tokens_per_batch is not None:
        need(d.max_tokens_per_batch >= d.max_seq_len,
             f"data.max_tokens_per_batch: must be >= data.max_seq_len ({d.max_seq_len}) so every example fits, "
             f"got {d.max_tokens_per_batch}")
    if d.pad_to_multiple_of is not None:
        need(d.pad_to_multiple_of >= 1, f"data.pad_to_multiple_of: must be >= 1, got {d.pad_to_multiple_of}")
    for key in ("max_train_samples", "max_eval_samples"):
        val = getattr(d, key)
        if val is not None:
            need(val >= 1, f"data.{key}: must be >= 1, got {val}")
    need(d.bucket_size_multiplier >= 1, f"data.bucket_size_multiplier: must be >= 1, got {d.bucket_size_multiplier}")
    need(d.buffer_size >= 0, f"data.buffer_size: must be >= 0, got {d.buffer_size}")
    if d.streaming:
        need(t.max_steps > 0, f"data.streaming: a stream has no length, so training.max_steps must say how long to "
                              f"train (> 0), got {t.max_steps}")
        need(d.batching != "hf", "data.streaming: data.batching='hf' leaves batching to transformers, which cannot "
                                 "batch hf_optcore's streams; choose random, bucket, token_budget or multipack")
        need(d.buffer_size > 0 or d.batching == "random",
             f"data.buffer_size: 0 (no look-ahead) works only with data.batching='random', got {d.batching!r}")
    if d.batching == "multipack":
        need(m.attn_implementation in ("sdpa", "eager", "flex_attention", "flash_attention_2"),
             f"data.batching: 'multipack' needs an attention that isolates packed sequences (sdpa, eager, "
             f"flex_attention, flash_attention_2), got model.attn_implementation={m.attn_implementation!r}")

    # ---- checkpoint ----
    need(c.every_n_steps >= 0, f"checkpoint.every_n_steps: must be >= 0, got {c.every_n_steps}")
    if c.keep_last is not None:
        need(c.keep_last >= 1, f"checkpoint.keep_last: must be >= 1 or null (keep all), got {c.keep_last}")
    need(c.keep_best >= 0, f"checkpoint.keep_best: must be >= 0, got {c.keep_best}")
    if c.keep_every_n_steps is not None:
        need(c.keep_every_n_steps >= 1, f"checkpoint.keep_every_n_steps: must be >= 1, got {c.keep_every_n_steps}")
    need(c.max_consecutive_nonfinite >= 1,
         f"checkpoint.max_consecutive_nonfinite: must be >= 1, got {c.max_consecutive_nonfinite}")

    # ---- ema ----
    if e.enabled:
        need(0 < e.decay < 1, f"ema.decay: must be in (0, 1), got {e.decay}")
        need(e.update_every >= 1, f"ema.update_every: must be >= 1, got {e.update_every}")
        need(e.start_step >= 0, f"ema.start_step: must be >= 0, got {e.start_step}")
        need(e.warmup_gamma > 0, f"ema.warmup_gamma: must be > 0, got {e.warmup_gamma}")
        need(e.warmup_power > 0, f"ema.warmup_power: must be > 0, got {e.warmup_power}")
        if e.half_life_steps is not None:
            need(e.half_life_steps > 0, f"ema.half_life_steps: must be > 0, got {e.half_life_steps}")
            need(not e.warmup, "ema.half_life_steps: choose either a half-life or ema.warmup, got both")
    elif e.use_for_final_model:
        p.append("ema.use_for_final_model: needs ema.enabled=true")
    # A non-finite value passes every range check above (inf > 0) and then ruins the run: weights are
    # NaN after one step. Such a key is reported once, as non-finite, instead of also out of range.
    bad = nonfinite_values(cfg)
    huge = oversized_ints(cfg)
    keys = tuple(f"{key}:" for key, _ in bad + huge)
    return [f"{key}: must be a finite number, got {value}" for key, value in bad] + [
        f"{key}: {value} does not fit in 64 bits (the most is {INT64_MAX}); give a value the run can use"
        for key, value in huge] + [msg for msg in p if msg and not msg.startswith(keys)]


INT64_MAX = 2**63 - 1


def _extra_args_problems(extra_args: dict, base: type | None = None) -> list[str]:
    """``training.extra_args`` keys that are not fields of the arguments class (``transformers.TrainingArguments``,
    or the subclass a config was read from, e.g. TRL's ``SFTConfig``), with a did-you-mean."""
    if not extra_args:
        return []
    from transformers import TrainingArguments

    from hf_optcore.errors import did_you_mean

    cls = base or TrainingArguments
    names = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    where = "transformers.TrainingArguments" if cls is TrainingArguments else cls.__name__
    return [f"training.extra_args.{key}: not a {where} field{did_you_mean(key, names)}"
            for key in extra_args if key not in names]


def is_metric_code(spec: Any) -> bool:
    """Whether ``training.eval_metrics`` entry ``spec`` loads code other than evaluate's own metrics: a local script
    or folder, or a Hub metric of another owner (``owner/name``). A bare name is a metric of the ``evaluate-metric``
    organisation unless a file or folder of that name is here (``evaluate.load`` then runs the local one)."""
    import os

    if hasattr(spec, "compute"):  # a metric object the caller built: nothing is loaded
        return False
    name = str(spec)
    return name.endswith(".py") or "/" in name or os.sep in name or os.path.exists(name) \
        or os.path.exists(f"{name}.py")


def _metric_code_problems(metrics: list, trusted: bool) -> list[str]:
    if trusted:
        return []
    return [f"training.eval_metrics: {str(m)!r} is metric code that would run when it loads (a local script or "
            f"folder, or another owner's Hub metric); set training.trust_metric_code=true if you trust it"
            for m in metrics if is_metric_code(m)]


def oversized_ints(obj: Any, path: str = "") -> list[tuple[str, int]]:
    """``(dotted key, value)`` of every integer beyond 64 bits anywhere in ``obj`` (torch, numpy and the
    dataloader take none of them; Python's ints would otherwise carry them into a meaningless run)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        return [hit for i, v in enumerate(obj) for hit in oversized_ints(v, f"{path}[{i}]")]
    elif isinstance(obj, int) and not isinstance(obj, bool) and not -INT64_MAX - 1 <= obj <= INT64_MAX:
        return [(path, obj)]
    else:
        return []
    return [hit for k, v in items for hit in oversized_ints(v, f"{path}.{k}" if path else str(k))]


def nonfinite_values(obj: Any, path: str = "") -> list[tuple[str, float]]:
    """``(dotted key, value)`` of every inf or nan anywhere in ``obj`` (a config, section, dict or list)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        return [hit for i, v in enumerate(obj) for hit in nonfinite_values(v, f"{path}[{i}]")]
    elif isinstance(obj, float) and not math.isfinite(obj):
        return [(path, obj)]
    else:
        return []
    return [hit for k, v in items for hit in nonfinite_values(v, f"{path}.{k}" if path else str(k))]

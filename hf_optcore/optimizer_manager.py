"""``OptimizerManager``: builds the optimizer, scheduler and gradient scaler from a ``TrainingConfig``.

Used by ``OptCoreTrainer.create_optimizer`` / ``create_scheduler``, and alone in a hand-written loop::

    mgr = OptimizerManager(config.training, model, use_amp=True, hardware=config.hardware)
    optimizer = mgr.create_optimizer()
    scheduler = mgr.create_scheduler(num_steps)
    scaler = mgr.create_scaler()
    for batch in loader:
        with mgr.autocast():
            loss = model(**batch).loss
        mgr.step(loss)          # backward, unscale, clip, step, scheduler step, zero_grad

Which keyword arguments reach the optimizer is decided by the registry entry's capability flags
(``has_betas``, ``supports_fused``, ...), never by its name.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Optional, Union

import torch
from torch import nn

from hf_optcore.optim import (
    OptimizerInfo,
    build_param_groups,
    create_scheduler,
    format_param_groups,
    get_optimizer_info,
    get_scheduler_info,
    has_train_eval_modes,
    optimizer_eval_mode,
    resolve_warmup_steps,
    unwrap_optimizer,
)

logger = logging.getLogger(__name__)

__all__ = ["OptimizerManager"]

_KERNELS = ("auto", "fused", "foreach", "for-loop")
_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class OptimizerManager:
    """Optimizer, scheduler and mixed-precision scaler for one model.

    Args:
        training: the ``training`` section (optimizer, scheduler, learning rate, decay rules, ...).
        model: the model whose trainable parameters are optimized.
        use_amp: run the standalone loop in mixed precision (``autocast()``, and a gradient scaler for
            float16). The Trainer leaves mixed precision to Accelerate and ignores this.
        hardware: the ``hardware`` section: ``fused_optimizer`` kernel choice and ``bf16`` / ``fp16``
            (default: ``auto`` kernel, and with ``use_amp`` bfloat16 unless CUDA lacks it).
        amp_dtype: force the autocast dtype (``"bf16"`` / ``"fp16"`` or a torch dtype).

    Raises:
        ValueError: float16 mixed precision requested on a model that is not on CUDA.
    """

    def __init__(
        self,
        training: Any,
        model: nn.Module,
        use_amp: bool = False,
        hardware: Any = None,
        amp_dtype: Union[str, torch.dtype, None] = None,
    ):
        self.training = training
        self.model = model
        self.hardware = hardware
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.amp_dtype = self._resolve_amp_dtype(use_amp, amp_dtype)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Any = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        self.param_groups: list = []
        self._micro_steps = 0

    # ---- construction -------------------------------------------------------------------

    def _resolve_amp_dtype(self, use_amp: bool, amp_dtype) -> Optional[torch.dtype]:
        if isinstance(amp_dtype, str):
            if amp_dtype not in _DTYPES:
                raise ValueError(f"amp_dtype: must be one of {', '.join(_DTYPES)} or a torch dtype, got {amp_dtype!r}")
            amp_dtype = _DTYPES[amp_dtype]
        hw = self.hardware
        if amp_dtype is None and hw is not None and (hw.fp16 or hw.bf16):
            amp_dtype = torch.float16 if hw.fp16 else torch.bfloat16
        if amp_dtype is None and use_amp:
            cuda = self.device.type == "cuda"
            amp_dtype = torch.float16 if cuda and not torch.cuda.is_bf16_supported() else torch.bfloat16
        if amp_dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError(f"hardware.fp16: float16 mixed precision needs a CUDA GPU, but the model is on "
                             f"{self.device.type}; use hardware.bf16 instead")
        return amp_dtype

    @property
    def optimizer_info(self) -> OptimizerInfo:
        """The registry entry of ``training.optimizer``."""
        return get_optimizer_info(self.training.optimizer)

    def resolve_param_groups(self) -> list:
        """The :class:`~hf_optcore.optim.ParamGroup` list for the model (decay rules, multipliers, LoRA+)."""
        t = self.training
        return build_param_groups(
            self.model,
            lr=t.learning_rate,
            weight_decay=t.weight_decay,
            no_decay_patterns=t.no_decay_patterns,
            lr_multipliers=t.lr_multipliers,
            lora_plus_ratio=t.lora_plus_ratio,
        )

    def _kernel_kwargs(self, info: OptimizerInfo) -> dict:
        mode = getattr(self.hardware, "fused_optimizer", "auto") if self.hardware is not None else "auto"
        if mode not in _KERNELS:
            raise ValueError(f"hardware.fused_optimizer: must be one of {', '.join(_KERNELS)}, got {mode!r}")
        if mode == "auto":
            # Fused on CPU too: AdamW's fused CPU kernel is ~5x its foreach one (benchmarks/bench_optimizers.py).
            if info.supports_fused and self.device.type in ("cuda", "cpu"):
                return {"fused": True}
            return {"foreach": True} if info.supports_foreach else {}
        if mode == "fused":
            if not info.supports_fused:
                raise ValueError(f"hardware.fused_optimizer: 'fused' is not supported by optimizer "
                                 f"{info.name!r}; use 'auto', 'foreach' or 'for-loop'")
            return {"fused": True}
        if mode == "foreach":
            if not info.supports_foreach:
                raise ValueError(f"hardware.fused_optimizer: 'foreach' is not supported by optimizer "
                                 f"{info.name!r}; use 'auto' or 'for-loop'")
            return {"foreach": True}
        out = {}
        if info.supports_foreach:
            out["foreach"] = False
        if info.supports_fused:
            out["fused"] = False
        return out

    def optimizer_kwargs(self, info: Optional[OptimizerInfo] = None) -> dict:
        """Keyword arguments for the optimizer: entry defaults < config < ``training.optimizer_kwargs``."""
        info = info or self.optimizer_info
        t = self.training
        kwargs = dict(info.defaults)
        kwargs["lr"] = t.learning_rate
        if info.has_weight_decay:
            kwargs["weight_decay"] = t.weight_decay
        if info.has_betas:
            kwargs["betas"] = (t.adam_beta1, t.adam_beta2)
        if info.has_eps:
            kwargs["eps"] = t.adam_epsilon
        kwargs.update(self._kernel_kwargs(info))
        if info.schedule_free and t.warmup_steps >= 1:
            kwargs["warmup_steps"] = int(t.warmup_steps)
        if info.needs_model:
            kwargs["model"] = self.model
        user = dict(t.optimizer_kwargs)
        if isinstance(user.get("betas"), list):  # YAML has no tuples
            user["betas"] = tuple(user["betas"])
        kwargs.update(user)
        return kwargs

    def create_optimizer(self) -> torch.optim.Optimizer:
        """Build ``training.optimizer`` over the resolved parameter groups (logged once).

        Schedule-free optimizers are returned in train mode.

        Raises:
            UnknownNameError: ``training.optimizer`` is not registered.
            OptimizerUnavailableError: its package is not installed (the message names it).
            ValueError: no trainable parameters, or a kernel the optimizer does not support.
        """
        info = self.optimizer_info
        info.require()
        self.param_groups = self.resolve_param_groups()
        if not self.param_groups:
            raise ValueError("training.optimizer: the model has no trainable parameters (all requires_grad=False)")
        groups = [g.to_optimizer_group(with_names=info.needs_param_names) for g in self.param_groups]
        if not info.has_weight_decay:
            for g in groups:
                g.pop("weight_decay")
        kwargs = self.optimizer_kwargs(info)
        logger.info("optimizer %s: %s", info.name, format_param_groups(self.param_groups))
        self.optimizer = info.factory(groups, **kwargs)
        if has_train_eval_modes(self.optimizer):
            self.optimizer.train()
        return self.optimizer

    def create_scheduler(self, num_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        """Build ``training.scheduler`` for ``num_steps`` optimizer steps, warmup from ``training.warmup_steps``.

        A schedule-free optimizer runs its own warmup and gets a constant schedule (a warning says so
        when another scheduler was configured).
        """
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            raise RuntimeError("OptimizerManager.create_scheduler: call create_optimizer() first or pass optimizer=")
        if num_steps <= 0:
            raise ValueError(f"OptimizerManager.create_scheduler: num_steps must be > 0, got {num_steps}")
        t = self.training
        if has_train_eval_modes(optimizer):
            warmup = resolve_warmup_steps(t.warmup_steps, num_steps)
            for group in unwrap_optimizer(optimizer).param_groups:
                if "warmup_steps" in group:
                    group["warmup_steps"] = warmup
            if t.scheduler not in ("constant", "constant_with_warmup"):
                logger.warning("training.scheduler %r is ignored: schedule-free optimizer %r runs a constant "
                               "learning rate with its own %d warmup steps", t.scheduler, t.optimizer, warmup)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
        else:
            self.scheduler = create_scheduler(t.scheduler, optimizer, num_steps, warmup=t.warmup_steps,
                                              **t.scheduler_kwargs)
        return self.scheduler

    def create_scaler(self) -> torch.amp.GradScaler:
        """A ``torch.amp.GradScaler``: enabled only for float16 on CUDA, else a disabled one (its ``scale``
        returns the loss unchanged, ``step`` just steps, ``state_dict`` is ``{}``), so callers and
        checkpoints treat every precision alike."""
        enabled = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda" if enabled else "cpu", enabled=enabled)
        return self.scaler

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for forward passes (a no-op without mixed precision)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def eval_mode(self) -> contextlib.AbstractContextManager:
        """Parameters at the schedule-free evaluation point inside the block (no-op for other optimizers)."""
        return optimizer_eval_mode(self.optimizer)

    # ---- the standalone step ------------------------------------------------------------

    def step(self, loss: torch.Tensor) -> dict:
        """Backward ``loss``; every ``gradient_accumulation_steps`` calls also unscale, clip to
        ``max_grad_norm``, step the optimizer, step the scheduler and zero the gradients.

        The loss is divided by ``gradient_accumulation_steps``. An optimizer step is skipped (and the
        scheduler not stepped) when the gradient norm is not finite or the float16 scaler finds inf/NaN.
        Metric-driven schedulers (``reduce_lr_on_plateau``) are left to the caller.

        Returns:
            ``{"stepped": bool, "skipped": bool, "grad_norm": float | None, "lr": float}``.
        """
        optimizer = self.optimizer
        if optimizer is None:
            raise RuntimeError("OptimizerManager.step: call create_optimizer() first")
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        accum = self.training.gradient_accumulation_steps
        scaled = loss / accum if accum > 1 else loss
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        self._micro_steps += 1
        if self._micro_steps % accum:
            return {"stepped": False, "skipped": False, "grad_norm": None, "lr": self.last_lr()}
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = None
        if self.training.max_grad_norm > 0:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.training.max_grad_norm))
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped = scaler.get_scale() < before
        elif grad_norm is not None and not math.isfinite(grad_norm):
            skipped = True
        else:
            optimizer.step()
            skipped = False
        if not skipped and self.scheduler is not None and not self._metric_driven():
            self.scheduler.step()
        self.zero_grad()
        return {"stepped": not skipped, "skipped": skipped, "grad_norm": grad_norm, "lr": self.last_lr()}

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def last_lr(self) -> float:
        """The learning rate of the first parameter group now."""
        if self.optimizer is None:
            return float(self.training.learning_rate)
        lr = self.optimizer.param_groups[0]["lr"]
        return float(lr.item() if torch.is_tensor(lr) else lr)

    def _metric_driven(self) -> bool:
        try:
            return get_scheduler_info(self.training.scheduler).metric_driven and not has_train_eval_modes(
                self.optimizer)
        except KeyError:
            return False

    def describe_param_groups(self) -> list[dict]:
        """``names``, ``num_tensors``, ``num_params``, ``lr``, ``weight_decay`` of every group."""
        return [g.summary() for g in (self.param_groups or self.resolve_param_groups())]

    def state_dict(self) -> dict:
        """The manager's own counter (optimizer, scheduler and scaler are checkpointed as themselves)."""
        return {"micro_steps": self._micro_steps}

    def load_state_dict(self, state: dict) -> None:
        self._micro_steps = int(state.get("micro_steps", 0))


def _constant(_step: int) -> float:
    return 1.0

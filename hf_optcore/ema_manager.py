"""Exponential moving average of a model's trainable weights, in pure torch.

``EMAManager`` keeps fp32 shadow copies of the parameters that train (a LoRA model: its
adapters only), updates them with one fused ``torch._foreach_lerp_`` per (device, dtype)
group, swaps them into the model for evaluation or export and back bit-exactly, and saves
and restores its full state (shadows and step count) so that a resumed run's EMA equals an
uninterrupted one's. It imports nothing from transformers: any training loop can use it.

Usage::

    ema = EMAManager(config.ema, model)
    for step, batch in enumerate(loader, start=1):
        ...; optimizer.step()
        ema.update(step)
    with ema.applied():
        evaluate(model)
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hf_optcore.wrapping import unwrap_model

__all__ = ["EMAManager"]

_STATE_VERSION = 1


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 / TP): each rank averages only what it holds."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    # Averaging in half precision loses the small (1 - decay) increments entirely.
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class EMAManager:
    """Shadow weights updated as ``ema = decay * ema + (1 - decay) * weight``.

    Args:
        config: an :class:`~hf_optcore.config.EMAConfig` (or any object with its fields:
            ``decay``, ``warmup``, ``warmup_gamma``, ``warmup_power``, ``half_life_steps``,
            ``update_every``, ``start_step``, ``include_buffers``, ``offload_to_cpu``).
        model: the model being trained; DDP / ``DataParallel`` / ``torch.compile`` wrappers are
            unwrapped. Only parameters with ``requires_grad`` are tracked (LoRA: the adapters).
            FSDP-sharded (DTensor) parameters are tracked by their local shard.
        device: where shadows live; default the parameter's device, or CPU with
            ``config.offload_to_cpu``.

    Raises:
        ValueError: ``decay`` outside (0, 1), ``update_every`` < 1, ``start_step`` < 0, or a
            model with no trainable parameter.
    """

    def __init__(self, config: Any, model: nn.Module, device: torch.device | str | None = None):
        self.decay = float(config.decay)
        self.warmup = bool(getattr(config, "warmup", False))
        self.warmup_gamma = float(getattr(config, "warmup_gamma", 1.0))
        self.warmup_power = float(getattr(config, "warmup_power", 0.75))
        self.half_life_steps = getattr(config, "half_life_steps", None)
        self.update_every = int(getattr(config, "update_every", 1))
        self.start_step = int(getattr(config, "start_step", 0))
        self.include_buffers = bool(getattr(config, "include_buffers", False))
        if device is None and getattr(config, "offload_to_cpu", False):
            device = "cpu"
        self.device = torch.device(device) if device is not None else None
        self._check_config()

        self.model = unwrap_model(model)
        self._params: dict[str, torch.Tensor] = {
            name: p for name, p in self.model.named_parameters() if p.requires_grad
        }
        if not self._params:
            raise ValueError(
                f"ema.enabled: {type(self.model).__name__} has no trainable parameter (none has requires_grad=True), "
                "so there is nothing to average; unfreeze weights or add LoRA adapters, or set ema.enabled=false"
            )
        if self.include_buffers:
            self._params.update(
                {f"buffer:{name}": b for name, b in self.model.named_buffers() if b is not None and b.is_floating_point()}
            )
        self.shadow: dict[str, torch.Tensor] = {}
        for name, p in self._params.items():
            src = _local(p.detach())
            self.shadow[name] = src.to(device=self.device or src.device, dtype=_shadow_dtype(src.dtype), copy=True)
        self.step = 0  # last optimizer step seen by update()
        self.num_updates = 0  # averaging updates done (copies before start_step not counted)
        self._backup: dict[str, torch.Tensor] | None = None
        self._groups = self._build_groups()

    # ---- configuration ------------------------------------------------------------------

    def _check_config(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {self.decay}")
        if self.update_every < 1:
            raise ValueError(f"ema.update_every must be >= 1, got {self.update_every}")
        if self.start_step < 0:
            raise ValueError(f"ema.start_step must be >= 0, got {self.start_step}")
        if self.half_life_steps is not None and not self.half_life_steps > 0:
            raise ValueError(f"ema.half_life_steps must be > 0, got {self.half_life_steps}")
        if self.warmup and not (self.warmup_gamma > 0 and self.warmup_power > 0):
            raise ValueError(
                f"ema.warmup_gamma and ema.warmup_power must be > 0, got {self.warmup_gamma} and {self.warmup_power}"
            )

    def _build_groups(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor], bool, bool]]:
        """Tensors grouped by (shadow device/dtype, weight device/dtype): one foreach kernel each.

        The lists are built once: per-update Python work over hundreds of LoRA tensors would
        otherwise cost as much as the averaging itself. Parameters (not ``.detach()`` views) are
        kept, so a later ``model.to()`` that swaps ``param.data`` is still seen.
        """
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name, p in self._params.items():
            s, w = self.shadow[name], _local(p.detach())
            groups[(s.device, s.dtype, w.device, w.dtype)].append(name)
        out = []
        for key, names in groups.items():
            sharded = any(callable(getattr(self._params[n], "to_local", None)) for n in names)
            out.append(([self.shadow[n] for n in names], [self._params[n] for n in names],
                        key[0] == key[2] and key[1] == key[3], sharded))
        return out

    def get_decay(self, step: int | None = None) -> float:
        """Decay applied by an update at optimizer ``step`` (default: the next step).

        Fixed ``decay``; with ``half_life_steps`` h, ``0.5 ** (update_every / h)`` so that a
        weight's influence halves every h optimizer steps; with ``warmup``,
        ``1 - (1 + t / gamma) ** -power`` capped by ``decay``, ``t`` counting steps from
        ``start_step`` (0 at the first update, which therefore copies the weights).
        """
        step = self.step + 1 if step is None else step
        if self.half_life_steps is not None:
            return 0.5 ** (self.update_every / float(self.half_life_steps))
        if self.warmup:
            t = max(0, step - self.start_step)
            return max(0.0, min(self.decay, 1.0 - (1.0 + t / self.warmup_gamma) ** -self.warmup_power))
        return self.decay

    # ---- update -------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, step: int | None = None) -> bool:
        """Fold the current weights into the shadows after optimizer step ``step``.

        Call once per optimizer step (not per micro-batch). ``step`` defaults to one more
        than the last call's. Before ``start_step`` the weights are copied; from it on, every
        ``update_every``-th step averages.

        Returns:
            True when the shadows changed (a copy or an averaging update).
        """
        step = self.step + 1 if step is None else int(step)
        self.step = step
        if step < self.start_step:
            self._copy_from_model()
            return True
        if (step - self.start_step) % self.update_every != 0:
            return False
        weight = 1.0 - self.get_decay(step)
        for shadows, weights, same_kind, sharded in self._groups:
            if sharded:
                weights = [_local(w.detach()) for w in weights]
            if not same_kind:
                s0 = shadows[0]
                weights = [w.to(device=s0.device, dtype=s0.dtype, non_blocking=True) for w in weights]
            torch._foreach_lerp_(shadows, weights, weight)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def _copy_from_model(self) -> None:
        for name, p in self._params.items():
            self.shadow[name].copy_(_local(p.detach()))

    # ---- swapping -----------------------------------------------------------------------

    @torch.no_grad()
    def apply(self) -> None:
        """Put the EMA weights into the model, keeping the training weights for :meth:`restore`."""
        if self._backup is not None:
            raise RuntimeError("EMAManager.apply: EMA weights are already applied; call restore() first")
        backup = {}
        for name, p in self._params.items():
            local = _local(p.detach())
            backup[name] = local.clone()
            local.copy_(self.shadow[name])
        self._backup = backup

    @torch.no_grad()
    def restore(self) -> None:
        """Put the training weights back exactly as they were before :meth:`apply`."""
        if self._backup is None:
            raise RuntimeError("EMAManager.restore: nothing to restore; apply() was not called")
        for name, p in self._params.items():
            _local(p.detach()).copy_(self._backup[name])
        self._backup = None

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """``with ema.applied():`` the model holds the EMA weights; the training ones come back after."""
        self.apply()
        try:
            yield self.model
        finally:
            self.restore()

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Write the EMA weights into the model for good (the training weights are dropped)."""
        if self._backup is not None:
            self._backup = None  # already applied: keep the EMA weights in place
            return
        for name, p in self._params.items():
            _local(p.detach()).copy_(self.shadow[name])

    def tracked_names(self) -> list[str]:
        """Names of the tracked tensors (buffers prefixed ``buffer:``)."""
        return list(self._params)

    def num_tracked_elements(self) -> int:
        """Number of elements held in shadows (on this rank)."""
        return sum(s.numel() for s in self.shadow.values())

    # ---- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Shadows (the live tensors, not copies: save or clone them), step and update counts."""
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "num_updates": self.num_updates,
            "decay": self.decay,
            "shadow": dict(self.shadow),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore shadows and counts saved by :meth:`state_dict` (same tracked tensors)."""
        shadow = state.get("shadow")
        if not isinstance(shadow, dict):
            raise ValueError("EMAManager.load_state_dict: expected a dict with a 'shadow' mapping")
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                "EMAManager.load_state_dict: tracked tensors differ from the saved EMA "
                f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); "
                "was the model or its LoRA targets changed?"
            )
        for name, value in shadow.items():
            dst = self.shadow[name]
            if tuple(value.shape) != tuple(dst.shape):
                raise ValueError(
                    f"EMAManager.load_state_dict: {name} has shape {tuple(value.shape)} in the saved EMA, "
                    f"{tuple(dst.shape)} in the model"
                )
            dst.copy_(value)
        self.step = int(state.get("step", 0))
        self.num_updates = int(state.get("num_updates", 0))

    def __repr__(self) -> str:
        hl = f", half_life_steps={self.half_life_steps}" if self.half_life_steps is not None else ""
        return (
            f"EMAManager(decay={self.decay}{hl}, warmup={self.warmup}, update_every={self.update_every}, "
            f"start_step={self.start_step}, tensors={len(self.shadow)}, elements={self.num_tracked_elements():,}, "
            f"step={self.step}, num_updates={self.num_updates})"
        )

"""The learning-rate scheduler registry: every transformers ``SchedulerType`` plus native schedules.

Same shape as the optimizer registry: a :class:`SchedulerInfo` per name, :func:`register_scheduler`
(call or decorator), :func:`list_schedulers`, :func:`get_scheduler_info`, and
:func:`create_scheduler`. A factory is called as
``factory(optimizer, num_warmup_steps=..., num_training_steps=..., **scheduler_kwargs)``.

Native schedules (pure torch ``LambdaLR``; ``w`` warmup steps, ``T`` total steps, ``s`` the step):

- ``cosine_min_lr``: linear warmup, then ``r + (1 - r) * 0.5 * (1 + cos(pi * (s - w) / (T - w)))``
  with ``r = min_lr_ratio`` (default 0.1).
- ``wsd`` (warmup-stable-decay): linear warmup, constant 1 until the last ``D`` steps
  (``D = num_decay_steps`` or ``round(decay_ratio * T)``, default ratio 0.1), then decay to
  ``min_lr_ratio`` along ``decay_type`` = ``linear`` | ``cosine`` | ``1-sqrt``.

Names of transformers' ``SchedulerType`` are delegated to ``transformers.get_scheduler`` (imported
only when one is built); the static list is checked against the installed enum by a test.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch.optim.lr_scheduler import LambdaLR

from hf_optcore.optim.registry import UnknownNameError, register_entry, unknown_name_message

__all__ = [
    "HF_SCHEDULER_NAMES",
    "SchedulerInfo",
    "create_scheduler",
    "get_scheduler_info",
    "list_schedulers",
    "register_scheduler",
    "resolve_warmup_steps",
]

HF_SCHEDULER_NAMES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy",
)
# Schedulers stepped with a metric (scheduler.step(metric)), not once per optimizer step.
_METRIC_DRIVEN = ("reduce_lr_on_plateau", "greedy")


@dataclass(frozen=True)
class SchedulerInfo:
    """What the registry knows about one scheduler.

    Args:
        name: registry name (``training.scheduler``).
        factory: ``(optimizer, *, num_warmup_steps, num_training_steps, **kwargs) -> LRScheduler``.
        description: one line for listings.
        uses_warmup: honours ``training.warmup_steps``.
        metric_driven: stepped with a metric by the caller, not once per optimizer step.
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""
    uses_warmup: bool = True
    metric_driven: bool = False


_SCHEDULERS: dict[str, SchedulerInfo] = {}


def register_scheduler(name: Union[str, SchedulerInfo], factory: Optional[Callable[..., Any]] = None, **info: Any):
    """Register a scheduler (call or decorator form, like :func:`~hf_optcore.optim.register_optimizer`)."""
    return register_entry(SchedulerInfo, _store, name, factory, info)


def _store(entry: SchedulerInfo) -> SchedulerInfo:
    key = entry.name.lower()
    if key in _SCHEDULERS:
        warnings.warn(f"scheduler {key!r} is already registered; replacing it", stacklevel=3)
    _SCHEDULERS[key] = dataclasses.replace(entry, name=key)
    return _SCHEDULERS[key]


def list_schedulers(filter: Optional[str] = None) -> list[str]:  # noqa: A002
    """Sorted registered scheduler names (``filter``: substring)."""
    return sorted(n for n in _SCHEDULERS if not filter or filter.lower() in n)


def get_scheduler_info(name: str) -> SchedulerInfo:
    """The :class:`SchedulerInfo` of ``name``; an unknown name lists the valid ones and the closest."""
    key = str(name).lower()
    if key not in _SCHEDULERS:
        raise UnknownNameError(unknown_name_message("scheduler", str(name), list_schedulers()))
    return _SCHEDULERS[key]


def resolve_warmup_steps(warmup: float, num_training_steps: int) -> int:
    """Warmup given as steps (``>= 1``) or as a ratio of ``num_training_steps`` (``[0, 1)``, rounded up)."""
    if warmup < 0:
        raise ValueError(f"training.warmup_steps: must be >= 0, got {warmup}")
    if warmup >= 1:
        return int(warmup)
    return math.ceil(warmup * num_training_steps)


def create_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    warmup: float = 0.0,
    **kwargs: Any,
):
    """Build scheduler ``name`` over ``optimizer`` for ``num_training_steps`` with ``warmup`` (steps or ratio)."""
    info = get_scheduler_info(name)
    return info.factory(
        optimizer,
        num_warmup_steps=resolve_warmup_steps(warmup, num_training_steps),
        num_training_steps=num_training_steps,
        **kwargs,
    )


# ---- native schedules -------------------------------------------------------------------------


class _CosineMinLR:
    def __init__(self, warmup: int, total: int, min_lr_ratio: float):
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"training.scheduler_kwargs.min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")
        self.warmup, self.total, self.min_lr_ratio = warmup, total, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _WarmupStableDecay:
    _SHAPES = ("linear", "cosine", "1-sqrt")

    def __init__(self, warmup: int, total: int, decay_steps: int, min_lr_ratio: float, decay_type: str):
        if decay_type not in self._SHAPES:
            raise ValueError(f"training.scheduler_kwargs.decay_type: must be one of {', '.join(self._SHAPES)}, "
                             f"got {decay_type!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"training.scheduler_kwargs.min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")
        if not 0 <= decay_steps <= total - warmup:
            raise ValueError(f"training.scheduler_kwargs: {decay_steps} decay steps do not fit in {total} steps "
                             f"after {warmup} warmup steps")
        self.warmup, self.total, self.decay_steps = warmup, total, decay_steps
        self.min_lr_ratio, self.decay_type = min_lr_ratio, decay_type

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        decay_start = self.total - self.decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, self.decay_steps))
        if self.decay_type == "linear":
            shape = 1.0 - progress
        elif self.decay_type == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - math.sqrt(progress)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def _cosine_min_lr(optimizer, *, num_warmup_steps: int, num_training_steps: int, min_lr_ratio: float = 0.1):
    return LambdaLR(optimizer, _CosineMinLR(num_warmup_steps, num_training_steps, float(min_lr_ratio)))


def _wsd(optimizer, *, num_warmup_steps: int, num_training_steps: int, decay_ratio: float = 0.1,
         num_decay_steps: Optional[int] = None, min_lr_ratio: float = 0.0, decay_type: str = "linear"):
    if num_decay_steps is None:
        if not 0.0 <= decay_ratio <= 1.0:
            raise ValueError(f"training.scheduler_kwargs.decay_ratio: must be in [0, 1], got {decay_ratio}")
        num_decay_steps = round(decay_ratio * num_training_steps)
    sched = _WarmupStableDecay(num_warmup_steps, num_training_steps, int(num_decay_steps), float(min_lr_ratio),
                               decay_type)
    return LambdaLR(optimizer, sched)


def _hf_scheduler(name: str):
    def build(optimizer, *, num_warmup_steps: int, num_training_steps: int, **kwargs):
        from transformers import get_scheduler

        return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps,
                             num_training_steps=num_training_steps, scheduler_specific_kwargs=kwargs or None)

    build.__name__ = f"hf_{name}"
    return build


def register_builtin_schedulers() -> None:
    """Register the native schedules and every transformers ``SchedulerType`` (idempotent)."""
    if _SCHEDULERS:
        return
    for name in HF_SCHEDULER_NAMES:
        register_scheduler(name, _hf_scheduler(name), description=f"transformers' lr_scheduler_type={name!r}",
                           uses_warmup=name not in ("constant",) + _METRIC_DRIVEN,
                           metric_driven=name in _METRIC_DRIVEN)
    register_scheduler("cosine_min_lr", _cosine_min_lr,
                       description="linear warmup, cosine decay to min_lr_ratio x peak (default 0.1)")
    register_scheduler("wsd", _wsd,
                       description="warmup-stable-decay: warmup, constant, decay over the last decay_ratio of steps")

"""Train/eval modes of schedule-free optimizers, and seeing through optimizer wrappers.

A schedule-free optimizer (``schedulefree.AdamWScheduleFree``, ...) keeps the parameters at an
interpolated point during training; the point to evaluate or save is reached with
``optimizer.eval()`` and left with ``optimizer.train()``. :func:`optimizer_eval_mode` does that
round trip around a block, and leaves optimizers without modes alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["has_train_eval_modes", "optimizer_eval_mode", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The innermost optimizer behind wrappers that keep it in ``.optimizer`` (Accelerate, DeepSpeed)."""
    seen = set()
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def has_train_eval_modes(optimizer) -> bool:
    """True when the optimizer has schedule-free style ``train()`` / ``eval()`` methods."""
    inner = unwrap_optimizer(optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def _in_train_mode(optimizer) -> bool:
    groups = unwrap_optimizer(optimizer).param_groups
    # schedulefree records the mode per group; an optimizer that does not is taken to be training.
    return any(g.get("train_mode", True) for g in groups)


@contextlib.contextmanager
def optimizer_eval_mode(optimizer) -> Iterator[None]:
    """Inside the block the parameters are the schedule-free evaluation point; afterwards the mode
    the optimizer had is restored. A no-op for ``None`` and for optimizers without modes."""
    if optimizer is None or not has_train_eval_modes(optimizer):
        yield
        return
    inner = unwrap_optimizer(optimizer)
    was_training = _in_train_mode(inner)
    if was_training:
        inner.eval()
    try:
        yield
    finally:
        if was_training:
            inner.train()

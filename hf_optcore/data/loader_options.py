"""DataLoader options from the ``dataloader_*`` fields, for the dataloaders hf_optcore builds itself.

The Trainer's in-memory train loader is built by transformers (:mod:`hf_optcore.data.trainer_loader`); the
dataloaders hf_optcore builds itself (the streamed train loader, :mod:`hf_optcore.data.streaming`, and
:meth:`~hf_optcore.data_manager.DataManager.create_loaders` for a loop of your own) take their options from
here, from ``TrainingArguments`` or :class:`~hf_optcore.config.HardwareConfig` alike (the fields share
their names).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

__all__ = ["dataloader_options"]


def dataloader_options(source: Any, *, training: bool = True, rank: int = 0) -> dict[str, Any]:
    """``torch.utils.data.DataLoader`` keyword arguments for ``source``'s ``dataloader_*`` fields.

    Args:
        source: ``TrainingArguments`` or a ``HardwareConfig``: ``dataloader_num_workers``, ``_pin_memory``,
            ``_persistent_workers``, ``_prefetch_factor``, ``_multiprocessing_context``, ``_in_order``.
        training: seed the workers as transformers seeds training workers (by rank), default True.
        rank: this process's rank (default 0).
    """
    workers = int(source.dataloader_num_workers)
    # Pinning without an accelerator only warns; it cannot speed anything up.
    options: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": bool(source.dataloader_pin_memory) and torch.cuda.is_available(),
        "in_order": bool(getattr(source, "dataloader_in_order", True)),
    }
    if workers > 0:
        options["persistent_workers"] = bool(source.dataloader_persistent_workers)
        if source.dataloader_prefetch_factor is not None:
            options["prefetch_factor"] = source.dataloader_prefetch_factor
        context = getattr(source, "dataloader_multiprocessing_context", None)
        if context is not None:
            options["multiprocessing_context"] = context
        if training:
            from transformers.trainer_utils import seed_worker

            options["worker_init_fn"] = partial(seed_worker, num_workers=workers, rank=rank)
    return options

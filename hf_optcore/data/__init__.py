"""Data pieces behind :class:`~hf_optcore.data_manager.DataManager`, each usable alone.

``loading`` (files, Hub, format detection), ``encoding`` (rendering, completion-only labels,
truncation), ``collator`` (dynamic padding, packing-aware), ``samplers`` (random, bucket,
token_budget, multipack; pure torch), ``packing`` (packed rows; pure torch), ``trainer_loader``
(the Trainer's train dataloader under Accelerate).
"""

from hf_optcore.data.collator import PaddingCollator
from hf_optcore.data.packing import PackedDataset, pack_examples
from hf_optcore.data.samplers import (
    BATCHING_STRATEGIES,
    BucketBatchSampler,
    MultipackBatchSampler,
    RandomBatchSampler,
    TokenBudgetBatchSampler,
    pack_best_fit_decreasing,
)

__all__ = [
    "BATCHING_STRATEGIES",
    "BucketBatchSampler",
    "MultipackBatchSampler",
    "PackedDataset",
    "PaddingCollator",
    "RandomBatchSampler",
    "TokenBudgetBatchSampler",
    "pack_best_fit_decreasing",
    "pack_examples",
]

"""Data pieces behind :class:`~hf_optcore.data_manager.DataManager`, each usable alone.

``loading`` (files, Hub, format detection), ``encoding`` (rendering, completion-only labels,
truncation), ``collator`` (dynamic padding, packing-aware), ``samplers`` (random, bucket,
token_budget, multipack; pure torch), ``packing`` (packed rows; pure torch), ``trainer_loader``
(the Trainer's in-memory train dataloader, built by transformers around our batch sampler),
``loader_options`` (DataLoader options of the loaders hf_optcore builds itself); for data larger than
memory: ``stream_sources`` (lazy, resumable reading of shards per rank and worker), ``stream_batching``
(batches from a look-ahead window; pure torch) and ``streaming`` (the streamed train and eval sets, their
dataloader and checkpointed position).
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
from hf_optcore.data.stream_batching import StreamBatcher
from hf_optcore.data.stream_sources import FileStream

__all__ = [
    "BATCHING_STRATEGIES",
    "BucketBatchSampler",
    "FileStream",
    "MultipackBatchSampler",
    "PackedDataset",
    "PaddingCollator",
    "RandomBatchSampler",
    "StreamBatcher",
    "TokenBudgetBatchSampler",
    "pack_best_fit_decreasing",
    "pack_examples",
]

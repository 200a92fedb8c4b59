"""The four batching strategies (``data.batching``): ``random``, ``bucket``, ``token_budget``, ``multipack``.

See :mod:`hf_optcore.data.samplers` for the contract they share. Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hf_optcore.data.packing import pack_best_fit_decreasing
from hf_optcore.data.samplers.base import _fill_last_step, _GlobalBatchSampler, _ResumableBatchSampler


class RandomBatchSampler(_GlobalBatchSampler):
    """Uniformly shuffled fixed-size batches (the baseline).

    Args:
        lengths: token length of every example (only its size matters here).
        batch_size: examples per batch on one rank.
        num_replicas, rank, seed: see :class:`_ResumableBatchSampler`.
    """

    strategy = "random"

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = False):
        super().__init__(lengths, num_replicas, rank, seed, drop_last)
        if batch_size < 1:
            raise ValueError(f"RandomBatchSampler: batch_size must be >= 1, got {batch_size}")
        self.per_device_batch_size = int(batch_size)

    def _global_batches(self, gen, size):
        perm = self._permutation(len(self.lengths), gen)
        return [perm[i : i + size] for i in range(0, len(perm), size)]


class BucketBatchSampler(_GlobalBatchSampler):
    """Length-grouped fixed-size batches with random order.

    Each epoch: a random permutation is cut into mega-batches of ``global * bucket_size_multiplier``
    examples (``global = num_replicas * batch_size``), each mega-batch is sorted by length (ties
    keep their random order) and cut into global batches, and the full ones are shuffled together
    (the short one, if any, comes last); each rank takes its slice of every global batch. Batches hold similar lengths (little padding)
    but neither their composition nor their order is systematic (no longest-first).

    Args:
        lengths: token length of every example.
        batch_size: examples per batch on one rank.
        bucket_size_multiplier: batches per mega-batch (default 64): larger pads less, mixes less.
        num_replicas, rank, seed: see :class:`_ResumableBatchSampler`.
    """

    strategy = "bucket"

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 bucket_size_multiplier: int = 64, drop_last: bool = False):
        super().__init__(lengths, num_replicas, rank, seed, drop_last)
        if batch_size < 1:
            raise ValueError(f"BucketBatchSampler: batch_size must be >= 1, got {batch_size}")
        if bucket_size_multiplier < 1:
            raise ValueError(f"BucketBatchSampler: bucket_size_multiplier must be >= 1, got {bucket_size_multiplier}")
        self.per_device_batch_size = int(batch_size)
        self.bucket_size_multiplier = int(bucket_size_multiplier)

    def _global_batches(self, gen, size):
        perm = self._permutation(len(self.lengths), gen)
        mega = size * self.bucket_size_multiplier
        batches = []
        for start in range(0, len(perm), mega):
            chunk = sorted(perm[start : start + mega], key=self.lengths.__getitem__)  # stable: ties stay random
            batches.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
        return batches


class TokenBudgetBatchSampler(_ResumableBatchSampler):
    """Variable-size batches whose padded size (rows x longest row) stays within ``max_tokens``.

    The partition is cut once over the length-sorted data (so the batch count, and thus the
    Trainer's step count, is the same every epoch); each epoch examples of equal length are
    shuffled among themselves and the batch order is shuffled. With ``num_replicas`` ranks each
    step takes that many consecutive batches of this plan, one per rank.

    Args:
        lengths: token length of every example.
        max_tokens: padded-token budget per batch on one rank (every example must fit alone).
        max_batch_size: optional cap on examples per batch.
        pad_to_multiple_of: the collator's rounding, counted in the budget (default None).
        num_replicas, rank, seed: see :class:`_ResumableBatchSampler`.
    """

    strategy = "token_budget"

    def __init__(self, lengths: Sequence[int], max_tokens: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 max_batch_size: int | None = None, pad_to_multiple_of: int | None = None, drop_last: bool = False):
        super().__init__(lengths, num_replicas, rank, seed, drop_last)
        self.max_tokens = int(max_tokens)
        self.max_batch_size = max_batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        longest = self._padded(max(self.lengths))
        if longest > self.max_tokens:
            raise ValueError(
                f"TokenBudgetBatchSampler: max_tokens must hold the longest example ({longest} tokens padded), "
                f"got {self.max_tokens}"
            )
        self._slots = self._partition()

    def _padded(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else int(math.ceil(n / m) * m)

    def _partition(self) -> list[tuple[int, int]]:
        """``[start, end)`` ranges over the ascending length order, each within the budget."""
        sorted_lengths = sorted(self.lengths)
        slots, start = [], 0
        for end in range(1, len(sorted_lengths) + 1):
            rows = end - start
            too_many = self.max_batch_size is not None and rows > self.max_batch_size
            if too_many or rows * self._padded(sorted_lengths[end - 1]) > self.max_tokens:
                slots.append((start, end - 1))
                start = end - 1
        slots.append((start, len(sorted_lengths)))
        return slots

    def _plan(self, gen):
        perm = self._permutation(len(self.lengths), gen)
        order = sorted(perm, key=self.lengths.__getitem__)  # equal lengths in random order
        batches = [order[a:b] for a, b in self._slots]
        batches = [batches[i] for i in self._permutation(len(batches), gen)]
        world = self.num_replicas
        if self.drop_last and len(batches) >= world:
            batches = batches[: len(batches) - len(batches) % world]  # an incomplete last step is dropped, not split
        batches = _fill_last_step(batches, world, type(self).__name__)
        return [batches[i : i + world] for i in range(0, len(batches), world)]


class MultipackBatchSampler(_GlobalBatchSampler):
    """Batches of packed rows: each row concatenates whole examples up to ``max_seq_len`` tokens.

    Bins come from :func:`pack_best_fit_decreasing` once (so the count is fixed); each epoch the
    bins are shuffled and grouped ``num_replicas * rows_per_batch`` at a time, and each rank takes
    its ``rows_per_batch`` of every group. Batches are lists of bins (tuples
    of example indices) for :class:`~hf_optcore.data.packing.PackedDataset`.

    Args:
        lengths: token length of every example (each <= ``max_seq_len``).
        max_seq_len: tokens per packed row.
        rows_per_batch: packed rows per batch on one rank.
        num_replicas, rank, seed: see :class:`_ResumableBatchSampler`.
    """

    strategy = "multipack"

    def __init__(self, lengths: Sequence[int], max_seq_len: int, rows_per_batch: int, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, drop_last: bool = False):
        super().__init__(lengths, num_replicas, rank, seed, drop_last)
        if rows_per_batch < 1:
            raise ValueError(f"MultipackBatchSampler: rows_per_batch must be >= 1, got {rows_per_batch}")
        self.max_seq_len = int(max_seq_len)
        self.rows_per_batch = self.per_device_batch_size = int(rows_per_batch)
        self.bins = pack_best_fit_decreasing(self.lengths, self.max_seq_len)

    def _global_batches(self, gen, size):
        perm = self._permutation(len(self.bins), gen)
        return [[self.bins[j] for j in perm[i : i + size]] for i in range(0, len(perm), size)]

    def packing_efficiency(self) -> float:
        """Real tokens / (bins x max_seq_len): the fill of the packed rows."""
        return sum(self.lengths) / (len(self.bins) * self.max_seq_len)

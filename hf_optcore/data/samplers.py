"""Rank-aware, resumable batch samplers: ``random``, ``bucket``, ``token_budget``, ``multipack``.

Every sampler here is a :class:`torch.utils.data.Sampler` that yields whole batches (lists of
dataset indices; for ``multipack`` lists of *bins*, each a tuple of indices packed into one row).
They share one contract:

* the batches of an epoch are a pure function of ``(seed, epoch)`` and the *global* batch (a
  private :class:`torch.Generator`, never the global RNG), so every rank computes the same plan;
* every rank gets disjoint batches and the *same number* of them, and together the ranks cover
  every example exactly once per epoch;
* the number of steps per epoch does not depend on the epoch, so ``__len__`` is stable and
  the Trainer's step count is right;
* ``state_dict()`` / ``load_state_dict()`` round-trip ``{"epoch", "consumed"}``: the next
  ``__iter__`` starts at batch ``consumed`` of ``epoch`` without replaying earlier batches.

What a multi-process run sees, for ``W`` ranks (``num_replicas``):

* ``random``, ``bucket``, ``multipack`` (a fixed count per rank: examples, or packed rows):
  the plan is cut in *global* batches of ``W x batch_size`` items, and rank ``r`` takes the
  ``r``-th slice of each. The plan depends only on ``(seed, epoch, W x batch_size)``, so at every
  step the union of the ranks' batches is exactly the batch a 1-process run with ``W x
  batch_size`` trains on at that step. The one exception: when the last global batch has fewer
  items than there are ranks, it joins the global batch before it (that last step gives some
  ranks ``batch_size + 1`` items), and the 1-process run's last two steps are that one step.
* ``token_budget`` (a padded-token budget per rank): the plan is the 1-process plan of the same
  ``max_tokens``, and each step takes ``W`` consecutive batches of it, rank ``r`` the ``r``-th.
  A ``W``-process run thus trains on the 1-process run's batches in the same order, ``W`` per
  step (not on the batches of a ``W``-times larger budget, which would be cut differently).
  When the batch count does not divide by ``W``, the largest batches of the last step are split
  in two (never breaking the budget; the largest batches anywhere if the last step has fewer
  examples than ranks).

Pure torch: nothing here imports transformers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from hf_optcore.data.packing import pack_best_fit_decreasing

__all__ = [
    "BATCHING_STRATEGIES",
    "BucketBatchSampler",
    "MultipackBatchSampler",
    "RandomBatchSampler",
    "TokenBudgetBatchSampler",
    "pack_best_fit_decreasing",
]

_SEED_STRIDE = 1_000_003  # epochs of one seed never collide with another seed's epochs


class _ResumableBatchSampler(Sampler):
    """Shared machinery: epoch plan -> steps of one batch per rank -> resumable iteration.

    Subclasses implement :meth:`_plan`, the steps of one epoch (the same on every rank), each a
    list of ``num_replicas`` batches. Batches are lists of "items" (example indices, or bins for
    multipack).

    Args:
        lengths: token length of every example of the dataset.
        num_replicas: number of data-parallel ranks (default 1).
        rank: this rank, in ``[0, num_replicas)`` (default 0).
        seed: base seed of the data order (default 0).
    """

    strategy = "base"

    def __init__(self, lengths: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if len(lengths) == 0:
            raise ValueError(f"{type(self).__name__}: the dataset is empty (no lengths given)")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"{type(self).__name__}: rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}"
            )
        self.lengths = [int(x) for x in lengths]
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.epoch = 0
        self.consumed = 0
        # The Trainer sets this: it knows how many batches the loop really consumed (the
        # dataloader prefetches ahead of the loop, so counting yields would overcount).
        self.external_progress = False
        self._num_steps: int | None = None

    # ---- to implement ---------------------------------------------------------------------

    def _plan(self, gen: torch.Generator) -> list[list[list[Any]]]:
        raise NotImplementedError

    # ---- plan -----------------------------------------------------------------------------

    def _generator(self, epoch: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * _SEED_STRIDE + epoch) % (2**63 - 1))
        return g

    def _permutation(self, n: int, gen: torch.Generator) -> list[int]:
        return torch.randperm(n, generator=gen).tolist()

    def _steps(self, epoch: int) -> list[list[list[Any]]]:
        """Every step of ``epoch``: a list of ``num_replicas`` batches, one per rank."""
        return self._plan(self._generator(epoch))

    def _rank_batches(self, epoch: int) -> list[list[Any]]:
        return [step[self.rank] for step in self._steps(epoch)]

    def __len__(self) -> int:
        if self._num_steps is None:
            # The count is independent of the epoch (see module docstring), so epoch 0 measures it.
            self._num_steps = len(self._steps(0))
        return self._num_steps

    # ---- iteration and state -------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a new epoch starts at its first batch."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.consumed = 0

    def __iter__(self) -> Iterator[list[Any]]:
        if self.consumed >= len(self):
            # The previous pass finished and nobody called set_epoch: move on to the next epoch.
            self.set_epoch(self.epoch + 1)
        batches = self._rank_batches(self.epoch)
        for i in range(self.consumed, len(batches)):
            if not self.external_progress:
                self.consumed = i + 1
            yield batches[i]

    def state_dict(self) -> dict[str, Any]:
        """Position in the data: ``epoch``, ``consumed`` (batches of it already delivered), and the plan's identity."""
        return {
            "strategy": self.strategy,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "num_batches": len(self),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next ``__iter__`` starts at batch ``consumed`` of ``epoch``."""
        for key in ("strategy", "num_replicas", "num_batches"):
            if key in state:
                mine = self.strategy if key == "strategy" else (self.num_replicas if key == "num_replicas" else len(self))
                if state[key] != mine:
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: the saved sampler has {key}={state[key]!r} but this "
                        f"one has {key}={mine!r}; the data order cannot be continued (same data, batching and world "
                        f"size are needed)"
                    )
        consumed = int(state["consumed"])
        if not 0 <= consumed <= len(self):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: consumed must be in [0, {len(self)}], got {consumed}"
            )
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.consumed = consumed


def _split_to_multiple(batches: list[list[Any]], world: int, who: str) -> list[list[Any]]:
    """Split the largest batches in two until the count divides by ``world`` (no drop, no repeat)."""
    if world == 1 or len(batches) % world == 0:
        return batches
    batches = list(batches)
    while len(batches) % world:
        i = max(range(len(batches)), key=lambda j: len(batches[j]))
        b = batches[i]
        if len(b) < 2:
            raise ValueError(
                f"{who}: cannot give {world} ranks the same number of batches: only {len(batches)} batches of one "
                f"item each; use more data or fewer processes"
            )
        half = (len(b) + 1) // 2
        batches[i : i + 1] = [b[:half], b[half:]]
    return batches


def _fill_last_step(batches: list[list[Any]], world: int, who: str) -> list[list[Any]]:
    """Make the count divide by ``world`` by splitting the largest batches of the last step only
    (earlier steps stay those of the 1-process plan); anywhere when the last step is too small."""
    short = len(batches) % world
    if short == 0:
        return batches
    try:
        return batches[:-short] + _split_to_multiple(batches[-short:], world, who)
    except ValueError:
        return _split_to_multiple(batches, world, who)


def _slices(batch: list[Any], world: int) -> list[list[Any]]:
    """``batch`` cut in ``world`` contiguous slices whose sizes differ by at most one."""
    q, extra = divmod(len(batch), world)
    bounds = [r * q + min(r, extra) for r in range(world + 1)]
    return [batch[bounds[r] : bounds[r + 1]] for r in range(world)]


class _GlobalBatchSampler(_ResumableBatchSampler):
    """A fixed number of items per rank: global batches of ``num_replicas`` times it, sliced per rank.

    Subclasses implement :meth:`_global_batches` (cut at a given global size) and set
    ``per_device_batch_size``. Full global batches are shuffled; the short one (if any) comes
    last, so the plan depends on the global size only, never on how it is split among ranks.
    """

    per_device_batch_size: int

    def _global_batches(self, gen: torch.Generator, size: int) -> list[list[Any]]:
        raise NotImplementedError

    def _plan(self, gen):
        world = self.num_replicas
        size = world * self.per_device_batch_size
        batches = self._global_batches(gen, size)
        full = [b for b in batches if len(b) == size]
        plan = [full[i] for i in self._permutation(len(full), gen)] + [b for b in batches if len(b) < size]
        if len(plan[-1]) < world:
            if len(plan) == 1:
                raise ValueError(
                    f"{type(self).__name__}: cannot give {world} ranks the same number of batches: the epoch has "
                    f"only {len(plan[-1])} items; use more data or fewer processes"
                )
            # Fewer items than ranks cannot make a step: they join the step before (no drop).
            tail = plan.pop()
            plan[-1] = plan[-1] + tail
        return [_slices(b, world) for b in plan]


class RandomBatchSampler(_GlobalBatchSampler):
    """Uniformly shuffled fixed-size batches (the baseline).

    Args:
        lengths: token length of every example (only its size matters here).
        batch_size: examples per batch on one rank.
        num_replicas, rank, seed: see :class:`_ResumableBatchSampler`.
    """

    strategy = "random"

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(lengths, num_replicas, rank, seed)
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
                 bucket_size_multiplier: int = 64):
        super().__init__(lengths, num_replicas, rank, seed)
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
                 max_batch_size: int | None = None, pad_to_multiple_of: int | None = None):
        super().__init__(lengths, num_replicas, rank, seed)
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
                 rank: int = 0, seed: int = 0):
        super().__init__(lengths, num_replicas, rank, seed)
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


BATCHING_STRATEGIES = {
    "random": RandomBatchSampler,
    "bucket": BucketBatchSampler,
    "token_budget": TokenBudgetBatchSampler,
    "multipack": MultipackBatchSampler,
}

"""What every batch sampler of :mod:`hf_optcore.data.samplers` shares: the epoch plan, rank slices, resumable state.

A state saved with another topology (world size, batch size) continues the saved epoch by examples
consumed when ``allow_topology_change`` is set: the rest of that epoch keeps the saved run's order of
examples, re-cut into this sampler's batches. Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

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
        drop_last: drop the epoch's incomplete last batch (transformers' ``dataloader_drop_last``) instead of
            keeping it (default False: every example is trained on once per epoch).
    """

    strategy = "base"

    def __init__(self, lengths: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = False):
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
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.consumed = 0
        # The Trainer sets this: it knows how many batches the loop really consumed (the
        # dataloader prefetches ahead of the loop, so counting yields would overcount).
        self.external_progress = False
        self._num_steps: int | None = None
        # Set by whoever restores a state saved with another topology (the Trainer: checkpoint.allow_topology_change).
        self.allow_topology_change = False
        self._recut: tuple[int, Any] | None = None  # (epoch, plan size whose order that epoch keeps)

    # ---- to implement ---------------------------------------------------------------------

    def _plan(self, gen: torch.Generator) -> list[list[list[Any]]]:
        raise NotImplementedError

    def _plan_size(self) -> Any:
        """What the order of an epoch depends on besides ``(seed, epoch)``: None when nothing (then another
        topology keeps the order by itself)."""
        return None

    def _recut_plan(self, gen: torch.Generator, size: Any) -> list[list[list[Any]]]:
        """The epoch in the order of the plan of size ``size``, cut into this sampler's steps."""
        return self._plan(gen)

    # ---- plan -----------------------------------------------------------------------------

    def _generator(self, epoch: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * _SEED_STRIDE + epoch) % (2**63 - 1))
        return g

    def _permutation(self, n: int, gen: torch.Generator) -> list[int]:
        return torch.randperm(n, generator=gen).tolist()

    def _steps(self, epoch: int) -> list[list[list[Any]]]:
        """Every step of ``epoch``: a list of ``num_replicas`` batches, one per rank."""
        if self._recut is not None and self._recut[0] == epoch:
            return self._recut_plan(self._generator(epoch), self._recut[1])
        return self._plan(self._generator(epoch))

    def _rank_batches(self, epoch: int) -> list[list[Any]]:
        return [step[self.rank] for step in self._steps(epoch)]

    def __len__(self) -> int:
        if self._num_steps is None:
            # The count is independent of the epoch (see module docstring), so epoch 0 measures it.
            self._num_steps = len(self._plan(self._generator(0)))
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
            "global_batch_size": self._plan_size(),
            "plan_size": self._recut[1] if self._recut is not None and self._recut[0] == self.epoch else self._plan_size(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next ``__iter__`` starts at batch ``consumed`` of ``epoch``.

        A state of another topology (world size, batch size) loads only with ``allow_topology_change``.
        """
        who = f"{type(self).__name__}.load_state_dict"
        mine = {"strategy": self.strategy, "num_replicas": self.num_replicas, "num_batches": len(self),
                "global_batch_size": self._plan_size()}
        if state.get("strategy", self.strategy) != self.strategy:
            raise ValueError(f"{who}: the saved sampler has strategy={state['strategy']!r} but this one has "
                             f"strategy={self.strategy!r}; the data order cannot be continued")
        moved = [k for k in ("num_replicas", "num_batches", "global_batch_size") if k in state and state[k] != mine[k]]
        if moved and not self.allow_topology_change:
            key = moved[0]
            raise ValueError(
                f"{who}: the saved sampler has {key}={state[key]!r} but this one has {key}={mine[key]!r}; the data "
                f"order cannot be continued (same data, batching and world size are needed, or "
                f"allow_topology_change)"
            )
        epoch = int(state["epoch"])
        consumed = int(state["consumed"])
        plan_size = state.get("plan_size", self._plan_size() if not moved else "unknown")
        if plan_size == "unknown":
            raise ValueError(f"{who}: the saved sampler ({', '.join(f'{k}={state[k]!r}' for k in moved)}) was saved "
                             f"before samplers recorded their plan size; it cannot be re-cut for this topology")
        recut = (epoch, plan_size) if plan_size != self._plan_size() else None
        if moved:
            consumed = self._converted(state, consumed, recut, who)
        if not 0 <= consumed <= len(self):
            raise ValueError(f"{who}: consumed must be in [0, {len(self)}], got {consumed}")
        self.seed = int(state.get("seed", self.seed))
        self._recut = recut
        self.epoch = epoch
        self.consumed = consumed

    def _converted(self, state: dict[str, Any], consumed: int, recut: Any, who: str) -> int:
        """``consumed`` steps of the saved topology as steps of this one: the same items consumed (examples or
        bins; ``token_budget``, whose base plan ignores the world size: batches of it)."""
        if consumed >= int(state.get("num_batches", consumed + 1)):
            return len(self)  # the epoch was finished
        per_step = state.get("global_batch_size") or state.get("num_replicas", 1)
        items, done = consumed * int(per_step), 0
        previous, self._recut = self._recut, recut
        try:
            steps = self._steps(int(state["epoch"]))
        finally:
            self._recut = previous
        for step, batches in enumerate(steps):
            if done == items:
                return step
            done += sum(len(b) for b in batches) if self._plan_size() else len(batches)
        raise ValueError(f"{who}: the saved position ({items} {'items' if self._plan_size() else 'batches'} into "
                         f"epoch {state['epoch']}) does not fall on a step boundary of this topology")


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

    def _plan_size(self) -> int:
        return self.num_replicas * self.per_device_batch_size

    def _ordered(self, gen: torch.Generator, size: int) -> list[list[Any]]:
        batches = self._global_batches(gen, size)
        full = [b for b in batches if len(b) == size]
        short = [] if self.drop_last else [b for b in batches if len(b) < size]
        if not full and not short:
            raise ValueError(f"{type(self).__name__}: dataloader_drop_last leaves no batch: the epoch has fewer "
                             f"items than one global batch of {size}")
        return [full[i] for i in self._permutation(len(full), gen)] + short

    def _plan(self, gen):
        return self._sliced(self._ordered(gen, self._plan_size()))

    def _recut_plan(self, gen, size):
        order = [item for batch in self._ordered(gen, int(size)) for item in batch]
        g = self._plan_size()
        return self._sliced([order[i : i + g] for i in range(0, len(order), g)])

    def _sliced(self, plan: list[list[Any]]) -> list[list[list[Any]]]:
        world = self.num_replicas
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

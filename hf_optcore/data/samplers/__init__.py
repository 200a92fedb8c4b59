"""Rank-aware, resumable batch samplers: ``random``, ``bucket``, ``token_budget``, ``multipack``.

Every sampler here is a :class:`torch.utils.data.Sampler` that yields whole batches (lists of
dataset indices; for ``multipack`` lists of *bins*, each a tuple of indices packed into one row).
They share one contract:

* the batches of an epoch are a pure function of ``(seed, epoch)`` and the *global* batch (a
  private :class:`torch.Generator`, never the global RNG), so every rank computes the same plan;
* every rank gets disjoint batches and the *same number* of them, and together the ranks cover
  every example exactly once per epoch (with ``drop_last``, transformers' ``dataloader_drop_last``: all
  but those of the incomplete last batch);
* the number of steps per epoch does not depend on the epoch, so ``__len__`` is stable and
  the Trainer's step count is right;
* ``state_dict()`` / ``load_state_dict()`` round-trip ``{"epoch", "consumed"}``: the next
  ``__iter__`` starts at batch ``consumed`` of ``epoch`` without replaying earlier batches;
* with ``allow_topology_change = True``, a state saved with another world size or batch size loads
  too: the rest of the saved epoch keeps the saved run's order of examples, re-cut into this
  sampler's batches (``consumed`` is converted by examples, and must fall on a batch boundary);
  later epochs are this sampler's own plans.

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

Pure torch: nothing here imports transformers. The shared machinery (plans, rank slices, resumable
state, re-cutting an epoch for another topology) is in ``base.py``; the four strategies in ``strategies.py``.
"""

from hf_optcore.data.packing import pack_best_fit_decreasing
from hf_optcore.data.samplers.strategies import (
    BucketBatchSampler,
    MultipackBatchSampler,
    RandomBatchSampler,
    TokenBudgetBatchSampler,
)

__all__ = [
    "BATCHING_STRATEGIES",
    "BucketBatchSampler",
    "MultipackBatchSampler",
    "RandomBatchSampler",
    "TokenBudgetBatchSampler",
    "pack_best_fit_decreasing",
]

BATCHING_STRATEGIES = {
    "random": RandomBatchSampler,
    "bucket": BucketBatchSampler,
    "token_budget": TokenBudgetBatchSampler,
    "multipack": MultipackBatchSampler,
}

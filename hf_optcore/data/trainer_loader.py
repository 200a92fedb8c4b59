"""The train dataloader of ``OptCoreTrainer``: hf_optcore's batch sampler inside transformers' own dataloader.

transformers builds the DataLoader (``Trainer._get_dataloader``: every ``dataloader_*`` option, including
``multiprocessing_context``, ``in_order``, ``persistent_workers`` and ``prefetch_factor``, the removal of
unused columns, worker seeding) and has Accelerate prepare it; hf_optcore only hands it the batch sampler,
the dataset view (packed rows for ``multipack``) and the collator. Nothing of transformers' construction is
copied, so an option transformers adds is honoured without a change here.

transformers has no public hook that takes a batch sampler: ``_get_dataloader`` passes a sampler as
``batch_sampler`` only when it is its own rank-aware ``BatchRebalanceSampler`` (and then also makes
Accelerate's re-sharding ``BatchSamplerShard`` a passthrough, since such a sampler already gives each rank its
share). :class:`RankAwareBatchSampler` presents hf_optcore's samplers as one.
"""

from __future__ import annotations

from typing import Any

from transformers.trainer_pt_utils import BatchRebalanceSampler

from hf_optcore.data.collator import PaddingCollator
from hf_optcore.data.packing import PackedDataset
from hf_optcore.data.samplers import MultipackBatchSampler
from hf_optcore.errors import DataError
from hf_optcore.wrapping import base_model

__all__ = ["PACKING_ATTENTION", "RankAwareBatchSampler", "build_train_dataloader", "check_packing_support",
           "require_padding_collator"]

PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
"""Attention implementations whose masks isolate packed sequences given restarting position ids."""


def check_packing_support(model: Any) -> None:
    """Refuse a model whose attention cannot keep packed examples apart (one clear error)."""
    base = base_model(model)
    config = getattr(base, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        raise DataError(
            f"data.batching='multipack' needs an attention implementation that isolates packed sequences "
            f"({', '.join(PACKING_ATTENTION)}), but the model uses {impl!r}; choose another model.attn_implementation "
            f"or another data.batching"
        )
    import inspect

    if "position_ids" not in inspect.signature(base.forward).parameters:
        raise DataError(
            f"data.batching='multipack' needs a model whose forward takes position_ids; {type(base).__name__} does not"
        )


def require_padding_collator(collator: Any) -> None:
    """Packed rows need hf_optcore's :class:`PaddingCollator` (it emits their position ids)."""
    base = _unwrap(collator)
    if not isinstance(base, PaddingCollator):
        raise DataError(
            f"data.batching='multipack' needs hf_optcore's PaddingCollator (it emits position_ids), "
            f"got data_collator={type(base).__name__}"
        )


class RankAwareBatchSampler(BatchRebalanceSampler):
    """One of hf_optcore's batch samplers, as the type transformers' dataloader takes as ``batch_sampler``.

    It iterates, measures and re-epochs the wrapped sampler; ``BatchRebalanceSampler``'s own plan is never
    built (its ``__init__`` is not called: only its type is what ``Trainer._get_dataloader`` recognises).

    Args:
        sampler: a rank-aware batch sampler of :mod:`hf_optcore.data.samplers`.
    """

    def __init__(self, sampler: Any):
        self.sampler = sampler
        self.drop_last = bool(getattr(sampler, "drop_last", False))

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def build_train_dataloader(trainer: Any, make_sampler):
    """Build, through transformers' own dataloader construction, ``(dataloader, batch_sampler)`` for
    ``trainer.train_dataset``.

    Args:
        trainer: an ``OptCoreTrainer`` (uses its args, model and data collator).
        make_sampler: ``callable(dataset, num_replicas, rank) -> batch sampler``.
    """
    args = trainer.args
    dataset = trainer.train_dataset
    world = max(1, args.world_size)
    rank = args.process_index if world > 1 else 0
    sampler = make_sampler(dataset, world, rank)
    if isinstance(sampler, MultipackBatchSampler):
        require_padding_collator(trainer.data_collator)
        check_packing_support(trainer.model)
        dataset = PackedDataset(dataset)
    # get_train_dataloader's own call, with the packed view of the dataset and our batch sampler (the batch size
    # is the sampler's: transformers drops it for a batch sampler).
    loader = trainer._get_dataloader(dataset=dataset, description="Training", batch_size=args.train_batch_size,
                                     sampler_fn=lambda _dataset: RankAwareBatchSampler(sampler), is_training=True)
    # The training loop, not the prefetching dataloader, knows what was consumed (see callbacks).
    sampler.external_progress = True
    return loader, sampler


def _unwrap(collator: Any) -> Any:
    """The collator inside wrappers that keep it as ``.collate`` (the checkpoint RNG tracker) or
    ``.data_collator`` (transformers' unused-column remover)."""
    for _ in range(8):
        if isinstance(collator, PaddingCollator):
            break
        inner = getattr(collator, "collate", None) or getattr(collator, "data_collator", None)
        if inner is None:
            break
        collator = inner
    return collator


def default_collator(data_config: Any, tokenizer: Any, current: Any) -> Any:
    """Our :class:`PaddingCollator` in place of transformers' default collators; a user's own stays.

    transformers' defaults cannot pad ``labels`` of different lengths nor emit packed position ids.
    """
    from transformers.data.data_collator import DataCollatorWithPadding, default_data_collator

    if current is not default_data_collator and type(current) is not DataCollatorWithPadding:
        return current
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return PaddingCollator(pad, data_config.pad_to_multiple_of, data_config.padding_side)

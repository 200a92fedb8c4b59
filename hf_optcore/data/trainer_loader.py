"""The train dataloader of ``OptCoreTrainer``: hf_optcore's batch sampler under Accelerate.

Accelerate's ``prepare`` wraps a multi-process dataloader's batch sampler in a
``BatchSamplerShard`` that deals batches round-robin to ranks. Our samplers already give each
rank its own share, so the wrapper is turned into a passthrough (``num_processes=1``), the same
way transformers does for its own rank-aware ``BatchRebalanceSampler``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch.utils.data import DataLoader

from hf_optcore.data.collator import PaddingCollator
from hf_optcore.data.packing import PackedDataset
from hf_optcore.data.samplers import MultipackBatchSampler
from hf_optcore.errors import DataError
from hf_optcore.wrapping import base_model

__all__ = ["PACKING_ATTENTION", "build_train_dataloader", "check_packing_support"]

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


def build_train_dataloader(trainer: Any, make_sampler):
    """Build, prepare and return ``(dataloader, batch_sampler)`` for ``trainer.train_dataset``.

    Args:
        trainer: an ``OptCoreTrainer`` (uses its args, accelerator, model and data collator).
        make_sampler: ``callable(dataset, num_replicas, rank) -> batch sampler``.
    """
    from transformers.trainer_utils import seed_worker

    args = trainer.args
    dataset = trainer.train_dataset
    world = max(1, args.world_size)
    rank = args.process_index if world > 1 else 0
    sampler = make_sampler(dataset, world, rank)
    collator = trainer.data_collator
    if isinstance(sampler, MultipackBatchSampler):
        base = _unwrap(collator)
        if not isinstance(base, PaddingCollator):
            raise DataError(
                f"data.batching='multipack' needs hf_optcore's PaddingCollator (it emits position_ids), "
                f"got data_collator={type(base).__name__}"
            )
        check_packing_support(trainer.model)
        dataset = PackedDataset(dataset)
    kwargs: dict[str, Any] = {
        "batch_sampler": sampler,
        "collate_fn": collator,
        "num_workers": args.dataloader_num_workers,
        "pin_memory": args.dataloader_pin_memory,
        "worker_init_fn": partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
    }
    if args.dataloader_num_workers > 0:
        kwargs["persistent_workers"] = args.dataloader_persistent_workers
        if args.dataloader_prefetch_factor is not None:
            kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
    loader = trainer.accelerator.prepare(DataLoader(dataset, **kwargs))
    shard = getattr(loader, "batch_sampler", None)
    if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
        shard.num_processes = 1
        shard.process_index = 0
    # The training loop, not the prefetching dataloader, knows what was consumed (see callbacks).
    sampler.external_progress = True
    return loader, sampler


def _unwrap(collator: Any) -> Any:
    """The collator inside wrappers that keep it as ``.collate`` (e.g. the checkpoint RNG tracker)."""
    seen = 0
    while hasattr(collator, "collate") and not isinstance(collator, PaddingCollator) and seen < 8:
        collator, seen = collator.collate, seen + 1
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

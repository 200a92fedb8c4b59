"""Padding-free packing: several examples concatenated into one row, isolated from each other.

:class:`PackedDataset` turns a bin (a tuple of example indices from
:class:`~hf_optcore.data.samplers.MultipackBatchSampler`) into one row:

* ``input_ids`` concatenated;
* ``position_ids`` restarting at 0 for every example: this is what transformers' mask builders
  (``find_packed_sequence_indices`` for sdpa / eager / flex, the varlen path of flash-attention)
  read to keep each example's tokens from attending to another's;
* ``labels`` concatenated with the *first* label of every example set to -100, so that no
  example's first token is predicted from the previous example's last token. The set of
  predicted tokens is then exactly the one of the examples run one by one, and the Trainer's
  ``num_items_in_batch`` (labels[..., 1:] != -100) counts exactly those tokens.

Pure torch: nothing here imports transformers.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

__all__ = ["PackedDataset", "pack_examples"]


def _as_list(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def pack_examples(examples: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Concatenate tokenized examples into one packed row (see module docstring).

    Args:
        examples: dicts with ``input_ids`` and optionally ``labels`` (defaults to ``input_ids``).

    Returns:
        A dict with ``input_ids``, ``labels``, ``position_ids`` and ``seq_lens``.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    seq_lens: list[int] = []
    for ex in examples:
        ids = _as_list(ex["input_ids"])
        lab = _as_list(ex["labels"]) if ex.get("labels") is not None else list(ids)
        if not ids:
            continue
        input_ids.extend(ids)
        labels.append(-100)
        labels.extend(lab[1:])
        position_ids.extend(range(len(ids)))
        seq_lens.append(len(ids))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lens": seq_lens}


class PackedDataset(Dataset):
    """A view of a tokenized dataset indexed by bins: ``ds[(3, 17, 5)]`` is one packed row.

    Args:
        base: a map-style dataset whose items are dicts with ``input_ids`` (and ``labels``).
    """

    def __init__(self, base: Any):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, bin_: Sequence[int] | int) -> dict[str, list[int]]:
        if isinstance(bin_, int):
            bin_ = (bin_,)
        return pack_examples([self.base[int(i)] for i in bin_])


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[tuple[int, ...]]:
    """Pack examples into bins of at most ``capacity`` tokens (best-fit decreasing).

    Examples are placed longest first into the bin with the least remaining room that still
    fits them, which is never worse than first-fit decreasing (<= 11/9 OPT + 1 bins).

    Args:
        lengths: token length of every example; each must be <= ``capacity``.
        capacity: tokens per bin (the packed row length).

    Returns:
        Bins as tuples of example indices, longest example first, in creation order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"pack_best_fit_decreasing: example {i} has {n} tokens, more than capacity {capacity}")
        pos = bisect.bisect_left(room, (n, -1))
        if pos < len(room):
            left, b = room.pop(pos)
            bins[b].append(i)
            bisect.insort(room, (left - n, b))
        else:
            bins.append([i])
            bisect.insort(room, (capacity - n, len(bins) - 1))
    return [tuple(b) for b in bins]

"""Dynamic padding to the batch maximum, aware of packed rows.

Pure torch: nothing here imports transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["PaddingCollator", "count_real_tokens"]


def _as_list(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


class PaddingCollator:
    """Pad a list of tokenized examples to the longest one (rounded up to ``pad_to_multiple_of``).

    Plain examples get ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding),
    padded on ``padding_side``. Packed rows (examples carrying ``position_ids``, from
    :class:`~hf_optcore.data.packing.PackedDataset`) are padded on the right and get
    ``position_ids`` instead of an attention mask, plus ``use_cache=False``: transformers only
    detects packed sequences from restarting position ids when no 2D mask and no cache are
    given. Every padding token of a packed row is a sequence of its own (position id 0), so it
    never attends to, or is attended by, a real token, and :func:`count_real_tokens` can tell
    it from a real example (whose length is >= 2).

    Args:
        pad_token_id: id written into padded positions (default 0; they are masked anyway).
        pad_to_multiple_of: round the padded length up to a multiple of this (default None).
        padding_side: ``"right"`` (default) or ``"left"`` (plain examples only).
        label_pad_token_id: label of padded positions (default -100).
    """

    def __init__(self, pad_token_id: int | None = 0, pad_to_multiple_of: int | None = None,
                 padding_side: str = "right", label_pad_token_id: int = -100):
        if padding_side not in ("right", "left"):
            raise ValueError(f"PaddingCollator: padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"PaddingCollator: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.label_pad_token_id = label_pad_token_id

    def _target_len(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if not m else int(math.ceil(longest / m) * m)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("PaddingCollator: got an empty batch")
        packed = "position_ids" in features[0]
        ids = [_as_list(f["input_ids"]) for f in features]
        labels = [_as_list(f["labels"]) if f.get("labels") is not None else list(x) for f, x in zip(features, ids)]
        width = self._target_len(max(len(x) for x in ids))
        n = len(ids)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        label_t = torch.full((n, width), self.label_pad_token_id, dtype=torch.long)
        batch: dict[str, Any] = {}
        if packed:
            position_ids = torch.zeros((n, width), dtype=torch.long)
            for r, (x, y, f) in enumerate(zip(ids, labels, features)):
                k = len(x)
                input_ids[r, :k] = torch.tensor(x, dtype=torch.long)
                label_t[r, :k] = torch.tensor(y, dtype=torch.long)
                position_ids[r, :k] = torch.tensor(_as_list(f["position_ids"]), dtype=torch.long)
            batch.update(input_ids=input_ids, labels=label_t, position_ids=position_ids, use_cache=False)
        else:
            attention_mask = torch.zeros((n, width), dtype=torch.long)
            for r, (x, y) in enumerate(zip(ids, labels)):
                k = len(x)
                sl = slice(0, k) if self.padding_side == "right" else slice(width - k, width)
                input_ids[r, sl] = torch.tensor(x, dtype=torch.long)
                label_t[r, sl] = torch.tensor(y, dtype=torch.long)
                attention_mask[r, sl] = 1
            batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=label_t)
        return batch


def count_real_tokens(batch: dict[str, Any]) -> int:
    """Non-pad tokens of a collated batch (from its attention mask, or its packed position ids)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    pos = batch.get("position_ids")
    ids = batch["input_ids"]
    if pos is None:
        return ids.numel()
    # A padding token of a packed row is position 0 followed by position 0 or the row's end;
    # a real example (length >= 2) always continues its position 0 with 1.
    nxt = torch.cat([pos[:, 1:], torch.zeros_like(pos[:, :1])], dim=1)
    return int((~((pos == 0) & (nxt == 0))).sum())

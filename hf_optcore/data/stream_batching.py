"""Batches of a stream from a bounded look-ahead window: ``random``, ``bucket``, ``token_budget``, ``multipack``.

:class:`StreamBatcher` collects tokenized examples into a window of ``buffer_size`` examples; a full window is
planned the way the in-memory samplers plan a mega-batch (:mod:`hf_optcore.data.samplers`), and its batches
are handed out one by one while the next window fills:

* ``random``: the window in a random order, cut into batches of ``batch_size`` examples (``buffer_size`` 0:
  the stream's own order);
* ``bucket``: the window sorted by length (ties in random order), cut into batches of ``batch_size``, the
  batches in random order;
* ``token_budget``: the window sorted by length, cut into batches whose padded size (rows x longest row,
  rounded to ``pad_to_multiple_of``) stays within ``max_tokens``, in random order;
* ``multipack``: the window packed best-fit-decreasing into rows of ``max_seq_len`` tokens,
  ``batch_size`` rows a batch, in random order.

What does not fill a batch (the last ``batch_size``-group, budget batch or rows of a window) is carried into
the next window, so every batch but the last of a pass is full. The plan draws from the batcher's own
``torch.Generator``, never the global RNG. ``state_dict()`` holds everything needed to continue exactly: the
window and the planned batches (their token ids as flat tensors), the generator and the counters.

Pure torch: nothing here imports transformers.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from hf_optcore.data.packing import pack_best_fit_decreasing, pack_examples

__all__ = ["STREAM_STRATEGIES", "StreamBatcher"]

STREAM_STRATEGIES = ("random", "bucket", "token_budget", "multipack")

Example = dict[str, list[int]]


class StreamBatcher:
    """Plan batches of a stream of tokenized examples from a bounded look-ahead window.

    Args:
        strategy: ``random``, ``bucket``, ``token_budget`` or ``multipack``.
        batch_size: examples (``multipack``: packed rows) per batch.
        buffer_size: examples in the look-ahead window (>= 0; at least one batch's worth is used).
        seed: seed of the batcher's generator.
        max_tokens: padded-token budget per batch (``token_budget``).
        max_seq_len: tokens per packed row (``multipack``).
        pad_to_multiple_of: the collator's rounding, counted in the budget (``token_budget``).
        drop_last: drop the incomplete last batch of every pass (default False).
    """

    def __init__(self, strategy: str, batch_size: int, buffer_size: int, seed: int = 0, *,
                 max_tokens: int | None = None, max_seq_len: int | None = None,
                 pad_to_multiple_of: int | None = None, drop_last: bool = False):
        if strategy not in STREAM_STRATEGIES:
            raise ValueError(f"StreamBatcher: unknown strategy {strategy!r}; valid: {', '.join(STREAM_STRATEGIES)}")
        if batch_size < 1 or buffer_size < 0:
            raise ValueError(f"StreamBatcher: batch_size must be >= 1 and buffer_size >= 0, got {batch_size}, "
                             f"{buffer_size}")
        if strategy == "token_budget" and not max_tokens:
            raise ValueError("StreamBatcher: token_budget needs max_tokens")
        if strategy == "multipack" and not max_seq_len:
            raise ValueError("StreamBatcher: multipack needs max_seq_len")
        self.strategy = strategy
        self.batch_size = int(batch_size)
        self.buffer_size = int(buffer_size)
        self.max_tokens = max_tokens
        self.max_seq_len = max_seq_len
        self.pad_to_multiple_of = pad_to_multiple_of
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(int(seed))
        self.window: list[Example] = []
        # Planned batches; a batch is a list of groups (a packed row's examples, or one example each).
        self.pending: deque[list[list[Example]]] = deque()
        self.examples_in = 0
        self.batches_out = 0

    # ---- feeding and taking -----------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Examples a window holds before it is planned (never fewer than one batch's worth)."""
        return max(self.buffer_size, 1 if self.strategy != "random" else self.batch_size, self.batch_size)

    def add(self, example: Example) -> None:
        """One more example of the stream; plans the window once it is full."""
        self.window.append(example)
        self.examples_in += 1
        if len(self.window) >= self.capacity:
            self._plan(final=False)

    def end_pass(self) -> None:
        """The stream ended (this pass): plan everything left; the last batch may be short (or dropped)."""
        if self.window:
            self._plan(final=True)

    def ready(self) -> bool:
        return bool(self.pending)

    def pop(self) -> list[dict[str, Any]]:
        """The next batch: a list of examples (``multipack``: of packed rows) for the collator."""
        batch = self.pending.popleft()
        self.batches_out += 1
        if self.strategy == "multipack":
            return [pack_examples(group) for group in batch]
        return [group[0] for group in batch]

    # ---- planning -------------------------------------------------------------------------

    def _perm(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist()

    def _padded(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else int(math.ceil(n / m) * m)

    def _by_length(self, window: list[Example]) -> list[Example]:
        order = self._perm(len(window))  # equal lengths in random order
        return sorted((window[i] for i in order), key=lambda e: len(e["input_ids"]))

    def _plan(self, final: bool) -> None:
        window, self.window = self.window, []
        b = self.batch_size
        if self.strategy in ("random", "bucket"):
            if self.strategy == "bucket":
                window = self._by_length(window)
            elif self.buffer_size > 0:
                window = [window[i] for i in self._perm(len(window))]
            batches = [[[e] for e in window[i : i + b]] for i in range(0, len(window), b)]
        elif self.strategy == "token_budget":
            batches, current, longest = [], [], 0
            for e in self._by_length(window):
                n = len(e["input_ids"])
                if current and (len(current) + 1) * self._padded(max(longest, n)) > self.max_tokens:
                    batches.append(current)
                    current, longest = [], 0
                current.append([e])
                longest = max(longest, n)
            if current:
                batches.append(current)
        else:
            lengths = [len(e["input_ids"]) for e in window]
            bins = pack_best_fit_decreasing(lengths, self.max_seq_len)
            bins.sort(key=lambda bin_: -sum(lengths[i] for i in bin_))  # fullest rows first: the emptiest carry
            rows = [[window[i] for i in bin_] for bin_ in bins]
            batches = [rows[i : i + b] for i in range(0, len(rows), b)]
        if not final and batches and self._short(batches[-1]):
            self.window = [e for group in batches.pop() for e in group]  # carried into the next window
        elif final and batches and self.drop_last and self._short(batches[-1]):
            batches.pop()
        if self.strategy != "random" or self.buffer_size > 0:
            batches = [batches[i] for i in self._perm(len(batches))]
        self.pending.extend(batches)

    def _short(self, batch: list[list[Example]]) -> bool:
        if self.strategy == "token_budget":
            longest = max(len(g[0]["input_ids"]) for g in batch)
            return (len(batch) + 1) * self._padded(longest) <= self.max_tokens  # another example could still fit
        return len(batch) < self.batch_size

    # ---- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The window, the planned batches, the generator and the counters (tensors and ints only)."""
        groups = [[e] for e in self.window] + [g for batch in self.pending for g in batch]
        flat = [e for g in groups for e in g]
        return {
            "strategy": self.strategy,
            "batch_size": self.batch_size,
            "buffer_size": self.buffer_size,
            "generator": self.generator.get_state(),
            "window": len(self.window),
            "group_sizes": torch.tensor([len(g) for g in groups], dtype=torch.int64),
            "batch_groups": torch.tensor([len(batch) for batch in self.pending], dtype=torch.int64),
            "lengths": torch.tensor([len(e["input_ids"]) for e in flat], dtype=torch.int64),
            "input_ids": torch.tensor([t for e in flat for t in e["input_ids"]], dtype=torch.int64),
            "labels": torch.tensor([t for e in flat for t in e["labels"]], dtype=torch.int64),
            "examples_in": self.examples_in,
            "batches_out": self.batches_out,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (same strategy, batch size and buffer size)."""
        mine = {"strategy": self.strategy, "batch_size": self.batch_size, "buffer_size": self.buffer_size}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"StreamBatcher.load_state_dict: the saved stream has {key}={state[key]!r} but this "
                                 f"one has {key}={value!r}; its position cannot be continued")
        self.generator.set_state(state["generator"])
        ids, labels, lengths = state["input_ids"].tolist(), state["labels"].tolist(), state["lengths"].tolist()
        flat, at = [], 0
        for n in lengths:
            flat.append({"input_ids": ids[at : at + n], "labels": labels[at : at + n]})
            at += n
        groups, at = [], 0
        for n in state["group_sizes"].tolist():
            groups.append(flat[at : at + n])
            at += n
        n_window = int(state["window"])
        self.window = [g[0] for g in groups[:n_window]]
        rest, self.pending = groups[n_window:], deque()
        for n in state["batch_groups"].tolist():
            self.pending.append(rest[:n])
            rest = rest[n:]
        self.examples_in = int(state["examples_in"])
        self.batches_out = int(state["batches_out"])

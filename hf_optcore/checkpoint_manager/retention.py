"""Which checkpoints to keep: a pure function of (step, metric) pairs, never of file times."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def metric_greater_is_better(metric: str | None, greater_is_better: bool | None) -> bool:
    """HF's default: an explicit choice wins; otherwise a metric named like a loss is lower-is-better."""
    if greater_is_better is not None:
        return bool(greater_is_better)
    return not (metric is None or "loss" in metric or "perplexity" in metric)


def select_to_keep(
    checkpoints: Mapping[int, float | None] | Iterable[tuple[int, float | None]],
    keep_last: int,
    keep_best: int,
    keep_every_n_steps: int | None = None,
    greater_is_better: bool = False,
    protect: Iterable[int] = (),
) -> set[int]:
    """The steps to keep among ``checkpoints`` (step -> metric, None when it has none).

    Kept: the ``keep_last`` highest steps; the ``keep_best`` best metrics (ties broken by the
    later step), and always the single best; every multiple of ``keep_every_n_steps``; and the
    ``protect`` steps (e.g. the checkpoint a run resumed from). Non-finite metrics never rank.

    Args:
        checkpoints: step -> metric value (or None).
        keep_last: newest K by step (the latest is always kept).
        keep_best: top-k by metric.
        keep_every_n_steps: milestone period, or None.
        greater_is_better: direction of the metric.
        protect: steps that must survive.
    """
    items = dict(checkpoints.items() if isinstance(checkpoints, Mapping) else checkpoints)
    steps = sorted(items)
    keep = set(steps[-max(keep_last, 1):]) if steps else set()
    ranked = [(m, s) for s, m in items.items() if m is not None and math.isfinite(m)]
    # Best first; among equal metrics the later checkpoint wins.
    ranked.sort(key=lambda ms: (-ms[0] if greater_is_better else ms[0], -ms[1]))
    keep.update(s for _, s in ranked[: max(keep_best, 1)])
    if keep_every_n_steps:
        keep.update(s for s in steps if s % keep_every_n_steps == 0)
    keep.update(s for s in protect if s in items)
    return keep

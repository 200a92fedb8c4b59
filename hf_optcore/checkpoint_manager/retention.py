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


class Ranking:
    """How checkpoints are ranked: by ``metric_for_best_model`` (default ``eval_loss``, else ``loss``).

    Args:
        metric_for_best_model: the metric (``eval_`` prefix optional, as in transformers), or None.
        greater_is_better: its direction (None: lower is better for a loss or perplexity, as in transformers).
    """

    def __init__(self, metric_for_best_model: str | None = None, greater_is_better: bool | None = None):
        self.metric_for_best_model = metric_for_best_model
        self.greater_is_better = greater_is_better

    def key(self, metrics: Mapping[str, float]) -> str | None:
        key = self.metric_for_best_model
        if key is None:
            return next((k for k in ("eval_loss", "loss") if k in metrics), None)
        return key if key in metrics or key.startswith("eval_") else f"eval_{key}"

    def metric_of(self, metrics: Mapping[str, float]) -> float | None:
        key = self.key(metrics)
        value = metrics.get(key) if key else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def higher_is_better(self) -> bool:
        return metric_greater_is_better(self.metric_for_best_model or "eval_loss", self.greater_is_better)

    def best(self, checkpoints: Iterable) -> object | None:
        """The checkpoint (anything with ``.metrics`` and ``.step``) with the best finite metric, or None."""
        scored = [(self.metric_of(c.metrics), c) for c in checkpoints]
        scored = [(m, c) for m, c in scored if m is not None and math.isfinite(m)]
        if not scored:
            return None
        better = self.higher_is_better
        return max(scored, key=lambda mc: ((mc[0] if better else -mc[0]), mc[1].step))[1]


def to_prune(checkpoints: list, config: object, ranking: Ranking, protect: Iterable[int] = ()) -> list:
    """The checkpoints (with ``.step`` and ``.metrics``) that no retention rule of ``config`` keeps.

    Args:
        checkpoints: the complete checkpoints of the run, any order.
        config: the ``checkpoint`` section (``keep_last``, ``keep_best``, ``keep_every_n_steps``).
        ranking: how metrics rank.
        protect: steps that must survive (the checkpoint a run resumed from).
    """
    keep = select_to_keep(
        {c.step: ranking.metric_of(c.metrics) for c in checkpoints},
        keep_last=len(checkpoints) if config.keep_last is None else config.keep_last,
        keep_best=config.keep_best,
        keep_every_n_steps=config.keep_every_n_steps,
        greater_is_better=ranking.higher_is_better,
        protect=protect,
    )
    return [c for c in checkpoints if c.step not in keep]

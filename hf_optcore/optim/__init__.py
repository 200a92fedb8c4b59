"""Optimizer and scheduler registries (foundation placeholder; issue 3 builds the real registry)."""

from __future__ import annotations

_OPTIMIZERS = ["adamw", "adam", "sgd"]
_SCHEDULERS = ["linear", "cosine", "constant", "constant_with_warmup"]


def list_optimizers(filter: str | None = None) -> list[str]:  # noqa: A002
    return [n for n in _OPTIMIZERS if filter is None or filter in n]


def list_schedulers() -> list[str]:
    return list(_SCHEDULERS)

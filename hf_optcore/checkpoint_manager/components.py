"""What hf_optcore itself puts into a checkpoint, beside transformers' files, and how it reads it back.

- ``components/<name>.pt``: the ``state_dict()`` of each registered component (EMA, sampler position, ...);
- ``components/rng_rank<r>.pt``: each rank's RNG state (and the pending collate RNG, see
  :mod:`~hf_optcore.checkpoint_manager.trainer_checkpointing`), written by that rank;
- ``config.yaml``: the resolved :class:`~hf_optcore.config.TrainerConfig`.

Every file is read with ``torch.load(weights_only=True)`` (plain tensors, numbers and strings; never an object).
Per-rank state of other components (e.g. sharded EMA under FSDP) belongs here too: a ``components/<name>_rank<r>.pt``
beside :func:`rank_file`, written by each rank and listed in the manifest with the others (the manifest's
``components`` and ``topology`` say which files verification requires; see ``storage._expected``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from hf_optcore.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["COMPONENTS_DIR", "component_file", "load_components", "rank_file", "rank_state", "safe_load",
           "write_components", "write_rank_state"]

COMPONENTS_DIR = "components"
CONFIG_FILE = "config.yaml"


def component_file(name: str) -> str:
    """Where component ``name``'s state lives inside a checkpoint."""
    return f"{COMPONENTS_DIR}/{name}.pt"


def rank_file(rank: int) -> str:
    """Where one rank's RNG state (and pending collate RNG) lives inside a checkpoint."""
    return f"{COMPONENTS_DIR}/rng_rank{rank}.pt"


def safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of ``path``; a refusal is a :class:`CheckpointError` naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses arbitrary objects: say which file
        raise CheckpointError(f"cannot read {str(path)!r} safely (weights_only): {exc}") from exc


def write_components(path: Path, components: dict[str, Any], trainer_config: Any = None) -> None:
    """Write every component's state and the resolved config into checkpoint directory ``path``."""
    path = Path(path)
    if components:
        (path / COMPONENTS_DIR).mkdir(parents=True, exist_ok=True)
        for name, comp in components.items():
            if not getattr(comp, "per_rank", False):  # per-rank ones are in each rank's own file
                torch.save(comp.state_dict(), path / component_file(name))
    if trainer_config is not None:
        trainer_config.to_yaml(path / CONFIG_FILE)


def write_rank_state(path: Path, rank: int, state: dict[str, Any]) -> None:
    """Write one rank's state (``{"rng": ..., ...}``) into checkpoint directory ``path``."""
    file = Path(path) / rank_file(rank)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, file)


def load_components(path: Path, components: dict[str, Any]) -> None:
    """Restore every component that checkpoint ``path`` holds; one it lacks starts fresh (warned)."""
    path = Path(path)
    for name, comp in components.items():
        if getattr(comp, "per_rank", False):
            continue  # restored from each rank's own file (rank_state()["components"])
        file = path / component_file(name)
        if not file.is_file():
            logger.warning("checkpoint %s has no state for %r; it starts fresh", path, name)
            continue
        comp.load_state_dict(safe_load(file))


def rank_state(path: Path, rank: int, *, new_rank_ok: bool = False) -> dict[str, Any]:
    """Rank ``rank``'s saved state in checkpoint ``path``.

    A rank the checkpoint has no state for (it was saved by fewer processes) is an error, unless ``new_rank_ok``
    (``checkpoint.allow_topology_change``): it then starts from rank 0's saved state, as every rank of a new run
    starts from the same seed (transformers seeds all ranks alike), so a resume from 1 to 2 processes begins with
    both ranks where rank 0 was. Such a resume cannot be bit-exact with any uninterrupted run.
    """
    path = Path(path)
    file = path / rank_file(rank)
    if file.is_file():
        return safe_load(file)
    first = path / rank_file(0)
    if new_rank_ok and first.is_file():
        logger.info("checkpoint %s holds no RNG state for rank %d (it was saved by fewer processes): rank %d starts "
                    "from rank 0's saved state", path, rank, rank)
        return safe_load(first)
    raise CheckpointError(f"checkpoint {str(path)!r} has no RNG state for rank {rank} ({file.name})")

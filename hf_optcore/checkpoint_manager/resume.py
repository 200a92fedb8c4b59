"""What a resume resumes, and every reason it may not, found before anything is loaded.

``checkpoint.resume_from`` (or ``train(resume_from_checkpoint=...)``) is ``auto`` or a path:

- ``auto``: the newest intact checkpoint, walking back past corrupt ones (each named in a warning: "... falling
  back to <the previous one>"); with a run that owns its directory, only that run's checkpoints
  (:mod:`~hf_optcore.checkpoint_manager.ownership`).
- a ``checkpoint-<step>`` written by hf_optcore: it must verify (:func:`~hf_optcore.checkpoint_manager.storage.verify`).
- a plain transformers checkpoint (``trainer_state.json``, no manifest): accepted with a warning (its torch files
  must still be plain tensors); hf_optcore's components start fresh.
- a run's output directory (it holds ``checkpoint-<step>`` folders or a ``run.json``) is refused with one line
  naming the checkpoints it holds: resuming "the run folder" would otherwise load the final weights with a fresh
  optimizer and RNG, which is no resume at all. Name one of its checkpoints, or use ``auto`` with that directory
  as ``output_dir``.

:func:`objections` then lists everything that stands against resuming the checkpoint found, all at once: config
fields changed without ``checkpoint.allow_changes`` (with run ownership), another optimizer, another topology.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_optcore.checkpoint_manager import storage
from hf_optcore.checkpoint_manager.topology import Topology, topology_problems
from hf_optcore.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["Target", "find", "newest_intact", "objections", "resolve_path"]

RUN_FILE = "run.json"


@dataclass
class Target:
    """A checkpoint to resume.

    Attributes:
        path: the checkpoint directory (None: nothing to resume, a fresh start).
        manifest: its verified manifest (None for a plain transformers checkpoint).
        warnings: what the run should say when it starts.
    """

    path: Path | None = None
    manifest: dict | None = None
    warnings: list[str] = field(default_factory=list)


def newest_intact(candidates: list, verify: bool = True) -> tuple[Any, dict | None, list[str]]:
    """``(found, manifest, errors)``: the newest of ``candidates`` (``.path``/``.manifest``, oldest first) that
    verifies, its manifest, and the verification error of each newer one passed over."""
    errors = []
    for found in reversed(candidates):
        if not verify:
            return found, found.manifest, errors
        try:
            return found, storage.verify(found.path), errors
        except CheckpointError as exc:
            errors.append(str(exc))
    return None, None, errors


def fallback_warnings(errors: list[str], used: Path | None) -> list[str]:
    return [f"{e}; falling back to {str(used)!r}" if used is not None else e for e in errors]


def resolve_path(spec: Any, verify: bool = True) -> Target:
    """The checkpoint at path ``spec``, verified; see the module doc for what is accepted.

    Raises:
        CheckpointError: one line starting with ``checkpoint.resume_from:``.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume_from: {str(spec)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume_from: {str(spec)!r} is not a checkpoint directory")
    manifest, problem = storage.read_manifest(path), storage.manifest_problem(path)
    if manifest is None and problem == f"{storage.MANIFEST_NAME} is missing":
        inside = storage.holds_checkpoints(path)
        if inside or (path / RUN_FILE).is_file():
            held = f"it holds {', '.join(inside)}: name one of them, or use 'auto'" if inside else "it holds no checkpoint"
            raise CheckpointError(f"checkpoint.resume_from: {str(spec)!r} is a run's output directory, not a "
                                  f"checkpoint ({held}); resuming it would load its final weights with a fresh "
                                  f"optimizer and random state")
        if (path / storage.TRAINER_STATE).is_file():
            try:  # transformers loads its torch files with weights_only too; refuse them here in one line instead
                storage.check_plain_tensors(path)
            except CheckpointError as exc:
                raise CheckpointError(f"checkpoint.resume_from: {exc}") from None
            return Target(path, None, [f"resuming from {path}, a checkpoint not written by hf_optcore (or whose "
                                       f"manifest is gone): no integrity check, and hf_optcore's components (EMA, "
                                       f"sampler position, collate RNG) start fresh"])
    try:
        manifest = storage.verify(path) if verify or manifest is None else manifest
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint.resume_from: {exc}") from None
    return Target(path, manifest)


def find(spec: Any, output_dir: str | Path, verify: bool = True) -> Target:
    """What ``spec`` resumes in ``output_dir`` when no run owns the directory (``checkpoint.own_output_dir`` off).

    ``auto`` / True: the newest intact checkpoint (True: one must exist); a path: :func:`resolve_path`; None or
    False: nothing.

    Raises:
        CheckpointError: nothing intact to resume where one is required, or a path that cannot be resumed.
    """
    if spec is None or spec is False or spec == "":
        return Target()
    if spec is True or spec == "auto":
        complete = storage.list_complete(output_dir)
        found, manifest, errors = newest_intact(complete, verify)
        if found is None:
            if errors:
                raise CheckpointError(f"checkpoint.resume_from: 'auto' finds no intact checkpoint in "
                                      f"{str(output_dir)!r}: {'; '.join(errors)}")
            if spec is True:
                raise CheckpointError(f"No valid checkpoint found in output directory {str(output_dir)!r}: resume "
                                      f"was requested but no complete checkpoint is there")
            return Target()
        target = Target(found.path, manifest, fallback_warnings(errors, found.path))
        for bare in storage.list_unmanifested(output_dir):
            if storage.step_of(bare) > found.step:
                target.warnings.append(unmanifested_warning(bare, found.path))
        return target
    return resolve_path(spec, verify)


def unmanifested_warning(path: Path, resumed: Path) -> str:
    """The warning for a ``checkpoint-<step>`` newer than the one resumed that is not a valid checkpoint."""
    problem = storage.manifest_problem(path)
    if problem == f"{storage.MANIFEST_NAME} is missing":
        return (f"{path} has no manifest (an interrupted save, or its manifest was deleted): it is never trusted "
                f"or resumed from; resuming {resumed} instead")
    return (f"{path} is not a valid checkpoint ({problem}): it is never trusted, resumed from or deleted; resuming "
            f"{resumed} instead")


def _saved_optimizer(path: Path) -> str | None:
    from hf_optcore.checkpoint_manager.resume_changes import saved_config

    saved = saved_config(path) or {}
    training = saved.get("training")
    return str(training["optimizer"]) if isinstance(training, dict) and "optimizer" in training else None


def _canonical_optimizer(name: str) -> str:
    from hf_optcore import optim

    try:
        return optim.get_optimizer_info(name).name
    except KeyError:
        return name


def objections(config: Any, target: Target, topology: Topology | None, *,
               compare_config: bool) -> tuple[list, list[str], list[str]]:
    """``(allowed config changes, problems, warnings)`` of resuming ``target`` with ``config``, all at once.

    Args:
        config: the run's :class:`~hf_optcore.config.TrainerConfig`.
        target: the checkpoint found (:func:`find`, or a run's plan).
        topology: this run's topology (None: not checked here).
        compare_config: compare the config with the checkpoint's (``checkpoint.own_output_dir``).
    """
    if target.path is None:
        return [], [], []
    changes, problems, warnings = [], [], []
    if compare_config:
        from hf_optcore.checkpoint_manager.resume_changes import config_changes

        changes, problems = config_changes(config, target.path, target.manifest)
    saved_opt = _saved_optimizer(target.path) if target.manifest is not None else None
    wanted = config.training.optimizer
    if saved_opt is not None and _canonical_optimizer(saved_opt) != _canonical_optimizer(wanted):
        problems.append(f"training.optimizer: {wanted!r}, but checkpoint {str(target.path)!r} holds the state of "
                        f"{saved_opt!r}; resume with training.optimizer={saved_opt}, or start a new run")
    if topology is not None and target.manifest is not None:
        more, said = topology_problems(target.manifest.get("topology"), topology,
                                       allow_change=config.checkpoint.allow_topology_change,
                                       batching=config.data.batching, where=target.path)
        problems += more
        warnings += said
    return changes, problems, warnings

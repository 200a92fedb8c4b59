"""A run owns its output directory: an identity, a lock for its lifetime, and refusals that change nothing.

With ``checkpoint.own_output_dir`` (the default; transformers' behaviour when false):

- **Identity.** When a run starts, rank 0 writes ``run.json`` into ``output_dir`` (atomically): run id,
  config fingerprint, start time, host, pid, what it resumed (:mod:`~hf_optcore.checkpoint_manager.run_identity`).
  Every manifest the run commits names its run id. A resume continues the run it resumes (same id); anything
  else is a new run.
- **Lock.** From train start to train end rank 0 holds an exclusive ``flock`` on ``output_dir/run.lock``. A
  second run on the same directory refuses at once, naming the holder; a lock file left by a dead process
  is no obstacle.
- **Where a run may start** (:func:`plan_run`, read-only; the Trainer and the preflight share it):

  * ``resume_from: auto`` resumes only the directory's own run (the one ``run.json`` names; without
    ``run.json``, the run of its newest complete checkpoint), walking back past corrupt checkpoints; a
    manifest-less ``checkpoint-N`` newer than the one resumed is named in a warning, never resumed.
  * A run that starts from step 0 (no resume, or ``auto`` with nothing of its own run to resume) in a
    directory holding checkpoints refuses, naming their run (id, start, config differences), unless
    ``checkpoint.overwrite``: then the old checkpoints are replaced step by step as this run saves its
    own, are never deleted wholesale, never resumed by ``auto`` and never counted by its retention.
    Two exceptions: ``auto`` restarts its own run from step 0 over manifest-less directories when that run
    never committed a checkpoint and the config is unchanged (it was killed inside its first save), with a
    warning naming them; and when the run did commit checkpoints and every one of them lost its manifest,
    ``auto`` refuses rather than start over on top of them.
  * A resume (``auto`` or a path) whose config differs from the checkpoint's refuses unless every changed
    field is allowed (:mod:`~hf_optcore.checkpoint_manager.resume_changes`).

Every refusal is a :class:`~hf_optcore.errors.RunDirError` raised before anything in ``output_dir`` is written,
changed or deleted.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_optcore.checkpoint_manager import resume, storage
from hf_optcore.checkpoint_manager.resume_changes import compared_fingerprint, diff_configs, saved_config
from hf_optcore.checkpoint_manager.run_identity import RunLock, new_run_id, now, read_run, write_run
from hf_optcore.checkpoint_manager.topology import Topology
from hf_optcore.errors import CheckpointError, RunDirError

logger = logging.getLogger(__name__)

__all__ = ["StartPlan", "claim", "plan_run"]

_HISTORY = 100


# ---- where a run may start --------------------------------------------------------------------


@dataclass
class _Found:
    """A ``checkpoint-<step>`` directory of the output directory (``manifest`` None: it has none)."""

    path: Path
    step: int
    manifest: dict | None = None

    @property
    def run_id(self) -> str | None:
        return (self.manifest or {}).get("run_id")


@dataclass
class StartPlan:
    """As what, and from which checkpoint, a run starts (:func:`plan_run`).

    Attributes:
        run_id: this run's id (a resume continues the resumed checkpoint's run).
        resume: the checkpoint to resume from (None: step 0).
        manifest: its manifest (None for a plain transformers checkpoint).
        lineage: run ids whose checkpoints count as this run's (None: ones written before run ids).
        changes: allowed config changes against the resumed checkpoint: ``(key, old, new)``.
        warnings: what the run should say when it starts.
        problems: why it may not start (empty: it may).
        owner: ``run.json`` as found.
    """

    run_id: str
    resume: Path | None = None
    manifest: dict | None = None
    lineage: set = field(default_factory=set)
    changes: list = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    owner: dict | None = None

    def record(self, config: Any) -> dict:
        """The ``run.json`` this run writes: its identity, this start appended to the history."""
        start = {"started": now(), "host": socket.gethostname(), "pid": os.getpid(),
                 "config_fingerprint": config.fingerprint(), "compared_fingerprint": compared_fingerprint(config),
                 "resumed_from": str(self.resume) if self.resume is not None else None}
        if self.changes:
            start["allowed_changes"] = [k for k, _, _ in self.changes]
        same = self.owner if self.owner and self.owner.get("run_id") == self.run_id else {}
        return {"run_id": self.run_id, "created": same.get("created", start["started"]), **start,
                "last_checkpoint": same.get("last_checkpoint"),
                "history": list(same.get("history", []))[-(_HISTORY - 1):] + [start]}


def _scan(output_dir: Path) -> tuple[list[_Found], list[_Found]]:
    complete = [_Found(c.path, c.step, c.manifest) for c in storage.list_complete(output_dir)]
    bare = [_Found(p, storage.step_of(p)) for p in storage.list_unmanifested(output_dir)]
    return complete, bare


def _names(found: list[_Found]) -> str:
    return ", ".join(f.path.name for f in found)


def _describe_others(config: Any, owner: dict | None, complete: list[_Found], bare: list[_Found]) -> str:
    """The runs whose checkpoints are in the directory: id, start, checkpoints, config differences."""
    parts = []
    by_run: dict[Any, list[_Found]] = {}
    for found in complete:
        by_run.setdefault(found.run_id, []).append(found)
    order = sorted(by_run, key=lambda rid: (owner is None or rid != owner.get("run_id"), -by_run[rid][-1].step))
    for rid in order:
        found = by_run[rid]
        if rid is None:
            parts.append(f"{_names(found)} (no run identity: written before hf_optcore recorded one)")
            continue
        text = f"run {rid}"
        if owner and owner.get("run_id") == rid:
            text += f" (started {owner.get('created')} on {owner.get('host')}, pid {owner.get('pid')})"
        text += f": {_names(found)}"
        saved = saved_config(found[-1].path)
        if saved is not None:
            diffs = diff_configs(saved, config)
            shown = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in diffs[:8]) + ("; ..." if len(diffs) > 8 else "")
            text += (f", whose config differs from this one in {shown}" if diffs else
                     ", with the same config as this one")
        parts.append(text)
    if owner and owner.get("run_id") not in by_run and not complete:
        parts.append(f"run {owner['run_id']} (started {owner.get('created')} on {owner.get('host')}, pid "
                     f"{owner.get('pid')}) owns the directory")
    if bare:
        parts.append(f"{_names(bare)} (no manifest: an interrupted save, or not written by hf_optcore)")
    return "; ".join(parts)


def _ways_on(resumable: bool) -> str:
    first = "resume it with checkpoint.resume_from=auto, " if resumable else ""
    return (f"{first}choose another output_dir, or set checkpoint.overwrite=true to replace its checkpoints "
            f"step by step")


def _same_config(owner: dict, config: Any) -> bool:
    """Whether ``run.json``'s run had this config, bookkeeping fields (checkpoint section, output_dir) aside."""
    if "compared_fingerprint" in owner:
        return owner["compared_fingerprint"] == compared_fingerprint(config)
    return owner.get("config_fingerprint") == config.fingerprint()


def _plan_fresh(config: Any, owner: dict | None, complete: list[_Found], bare: list[_Found],
                via_auto: bool = False) -> StartPlan:
    out = config.output_dir
    same_run = owner is not None and owner.get("last_checkpoint") is None and _same_config(owner, config)
    run_id = owner["run_id"] if same_run else new_run_id()
    plan = StartPlan(run_id=run_id, lineage={run_id})
    if not complete and not bare:
        return plan
    others = _describe_others(config, owner, complete, bare)
    if config.checkpoint.overwrite:
        plan.run_id = new_run_id()
        plan.lineage = {plan.run_id}
        plan.warnings.append(f"checkpoint.overwrite: run {plan.run_id} starts in {out!r}, which holds {others}; they "
                             f"are replaced step by step as this run saves, and never resumed or pruned by it")
        return plan
    lead = (f"checkpoint.resume_from: 'auto' resumes only this directory's own run, which has no checkpoint in "
            f"{out!r}, and the directory holds the checkpoints of another run" if via_auto else
            f"output_dir: {out!r} holds the checkpoints of another run")
    plan.problems.append(f"{lead}: {others}. Starting here would overwrite them: "
                         f"{_ways_on(resumable=bool(complete) and not via_auto)}")
    return plan


def _plan_auto(config: Any, owner: dict | None, complete: list[_Found], bare: list[_Found], verify: bool,
               required: bool) -> StartPlan:
    out = config.output_dir
    lineage_id = owner["run_id"] if owner else (complete[-1].run_id if complete else None)
    mine = [f for f in complete if f.run_id == lineage_id] if (owner or complete) else []
    target, manifest, errors = resume.newest_intact(mine, verify)
    if target is not None:
        run_id = lineage_id or new_run_id()
        plan = StartPlan(run_id=run_id, resume=target.path, manifest=manifest, lineage={lineage_id, run_id})
        plan.warnings += resume.fallback_warnings(errors, target.path)
        plan.warnings += [resume.unmanifested_warning(b.path, target.path) for b in bare if b.step > target.step]
        return plan
    if errors:
        return StartPlan(run_id="", problems=[f"checkpoint.resume_from: 'auto' finds no intact checkpoint in "
                                              f"{out!r}: {'; '.join(errors)}"])
    if required:
        return StartPlan(run_id="", problems=[f"checkpoint.resume_from: No valid checkpoint found in output directory "
                                              f"{out!r} (no complete checkpoint of this directory's run)"])
    if owner is not None and owner.get("last_checkpoint") is not None and bare and not config.checkpoint.overwrite:
        return StartPlan(run_id="", problems=[
            f"checkpoint.resume_from: run {owner['run_id']} committed checkpoints in {out!r} (the newest at step "
            f"{owner['last_checkpoint']}), but none is complete now: {_names(bare)} "
            f"{'has' if len(bare) == 1 else 'have'} no manifest (deleted or damaged). checkpoint.resume_from=auto "
            f"does not start over from step 0 on top of them: resume one explicitly "
            f"(checkpoint.resume_from={bare[-1].path}, not verified), choose another output_dir, or set "
            f"checkpoint.overwrite=true to replace them step by step"])
    if (owner is not None and not complete and bare and owner.get("last_checkpoint") is None
            and _same_config(owner, config)):
        # Killed inside its first save: the same run starts over and replaces them as it saves again.
        plan = StartPlan(run_id=owner["run_id"], lineage={owner["run_id"]})
        plan.warnings += [f"{b.path} has no manifest (an interrupted save of this run, {owner['run_id']}, which "
                          f"never completed a checkpoint): it is never resumed from; the run starts from step 0 "
                          f"and replaces it when it saves step {b.step} again" for b in bare]
        return plan
    return _plan_fresh(config, owner, complete, bare, via_auto=bool(complete or bare))


def _plan_path(config: Any, spec: Any, owner: dict | None, complete: list[_Found], bare: list[_Found],
               verify: bool) -> StartPlan:
    try:
        found = resume.resolve_path(spec, verify)
    except CheckpointError as exc:
        return StartPlan(run_id="", problems=[str(exc)])
    path, manifest, warnings = found.path, found.manifest, found.warnings
    rid = (manifest or {}).get("run_id") if manifest is not None else None
    run_id = rid or new_run_id()
    # A checkpoint written before run ids adopts the other id-less ones; a plain transformers one adopts nothing.
    lineage = {run_id} | ({rid} if manifest is not None else set())
    plan = StartPlan(run_id=run_id, resume=path, manifest=manifest, lineage=lineage, warnings=warnings)
    here = path.resolve()
    foreign = [f for f in complete if f.run_id not in lineage and f.path.resolve() != here]
    if owner is not None and owner.get("run_id") in lineage:
        foreign = []  # this run owns the directory: other runs' checkpoints are leftovers of an overwrite
    if foreign and not config.checkpoint.overwrite:
        plan.problems.append(f"output_dir: {config.output_dir!r} holds the checkpoints of another run: "
                             f"{_describe_others(config, owner, foreign, [])}. Resuming {str(path)!r} "
                             f"(run {rid or 'without an id'}) there would mix two runs: choose another output_dir, "
                             f"or set checkpoint.overwrite=true to replace their checkpoints step by step")
    plan.warnings += [resume.unmanifested_warning(b.path, path) for b in bare
                      if b.path.resolve() != here and b.step > storage.step_of(path)]
    return plan


def plan_run(config: Any, resume_spec: Any = None, *, verify: bool = True,
             topology: Topology | None = None) -> StartPlan:
    """As what, and from which checkpoint, a run of ``config`` starts in ``config.output_dir``; reads, never writes.

    Every objection to a resume is in ``problems`` at once: config fields changed without
    ``checkpoint.allow_changes``, another optimizer, another topology (:func:`resume.objections`).

    Args:
        config: the run's :class:`~hf_optcore.config.TrainerConfig`.
        resume_spec: ``"auto"`` / True, a checkpoint path, or None (step 0).
        verify: check the resumed checkpoint against its manifest (sha256 and the rest of ``storage.verify``).
        topology: this run's topology, checked against the resumed checkpoint's (None: not checked here).
    """
    out = Path(config.output_dir)
    owner = read_run(out)
    complete, bare = _scan(out)
    if resume_spec is True or resume_spec == "auto":
        plan = _plan_auto(config, owner, complete, bare, verify, required=resume_spec is True)
    elif resume_spec:
        plan = _plan_path(config, resume_spec, owner, complete, bare, verify)
    else:
        plan = _plan_fresh(config, owner, complete, bare)
    plan.owner = owner
    if plan.resume is not None:
        target = resume.Target(plan.resume, plan.manifest)
        plan.changes, problems, warnings = resume.objections(config, target, topology, compare_config=True)
        plan.problems += problems
        plan.warnings += warnings
    return plan


def claim(config: Any, resume_spec: Any, topology: Topology) -> tuple[StartPlan, RunLock, dict]:
    """Plan the start, take the run lock, write ``run.json``: ``(plan, held lock, run.json record)``.

    Rank 0 only. Raises :class:`RunDirError` before anything is written when the run may not start (a refusal
    found without the lock touches nothing, not even the lock file); the lock is released on any failure.
    """
    plan = plan_run(config, resume_spec, verify=False, topology=topology)  # cheap first: no sha256
    if plan.problems:
        raise RunDirError("; ".join(plan.problems))
    lock = RunLock(config.output_dir)
    lock.acquire()
    try:
        plan = plan_run(config, resume_spec, verify=True, topology=topology)  # under the lock: authoritative
        if plan.problems:
            raise RunDirError("; ".join(plan.problems))
        record = plan.record(config)
        lock.describe(run_id=plan.run_id)
        write_run(config.output_dir, record)
    except BaseException:
        lock.release()
        raise
    for line in plan.warnings:
        logger.warning("%s", line)
    if plan.changes:
        logger.warning("resuming %s with the changed config allowed by checkpoint.allow_changes: %s", plan.resume,
                       "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in plan.changes))
    logger.info("run %s owns %s%s", plan.run_id, config.output_dir,
                f" (resumed from {plan.resume})" if plan.resume is not None else "")
    return plan, lock, record

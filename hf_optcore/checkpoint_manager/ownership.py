"""A run owns its output directory: an identity, a lock for its lifetime, and refusals that change nothing.

With ``checkpoint.own_output_dir`` (the default; transformers' behaviour when false):

- **Identity.** When a run starts, rank 0 writes ``run.json`` into ``output_dir`` (atomically): run id,
  config fingerprint (:meth:`~hf_optcore.config.TrainerConfig.fingerprint`), start time, host, pid, what it
  resumed, its newest committed checkpoint, and one entry per start (``compared_fingerprint`` hashes only the
  fields a resume compares, see :mod:`~hf_optcore.checkpoint_manager.resume_changes`). Every manifest the run commits names
  its run id. A resume continues the run it resumes (same id); anything else is a new run.
- **Lock.** From train start to train end rank 0 holds an exclusive ``flock`` on ``output_dir/run.lock``
  (holder host, pid, since and run id written inside). A second run on the same directory refuses at once,
  naming the holder. The kernel drops the lock however the process ends (exception, SIGKILL), so a lock
  file left by a dead process is no obstacle; ``hf-optcore validate`` probes it without writing.
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

import datetime as _dt
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_optcore.checkpoint_manager import storage
from hf_optcore.checkpoint_manager.manager import TOPOLOGY_KEYS, CheckpointManager
from hf_optcore.checkpoint_manager.resume_changes import (
    compared_fingerprint,
    config_changes,
    diff_configs,
    saved_config,
    step_size_problem,
)
from hf_optcore.errors import CheckpointError, RunDirError

logger = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "RUN_FILE", "RunCheckpointManager", "RunLock", "StartPlan", "lock_holder", "plan_run",
           "read_run", "write_run"]

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
TRAINER_STATE = "trainer_state.json"
_HISTORY = 100


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


# ---- run.json -------------------------------------------------------------------------------


def read_run(output_dir: str | os.PathLike) -> dict | None:
    """The identity ``run.json`` of ``output_dir``, or None when there is none (or it is unreadable: warned)."""
    path = Path(output_dir) / RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s): the run owning this directory is unknown", path, exc)
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def write_run(output_dir: str | os.PathLike, record: dict) -> None:
    """Write ``run.json`` atomically (temporary file, fsync, rename)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / RUN_FILE)
    storage.fsync_dir(out)


# ---- the lock -------------------------------------------------------------------------------


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode("utf-8")) if raw else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def in_use_message(output_dir: str | os.PathLike, holder: dict) -> str:
    who = ", ".join(f"{k} {holder[k]}" for k in ("run_id", "pid", "host", "since") if holder.get(k)) or "holder unknown"
    return (f"output_dir: {str(output_dir)!r} is in use by another run ({who}), which holds {LOCK_FILE}; wait "
            f"for it to end or stop it, or choose another output_dir")


def lock_holder(output_dir: str | os.PathLike) -> dict | None:
    """Who holds ``output_dir``'s run lock (``{}`` when unknown), or None when nobody does. Writes nothing."""
    import fcntl

    try:
        fd = os.open(Path(output_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive ``flock`` on ``output_dir/run.lock``, held by one process for the life of a run.

    Args:
        output_dir: the run's directory (created when missing).
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, attempts: int = 5) -> None:
        """Take the lock or raise :class:`RunDirError` naming its holder (a few quick retries: a preflight probe
        holds it for an instant)."""
        import fcntl

        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        for attempt in range(attempts):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == attempts - 1:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunDirError(in_use_message(self.path.parent, holder)) from None
                time.sleep(0.1)
        self._fd = fd
        self.describe()

    def describe(self, **extra: Any) -> None:
        """Write who holds the lock (host, pid, since, and ``extra`` such as the run id) into the lock file."""
        if self._fd is None:
            return
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(), **extra}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode("utf-8"), 0)

    def release(self) -> None:
        """Release the lock (the file stays: removing it would race with a run opening it)."""
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


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
        start = {"started": _now(), "host": socket.gethostname(), "pid": os.getpid(),
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


def _newest_intact(candidates: list[_Found], verify: bool) -> tuple[_Found | None, dict | None, list[str]]:
    errors = []
    for found in reversed(candidates):
        if not verify:
            return found, found.manifest, errors
        try:
            return found, storage.verify(found.path), errors
        except CheckpointError as exc:
            errors.append(str(exc))
    return None, None, errors


def _names(found: list[_Found]) -> str:
    return ", ".join(f.path.name for f in found)


def _unmanifested_warning(found: _Found, resumed: Path) -> str:
    return (f"{found.path} has no manifest (an interrupted save, or its manifest was deleted): it is never trusted "
            f"or resumed from; resuming {resumed} instead")


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
    resume = "resume it with checkpoint.resume_from=auto, " if resumable else ""
    return (f"{resume}choose another output_dir, or set checkpoint.overwrite=true to replace its checkpoints "
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
    run_id = owner["run_id"] if same_run else _new_run_id()
    plan = StartPlan(run_id=run_id, lineage={run_id})
    if not complete and not bare:
        return plan
    others = _describe_others(config, owner, complete, bare)
    if config.checkpoint.overwrite:
        plan.run_id = _new_run_id()
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
    target, manifest, errors = _newest_intact(mine, verify)
    if target is not None:
        run_id = lineage_id or _new_run_id()
        plan = StartPlan(run_id=run_id, resume=target.path, manifest=manifest, lineage={lineage_id, run_id})
        plan.warnings += [f"{e}; falling back to the previous complete checkpoint" for e in errors]
        plan.warnings += [_unmanifested_warning(b, target.path) for b in bare if b.step > target.step]
        return plan
    if errors:
        return StartPlan(run_id="", problems=[f"checkpoint.resume_from: 'auto' finds no intact checkpoint in "
                                              f"{out!r}: {'; '.join(errors)}"])
    if required:
        return StartPlan(run_id="", problems=[f"checkpoint.resume_from: resume requested but no complete checkpoint "
                                              f"of this directory's run in {out!r}"])
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
    path = Path(spec).expanduser()
    if not path.exists():
        return StartPlan(run_id="", problems=[f"checkpoint.resume_from: {str(spec)!r} does not exist"])
    if not path.is_dir():
        return StartPlan(run_id="", problems=[f"checkpoint.resume_from: {str(spec)!r} is not a checkpoint directory"])
    manifest = storage.read_manifest(path)
    warnings = []
    if manifest is None and (path / TRAINER_STATE).is_file():
        warnings.append(f"resuming from {path}, a checkpoint not written by hf_optcore (or whose manifest is gone): "
                        f"no integrity check, and hf_optcore's components (EMA, sampler position, collate RNG) "
                        f"start fresh")
    else:
        try:
            manifest = storage.verify(path) if verify or manifest is None else manifest
        except CheckpointError as exc:
            inside = [c.path.name for c in storage.list_complete(path)]
            hint = f" (it holds {', '.join(inside)}: name one of them, or use 'auto')" if inside else ""
            return StartPlan(run_id="", problems=[f"checkpoint.resume_from: {exc}{hint}"])
    rid = (manifest or {}).get("run_id") if manifest is not None else None
    run_id = rid or _new_run_id()
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
    plan.warnings += [_unmanifested_warning(b, path) for b in bare
                      if b.path.resolve() != here and b.step > storage.step_of(path)]
    return plan


def plan_run(config: Any, resume: Any = None, *, verify: bool = True, topology: dict | None = None) -> StartPlan:
    """As what, and from which checkpoint, a run of ``config`` starts in ``config.output_dir``; reads, never writes.

    Args:
        config: the run's :class:`~hf_optcore.config.TrainerConfig`.
        resume: ``"auto"`` / True, a checkpoint path, or None (step 0).
        verify: check the resumed checkpoint's files against its manifest (sha256).
        topology: this run's ``world_size`` / ``per_device_train_batch_size`` / ``gradient_accumulation_steps``,
            checked against the resumed checkpoint's (None: not checked here).
    """
    out = Path(config.output_dir)
    owner = read_run(out)
    complete, bare = _scan(out)
    if resume is True or resume == "auto":
        plan = _plan_auto(config, owner, complete, bare, verify, required=resume is True)
    elif resume:
        plan = _plan_path(config, resume, owner, complete, bare, verify)
    else:
        plan = _plan_fresh(config, owner, complete, bare)
    plan.owner = owner
    if plan.resume is not None and not plan.problems:
        plan.changes, problems = config_changes(config, plan.resume, plan.manifest)
        plan.problems += problems
        if topology is not None and plan.manifest is not None:
            plan.problems += _topology_problems(config, plan, topology)
    return plan


def _topology_problems(config: Any, plan: StartPlan, now: dict) -> list[str]:
    saved = plan.manifest.get("topology") or {}
    diffs = [f"{k}: checkpoint {saved[k]}, this run {now[k]}" for k in TOPOLOGY_KEYS
             if k in saved and k in now and saved[k] != now[k]]
    if not diffs:
        return []
    if not config.checkpoint.allow_topology_change:
        return [f"checkpoint {str(plan.resume)!r} was saved with another topology ({'; '.join(diffs)}); resuming would "
                f"not be exact. Use the same settings or set checkpoint.allow_topology_change=true"]
    problem = step_size_problem(saved, now, config.data.batching, plan.resume)
    if problem and config.data.batching == "hf":
        plan.warnings.append(f"{problem} (data.batching=hf: transformers' own positioning runs anyway)")
        return []
    return [problem] if problem else []


# ---- the run's checkpoint manager ---------------------------------------------------------------


class RunCheckpointManager(CheckpointManager):
    """The checkpoint manager of a run that owns its output directory.

    Only checkpoints of the run's ``lineage`` (run ids; None for checkpoints written before run ids) are
    listed, ranked, pruned and resumed: another run's checkpoints left in the directory are never touched.
    Every manifest it commits names the run (``run_id``), and ``run.json`` (``run_record``) records the newest
    committed step. With an empty lineage it is a plain :class:`CheckpointManager`.
    """

    lineage: frozenset = frozenset()
    run_record: dict | None = None

    def checkpoints(self) -> list[storage.CheckpointInfo]:
        found = super().checkpoints()
        if not self.lineage:
            return found
        return [c for c in found if c.manifest.get("run_id") in self.lineage]

    def _meta(self, metrics: dict[str, float] | None, world: int) -> dict[str, Any]:
        meta = super()._meta(metrics, world)
        if self.run_record is not None:
            meta["run_id"] = self.run_record["run_id"]
        return meta

    def commit(self, path: Path, step: int, metrics: dict[str, float] | None, files: list[str]) -> Path:
        path = super().commit(path, step, metrics, files)
        if self.run_record is not None:
            self.run_record["last_checkpoint"] = int(step)
            write_run(self.output_dir, self.run_record)
        return path


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (itself without a process group)."""
    from hf_optcore.distributed import rank_and_world

    if rank_and_world()[1] <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

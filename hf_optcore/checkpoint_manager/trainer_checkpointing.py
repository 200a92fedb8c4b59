"""What ``OptCoreTrainer`` adds to transformers' own checkpoints: components, a manifest, retention, exact resume.

transformers writes ``checkpoint-<step>`` itself (``Trainer._save_checkpoint``: model or adapter,
optimizer, scheduler, scaler, RNG, trainer state; FSDP/DeepSpeed sharded states, ``save_only_model``,
``save_on_each_node``), and loads it back itself on resume. :meth:`TrainerCheckpointing.save` wraps that save:
it makes the directory safe to write (:func:`storage.prepare_resave`), lets transformers write, adds hf_optcore's
components (EMA, sampler position, every rank's collate RNG) under ``components/`` and the resolved
``config.yaml`` (:mod:`components`), writes ``manifest.json`` last as the commit point (:mod:`storage`), then
applies retention (:mod:`retention`). A full disk on the way ends in one :class:`StorageFullError` naming the
directory, with the partial save removed and every earlier checkpoint intact. A plain ``transformers.Trainer`` can
resume from such a checkpoint, and ``OptCoreTrainer`` can resume from a plain transformers checkpoint (its
components start fresh).

The path from ``OptCoreTrainer._save_checkpoint`` to the file system is three layers: the Trainer, this object
(which reads the Trainer's live model, arguments, state and components whenever it needs them, and keeps no copy
of them), and :mod:`storage` / :mod:`components`, which write the files.

Exact resume, and why the RNG needs care: Accelerate's dataloader collates one batch ahead, so
when a checkpoint is written after step k, batch k+1 (the next one to train on) was already
collated, drawing from the RNG state of *before* step k's forward pass. Restoring the step-k RNG
state after the first batch is drawn (what ``transformers.Trainer`` does) therefore diverges for
collators that draw random numbers. The collate tracker records the RNG state before each
training collation; a checkpoint stores the one of the still-pending batch, and a resume replays
that state for the pending batch and the step-k state right after it.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hf_optcore.checkpoint_manager import components, ownership, resume, retention, run_identity, storage
from hf_optcore.checkpoint_manager import rng as _rng
from hf_optcore.checkpoint_manager.faults import (
    NonFiniteGuard,
    PreemptionHandler,
    StorageFullError,
    storage_full_reason,
)
from hf_optcore.checkpoint_manager.topology import Topology, epoch_length_problem
from hf_optcore.distributed import barrier, rank_and_world
from hf_optcore.errors import CheckpointError, RunDirError
from hf_optcore.wrapping import is_peft_model, unwrap_model

logger = logging.getLogger(__name__)


class CollateRNGTracker:
    """Wraps a data collator to record the RNG state before each training collation.

    Args:
        collate: the collator to wrap.
    """

    def __init__(self, collate: Any):
        self.collate = collate
        self.active = False
        self.pending: collections.deque = collections.deque()
        self.before_next: dict | None = None
        self.after_next: dict | None = None

    def __call__(self, features):
        if not self.active or torch.utils.data.get_worker_info() is not None:
            return self.collate(features)
        if self.before_next is not None:
            _rng.restore(self.before_next)
            self.before_next = None
        self.pending.append(_rng.capture())
        out = self.collate(features)
        if self.after_next is not None:
            _rng.restore(self.after_next)
            self.after_next = None
        return out

    def consumed(self, n: int) -> None:
        for _ in range(min(n, len(self.pending))):
            self.pending.popleft()


class TrainerCheckpointing:
    """Checkpoint behaviour of one ``OptCoreTrainer`` (created by it; one per trainer).

    It reads the trainer's live objects (``args``, ``model``, ``optimizer``, ``state``, ``optcore_state``) when it
    needs them, and keeps only what is its own: the resume in progress, the run's lineage, the fault handlers.

    Args:
        trainer: the ``OptCoreTrainer`` (extensions enabled).
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.durable = True  # fsync files and directories (off only to measure what fsync costs)
        self.tracker: CollateRNGTracker | None = None
        self.resume_path: Path | None = None
        self.protected_steps: set[int] = set()  # the checkpoint resumed from is never pruned
        self._resume_state: dict | None = None
        self._rng_done = True
        self._components_done = True
        self._first_pull_done = False
        self._before_save: dict[str, tuple[int, int]] = {}
        cfg = self.config
        self.guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_consecutive_nonfinite)
        self.preemption = PreemptionHandler()
        self.preempted = False
        self._scheduler_backup: tuple[dict, list[float]] | None = None
        self._lock: run_identity.RunLock | None = None
        self._lineage: frozenset = frozenset()  # run ids whose checkpoints are this run's (empty: every one)
        self._run_record: dict | None = None  # run.json of the run that owns output_dir (rank 0 only)
        self._changes: list = []
        self._resume_topology: dict | None = None
        self._optimizer_given = trainer.optimizer is not None

    @property
    def config(self):
        return self.trainer.optcore_config.checkpoint

    @property
    def output_dir(self) -> Path:
        return Path(self.trainer.args.output_dir)

    # ---- the run's checkpoints ------------------------------------------------------------

    def checkpoints(self) -> list[storage.CheckpointInfo]:
        """This run's complete checkpoints in ``output_dir``, oldest first (another run's are never listed)."""
        found = storage.list_complete(self.output_dir)
        if not self._lineage:
            return found
        return [c for c in found if c.manifest.get("run_id") in self._lineage]

    def latest(self) -> Path | None:
        """This run's newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1].path if found else None

    def last_good_checkpoint(self) -> Path | None:
        """The newest checkpoint saved before the first non-finite loss or weights (the latest when there were none)."""
        bad = self.guard.last_good_step()
        found = [c for c in self.checkpoints() if bad is None or c.step < bad]
        return found[-1].path if found else None

    def divergence_note(self) -> str:
        """Where a diverged run can go back to, for its one error line."""
        good = self.last_good_checkpoint()
        if good is not None:
            return f"the last good checkpoint is {good}"
        if self.checkpoints():
            return "every checkpoint saved holds non-finite weights or followed a non-finite loss"
        return "no checkpoint was saved"

    def prune(self) -> list[Path]:
        """Delete this run's checkpoints that no retention rule keeps (only the files each manifest lists)."""
        args = self.trainer.args
        ranking = retention.Ranking(args.metric_for_best_model, args.greater_is_better)
        removed = []
        for c in retention.to_prune(self.checkpoints(), self.config, ranking, self.protected_steps):
            if not storage.delete(c.path):
                logger.warning("pruned %s but kept the directory: it holds files hf_optcore did not write", c.path)
            removed.append(c.path)
        return removed

    # ---- train() ------------------------------------------------------------------------

    def begin_train(self, resume_from_checkpoint: Any) -> str | None:
        """Resolve what to resume from (``auto``/True, a path, or ``checkpoint.resume_from``) to a verified checkpoint.

        With ``checkpoint.own_output_dir`` the run claims ``output_dir`` first (:mod:`ownership`): it refuses
        another run's directory, a directory in use and an unallowed config change before anything is written,
        then holds the run lock until :meth:`end_train` and records its identity. Otherwise (:func:`resume.find`):
        a checkpoint written by hf_optcore must be intact (``auto`` walks back past corrupt ones, warning); a plain
        transformers checkpoint (no manifest) is accepted when named explicitly. Either way every objection
        (config, optimizer, topology) is reported at once, in one error.
        """
        arg = None if resume_from_checkpoint is False else resume_from_checkpoint
        if arg is None:
            arg = self.trainer.args.resume_from_checkpoint
        self._changes = []
        if self.config.own_output_dir:
            path, manifest = self._claim_output_dir(arg)
        else:
            path, manifest = self._find_resume(arg)
        if rank_and_world()[0] == 0:  # only once the run may start: a refusal changes nothing
            for leftover in storage.remove_leftovers(self.output_dir):
                logger.warning("removed %s left by an interrupted checkpoint save", leftover)
        self.resume_path = path
        self._resume_topology = (manifest or {}).get("topology")
        self._resume_state = None
        self._rng_done = self._components_done = True
        if manifest is not None:
            self.protected_steps.add(int(manifest["step"]))
            self._resume_state = components.rank_state(path, rank_and_world()[0],
                                                        new_rank_ok=self.config.allow_topology_change)
            self._rng_done = self._components_done = False
            logger.info("resuming from %s (step %s)", path, manifest["step"])
        self.tracker = None
        self._first_pull_done = False
        self.preempted = False
        self.preemption.received = None
        if self.config.save_on_preemption:
            self.preemption.install()
        return str(path) if path is not None else None

    def _find_resume(self, arg: Any) -> tuple[Path | None, dict | None]:
        target = resume.find(arg, self.output_dir, verify=self.config.verify)
        _, problems, warnings = resume.objections(self.trainer.optcore_config, target,
                                                  Topology.of_arguments(self.trainer.args), compare_config=False)
        if problems:
            raise CheckpointError("; ".join(problems))
        for line in target.warnings + warnings:
            logger.warning("%s", line)
        return target.path, target.manifest

    def _claim_output_dir(self, arg: Any) -> tuple[Path | None, dict | None]:
        """Rank 0 claims ``output_dir`` (:func:`ownership.claim`); every rank gets its decision, or its refusal."""
        decision = {}
        if rank_and_world()[0] == 0:
            try:
                plan, self._lock, record = ownership.claim(self.trainer.optcore_config, arg,
                                                           Topology.of_arguments(self.trainer.args))
            except Exception as exc:
                run_identity.broadcast({"error": str(exc), "own": isinstance(exc, RunDirError)})
                raise
            decision = {"path": str(plan.resume) if plan.resume is not None else None, "manifest": plan.manifest,
                        "lineage": sorted(plan.lineage, key=str), "record": record, "changes": plan.changes}
        decision = run_identity.broadcast(decision)
        if "error" in decision:
            raise (RunDirError if decision["own"] else CheckpointError)(decision["error"])
        self._lineage = frozenset(decision["lineage"])
        self._run_record = decision["record"] if rank_and_world()[0] == 0 else None
        self._changes = decision["changes"]
        if decision["path"] is None:
            return None, None
        return Path(decision["path"]), decision["manifest"]  # verified by rank 0

    def on_train_begin(self, train_dataloader: Any) -> None:
        """Wrap the prepared train dataloader's collator (the skip-loader of a resume copies it); after a resume
        with allowed config changes, make the new optimizer and scheduler values run (transformers restored the
        checkpoint's)."""
        if self._changes:
            from hf_optcore.checkpoint_manager.resume_changes import reapply

            reapply(self.trainer, self._changes, optimizer_given=self._optimizer_given)
        base = getattr(train_dataloader, "base_dataloader", train_dataloader)
        if base is None or not hasattr(base, "collate_fn"):
            return
        if not isinstance(base.collate_fn, CollateRNGTracker):
            base.collate_fn = CollateRNGTracker(base.collate_fn)
        self.tracker = base.collate_fn

    def end_train(self) -> None:
        self.preemption.uninstall()
        self.tracker = None
        if self._lock is not None:  # the run is over, however it ended
            self._lock.release()
            self._lock = None

    # ---- save: around transformers' own _save_checkpoint ---------------------------------

    def save(self, run_dir: str | Path, transformers_save: Callable[[], None]) -> Path:
        """Save the checkpoint of the current step into ``run_dir``: transformers' files (``transformers_save``,
        its own ``_save_checkpoint``), then hf_optcore's, the manifest last, then retention.

        Raises:
            StorageFullError: the disk filled up (or a quota or file-size limit was hit); the partial checkpoint
                was removed, every earlier one is complete.
        """
        step = self.trainer.state.global_step
        path = Path(run_dir) / f"{storage.PREFIX}{step}"
        fresh = not os.path.lexists(path)
        args = self.trainer.args
        try:
            self._prepare(path)
            # Retention (save_total_limit) is applied once the new checkpoint counts, not by transformers'
            # mtime-based rotation before its manifest exists.
            limit, args.save_total_limit = args.save_total_limit, None
            try:
                transformers_save()
            finally:
                args.save_total_limit = limit
            self._add_and_commit(path)
        except Exception as exc:
            reason = storage_full_reason(exc, path)
            if reason is None:
                raise
            self._drop_partial(path, fresh)
            latest = self.latest()
            raise StorageFullError(
                f"{reason} in {str(Path(run_dir))!r} while saving checkpoint-{step}: the partial checkpoint was "
                f"removed; " + (f"the last complete checkpoint is {str(latest)!r} (resume it with "
                                f"checkpoint.resume_from=auto once there is space)" if latest else
                                "no checkpoint of this run was saved")) from exc
        return path

    def _prepare(self, path: Path) -> None:
        """Rank 0 makes ``path`` safe to write (:func:`storage.prepare_resave`); every rank snapshots it."""
        if rank_and_world()[0] == 0:
            for i, note in enumerate(storage.prepare_resave(path)):
                (logger.info if i == 0 and note.startswith("re-saving") else logger.warning)("%s", note)
        self._before_save = storage.snapshot(path)
        barrier()

    def _add_and_commit(self, path: Path) -> None:
        """Add hf_optcore's components to transformers' checkpoint at ``path``, then the manifest, then prune."""
        t = self.trainer
        rank, _ = rank_and_world()
        pending = self.tracker.pending[0] if self.tracker is not None and self.tracker.pending else None
        rank_state = {"rng": _rng.capture(), **({"pending_collate_rng": pending} if pending is not None else {})}
        path.mkdir(parents=True, exist_ok=True)
        # Components whose state differs per rank (a stream's position) go into each rank's own file.
        per_rank = {n: c.state_dict() for n, c in t.optcore_state.items() if getattr(c, "per_rank", False)}
        if per_rank:
            rank_state["components"] = per_rank
        components.write_rank_state(path, rank, rank_state)
        self.guard.observe_saved_weights([p for p in self._trained() if p.requires_grad], t.state.global_step)
        barrier()
        if rank == 0:
            components.write_components(path, t.optcore_state, t.optcore_config)
            metrics = {}
            for entry in t.state.log_history:
                if entry.get("step") == t.state.global_step:
                    metrics.update({k: v for k, v in entry.items() if k.startswith("eval_")})
            written = storage.written_since(path, self._before_save)
            for rel in storage.remove_stale(path, written):
                logger.warning("removed %s from %s: an earlier save left it and this one did not rewrite it", rel, path)
            storage.commit_in_place(path, t.state.global_step, self._meta(metrics), written, durable=self.durable)
            if self._run_record is not None:
                self._run_record["last_checkpoint"] = int(t.state.global_step)
                run_identity.write_run(self.output_dir, self._run_record)
            self.prune()
        barrier()

    def _meta(self, metrics: dict[str, Any]) -> dict[str, Any]:
        t = self.trainer
        meta = {
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
            "config_hash": t.optcore_config.fingerprint(),
            "topology": Topology.of_arguments(t.args).to_dict(),
            # Shared components have a file of their own (verified); per-rank ones live in each rank's rng file.
            "components": sorted(n for n, c in t.optcore_state.items() if not getattr(c, "per_rank", False)),
            "rank_components": sorted(n for n, c in t.optcore_state.items() if getattr(c, "per_rank", False)),
            "model_format": "peft_adapter" if is_peft_model(unwrap_model(t.model)) else "full",
            "saved_by": "trainer",
        }
        if not (t.is_deepspeed_enabled or t.is_fsdp_enabled):
            # Whether transformers wrote optimizer.pt / scheduler.pt: verification then requires them.
            meta["save_only_model"] = bool(t.args.save_only_model)
        if self._run_record is not None:
            meta["run_id"] = self._run_record["run_id"]
        return meta

    def _drop_partial(self, path: Path, fresh: bool) -> None:
        """Remove what a failed save wrote: all of a directory it created, else the files it wrote (a checkpoint
        without a manifest is never listed anyway; this gives the space back)."""
        if rank_and_world()[0] != 0 or path.is_symlink():
            return
        if fresh:
            shutil.rmtree(path, ignore_errors=True)  # fd-based: links inside are not followed
            return
        for rel in storage.written_since(path, self._before_save):
            try:
                (path / rel).unlink()
            except OSError:
                pass

    # ---- resume -------------------------------------------------------------------------

    def owns_rng(self, checkpoint: Any) -> bool:
        """True when the RNG of ``checkpoint`` is restored here (a checkpoint with hf_optcore's components)."""
        return self._resume_state is not None and checkpoint is not None and Path(checkpoint) == self.resume_path

    def _restore_components(self) -> None:
        if self._components_done or self.resume_path is None:
            return
        self._components_done = True
        state = self.trainer.optcore_state
        sampler = state.get("sampler")
        if sampler is not None and hasattr(sampler, "allow_topology_change"):
            sampler.allow_topology_change = self.config.allow_topology_change  # re-cut by examples consumed
        components.load_components(self.resume_path, state)
        for name, saved in (self._resume_state or {}).get("components", {}).items():
            if name in state:  # per-rank components, from this rank's own file
                state[name].load_state_dict(saved)
        self._check_epoch_length(sampler)
        if sampler is not None and hasattr(sampler, "state_dict"):
            # The Trainer positions the data itself (index-level skip, nothing is loaded or
            # collated), so the sampler resumes its epoch from the start, not from `consumed`.
            sd = sampler.state_dict()
            if isinstance(sd, dict) and "consumed" in sd:
                sampler.load_state_dict({**sd, "consumed": 0})

    def restore_components(self) -> None:
        """Load the resumed checkpoint's components now (once): a stream must be positioned before it is iterated."""
        self._restore_components()

    def _check_epoch_length(self, sampler: Any) -> None:
        file = self.resume_path / components.component_file("sampler")
        if sampler is None or not self._resume_topology or not file.is_file():
            return
        saved = components.safe_load(file)
        problem = epoch_length_problem(self._resume_topology, saved.get("num_batches"), len(sampler),
                                       self.trainer.args.gradient_accumulation_steps, self.resume_path)
        if problem:
            raise CheckpointError(problem)

    def load_rng_at_epoch_start(self) -> None:
        """transformers' hook before the resumed epoch's iterator: restore here only at an epoch boundary."""
        self._restore_components()
        if self._rng_done or self._resume_state is None or self._first_pull_done:
            return  # mid-epoch: handled around the first pull (see before_pull)
        self._rng_done = True
        _rng.restore(self._resume_state["rng"])

    def before_pull(self) -> None:
        self._restore_components()
        if not self._rng_done and self._resume_state is not None:
            self._rng_done = True
            pending = self._resume_state.get("pending_collate_rng")
            if pending is not None and self.tracker is not None:
                self.tracker.before_next = pending
                self.tracker.after_next = self._resume_state["rng"]
            else:
                _rng.restore(self._resume_state["rng"])
        self._first_pull_done = True
        if self.tracker is not None:
            self.tracker.active = True

    def after_pull(self, n: int) -> None:
        if self.tracker is not None:
            self.tracker.active = False
            self.tracker.consumed(n)

    # ---- faults and cadence (called by CheckpointCallback) --------------------------------

    def _trained(self) -> list[torch.Tensor]:
        opt = self.trainer.optimizer
        return [p for g in opt.param_groups for p in g["params"]] if opt is not None else []

    def before_optimizer_step(self) -> None:
        """A step with a non-finite loss or gradient is skipped: its gradients are dropped (so the optimizer
        leaves parameters and moments alone) and the scheduler is put back after transformers steps it."""
        t = self.trainer
        if getattr(t.accelerator, "scaler", None) is not None:
            return  # fp16: the gradient scaler skips overflowing steps itself
        params = self._trained()
        if self.guard.should_skip([p.grad for p in params if p.grad is not None], t.state.global_step):
            for p in params:
                p.grad = None
            sched = t.lr_scheduler
            if sched is not None and hasattr(sched, "state_dict"):
                self._scheduler_backup = (sched.state_dict(), [g["lr"] for g in t.optimizer.param_groups])

    def after_optimizer_step(self) -> None:
        """Stop before anything is saved when the update left non-finite weights."""
        if not self.guard.last_step_skipped:
            self.guard.check_weights([p for p in self._trained() if p.requires_grad], self.trainer.state.global_step)

    def on_step_end(self, control: Any) -> None:
        """Undo the scheduler step of a skipped step; at the last step of ``on_nonfinite=ignore`` check the model;
        on a signal save now and stop; save at the end when asked."""
        t = self.trainer
        if t.state.max_steps and t.state.global_step >= t.state.max_steps:
            self.guard.check_final([p for p in self._trained() if p.requires_grad], t.state.global_step)
        if self._scheduler_backup is not None:
            state, lrs = self._scheduler_backup
            t.lr_scheduler.load_state_dict(state)
            for group, lr in zip(t.optimizer.param_groups, lrs):
                group["lr"] = lr
            self._scheduler_backup = None
        if self.config.save_on_preemption and self.preemption.requested():
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        elif (self.config.every_n_steps == 0 and self.config.save_at_end and t.state.max_steps
              and t.state.global_step >= t.state.max_steps and t.args.save_strategy == "no"):
            control.should_save = True

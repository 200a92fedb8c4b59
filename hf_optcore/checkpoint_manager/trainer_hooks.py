"""What ``OptCoreTrainer`` adds to transformers' own checkpoints: components, a manifest, retention, exact resume.

transformers writes ``checkpoint-<step>`` itself (``Trainer._save_checkpoint``: model or adapter,
optimizer, scheduler, scaler, RNG, trainer state; FSDP/DeepSpeed sharded states, ``save_only_model``,
``save_on_each_node``), and loads it back itself on resume. This object adds, after transformers'
save: hf_optcore's components (EMA, sampler position, every rank's collate RNG) under
``components/``, the resolved ``config.yaml``, then ``manifest.json`` last as the commit point,
then retention. A plain ``transformers.Trainer`` can resume from such a checkpoint, and
``OptCoreTrainer`` can resume from a plain transformers checkpoint (its components start fresh).

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
from pathlib import Path
from typing import Any

import torch

from hf_optcore.checkpoint_manager import ownership, run_identity, storage
from hf_optcore.checkpoint_manager import rng as _rng
from hf_optcore.checkpoint_manager.faults import NonFiniteGuard, PreemptionHandler
from hf_optcore.checkpoint_manager.manager import CheckpointManager, rank_file
from hf_optcore.distributed import barrier, rank_and_world
from hf_optcore.errors import CheckpointError, RunDirError

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


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

    Args:
        trainer: the ``OptCoreTrainer`` (extensions enabled).
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.tracker: CollateRNGTracker | None = None
        self.resume_path: Path | None = None
        self._resume_state: dict | None = None
        self._rng_done = True
        self._components_done = True
        self._first_pull_done = False
        self._before_save: dict[str, tuple[int, int]] = {}
        self._manager: CheckpointManager | None = None
        cfg = self.config
        self.guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_consecutive_nonfinite)
        self.preemption = PreemptionHandler()
        self.preempted = False
        self._scheduler_backup: tuple[dict, list[float]] | None = None
        self._lock: run_identity.RunLock | None = None
        self._changes: list = []
        self._resume_topology: dict | None = None
        self._optimizer_given = trainer.optimizer is not None

    @property
    def config(self):
        return self.trainer.optcore_config.checkpoint

    # ---- the manager, refreshed with the trainer's live objects ---------------------------

    @property
    def manager(self) -> CheckpointManager:
        t, args = self.trainer, self.trainer.args
        if self._manager is None:
            self._manager = run_identity.RunCheckpointManager(self.config, args.output_dir, t.model,
                                                              components=t.optcore_state)
        m = self._manager
        m.config, m.output_dir = self.config, Path(args.output_dir)
        m.model, m.optimizer, m.scheduler = t.model, t.optimizer, t.lr_scheduler
        m.components = t.optcore_state
        m.trainer_config = t.optcore_config
        m.metric_for_best_model, m.greater_is_better = args.metric_for_best_model, args.greater_is_better
        m.topology = {
            "world_size": args.world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        }
        return m

    # ---- train() ------------------------------------------------------------------------

    def begin_train(self, resume_from_checkpoint: Any) -> str | None:
        """Resolve what to resume from (``auto``/True, a path, or ``checkpoint.resume_from``) to a verified checkpoint.

        With ``checkpoint.own_output_dir`` the run claims ``output_dir`` first (:mod:`ownership`): it refuses
        another run's directory, a directory in use and an unallowed config change before anything is written,
        then holds the run lock until :meth:`end_train` and records its identity. Otherwise: a checkpoint
        written by hf_optcore must be intact (``auto`` walks back past corrupt ones, warning); a plain
        transformers checkpoint (no manifest) is accepted when named explicitly.
        """
        arg = None if resume_from_checkpoint is False else resume_from_checkpoint
        if arg is None:
            arg = self.trainer.args.resume_from_checkpoint
        self._changes = []
        if self.config.own_output_dir:
            path, manifest = self._claim_output_dir(arg)
            mgr = self.manager
        else:
            mgr = self.manager
            path, manifest = self._resolve_resume(arg, mgr)
        self.resume_path = path
        self._resume_topology = (manifest or {}).get("topology")
        self._resume_state = None
        self._rng_done = self._components_done = True
        if manifest is not None:
            mgr.check_topology(manifest, path)
            mgr.protected_steps.add(int(manifest["step"]))
            self._resume_state = mgr.rank_state(path)
            self._rng_done = self._components_done = False
            logger.info("resuming from %s (step %s)", path, manifest["step"])
        self.tracker = None
        self._first_pull_done = False
        self.preempted = False
        self.preemption.received = None
        if self.config.save_on_preemption:
            self.preemption.install()
        return str(path) if path is not None else None

    def _resolve_resume(self, arg: Any, mgr: CheckpointManager) -> tuple[Path | None, dict | None]:
        path, manifest = None, None
        if arg is True or arg == "auto":
            self._warn_unmanifested(mgr)
            if mgr.latest() is not None:
                path, manifest = mgr.resolve("latest", verify=self.config.verify)
            elif arg is True:
                raise CheckpointError(f"No valid checkpoint found in output directory {str(mgr.output_dir)!r}: resume "
                                      f"was requested but no complete checkpoint is there")
        elif arg:
            path = Path(arg)
            if storage.read_manifest(path) is not None or not (path / TRAINER_STATE).is_file():
                path, manifest = mgr.resolve(path, verify=self.config.verify)
            else:
                logger.warning("resuming from %s, a checkpoint not written by hf_optcore: no integrity check, and "
                               "hf_optcore's components (EMA, sampler position, collate RNG) start fresh", path)
        return path, manifest

    def _claim_output_dir(self, arg: Any) -> tuple[Path | None, dict | None]:
        """Rank 0 claims ``output_dir`` (:func:`ownership.claim`); every rank gets its decision, or its refusal."""
        args, decision = self.trainer.args, {}
        if rank_and_world()[0] == 0:
            topology = {"world_size": args.world_size, "per_device_train_batch_size": args.per_device_train_batch_size,
                        "gradient_accumulation_steps": args.gradient_accumulation_steps}
            try:
                plan, self._lock, record = ownership.claim(self.trainer.optcore_config, arg, topology)
            except Exception as exc:
                run_identity.broadcast({"error": str(exc), "own": isinstance(exc, RunDirError)})
                raise
            decision = {"path": str(plan.resume) if plan.resume is not None else None, "manifest": plan.manifest,
                        "lineage": sorted(plan.lineage, key=str), "record": record, "changes": plan.changes}
        decision = run_identity.broadcast(decision)
        if "error" in decision:
            raise (RunDirError if decision["own"] else CheckpointError)(decision["error"])
        mgr = self.manager
        mgr.lineage = frozenset(decision["lineage"])
        mgr.run_record = decision["record"] if rank_and_world()[0] == 0 else None
        self._changes = decision["changes"]
        if decision["path"] is None:
            return None, None
        return Path(decision["path"]), decision["manifest"]  # verified by rank 0

    @staticmethod
    def _warn_unmanifested(mgr: CheckpointManager) -> None:
        latest = mgr.latest()
        newest = latest.name if latest is not None else None
        for path in storage.list_unmanifested(mgr.output_dir):
            if newest is None or storage.step_of(path) > storage.step_of(Path(newest)):
                logger.warning("%s has no manifest (an interrupted save, or not written by hf_optcore): it is never "
                               "resumed from%s", path, f"; resuming from {newest} instead" if newest else "")

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

    def checkpoint_dir(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / f"{storage.PREFIX}{self.trainer.state.global_step}"

    def before_save(self, path: Path) -> None:
        """Re-saving a step that has a manifest: withdraw it first, so that a crash leaves it incomplete, not stale."""
        if rank_and_world()[0] == 0:
            if storage.invalidate(path):
                logger.info("re-saving %s: its previous manifest is withdrawn until the new save completes", path)
            elif path.is_dir():
                logger.warning("%s exists without a manifest (an interrupted save, or not written by hf_optcore); "
                               "files of the same names are overwritten, any other file is kept", path)
        self._before_save = storage.snapshot(path)
        barrier()

    def after_save(self, path: Path) -> Path:
        """Add hf_optcore's components to transformers' checkpoint at ``path``, then the manifest, then prune."""
        t = self.trainer
        rank, _ = rank_and_world()
        self.manager._pause_for_tests("after_hf_save")
        pending = self.tracker.pending[0] if self.tracker is not None and self.tracker.pending else None
        rank_state = {"rng": _rng.capture(), **({"pending_collate_rng": pending} if pending is not None else {})}
        path.mkdir(parents=True, exist_ok=True)
        mgr = self.manager
        # Components whose state differs per rank (a stream's position) go into each rank's own file.
        per_rank = {n: c.state_dict() for n, c in mgr.components.items() if getattr(c, "per_rank", False)}
        if per_rank:
            rank_state["components"] = per_rank
        (path / rank_file(rank)).parent.mkdir(parents=True, exist_ok=True)
        torch.save(rank_state, path / rank_file(rank))
        barrier()
        if rank == 0:
            mgr.write_components(path)
            metrics = {}
            for entry in t.state.log_history:
                if entry.get("step") == t.state.global_step:
                    metrics.update({k: v for k, v in entry.items() if k.startswith("eval_")})
            written = storage.written_since(path, self._before_save)
            mgr.commit(path, t.state.global_step, metrics, written)
            mgr.prune()
        barrier()
        return path

    # ---- resume -------------------------------------------------------------------------

    def owns_rng(self, checkpoint: Any) -> bool:
        """True when the RNG of ``checkpoint`` is restored here (a checkpoint with hf_optcore's components)."""
        return self._resume_state is not None and checkpoint is not None and Path(checkpoint) == self.resume_path

    def _restore_components(self) -> None:
        if self._components_done or self.resume_path is None:
            return
        self._components_done = True
        mgr = self.manager
        sampler = mgr.components.get("sampler")
        if sampler is not None and hasattr(sampler, "allow_topology_change"):
            sampler.allow_topology_change = self.config.allow_topology_change  # re-cut by examples consumed
        mgr.load_components(self.resume_path)
        for name, state in (self._resume_state or {}).get("components", {}).items():
            if name in mgr.components:  # per-rank components, from this rank's own file
                mgr.components[name].load_state_dict(state)
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
        from hf_optcore.checkpoint_manager.manager import component_file
        from hf_optcore.checkpoint_manager.resume_changes import epoch_length_problem

        file = self.resume_path / component_file("sampler")
        if sampler is None or not self._resume_topology or not file.is_file():
            return
        saved = torch.load(file, map_location="cpu", weights_only=True)
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
        """Undo the scheduler step of a skipped step; on a signal save now and stop; save at the end when asked."""
        t = self.trainer
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

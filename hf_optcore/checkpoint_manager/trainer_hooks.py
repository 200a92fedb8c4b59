"""What ``OptCoreTrainer`` delegates to for checkpoints: save, exact resume, faults.

The Trainer's overrides stay one-liners; this object holds the run's checkpoint state. It reads
the trainer's attributes and never imports transformers itself.

Exact resume, and why the RNG needs care: Accelerate's dataloader collates one batch ahead, so
when a checkpoint is written after step k, batch k (the next one to train on) was already
collated, drawing from the RNG state of *before* step k's forward pass. Restoring the step-k RNG
state after the first batch is drawn (what ``transformers.Trainer`` does) therefore diverges for
collators that draw random numbers. The collate tracker records the RNG state before each
training collation; a checkpoint stores the one of the still-pending batch, and a resume replays
that state for the pending batch and the step-k state right after it.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from hf_optcore.checkpoint_manager import rng as _rng
from hf_optcore.checkpoint_manager.faults import NonFiniteGuard, PreemptionHandler
from hf_optcore.checkpoint_manager.manager import CheckpointManager
from hf_optcore.errors import CheckpointError

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

    Args:
        trainer: the ``OptCoreTrainer`` (extensions enabled).
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        cfg = trainer.optcore_config.checkpoint
        self.config = cfg
        self.guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_consecutive_nonfinite)
        self.preemption = PreemptionHandler()
        self.preempted = False
        self.tracker: CollateRNGTracker | None = None
        self.resume_path: Path | None = None
        self._resume_state: dict | None = None
        self._rng_done = True
        self._components_done = True
        self._manager: CheckpointManager | None = None

    # ---- the manager, refreshed with the trainer's live objects ---------------------------

    @property
    def manager(self) -> CheckpointManager:
        t, args = self.trainer, self.trainer.args
        if self._manager is None:
            self._manager = CheckpointManager(
                self.config, args.output_dir, t.model, tokenizer=t.processing_class,
                components=t.optcore_state, trainer_config=t.optcore_config,
                metric_for_best_model=args.metric_for_best_model, greater_is_better=args.greater_is_better,
            )
        m = self._manager
        m.model, m.optimizer, m.scheduler = t.model, t.optimizer, t.lr_scheduler
        m.scaler = getattr(t.accelerator, "scaler", None)
        m.components = t.optcore_state
        m.topology = {
            "world_size": args.world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        }
        return m

    # ---- train() ------------------------------------------------------------------------

    def begin_train(self, resume_from_checkpoint: Any) -> str | None:
        """Resolve the checkpoint to resume from (``auto``, True, a path or None) and set up the run."""
        arg = None if resume_from_checkpoint is False else resume_from_checkpoint
        if arg is None:
            arg = self.config.resume_from
        mgr = self.manager
        path = None
        if arg is True or arg == "auto":
            if mgr.latest() is not None:
                path, manifest = mgr.resolve("latest")
            elif arg is True:
                raise CheckpointError(f"resume requested but no complete checkpoint in {str(mgr.output_dir)!r}")
        elif arg:
            path, manifest = mgr.resolve(arg)
        self.resume_path = path
        self._resume_state = None
        if path is not None:
            mgr.check_topology(manifest, path)
            mgr.protected_steps.add(int(manifest["step"]))
            self._resume_state = mgr.rank_state(path)
            self._rng_done = self._components_done = False
            logger.info("resuming from %s (step %s)", path, manifest["step"])
        self.tracker = None
        self.preempted = False
        self._first_pull_done = False
        self.preemption.received = None
        if self.config.save_on_preemption:
            self.preemption.install()
        return str(path) if path is not None else None

    def on_train_begin(self, train_dataloader: Any) -> None:
        """Wrap the prepared train dataloader's collator (the skip-loader of a resume copies it)."""
        base = getattr(train_dataloader, "base_dataloader", train_dataloader)
        if base is None or not hasattr(base, "collate_fn"):
            return
        if not isinstance(base.collate_fn, CollateRNGTracker):
            base.collate_fn = CollateRNGTracker(base.collate_fn)
        self.tracker = base.collate_fn

    def end_train(self) -> None:
        self.preemption.uninstall()
        self.tracker = None

    # ---- save ---------------------------------------------------------------------------

    def save(self, trial: Any = None) -> Path:
        """Write the Trainer's checkpoint of the current step through the manager."""
        t = self.trainer
        state = t.state
        if t.hp_search_backend is None and trial is None:
            t.store_flos()
        step = state.global_step
        metrics: dict[str, float] = {}
        for entry in state.log_history:
            if entry.get("step") == step:
                metrics.update({k: v for k, v in entry.items() if k.startswith("eval_")})
        run_dir = Path(t._get_output_dir(trial=trial))
        if state.best_global_step:
            best_dir = run_dir / f"checkpoint-{state.best_global_step}"
            if state.best_global_step == step or best_dir.is_dir():
                state.best_model_checkpoint = str(best_dir)
        # What HF's _save_checkpoint records for stateful callbacks, then the state as HF writes it.
        from transformers.trainer_callback import ExportableState

        for cb in [cb for cb in t.callback_handler.callbacks + [t.control] if isinstance(cb, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(state.stateful_callbacks.get(name), list):
                state.stateful_callbacks[name].append(cb.state())
            else:
                state.stateful_callbacks[name] = cb.state()
        state_text = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
        pending = self.tracker.pending[0] if self.tracker is not None and self.tracker.pending else None
        rank_state = {"pending_collate_rng": pending} if pending is not None else {}
        mgr = self.manager
        mgr.output_dir = run_dir
        return mgr.save(step, metrics, extra_json={"trainer_state.json": state_text}, rank_state=rank_state)

    # ---- resume -------------------------------------------------------------------------

    def load_model(self, path: str) -> None:
        self.manager.load_model(path)

    def load_optimizer_and_scheduler(self, path: str) -> None:
        mgr = self.manager
        mgr.load_training_state(path)
        self.guard.wrap(self.trainer.optimizer)

    def _restore_components(self) -> None:
        if self._components_done or self.resume_path is None:
            return
        self._components_done = True
        mgr = self.manager
        sampler = mgr.components.get("sampler")
        mgr.load_components(self.resume_path)
        if sampler is not None and hasattr(sampler, "state_dict"):
            # The Trainer positions the data itself (index-level skip, nothing is loaded or
            # collated), so the sampler resumes its epoch from the start, not from `consumed`.
            sd = sampler.state_dict()
            if isinstance(sd, dict) and "consumed" in sd:
                sampler.load_state_dict({**sd, "consumed": 0})

    def load_rng_at_epoch_start(self, path: str) -> None:
        """HF's hook before the resumed epoch's iterator: restore here only at an epoch boundary."""
        self._restore_components()
        if self._rng_done or self._resume_state is None or self._first_pull_done:
            return  # mid-epoch: handled around the first pull (see get_batch_samples)
        self._rng_done = True
        _rng.restore(self._resume_state["rng"])

    _first_pull_done = False

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

    # ---- faults ---------------------------------------------------------------------------

    def observe_loss(self, loss: Any) -> None:
        self.guard.observe_loss(loss)

    def check_grad_norm(self, grad_norm: Any) -> None:
        self.guard.wrap(self.trainer.optimizer)
        if self.guard.check(grad_norm, self.trainer.state.global_step):
            ema = self.trainer.optcore_state.get("ema")
            # The EMA callback updates at every step end; a skipped step must leave it as it was.
            self._ema_backup = copy.deepcopy(ema.state_dict()) if ema is not None else None

    _ema_backup = None

    def on_step_end(self, control: Any) -> None:
        """Preemption: save now and stop; with ``every_n_steps=0``, save at the final step."""
        t = self.trainer
        if self._ema_backup is not None:
            t.optcore_state["ema"].load_state_dict(self._ema_backup)
            self._ema_backup = None
        if self.config.save_on_preemption and self.preemption.requested():
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        elif self.config.every_n_steps == 0 and t.state.max_steps and t.state.global_step >= t.state.max_steps:
            control.should_save = True

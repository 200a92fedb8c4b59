"""TrainerCallbacks of hf_optcore: behaviour that only observes or nudges the loop.

Each callback is added by ``OptCoreTrainer`` only when its feature is enabled in the
``TrainerConfig``; none is ever active behind the user's back.
"""

from __future__ import annotations

from transformers import TrainerCallback  # noqa: F401  (the base of every callback below)
from transformers.trainer_callback import ProgressCallback


class TrainingReportCallback(TrainerCallback):
    """Writes ``report.png`` / ``report.md`` (and ``trainer_state.json``) into ``output_dir`` at train end.

    Only the main process writes. A failure to draw the report is logged, never raised: the run
    it describes has already finished and its checkpoints are safe.

    Args:
        config: the run's ``TrainerConfig`` (or a callable returning it), included resolved in ``report.md``.
    """

    def __init__(self, config=None):
        self.config = config

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        import logging
        from pathlib import Path

        from hf_optcore.report import write_report

        out = Path(args.output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            # The HF file `hf-optcore report RUN_DIR` reads later (Trainer.save_state writes the same).
            state.save_to_json(str(out / "trainer_state.json"))
            write_report(out, state.log_history, self.config() if callable(self.config) else self.config)
        except Exception as exc:  # noqa: BLE001 - a report must never fail a finished run
            logging.getLogger(__name__).warning("could not write the training report in %s: %s", out, exc)


class CheckpointCallback(TrainerCallback):
    """Run safety around each optimizer step: a non-finite step is skipped (or stops the run), an update that
    leaves non-finite weights stops it, a signal (SIGTERM, SIGUSR1, Ctrl-C) saves at the step boundary and
    stops, and with ``checkpoint.every_n_steps=0`` one checkpoint is saved at the final step.

    Args:
        checkpointing: the trainer's ``TrainerCheckpointing`` (``hf_optcore.checkpoint_manager.trainer_checkpointing``).
    """

    def __init__(self, checkpointing):
        self.checkpointing = checkpointing

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.checkpointing.on_train_begin(train_dataloader)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.checkpointing.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.checkpointing.after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.checkpointing.on_step_end(control)
        return control


class EMACallback(TrainerCallback):
    """Keeps the run's :class:`~hf_optcore.ema_manager.EMAManager`: one update per optimizer step.

    ``on_step_end`` fires once per optimizer step (micro-batches under gradient accumulation
    fire ``on_substep_end``), so the EMA never averages a half-accumulated step. The manager is
    built on the model the Trainer trains; at ``on_train_begin``, after Accelerate wrapped it,
    it is rebuilt if the parameters were replaced (FSDP sharding) so that each rank averages
    its own shard. The callback is also the checkpointed component ``optcore_state["ema"]``:
    ``state_dict()`` / ``load_state_dict()`` delegate to the manager.

    Args:
        config: the run's ``EMAConfig``.
        get_model: returns the Trainer's current model.
        on_train_end: called with the manager when training ends (export, final weights).
        step_skipped: returns True when the optimizer step just ended was skipped (non-finite): no update then.
    """

    def __init__(self, config, get_model, on_train_end=None, step_skipped=None):
        self.config = config
        self._get_model = get_model
        self._on_train_end = on_train_end
        self._step_skipped = step_skipped
        self.manager = None
        self._pending = None

    def ensure_manager(self):
        """The EMAManager, built on the Trainer's current model when missing or stale."""
        from hf_optcore.ema_manager import EMAManager

        model = self._get_model()
        if self.manager is not None and self._tracks(model):
            return self.manager
        self.manager = EMAManager(self.config, model)
        if self._pending is not None:
            self.manager.load_state_dict(self._pending)
        return self.manager

    def _tracks(self, model) -> bool:
        # Same parameter objects: DDP keeps them; FSDP replaces them with sharded ones.
        current = {id(p) for p in model.parameters() if p.requires_grad}
        return {id(p) for n, p in self.manager._params.items() if not n.startswith("buffer:")} == current

    def state_dict(self):
        return self.ensure_manager().state_dict()

    def load_state_dict(self, state):
        self._pending = state  # kept in case the parameters are re-sharded before training starts
        if self.manager is not None:
            self.manager.load_state_dict(state)

    def on_train_begin(self, args, state, control, **kwargs):
        self.ensure_manager()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_skipped is not None and self._step_skipped():
            return  # the weights did not move: averaging them again would count the step twice
        (self.manager or self.ensure_manager()).update(state.global_step)
        self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        if self._on_train_end is not None:
            self._on_train_end(self.ensure_manager())


class DataThroughputCallback(TrainerCallback):
    """Padding fraction and real (non-pad) tokens per second of the training batches.

    ``OptCoreTrainer.training_step`` feeds every micro-batch to :meth:`observe`; at each logging
    step ``OptCoreTrainer.log`` adds :meth:`pop_metrics` (``padding_fraction``,
    ``real_tokens_per_second``, ``real_tokens``) to the Trainer's logs. In a multi-process run
    the counters are summed over every rank at logging time (one all-reduce per log, none per
    micro-batch), so the numbers are those of the whole run, not of rank 0. It also keeps the train
    batch sampler's ``consumed`` count equal to the batches the loop really used (the
    dataloader prefetches ahead of the loop, so the sampler cannot count them itself).

    Args:
        sampler: the train batch sampler (optional): gets ``epoch`` / ``consumed`` at every step.
        gradient_accumulation_steps: micro-batches per optimizer step (default 1).
    """

    def __init__(self, sampler=None, gradient_accumulation_steps: int = 1):
        import time

        self._clock = time.perf_counter
        self.sampler = sampler
        self.gradient_accumulation_steps = max(1, int(gradient_accumulation_steps))
        self.real = 0
        self.total = 0
        self.run_real = 0
        self.run_total = 0
        self._since = self._clock()
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation, a checkpoint save) out of the time the next tokens/s divides by."""
        self._excluded += max(0.0, float(seconds))

    def observe(self, real_tokens: int, total_tokens: int) -> None:
        """Count one micro-batch: its non-pad tokens and its padded size (rows x width)."""
        self.real += int(real_tokens)
        self.total += int(total_tokens)

    def pop_metrics(self, reduce=None) -> dict[str, float]:
        """Metrics since the previous call (empty when no batch was seen), then reset.

        Args:
            reduce: optional ``callable([real, padded]) -> [real, padded]`` that sums the two
                counters over every rank; a collective, so every rank must call ``pop_metrics``.
        """
        now = self._clock()
        real, total = self.real, self.total
        if reduce is not None:
            real, total = (int(x) for x in reduce([real, total]))
        if total == 0:
            return {}
        out = {
            "padding_fraction": round(1.0 - real / total, 6),
            "real_tokens_per_second": round(real / max(now - self._since - self._excluded, 1e-9), 3),
            "real_tokens": real,
        }
        self.run_real += real
        self.run_total += total
        self.real = self.total = 0
        self._since, self._excluded = now, 0.0
        return out

    def on_train_begin(self, args, state, control, **kwargs):
        self.real = self.total = 0
        self._since, self._excluded = self._clock(), 0.0

    def on_step_end(self, args, state, control, **kwargs):
        s = self.sampler
        if s is None or state.global_step <= 0:
            return
        n = len(s)
        ga = self.gradient_accumulation_steps
        steps_per_epoch = max(1, -(-n // ga))  # the Trainer's num_update_steps_per_epoch
        epoch = (state.global_step - 1) // steps_per_epoch
        done = state.global_step - epoch * steps_per_epoch
        s.epoch = epoch
        s.consumed = min(n, done * ga)


class ThroughputProgressCallback(ProgressCallback):
    """transformers' training progress bar, with real tokens/s and the padding fraction beside it.

    It replaces :class:`~transformers.ProgressCallback` in ``OptCoreTrainer`` runs (never when
    ``disable_tqdm``); the values are the ones the data meter logs (``real_tokens_per_second``,
    ``padding_fraction``), shown as the bar's postfix so they are read without scrolling the logs.
    """

    POSTFIX = (("loss", "loss", "{:.4g}"), ("real_tokens_per_second", "tok/s", "{:,.0f}"),
               ("padding_fraction", "pad", "{:.1%}"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        postfix = {label: fmt.format(logs[key]) for key, label, fmt in self.POSTFIX
                   if isinstance(logs.get(key), (int, float))}
        if postfix:
            self.training_bar.set_postfix(postfix, refresh=False)

"""TrainerCallbacks of hf_optcore: behaviour that only observes or nudges the loop.

Each callback is added by ``OptCoreTrainer`` only when its feature is enabled in the
``TrainerConfig``; none is ever active behind the user's back.
"""

from __future__ import annotations

from transformers import TrainerCallback  # noqa: F401  (the base of every callback below)


class TrainingReportCallback(TrainerCallback):
    """Writes ``report.png`` / ``report.md`` (and ``trainer_state.json``) into ``output_dir`` at train end.

    Only the main process writes. A failure to draw the report is logged, never raised: the run
    it describes has already finished and its checkpoints are safe.

    Args:
        config: the run's ``TrainerConfig``, included resolved in ``report.md``.
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
            write_report(out, state.log_history, self.config)
        except Exception as exc:  # noqa: BLE001 - a report must never fail a finished run
            logging.getLogger(__name__).warning("could not write the training report in %s: %s", out, exc)

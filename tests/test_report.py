"""The training report: written at the end of every hf_optcore run, and on demand for a run dir."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hf_optcore.report import ReportError, find_log_history, series, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq_len=12):
        self.ids = torch.randint(0, 256, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _collate(rows):
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _state(step: int, rows: list[dict]) -> dict:
    return {"global_step": step, "log_history": rows}


def test_report_written_at_end_of_an_optcore_run(tmp_path):
    from hf_optcore.config import TrainerConfig
    from hf_optcore.tiny import build_tiny_model
    from hf_optcore.trainer import OptCoreTrainer

    cfg = TrainerConfig.from_dict({
        "output_dir": str(tmp_path / "run"),
        "model": {"lora": {"enabled": False}},
        "training": {"max_steps": 4, "logging_steps": 1, "per_device_train_batch_size": 4, "report_to": "none",
                     "learning_rate": 1e-2, "run_name": "tiny-report"},
        "hardware": {"use_cpu": True},
    })
    trainer = OptCoreTrainer(model=build_tiny_model("llama"), args=cfg, train_dataset=_Tokens(),
                             data_collator=_collate)
    trainer.train()
    run = tmp_path / "run"
    assert (run / "report.png").read_bytes()[:8] == PNG_MAGIC
    md = (run / "report.md").read_text()
    last_loss = [r["loss"] for r in trainer.state.log_history if "loss" in r][-1]
    assert f"| `loss` | {last_loss:.6g} |" in md
    assert "| `step` | 4 |" in md and "## Timings" in md and "`train_runtime`" in md
    assert "## Resolved config" in md and "run_name: tiny-report" in md
    # The state is saved so that `hf-optcore report RUN_DIR` can redraw it later.
    history, source = find_log_history(run)
    assert source == run / "trainer_state.json" and history == trainer.state.log_history


def test_plain_training_arguments_write_no_report(tmp_path):
    from transformers import TrainingArguments

    from hf_optcore.tiny import build_tiny_model
    from hf_optcore.trainer import OptCoreTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "plain"), max_steps=1, report_to="none", use_cpu=True,
                             save_strategy="no", per_device_train_batch_size=4)
    OptCoreTrainer(model=build_tiny_model("llama"), args=args, train_dataset=_Tokens(),
                   data_collator=_collate).train()
    assert not (tmp_path / "plain" / "report.md").exists()


def test_report_reads_the_newest_checkpoint_of_a_run_dir(tmp_path):
    for step, loss in ((2, 3.0), (10, 1.5)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        rows = [{"step": s, "loss": loss + 0.1 * (step - s), "learning_rate": 1e-3, "padding_fraction": 0.25}
                for s in range(1, step + 1)]
        rows.append({"step": step, "eval_loss": loss + 0.2, "eval_ema_loss": loss + 0.1})
        (d / "trainer_state.json").write_text(json.dumps(_state(step, rows)))
    (tmp_path / "config.yaml").write_text("output_dir: somewhere\n")
    png, md_path = write_report(tmp_path)
    md = md_path.read_text()
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "checkpoint-10" in md and "| `step` | 10 |" in md
    assert "| `eval_loss` | 1.7 |" in md
    assert f"| `eval_perplexity` | {math.exp(1.7):.6g} |" in md
    assert f"| `eval_ema_perplexity` | {math.exp(1.6):.6g} |" in md
    assert "output_dir: somewhere" in md


def test_series_takes_aliases_and_skips_non_finite():
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "train_loss_step": 1.0},
            {"step": 4, "eval_loss": 5.0}]
    assert series(rows, ("loss", "train_loss_step")) == ([1, 3], [2.0, 1.0])


def test_report_on_a_dir_without_log_names_the_problem(tmp_path):
    with pytest.raises(ReportError, match="no trainer_state.json in"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        find_log_history(tmp_path / "missing")


def test_callback_writes_only_on_the_main_process(tmp_path):
    from transformers import TrainerControl, TrainerState

    from hf_optcore.callbacks import TrainingReportCallback

    class _Args:
        output_dir = str(tmp_path / "out")

    state = TrainerState()
    state.log_history = [{"step": 1, "loss": 1.0}]
    state.is_world_process_zero = False
    TrainingReportCallback().on_train_end(_Args(), state, TrainerControl())
    assert not Path(_Args.output_dir).exists()
    state.is_world_process_zero = True
    TrainingReportCallback().on_train_end(_Args(), state, TrainerControl())
    assert (Path(_Args.output_dir) / "report.md").is_file()


TRACKER_RUN = """
import sys, torch
from hf_optcore.config import TrainerConfig
from hf_optcore.tiny import build_tiny_model
from hf_optcore.trainer import OptCoreTrainer
ids = torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(0))
data = [{"input_ids": r, "labels": r.clone()} for r in ids]
def collate(rows):
    x = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}
cfg = TrainerConfig.from_dict({"output_dir": sys.argv[1], "model": {"lora": {"enabled": False}},
    "training": {"max_steps": 3, "logging_steps": 1, "report_to": ["tensorboard", "trackio"], "run_name": "offline",
                 "per_device_train_batch_size": 4}, "hardware": {"use_cpu": True}})
OptCoreTrainer(model=build_tiny_model("llama"), args=cfg, train_dataset=data, data_collator=collate).train()
"""


@pytest.mark.slow
def test_tensorboard_and_trackio_work_offline(tmp_path):
    import os
    import sqlite3
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRACKIO_DIR": str(tmp_path / "trackio"),
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", TRACKER_RUN, str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (events_dir,) = (tmp_path / "run" / "runs").iterdir()
    acc = EventAccumulator(str(events_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert "train/padding_fraction" in acc.Tags()["scalars"]
    (db,) = (tmp_path / "trackio").glob("*.db")
    rows = sqlite3.connect(db).execute("select run_name, metrics from metrics").fetchall()
    logged = [json.loads(m) for run, m in rows if run == "offline"]
    assert [m["train/global_step"] for m in logged if "train/loss" in m] == [1, 2, 3]

"""A run that diverges ends loudly: non-zero exit, one error line, the last good checkpoint intact, no NaN result."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_optcore.checkpoint_manager.faults import NonFiniteError
from hf_optcore.config import TrainerConfig
from hf_optcore.tiny import build_tiny_model
from hf_optcore.trainer import OptCoreTrainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["--no-samples", "model.name_or_path=tiny:llama", "model.lora.enabled=false", "training.max_steps=8",
        "training.warmup_steps=0", "training.per_device_train_batch_size=4", "training.logging_steps=1",
        "data.max_seq_len=128", "data.max_train_samples=48", "data.max_eval_samples=8",
        "checkpoint.every_n_steps=1", "checkpoint.keep_last=null", "training.scheduler=constant"]


def test_the_recipe_exits_3_with_one_line_and_saves_no_nan_result(tmp_path):
    # Finite in the config, so it passes validation; the first update overflows the weights.
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), f"output_dir={out}", *TINY,
                        "training.learning_rate=1e30", "training.optimizer=sgd", "training.max_grad_norm=0"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0], r.stderr[-2000:]
    assert "update of optimizer step 1 left non-finite weights" in errors[0] and "no checkpoint was saved" in errors[0]
    assert "Traceback" not in r.stderr
    assert not list(out.glob("checkpoint-*"))
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()  # no result saved


def test_an_update_that_leaves_non_finite_weights_stops_before_anything_is_saved(tmp_path):
    rows = [{"input_ids": list(range(i, i + 10)), "labels": list(range(i, i + 10))} for i in range(32)]
    cfg = TrainerConfig.from_dict({"output_dir": str(tmp_path), "hardware": {"use_cpu": True},
                                   "model": {"lora": {"enabled": False}},
                                   "training": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 1e-3},
                                   "checkpoint": {"every_n_steps": 1, "keep_last": None}})
    trainer = OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=cfg, train_dataset=rows)
    trainer.create_optimizer()
    step, weight = trainer.optimizer.step, trainer.model.model.norm.weight

    def overflowing_step(*a, **k):  # the third update overflows, as a huge learning rate would
        out = step(*a, **k)
        if trainer.state.global_step == 2:
            with torch.no_grad():
                weight[0] = float("inf")
        return out

    trainer.optimizer.step = overflowing_step
    with pytest.raises(NonFiniteError, match="update of optimizer step 3 left non-finite weights"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_on_nonfinite_ignore_takes_every_step_but_a_non_finite_model_is_divergence_and_logs_nan(tmp_path):
    import math

    from tests._checkpoint_helpers import make_trainer, step_losses

    t = make_trainer(tmp_path, max_steps=5, ga=1, every=1, dropout=0.0, on_nonfinite="ignore")
    compute = t.compute_loss

    def nan_at_step_3(model, inputs, **kw):
        loss = compute(model, inputs, **kw)
        return loss * float("nan") if t.state.global_step + 1 == 3 else loss

    t.compute_loss = nan_at_step_3
    with pytest.raises(NonFiniteError, match=r"training ended with non-finite weights \(the first non-finite loss was "
                                             r"at optimizer step 3\); checkpoint.on_nonfinite is 'ignore'"):
        t.train()
    losses = step_losses(t)
    assert sorted(losses) == [1, 2, 3, 4]  # step 5 ends in the error, before it is logged or saved
    assert all(math.isfinite(losses[s]) for s in (1, 2))
    assert all(math.isnan(losses[s]) for s in (3, 4)), losses  # transformers' nan filter would have logged 0
    # Every step was taken and saved, as transformers does; the NaN ones are not called good.
    assert [c.step for c in t.optcore_checkpointing.checkpoints()] == [1, 2, 3, 4]
    assert t.optcore_checkpointing.last_good_checkpoint() == tmp_path / "checkpoint-2"


def test_the_recipe_with_on_nonfinite_ignore_exits_3_and_saves_no_nan_result(tmp_path):
    import json
    import math

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), f"output_dir={out}", *TINY,
                        "training.learning_rate=1e30", "training.optimizer=sgd", "training.max_grad_norm=0",
                        "checkpoint.on_nonfinite=ignore", "training.max_steps=4"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert errors[0].startswith("error: training diverged: training ended with non-finite weights")
    assert errors[0].endswith("every checkpoint saved holds non-finite weights or followed a non-finite loss")
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()  # no result saved
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    logged = {e["step"]: e["loss"] for e in history if "loss" in e}
    assert math.isfinite(logged[1]) and all(math.isnan(logged[s]) for s in (2, 3)), logged  # not 0


def test_an_evaluation_worse_than_a_uniform_guess_after_training_exits_3_without_a_result(tmp_path):
    # Learning rate 5.0 (what a duplicated YAML key trained at): every weight stays finite and so does the training
    # loss, but the evaluation after training is far worse than before and than guessing uniformly.
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), f"output_dir={out}", *TINY,
                        "training.learning_rate=5.0"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.fullmatch(r"error: training diverged: eval_loss after training is [\d.]+, up from 5\.5\d* before "
                        r"training \(perplexity [\d.e+]+, more than twice the 260 of a uniform guess over the "
                        r"vocabulary\); the result was not saved \(the latest checkpoint, .*checkpoint-8, is from this "
                        r"run\)", errors[0]), errors[0]
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize("after, before, expected", [
    ({"eval_loss": float("nan")}, None, "eval_loss after training is nan"),
    ({"eval_loss": 2.0, "eval_ema_loss": float("inf")}, None, "eval_ema_loss after training is inf"),
    ({"eval_loss": 800.0, "eval_perplexity": float("inf")}, {"eval_loss": 5.0},
     "eval_loss after training is 800 and its perplexity overflows (eval_perplexity inf)"),
    ({"eval_loss": 7.0}, {"eval_loss": 5.6},
     "eval_loss after training is 7, up from 5.6 before training (perplexity 1.1e+03, more than twice the 260 of a "
     "uniform guess over the vocabulary)"),
    ({"eval_loss": 7.0}, {"eval_loss": 7.5}, None),  # bad, but training made it better: not a divergence
    ({"eval_loss": 6.0}, {"eval_loss": 5.6}, None),  # worse, but within twice a uniform guess (perplexity 403)
    ({"eval_loss": 2.0, "eval_perplexity": 7.39}, {"eval_loss": 5.6}, None),
])
def test_evaluation_divergence(after, before, expected):
    from hf_optcore.evaluator import evaluation_divergence

    assert evaluation_divergence(after, before, vocab_size=260) == expected

"""Faults: non-finite steps, preemption by SIGTERM, SIGKILL inside a save; plus the private-hook pins."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from hf_optcore.checkpoint_manager.faults import NonFiniteError
from tests._checkpoint_helpers import make_trainer

SCRIPT = Path(__file__).with_name("_checkpoint_train_script.py")
PAUSES = Path(__file__).with_name("_save_pauses.py")  # pauses inside each save, from outside the library


class Snapshots(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.at = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        opt = t.optimizer.state_dict()["state"]
        self.at[state.global_step] = (
            {k: v.detach().clone() for k, v in t.model.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in opt.items()},
            t.lr_scheduler.last_epoch,
        )


def _nan_from(trainer, steps):
    orig = trainer.compute_loss

    def compute_loss(model, inputs, **kw):
        loss = orig(model, inputs, **kw)
        return loss * float("nan") if trainer.state.global_step + 1 in steps else loss

    trainer.compute_loss = compute_loss


def test_nonfinite_step_is_skipped_leaving_everything_unchanged(tmp_path):
    t = make_trainer(tmp_path, max_steps=6, every=0, dropout=0.0)
    _nan_from(t, {4})
    snaps = Snapshots(t)
    t.add_callback(snaps)
    t.train()
    p3, o3, s3 = snaps.at[3]
    p4, o4, s4 = snaps.at[4]
    for k in p3:
        assert torch.equal(p3[k], p4[k]), k
    for i in o3:
        for k in o3[i]:
            assert torch.equal(o3[i][k], o4[i][k]), (i, k)
    assert s3 == s4 and snaps.at[5][2] == s3 + 1
    assert any(not torch.equal(snaps.at[5][0][k], p4[k]) for k in p4)  # training went on
    assert t.optcore_checkpointing.guard.skipped_steps == [4]


def test_consecutive_nonfinite_steps_stop_with_last_checkpoint_intact(tmp_path):
    t = make_trainer(tmp_path, max_steps=10, every=2, max_consecutive_nonfinite=2)
    _nan_from(t, set(range(4, 11)))
    with pytest.raises(NonFiniteError, match="2 consecutive non-finite steps"):
        t.train()
    from safetensors.torch import load_file

    from hf_optcore.checkpoint_manager import verify

    # Step 4 was skipped (parameters unchanged), so its checkpoint is good; step 5 hit the limit.
    found = t.optcore_checkpointing.checkpoints()
    assert [c.step for c in found] == [2, 4]
    for c in found:
        verify(c.path)
        assert all(torch.isfinite(v).all() for v in load_file(str(c.path / "model.safetensors")).values())


def test_on_nonfinite_stop_raises_at_first_bad_step(tmp_path):
    t = make_trainer(tmp_path, max_steps=6, every=0, on_nonfinite="stop")
    _nan_from(t, {2})
    with pytest.raises(NonFiniteError, match="optimizer step 2.*'stop'"):
        t.train()


def _run(out, *extra, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *extra], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _final(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    r = _run(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return _final(out)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path, uninterrupted):
    r = _run(tmp_path, "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "final.safetensors").exists()
    assert (tmp_path / "checkpoint-5" / "manifest.json").is_file()  # 5 is not a multiple of every_n_steps
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _final(tmp_path)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.slow
def test_ctrl_c_saves_at_the_step_boundary_exits_130_and_resumes_exactly(tmp_path, uninterrupted):
    r = _run(tmp_path, "5", "SIGINT")
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    where = [line for line in r.stdout.splitlines() if line.startswith("stopped by Ctrl-C")]
    assert len(where) == 1 and "at step 5" in where[0] and "checkpoint-5" in where[0], r.stdout[-2000:]
    assert (tmp_path / "checkpoint-5" / "manifest.json").is_file() and not (tmp_path / "final.safetensors").exists()
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _final(tmp_path)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.slow
def test_sigkill_inside_saves_always_resumes_from_a_complete_checkpoint(tmp_path, uninterrupted):
    env = {"HF_OPTCORE_CKPT_TEST_DELAY": "1.0"}
    # (n-th save, point inside it): each run is killed there, then restarted from what is on disk. transformers
    # writes checkpoint-<step> in place; it counts only once hf_optcore's manifest is written, last.
    for nth, point in [(1, "after_hf_save"), (2, "before_manifest"), (2, "after_state")]:
        proc = subprocess.Popen([sys.executable, str(PAUSES), str(SCRIPT), str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env={**os.environ, **env})
        seen = 0
        for line in proc.stdout:
            if line.startswith(f"[checkpoint] {point}"):
                seen += 1
                if seen == nth:
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL
        incomplete = [d for d in tmp_path.glob("checkpoint-*") if not (d / "manifest.json").is_file()]
        assert len(incomplete) == 1  # the one killed inside its save: never listed, never resumed from
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _final(tmp_path)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted)
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())

"""A run owns its output directory: identity, refusals that change nothing, a lock, allowed config changes.

Every case runs a real short training of a tiny Llama on CPU (or reads what one left on disk).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from hf_optcore.checkpoint_manager import storage
from hf_optcore.checkpoint_manager.ownership import plan_run
from hf_optcore.checkpoint_manager.resume_changes import compared_fingerprint
from hf_optcore.checkpoint_manager.run_identity import RunLock, lock_holder, read_run
from hf_optcore.config import TrainerConfig
from hf_optcore.errors import RunDirError
from hf_optcore.tiny import build_tiny_model
from tests._checkpoint_helpers import TokenDataset, step_losses

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "configs" / "tiny_smoke.yaml"


def collate(features):
    ids = torch.stack([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def config(out, training=None, **checkpoint) -> TrainerConfig:
    return TrainerConfig.from_dict({
        "output_dir": str(out),
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
                     "scheduler": "cosine", "warmup_steps": 1, "seed": 7, "report_to": "none", **(training or {})},
        "hardware": {"use_cpu": True, "dataloader_pin_memory": False},
        "checkpoint": {"every_n_steps": 1, "keep_last": 100, **checkpoint},
    })


def trainer(out, training=None, callbacks=None, **checkpoint):
    from hf_optcore.trainer import OptCoreTrainer

    return OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=config(out, training, **checkpoint),
                          train_dataset=TokenDataset(16), data_collator=collate, callbacks=callbacks)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: equal snapshots mean nothing was written or removed."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def run_id_of(checkpoint: Path) -> str | None:
    return storage.read_manifest(checkpoint)["run_id"]


# ---- identity ---------------------------------------------------------------------------------


def test_a_run_records_its_identity_and_names_it_in_every_checkpoint(tmp_path):
    t = trainer(tmp_path)
    t.train()
    run = read_run(tmp_path)
    assert run["config_fingerprint"] == t.optcore_config.fingerprint()
    assert (run["host"], run["pid"], run["last_checkpoint"]) == (socket.gethostname(), os.getpid(), 2)
    assert run["created"] == run["started"] and len(run["history"]) == 1 and run["resumed_from"] is None
    assert [run_id_of(tmp_path / f"checkpoint-{s}") for s in (1, 2)] == [run["run_id"]] * 2
    assert lock_holder(tmp_path) is None  # released when train() returned


# ---- another run's directory --------------------------------------------------------------------


def test_a_new_run_in_another_runs_directory_is_refused_and_changes_nothing(tmp_path):
    trainer(tmp_path).train()
    old = read_run(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError) as info:
        trainer(tmp_path, training={"seed": 8}).train()
    message = str(info.value)
    assert message.startswith(f"output_dir: '{tmp_path}' holds the checkpoints of another run: run {old['run_id']} "
                              f"(started {old['created']} on {old['host']}, pid {old['pid']}): checkpoint-1, "
                              f"checkpoint-2, whose config differs from this one in training.seed: 7 -> 8")
    assert message.endswith("resume it with checkpoint.resume_from=auto, choose another output_dir, or set "
                            "checkpoint.overwrite=true to replace its checkpoints step by step")
    assert snapshot(tmp_path) == before
    # The same config without resume_from is another run too (it would overwrite the first's checkpoints).
    with pytest.raises(RunDirError, match="with the same config as this one"):
        trainer(tmp_path).train()
    # auto resumes only this directory's run, and not with another seed: a resume restores the random state.
    with pytest.raises(RunDirError, match=r"training.seed: 7 in checkpoint '.*checkpoint-2', 8 now; it cannot "
                                          r"change on resume"):
        trainer(tmp_path, training={"seed": 8}, resume_from="auto").train()
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_step_by_step_and_auto_resumes_only_the_directorys_own_run(tmp_path):
    trainer(tmp_path, training={"max_steps": 4}).train()
    old = read_run(tmp_path)["run_id"]
    kept = snapshot(tmp_path / "checkpoint-4")
    new = trainer(tmp_path, training={"seed": 8}, overwrite=True, keep_last=1)
    new.train()
    run = read_run(tmp_path)["run_id"]
    assert run != old
    # The new run replaced steps 1-2 and pruned its own step 1; the old run's steps 3-4 are untouched.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert [run_id_of(tmp_path / f"checkpoint-{s}") for s in (2, 3, 4)] == [run, old, old]
    assert snapshot(tmp_path / "checkpoint-4") == kept
    # auto resumes the new run's checkpoint-2, never the old run's newer checkpoint-4.
    resumed = trainer(tmp_path, training={"seed": 8, "max_steps": 3}, overwrite=True, keep_last=1,
                      resume_from="auto", allow_changes=["training.max_steps"])
    resumed.train()
    assert sorted(step_losses(resumed)) == [1, 2, 3] and resumed.state.global_step == 3
    assert read_run(tmp_path)["history"][-1]["resumed_from"] == str(tmp_path / "checkpoint-2")
    assert [run_id_of(tmp_path / f"checkpoint-{s}") for s in (3, 4)] == [run, old]


# ---- manifest-less checkpoints and files hf_optcore did not write -------------------------------


def test_every_manifest_deleted_auto_refuses_instead_of_starting_over(tmp_path):
    trainer(tmp_path).train()
    (tmp_path / "checkpoint-2" / "notes.txt").write_text("mine")
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}" / "manifest.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError) as info:
        trainer(tmp_path, resume_from="auto").train()
    assert ("committed checkpoints in" in str(info.value)
            and "checkpoint-1, checkpoint-2 have no manifest (deleted or damaged)" in str(info.value)
            and "does not start over from step 0 on top of them" in str(info.value))
    assert snapshot(tmp_path) == before


def test_newest_manifest_deleted_resumes_the_older_one_naming_it_and_keeps_a_users_file(tmp_path, caplog):
    trainer(tmp_path).train()
    (tmp_path / "checkpoint-2" / "manifest.json").unlink()
    (tmp_path / "checkpoint-2" / "notes.txt").write_text("mine")
    resumed = trainer(tmp_path, resume_from="auto")
    with caplog.at_level("WARNING"):
        resumed.train()
    assert (f"{tmp_path / 'checkpoint-2'} has no manifest (an interrupted save, or its manifest was deleted): it is "
            f"never trusted or resumed from; resuming {tmp_path / 'checkpoint-1'} instead") in caplog.text
    assert sorted(step_losses(resumed)) == [1, 2]  # step 1 from the checkpoint's history, step 2 trained again
    # Step 2 was saved again: a complete checkpoint that does not list (and kept) the user's file.
    manifest = storage.verify(tmp_path / "checkpoint-2")
    assert (tmp_path / "checkpoint-2" / "notes.txt").read_text() == "mine" and "notes.txt" not in manifest["files"]


class _UserFileAt(TrainerCallback):
    """Writes a file of the user's into the checkpoint just saved at ``step``."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            (Path(args.output_dir) / f"checkpoint-{self.step}" / "notes.txt").write_text("mine")


def test_retention_deletes_only_what_hf_optcore_wrote(tmp_path):
    trainer(tmp_path, keep_last=1, callbacks=[_UserFileAt(1)]).train()
    # checkpoint-1 was pruned at step 2: its listed files and manifest are gone, the user's file stays.
    assert [p.name for p in (tmp_path / "checkpoint-1").rglob("*")] == ["notes.txt"]
    assert storage.verify(tmp_path / "checkpoint-2")


def test_a_run_killed_inside_its_first_save_starts_over_as_the_same_run(tmp_path):
    cfg = config(tmp_path, resume_from="auto")
    (tmp_path / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    own = {"run_id": "r1", "config_fingerprint": cfg.fingerprint(), "last_checkpoint": None}
    (tmp_path / "run.json").write_text(json.dumps(own))
    plan = plan_run(cfg, "auto")
    assert (plan.problems, plan.run_id, plan.resume) == ([], "r1", None)
    assert plan.warnings == [f"{tmp_path / 'checkpoint-2'} has no manifest (an interrupted save of this run, r1, which "
                             f"never completed a checkpoint): it is never resumed from; the run starts from step 0 "
                             f"and replaces it when it saves step 2 again"]
    # Another config is another run; a run that did commit checkpoints does not start over on top of them.
    other = config(tmp_path, {"seed": 8}, resume_from="auto")
    assert plan_run(other, "auto").problems[0].startswith("checkpoint.resume_from: 'auto' resumes only this "
                                                          "directory's own run")
    (tmp_path / "run.json").write_text(json.dumps({**own, "last_checkpoint": 2}))
    assert "does not start over from step 0" in plan_run(cfg, "auto").problems[0]
    # Started without resume_from and restarted with auto: the same run (the checkpoint section is bookkeeping).
    first = config(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({**own, "config_fingerprint": first.fingerprint(),
                                                   "compared_fingerprint": compared_fingerprint(first)}))
    assert plan_run(cfg, "auto").run_id == "r1"


# ---- the lock -------------------------------------------------------------------------------------


def test_a_held_lock_refuses_at_once_naming_the_holder(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        before = snapshot(tmp_path)
        with pytest.raises(RunDirError) as info:
            trainer(tmp_path).train()
        assert str(info.value).startswith(f"output_dir: '{tmp_path}' is in use by another run (pid {os.getpid()}, "
                                          f"host {socket.gethostname()}, since ")
        assert snapshot(tmp_path) == before
    finally:
        lock.release()


def test_the_lock_of_a_killed_process_is_no_obstacle(tmp_path):
    code = ("import os, signal, sys; from hf_optcore.checkpoint_manager.run_identity import RunLock; "
            "RunLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] != os.getpid()  # the dead holder's record
    assert lock_holder(tmp_path) is None
    trainer(tmp_path).train()
    assert read_run(tmp_path)["last_checkpoint"] == 2


@pytest.mark.slow
def test_two_runs_started_together_one_refuses_at_once(tmp_path):
    out = tmp_path / "run"
    # Pauses inside each save, from outside the library (tests/_save_pauses.py).
    cmd = [sys.executable, str(REPO / "tests" / "_save_pauses.py"), str(REPO / "recipes" / "sft.py"), "--config",
           str(SMOKE), "--no-samples",
           f"output_dir={out}", "training.max_steps=6", "checkpoint.every_n_steps=2"]
    # Each save pauses (3 points x 1 s): the first to start training holds the lock for 9 s or more.
    env = {**os.environ, "HF_OPTCORE_CKPT_TEST_DELAY": "1.0", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    assert sorted(p.returncode for p, _, _ in results) == [0, 2], [e[-2000:] for _, _, e in results]
    winner = next(p for p, _, _ in results if p.returncode == 0)
    _, _, err = next(r for r in results if r[0].returncode == 2)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert errors[0].startswith(f"error: output_dir: '{out}' is in use by another run (run_id ")
    assert f"pid {winner.pid}, host {socket.gethostname()}" in errors[0]
    run = read_run(out)
    assert run["pid"] == winner.pid and len(run["history"]) == 1 and run["last_checkpoint"] == 6


# ---- a resume whose config differs -----------------------------------------------------------------


class _LearningRates(TrainerCallback):
    """The learning rate of every parameter group at each optimizer step, as the optimizer is about to use it."""

    def __init__(self):
        self.by_step: dict[int, list[float]] = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.by_step[state.global_step + 1] = [g["lr"] for g in optimizer.param_groups]


def _logged_lrs(t) -> dict[int, float]:
    return {e["step"]: e["learning_rate"] for e in t.state.log_history if "learning_rate" in e}


@pytest.mark.parametrize("scheduler", ["cosine", "cosine_min_lr"])
def test_an_allowed_learning_rate_change_runs_and_logs_the_new_schedule(tmp_path, scheduler):
    """transformers restores the checkpoint's learning rates (optimizer groups, scheduler base_lrs, and the
    attributes of hf_optcore's callable schedule): the new ones must run and be logged from the first resumed step."""
    training = {"max_steps": 6, "scheduler": scheduler}
    reference, seen_reference = trainer(tmp_path / "new", {**training, "learning_rate": 5e-3}, every_n_steps=3), \
        _LearningRates()
    reference.add_callback(seen_reference)
    reference.train()
    trainer(tmp_path / "old", {**training, "max_steps": 4}, every_n_steps=3).train()
    checkpoint = tmp_path / "old" / "checkpoint-3"
    before = snapshot(tmp_path / "old")
    changed = {**training, "learning_rate": 5e-3}
    with pytest.raises(RunDirError) as info:
        trainer(tmp_path / "old", changed, every_n_steps=3, resume_from=str(checkpoint)).train()
    assert str(info.value) == (
        f"checkpoint.allow_changes: resuming checkpoint '{checkpoint}' with another config (training.learning_rate: "
        f"0.01 -> 0.005; training.max_steps: 4 -> 6); allow these changes with checkpoint.allow_changes="
        f"[training.learning_rate, training.max_steps] (the new values then run), or start a new run instead "
        f"(another output_dir, or checkpoint.overwrite=true without resume_from)")
    assert snapshot(tmp_path / "old") == before
    seen = _LearningRates()
    resumed = trainer(tmp_path / "old", changed, every_n_steps=3, resume_from=str(checkpoint),
                      allow_changes=["training.learning_rate", "training.max_steps"], callbacks=[seen])
    resumed.train()
    assert sorted(seen.by_step) == [4, 5, 6]
    assert seen.by_step == {s: seen_reference.by_step[s] for s in (4, 5, 6)}  # what the optimizer used
    logged = _logged_lrs(resumed)
    assert {s: logged[s] for s in (4, 5, 6)} == {s: _logged_lrs(reference)[s] for s in (4, 5, 6)}
    assert all(g["initial_lr"] == 5e-3 for g in resumed.optimizer.param_groups)
    assert read_run(tmp_path / "old")["history"][-1]["allowed_changes"] == ["training.learning_rate",
                                                                             "training.max_steps"]


def test_fields_that_only_say_where_and_how_often_are_not_compared(tmp_path):
    trainer(tmp_path, training={"max_steps": 3}).train()
    resumed = trainer(tmp_path, training={"max_steps": 3, "logging_steps": 2}, keep_last=1, every_n_steps=3,
                      resume_from=str(tmp_path / "checkpoint-2"))
    resumed.train()
    # The new retention ran (checkpoint-1 pruned; the resumed checkpoint-2 is kept, as always).
    assert resumed.state.global_step == 3
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


# ---- the recipe and hf-optcore validate: one error line, exit 2, nothing written -------------------


def test_the_recipe_twice_with_another_seed_exits_2_and_changes_nothing(tmp_path, capsys):
    from hf_optcore import cli
    from hf_optcore.recipes import sft

    out = tmp_path / "run"
    args = ["--config", str(SMOKE), "--no-samples", f"output_dir={out}", "training.max_steps=2"]
    assert sft.main(args) == 0
    run = read_run(out)
    capsys.readouterr()
    before = snapshot(out)
    assert sft.main([*args, "training.seed=43"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: output_dir: '{out}' holds the checkpoints of another run: "
                                               f"run {run['run_id']} (started {run['created']}")
    assert "training.seed: 42 -> 43" in err[0] and "checkpoint.overwrite=true" in err[0]
    assert snapshot(out) == before
    # hf-optcore validate names the same problem, and a held lock, before any model loads.
    lock = RunLock(out)
    lock.acquire()
    try:
        assert cli.main(["validate", str(SMOKE), f"output_dir={out}", "training.seed=43"]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[1].strip() for line in err] == ["output_dir", "output_dir"]
    assert "is in use by another run" in err[0] and "holds the checkpoints of another run" in err[1]


def test_preflight_lists_changed_fields_and_unknown_allow_changes_keys(tmp_path):
    from hf_optcore.preflight import preflight

    trainer(tmp_path).train()
    cfg = config(tmp_path, {"learning_rate": 2e-2}, resume_from="auto", allow_changes=["training.lerning_rate"])
    problems = [p for p in preflight(cfg, world_size=1) if p.startswith("checkpoint.")]
    assert problems[0] == ("checkpoint.allow_changes: unknown key 'training.lerning_rate' (did you mean "
                           "'training.learning_rate'?); entries are dotted config keys (training.learning_rate) or "
                           "sections (hardware)")
    assert problems[1].startswith(f"checkpoint.allow_changes: resuming checkpoint '{tmp_path / 'checkpoint-2'}' with "
                                  f"another config (training.learning_rate: 0.01 -> 0.02)")
    assert len(problems) == 2

"""A full disk during a checkpoint save: one ``error:`` line naming the directory, a non-zero exit, the partial
save removed, and the previous checkpoint complete and resumed once there is space again.

The filesystem is real: a small tmpfs mounted for the test (this needs root or CAP_SYS_ADMIN, as in the project's
sandbox and CI). Where mounting is impossible, that variant is skipped and the other still runs: the process's
file-size limit (RLIMIT_FSIZE, ``ulimit -f``), under which the kernel fails the write with EFBIG instead of
ENOSPC, so the error says "file too large" rather than "no space left".
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_optcore.checkpoint_manager import storage
from hf_optcore.recipes import sft

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "configs" / "tiny_smoke.yaml"
ARGS = ["--config", str(SMOKE), "--no-samples", "data.max_train_samples=32", "data.max_eval_samples=8",
        "training.write_report=false", "checkpoint.every_n_steps=2", "checkpoint.keep_last=1",
        "checkpoint.resume_from=auto", "checkpoint.allow_changes=[training.max_steps]"]


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    if os.environ.get("HF_OPTCORE_TEST_NO_MOUNT"):  # to run the RLIMIT_FSIZE variant where mounting works
        return False
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _check_failed_save(out: Path, errors: list[str], reason: str) -> None:
    assert len(errors) == 1, errors
    assert reason in errors[0] and f"in '{out}' while saving checkpoint-4" in errors[0], errors[0]
    assert f"the last complete checkpoint is '{out / 'checkpoint-2'}'" in errors[0], errors[0]
    assert not os.path.lexists(out / "checkpoint-4")  # the partial save was removed (its space given back)
    assert [c.step for c in storage.list_complete(out)] == [2]
    storage.verify(out / "checkpoint-2")


def _resume_after_space_is_back(out: Path, capsys) -> None:
    assert sft.main([*ARGS, f"output_dir={out}", "training.max_steps=4"]) == 0
    capsys.readouterr()
    # checkpoint-2 stays: a run never prunes the checkpoint it resumed from.
    assert [c.step for c in storage.list_complete(out)] == [2, 4]
    assert storage.read_manifest(out / "checkpoint-4")["topology"]["world_size"] == 1


def _save_under_limit(out: Path, limit: int) -> subprocess.CompletedProcess:
    """The resumed recipe in a process whose file-size limit is ``limit`` bytes (RLIMIT_FSIZE, ``ulimit -f``)."""

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), *ARGS, f"output_dir={out}",
                           "training.max_steps=4"], preexec_fn=limited, env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_error_line_and_the_last_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    small = tmp_path / "small"
    mounted = _mount_tmpfs(small, "48m")
    try:
        out = small / "run"
        assert sft.main([*ARGS, f"output_dir={out}", "training.max_steps=2"]) == 0  # checkpoint-2
        capsys.readouterr()
        if mounted:
            # Fill the filesystem up to half a checkpoint: the next save starts, then runs out of space.
            free = shutil.disk_usage(small).free
            with open(small / "filler", "wb") as fh:
                fh.write(b"\0" * max(0, free - _size(out / "checkpoint-2") // 2))
            rc = sft.main([*ARGS, f"output_dir={out}", "training.max_steps=4"])
            err = capsys.readouterr().err
            reason = "no space left on device"
        else:  # no mount here: the kernel's per-process file-size limit, a real EFBIG from the same writes
            biggest = max(p.stat().st_size for p in (out / "checkpoint-2").rglob("*") if p.is_file())
            r = _save_under_limit(out, biggest // 2)  # above every log and run.json, below the largest file
            rc, err = r.returncode, r.stderr
            reason = "file too large (over the file size limit, ulimit -f)"
        assert rc == 2 and "Traceback" not in err, err[-3000:]
        _check_failed_save(out, _errors(err), reason)
        if mounted:
            (small / "filler").unlink()
        _resume_after_space_is_back(out, capsys)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(small)], capture_output=True, timeout=30)


def test_a_write_stopped_by_the_file_size_limit_is_recognised(tmp_path):
    """torch's archive writer hides the EFBIG of RLIMIT_FSIZE (``iostream error``): the files tell it."""
    code = ("import resource, sys, torch; from pathlib import Path; "
            "from hf_optcore.checkpoint_manager.faults import storage_full_reason; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "try:\n    torch.save({'w': torch.zeros(100_000)}, sys.argv[1] + '/optimizer.pt')\n"
            "except Exception as exc:\n    print(type(exc).__name__, '|', storage_full_reason(exc, Path(sys.argv[1])))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.stdout.strip() == "RuntimeError | file too large (over the file size limit, ulimit -f)", r.stderr[-2000:]


def test_the_standalone_manager_on_a_full_disk_raises_one_error_and_keeps_its_checkpoints(tmp_path):
    import torch

    from hf_optcore.checkpoint_manager import CheckpointManager
    from hf_optcore.checkpoint_manager.faults import StorageFullError
    from hf_optcore.config import CheckpointConfig
    from hf_optcore.tiny import build_tiny_model

    small = tmp_path / "small"
    if not _mount_tmpfs(small, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        model = build_tiny_model("llama", seed=0)
        mgr = CheckpointManager(CheckpointConfig(keep_last=1), small / "out", model,
                                torch.optim.AdamW(model.parameters()))
        first = mgr.save(1)
        with open(small / "filler", "wb") as fh:
            fh.write(b"\0" * max(0, shutil.disk_usage(small).free - _size(first) // 2))
        with pytest.raises(StorageFullError, match=f"no space left on device in '{small / 'out'}' while saving "
                                                   f"checkpoint-2: the partial checkpoint was removed"):
            mgr.save(2)
        assert [c.step for c in mgr.checkpoints()] == [1] and storage.verify(first)
        assert sorted(p.name for p in (small / "out").iterdir()) == ["checkpoint-1"]
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True, timeout=30)

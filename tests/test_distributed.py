"""Multi-process training: detection of a launch that formed no group, and real 2-process DDP runs.

The slow tests launch ``tests/distributed/train_tiny.py`` with ``accelerate launch --multi_gpu
--num_processes 2`` on CPU (gloo) *without* telling it ``use_cpu``: hf_optcore must notice and
form the group itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_optcore.distributed import (
    DistributedSetupError,
    launched_world_size,
    needs_cpu_process_group,
    prepare_process_group,
    verify_process_group,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "distributed" / "train_tiny.py"


class _Args:
    """Stands in for TrainingArguments: records that the device was re-resolved."""

    def __init__(self, use_cpu=False, deepspeed=None, world_size=1):
        self.use_cpu, self.deepspeed, self.world_size = use_cpu, deepspeed, world_size
        self.parallel_mode = "not_distributed"
        self.resolved = 0

    @property
    def device(self):
        self.resolved += 1
        return "cpu"


def test_launched_world_size_reads_launcher_env():
    assert launched_world_size({}) == 1
    assert launched_world_size({"WORLD_SIZE": "4"}) == 4
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE must be an integer, got 'two'"):
        launched_world_size({"WORLD_SIZE": "two"})


def test_needs_cpu_group_only_for_gpu_less_multi_process_launch():
    env2 = {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    assert needs_cpu_process_group(_Args(), env2, accelerator=False)
    assert not needs_cpu_process_group(_Args(), env2, accelerator=True)  # CUDA: nccl forms the group
    assert not needs_cpu_process_group(_Args(use_cpu=True), env2, accelerator=False)
    assert not needs_cpu_process_group(_Args(), {**env2, "ACCELERATE_USE_CPU": "true"}, accelerator=False)
    assert not needs_cpu_process_group(_Args(), {"WORLD_SIZE": "1"}, accelerator=False)
    assert not needs_cpu_process_group(_Args(), {}, accelerator=False)


def test_prepare_sets_use_cpu_and_re_resolves_device():
    args = _Args()
    args.__dict__["_setup_devices"] = "stale"
    assert prepare_process_group(args, {"WORLD_SIZE": "2"}, accelerator=False) is True
    assert args.use_cpu is True
    assert "_setup_devices" not in args.__dict__ and args.resolved == 1
    untouched = _Args()
    assert prepare_process_group(untouched, {"WORLD_SIZE": "2"}, accelerator=True) is False
    assert untouched.use_cpu is False and untouched.resolved == 0


def test_prepare_refuses_deepspeed_without_gpu():
    with pytest.raises(DistributedSetupError, match="DeepSpeed config but no GPU is visible"):
        prepare_process_group(_Args(deepspeed="ds.json"), {"WORLD_SIZE": "2"}, accelerator=False)


def test_verify_refuses_a_group_smaller_than_the_launch():
    verify_process_group(_Args(world_size=2), {"WORLD_SIZE": "2"})
    verify_process_group(_Args(world_size=1), {})
    with pytest.raises(DistributedSetupError, match=r"2 processes were launched .* group of 1"):
        verify_process_group(_Args(world_size=1), {"WORLD_SIZE": "2"})


def test_single_process_trainer_is_left_alone(tmp_path, monkeypatch):
    from hf_optcore.config import TrainerConfig
    from hf_optcore.tiny import build_tiny_model
    from hf_optcore.trainer import OptCoreTrainer

    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = TrainerConfig.from_dict({"output_dir": str(tmp_path), "model": {"lora": {"enabled": False}},
                                   "training": {"max_steps": 1, "report_to": "none"}})
    trainer = OptCoreTrainer(model=build_tiny_model("llama"), args=cfg)
    assert trainer.args.use_cpu is False and trainer.args.world_size == 1


# ---- real multi-process runs ---------------------------------------------------------------


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "ACCELERATE_USE_CPU", "CUDA_VISIBLE_DEVICES"):
        env.pop(var, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the test is about a machine without GPU
    return env


def _run(out: Path, nproc: int, *extra: str) -> dict:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "0"]
    cmd += [str(SCRIPT), "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    one = _run(root / "one", 1, "--batch", "4", "--steps", "6")
    two = _run(root / "two", 2, "--batch", "2", "--steps", "6", "--save-every", "3")
    # Resume the 2-process run from its step-3 checkpoint in a fresh directory.
    shutil.copytree(root / "two" / "checkpoint-3", root / "resumed" / "checkpoint-3")
    resumed = _run(root / "resumed", 2, "--batch", "2", "--steps", "6", "--save-every", "3",
                   "--resume", str(root / "resumed" / "checkpoint-3"))
    return root, one, two, resumed


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_form_a_gloo_group_without_use_cpu(two_process_runs):
    _, one, two, _ = two_process_runs
    assert one["world_size"] == 1 and one["use_cpu"] is False
    assert two["world_size"] == 2 and two["use_cpu"] is True  # turned on by hf_optcore, not the script


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_losses_equal_one_process_with_double_batch(two_process_runs):
    _, one, two, _ = two_process_runs
    assert sorted(one["losses"]) == sorted(two["losses"]) and len(one["losses"]) == 6
    for step, loss in one["losses"].items():
        assert abs(two["losses"][step] - loss) < 1e-5, (step, loss, two["losses"][step])
    # DDP keeps replicas identical: every rank ends with the same weights.
    assert len({r["model"] for r in two["ranks"]}) == 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_checkpoints_written_once_with_every_rank_rng(two_process_runs):
    root, _, two, _ = two_process_runs
    dirs = sorted(p.name for p in (root / "two").iterdir() if p.is_dir())
    assert dirs == ["checkpoint-3", "checkpoint-6"], dirs
    for ckpt in dirs:
        rng = sorted(p.name for p in (root / "two" / ckpt).rglob("rng_state*"))
        assert len(rng) == 2, (ckpt, rng)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_resume_is_exact(two_process_runs):
    _, _, two, resumed = two_process_runs
    assert resumed["global_step"] == 6
    for step in ("4", "5", "6"):
        assert resumed["losses"][step] == two["losses"][step], step
    assert [r["model"] for r in resumed["ranks"]] == [r["model"] for r in two["ranks"]]

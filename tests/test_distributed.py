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
import torch

from hf_optcore.distributed import (
    DistributedSetupError,
    launched_world_size,
    needs_cpu_process_group,
    prepare_process_group,
    requested_backend_fallback,
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


def test_fsdp_or_deepspeed_launch_that_runs_ddp_is_named(caplog):
    from accelerate.utils import DistributedType

    env = {"ACCELERATE_USE_FSDP": "true"}
    msg = requested_backend_fallback(DistributedType.MULTI_CPU, env)
    assert msg and "asked for FSDP but Accelerate runs MULTI_CPU" in msg
    assert requested_backend_fallback(DistributedType.FSDP, env) is None
    assert requested_backend_fallback(DistributedType.MULTI_CPU, {}) is None
    assert "DEEPSPEED" in requested_backend_fallback(DistributedType.MULTI_CPU, {"ACCELERATE_USE_DEEPSPEED": "1"})

    class _Acc:
        distributed_type = DistributedType.MULTI_CPU

    with caplog.at_level("WARNING", logger="hf_optcore.distributed"):
        verify_process_group(_Args(world_size=2), {"WORLD_SIZE": "2", **env}, accelerator=_Acc())
    assert "not sharded" in caplog.text


EXPECTED_CONFIGS = {
    "single_gpu.yaml": "NO",
    "multi_gpu_ddp.yaml": "MULTI_GPU",
    "cpu_ddp.yaml": "MULTI_GPU",
    "fsdp2.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
    "multi_node.yaml": "MULTI_GPU",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_accelerate_configs_load_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "recipes" / "accelerate" / name))
    assert cfg.distributed_type.value == EXPECTED_CONFIGS[name]
    if name == "fsdp2.yaml":
        fc = cfg.fsdp_config
        assert fc["fsdp_version"] == 2 and fc["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fc["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and fc["fsdp_reshard_after_forward"] is True
    if name.startswith("deepspeed"):
        ds = json.loads((REPO / cfg.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == int(name[-6])
        assert ds["gradient_accumulation_steps"] == "auto"  # taken from the hf_optcore config
    if name == "multi_node.yaml":
        assert cfg.num_machines == 2 and cfg.num_processes == 16


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
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    r = {"root": root}
    # Streamed data: Accelerate hands rank r the r-th slice of each 2B-example global batch.
    r["one_stream"] = _run(root / "one_stream", 1, "--batch", "4", "--iterable")
    r["two_stream"] = _run(root / "two_stream", 2, "--batch", "2", "--iterable")
    # hf_optcore's stream of a JSONL file: each rank reads every other row (one shard, two ranks), batch 8 vs 2 x 4;
    # the 2-process run checkpoints every 3 steps and is resumed from step 3 (every rank's own stream position).
    r["one_file_stream"] = _run(root / "one_file_stream", 1, "--batch", "8", "--stream")
    r["two_file_stream"] = _run(root / "two_file_stream", 2, "--batch", "4", "--stream", "--save-every", "3")
    shutil.copytree(root / "two_file_stream" / "checkpoint-3", root / "resumed_stream" / "checkpoint-3")
    r["resumed_stream"] = _run(root / "resumed_stream", 2, "--batch", "4", "--stream", "--save-every", "3",
                               "--resume", str(root / "resumed_stream" / "checkpoint-3"))
    # Map-style data: hf_optcore's rank-aware batch sampler, EMA on, checkpoints every 3 steps.
    r["one"] = _run(root / "one", 1, "--batch", "4")
    r["two"] = _run(root / "two", 2, "--batch", "2", "--save-every", "3", "--ema")
    # Resume the 2-process run from its step-3 checkpoint in a fresh directory.
    shutil.copytree(root / "two" / "checkpoint-3", root / "resumed" / "checkpoint-3")
    r["resumed"] = _run(root / "resumed", 2, "--batch", "2", "--save-every", "3", "--ema",
                        "--resume", str(root / "resumed" / "checkpoint-3"))
    return r


def _assert_losses_close(one: dict, two: dict) -> None:
    assert sorted(one["losses"]) == sorted(two["losses"]) and len(one["losses"]) == 6
    for step, loss in one["losses"].items():
        assert abs(two["losses"][step] - loss) < 1e-5, (step, loss, two["losses"][step])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_form_a_gloo_group_without_use_cpu(runs):
    assert runs["one"]["world_size"] == 1 and runs["one"]["use_cpu"] is False
    # Turned on by hf_optcore: the script never sets use_cpu.
    assert runs["two"]["world_size"] == 2 and runs["two"]["use_cpu"] is True


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_losses_equal_one_process_with_double_batch_streamed(runs):
    _assert_losses_close(runs["one_stream"], runs["two_stream"])
    # DDP keeps replicas identical: every rank ends with the same weights, equal to the 1-process run's.
    assert len({r["model"] for r in runs["two_stream"]["ranks"]}) == 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_stream_equals_one_process_with_double_batch(runs):
    # Each rank read and trained on its own rows (every other one); together they are the 1-process batches.
    _assert_losses_close(runs["one_file_stream"], runs["two_file_stream"])
    assert len({r["model"] for r in runs["two_file_stream"]["ranks"]}) == 1
    assert [r["observed_real_tokens"] for r in runs["two_file_stream"]["ranks"]] == [6 * 4 * 16] * 2


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_stream_resumes_each_rank_where_it_was(runs):
    root = runs["root"] / "two_file_stream" / "checkpoint-3" / "components"
    states = [torch.load(root / f"rng_rank{r}.pt", weights_only=True)["components"]["stream"] for r in (0, 1)]
    readers = [_stream_readers(s["loader"]) for s in states]
    # Each rank's file holds its own reader: after 3 steps of 4 rows each, rank 0 has just read global row 22 and
    # rank 1 row 23 (rank r reads rows r, r + 2, ...; `row` counts the rows it went through).
    assert [[(x["rank"], x["position"]["row"]) for x in r] for r in readers] == [[(0, 23)], [(1, 24)]]
    two, resumed = runs["two_file_stream"], runs["resumed_stream"]
    for step in ("4", "5", "6"):
        assert resumed["losses"][step] == two["losses"][step], step
    assert [r["model"] for r in resumed["ranks"]] == [r["model"] for r in two["ranks"]]


def _stream_readers(node) -> list:
    if isinstance(node, dict):
        if "hf_optcore_stream" in node:
            return [node["hf_optcore_stream"]]
        return [r for v in node.values() for r in _stream_readers(v)]
    return []


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_losses_equal_one_process_with_double_batch_sampler(runs):
    # The sampler cuts global batches of 2 x 2 examples and gives each rank its half of every one.
    _assert_losses_close(runs["one"], runs["two"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_logged_real_tokens_are_summed_over_ranks(runs):
    one, two = runs["one"], runs["two"]
    # Every step trains on 4 examples x 16 tokens in both runs; rank 0 alone saw half of them.
    assert one["real_tokens"] == two["real_tokens"] == {str(s): 64 for s in range(1, 7)}
    assert [r["observed_real_tokens"] for r in two["ranks"]] == [6 * 32, 6 * 32]
    assert sum(two["real_tokens"].values()) == sum(r["observed_real_tokens"] for r in two["ranks"])
    assert sum(one["real_tokens"].values()) == one["ranks"][0]["observed_real_tokens"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ema_shadows_agree_across_ranks(runs):
    ranks = runs["two"]["ranks"]
    assert ranks[0]["ema"] is not None
    assert len({r["ema"] for r in ranks}) == 1 and len({r["model"] for r in ranks}) == 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_checkpoints_written_once_with_every_rank_rng(runs):
    run = runs["root"] / "two"
    # Nothing but the two checkpoints (no per-rank copies, no leftover temporary folders).
    dirs = sorted(p.name for p in run.iterdir() if p.is_dir() and ("checkpoint" in p.name or "tmp" in p.name))
    assert dirs == ["checkpoint-3", "checkpoint-6"], dirs
    for ckpt in dirs:
        # transformers' RNG file per rank, and hf_optcore's (with the pending collate RNG) per rank.
        assert sorted(p.name for p in (run / ckpt).glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
        assert sorted(p.name for p in (run / ckpt / "components").glob("rng_rank*.pt")) == ["rng_rank0.pt",
                                                                                             "rng_rank1.pt"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_resume_is_exact(runs):
    two, resumed = runs["two"], runs["resumed"]
    assert resumed["global_step"] == 6
    for step in ("4", "5", "6"):
        assert resumed["losses"][step] == two["losses"][step], step
    for mine, full in zip(resumed["ranks"], two["ranks"], strict=True):  # weights and EMA shadows of every rank
        assert (mine["model"], mine["ema"]) == (full["model"], full["ema"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_with_another_world_size_is_refused(runs):
    root = runs["root"]
    shutil.copytree(root / "two" / "checkpoint-3", root / "one_from_two" / "checkpoint-3")
    cmd = [sys.executable, str(SCRIPT), "--out", str(root / "one_from_two"), "--batch", "2", "--save-every", "3",
           "--ema", "--resume", str(root / "one_from_two" / "checkpoint-3")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert "was saved by 2 process(es), this run has 1" in proc.stderr, proc.stderr[-3000:]
    assert "allow_topology_change" in proc.stderr, proc.stderr[-3000:]


# ---- FSDP2 on CPU (torch fully_shard over gloo; the Trainer itself falls back to DDP on CPU) ----

FSDP_SCRIPT = REPO / "tests" / "distributed" / "fsdp2_cpu.py"


def _torchrun(out: Path, nproc: int, phase: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(FSDP_SCRIPT), "--out", str(out), "--phase", phase]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / f"{phase}.json").read_text())


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return {
        "root": root,
        "one": _torchrun(root / "one", 1, "full"),
        "two": _torchrun(root / "two", 2, "full"),
        "resumed": _torchrun(root / "two", 2, "resume"),
    }


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_ema_follows_the_shards(fsdp_runs):
    import torch

    one, two = fsdp_runs["one"], fsdp_runs["two"]
    assert two["world_size"] == 2 and two["all_sharded"]
    # Each rank averages only its shard: about half of the elements on rank 0.
    assert two["ema_elements"] < two["full_elements"] <= 2 * two["ema_elements"] + 64
    assert one["ema_elements"] == one["full_elements"]
    for step, loss in one["losses"].items():
        assert abs(two["losses"][step] - loss) < 1e-5
    w1 = torch.load(fsdp_runs["root"] / "one" / "full_weights.pt")
    w2 = torch.load(fsdp_runs["root"] / "two" / "full_weights.pt")
    assert two["ema_differs_from_model"]
    for a, b in zip(w1["ema"], w2["ema"]):  # gathered shards == the unsharded run's EMA
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_sharded_checkpoint_resumes_exactly(fsdp_runs):
    two, resumed = fsdp_runs["two"], fsdp_runs["resumed"]
    assert sorted(resumed["losses"]) == ["4", "5", "6"]
    for step in ("4", "5", "6"):
        assert resumed["losses"][step] == two["losses"][step], step
    assert resumed["model"] == two["model"] and resumed["ema"] == two["ema"]


def test_gpu_check_dry_run_lists_every_check():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for name in ("bf16", "fused_adamw", "torch_compile", "fsdp2_trainer", "fsdp2_raw", "chunked_loss", "memory_bench"):
        assert f"  {name} " in proc.stdout
    assert "nothing was run" in proc.stdout

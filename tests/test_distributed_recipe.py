"""The recipe as users run it, on 1 and 2 processes: variable-length instruction data, evaluation before
training and every 2 steps, LoRA and full fine-tuning. 2 processes x batch 4 must train exactly what 1
process x batch 8 trains (per-step loss within 1e-5), which only holds if every training step after an
evaluation is still data-parallel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_optcore.allocator import find_jemalloc

REPO = Path(__file__).resolve().parents[1]

COMMON = [
    "--no-samples",
    "model.name_or_path=tiny:llama",
    "model.dtype=float32",
    "hardware.use_cpu=true",
    "training.learning_rate=3e-3",
    "training.max_steps=6",
    "training.warmup_steps=0",
    "training.logging_steps=1",
    "training.eval_strategy=steps",
    "training.eval_steps=2",
    "training.per_device_eval_batch_size=4",
    "training.seed=7",
    "data.format=instruction",
    "data.max_seq_len=96",
    "data.max_train_samples=96",
    "data.max_eval_samples=13",  # odd: the 2-process eval shards are uneven
    "data.batching=random",
    "checkpoint.save_at_end=false",
]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    return env


def _run(out: Path, nproc: int, lora: bool, *extra: str) -> dict:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    batch = 8 // nproc
    cmd += [str(REPO / "recipes" / "sft.py"), *COMMON, f"output_dir={out}", f"model.lora.enabled={str(lora).lower()}",
            f"training.per_device_train_batch_size={batch}", *extra]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = {e["step"]: e["loss"] for e in history if "loss" in e}
    evals = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"losses": losses, "evals": evals, "before": metrics["eval_before"].get("eval_loss"),
            "allocator": metrics["train"]["cpu_allocator"]}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_train_exactly_the_one_process_double_batch_with_evaluation(tmp_path, lora):
    one = _run(tmp_path / "one", 1, lora)
    # With LoRA each launched process also re-starts itself under jemalloc (hardware.cpu_allocator), which
    # must change nothing but memory.
    jemalloc = lora and find_jemalloc() is not None
    two = _run(tmp_path / "two", 2, lora, *(["hardware.cpu_allocator=jemalloc"] if jemalloc else []))
    assert two["allocator"] == ("jemalloc" if jemalloc else "system")
    assert sorted(one["losses"]) == sorted(two["losses"]) == list(range(1, 7))
    for step in one["losses"]:
        assert abs(one["losses"][step] - two["losses"][step]) < 1e-5, (step, one["losses"], two["losses"])
    # The evaluations (before training and at steps 2, 4, 6) are token-weighted over every rank: equal too.
    assert abs(one["before"] - two["before"]) < 1e-5
    assert sorted(one["evals"]) == sorted(two["evals"]) == [0, 2, 4, 6]  # before training, then every 2 steps
    for step in one["evals"]:
        assert abs(one["evals"][step] - two["evals"][step]) < 1e-5, (step, one["evals"], two["evals"])

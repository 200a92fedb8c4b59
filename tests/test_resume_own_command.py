"""A run resumes with the command that started it: values derived per process are not config changes, a new rank
of an allowed topology change gets an RNG state, and every objection to a resume is reported at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_optcore.config import TrainerConfig
from hf_optcore.errors import RunDirError
from hf_optcore.preflight import preflight
from hf_optcore.tiny import build_tiny_model
from tests._checkpoint_helpers import TokenDataset

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "configs" / "tiny_smoke.yaml"
NO_ACCELERATOR = not (torch.cuda.is_available() or getattr(torch, "accelerator", None) and torch.accelerator.is_available())


def collate(features):
    ids = torch.stack([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def config(out: Path, *overrides: str) -> TrainerConfig:
    return TrainerConfig.from_sources(SMOKE, [f"output_dir={out}", "training.max_steps=2", "checkpoint.every_n_steps=2",
                                              "training.per_device_train_batch_size=2", "data.batching=random",
                                              "checkpoint.resume_from=auto", "training.write_report=false",
                                              *overrides])


def train(cfg: TrainerConfig):
    from hf_optcore.trainer import OptCoreTrainer

    t = OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=cfg, train_dataset=TokenDataset(16),
                       data_collator=collate)
    t.train()
    return t


@pytest.mark.skipif(not NO_ACCELERATOR, reason="on a machine with an accelerator use_cpu=false is another device")
def test_a_cpu_run_resumes_with_its_own_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    train(config(out, "hardware.use_cpu=true"))
    saved = yaml.safe_load((out / "checkpoint-2" / "config.yaml").read_text())
    # What ran, as transformers derived it (use_cpu turns dataloader_pin_memory off), not what the user wrote.
    assert saved["hardware"]["use_cpu"] is True and saved["hardware"]["dataloader_pin_memory"] is False
    assert preflight(config(out, "hardware.use_cpu=true")) == []
    # A GPU-less multi-process launch switches use_cpu on by itself (prepare_process_group): the command that
    # started such a run says use_cpu=false. On this machine both mean the CPU.
    assert preflight(config(out)) == []
    resumed = train(config(out, "training.max_steps=4", "checkpoint.allow_changes=[training.max_steps]"))
    assert resumed.optcore_checkpointing.resume_path == out / "checkpoint-2" and resumed.state.global_step == 4
    # A real change is still one.
    problems = preflight(config(out, "training.learning_rate=1e-2"))
    assert len(problems) == 1 and "training.learning_rate: 0.003 -> 0.01" in problems[0]


def test_every_objection_to_a_resume_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    train(config(out, "hardware.use_cpu=true"))
    changed = config(out, "hardware.use_cpu=true", "training.learning_rate=1e-2", "training.optimizer=sgd",
                     "training.per_device_train_batch_size=4")
    expected = ["checkpoint.allow_changes: resuming checkpoint", "training.learning_rate: 0.003 -> 0.01",
                "training.optimizer: 'sgd', but checkpoint", "training.per_device_train_batch_size: 4, but checkpoint"]
    problems = preflight(changed)
    assert len(problems) == 3 and all(any(e in p for p in problems) for e in expected), problems
    with pytest.raises(RunDirError) as info:  # the Trainer, as a script without preflight meets it
        train(changed)
    assert all(e in str(info.value) for e in expected), str(info.value)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    return env


RECIPE = ["data.max_train_samples=32", "data.max_eval_samples=8", "data.batching=random", "training.logging_steps=1",
          "training.write_report=false", "checkpoint.every_n_steps=2", "checkpoint.resume_from=auto"]


def _recipe(out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += [str(REPO / "recipes" / "sft.py"), "--config", str(SMOKE), "--no-samples", f"output_dir={out}", *RECIPE,
            *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not NO_ACCELERATOR, reason="a GPU-less multi-process launch is what this is about")
def test_one_process_run_resumed_on_two_then_again_with_the_same_command(tmp_path, monkeypatch):
    from hf_optcore.recipes import sft

    out = tmp_path / "run"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--config", str(SMOKE), "--no-samples", f"output_dir={out}", *RECIPE]
    assert sft.main([*argv, "training.max_steps=2", "training.per_device_train_batch_size=8"]) == 0  # 1 process
    # README's launch (no use_cpu): 2 processes x 4 examples keep the 8 examples of each optimizer step.
    two = ["training.max_steps=4", "training.per_device_train_batch_size=4", "checkpoint.allow_topology_change=true",
           "checkpoint.allow_changes=[training.max_steps]"]
    r = _recipe(out, 2, *two)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "holds no RNG state for rank 1 (it was saved by fewer processes): rank 1 starts from rank 0's saved state" \
        in r.stderr, r.stderr[-4000:]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and {e["step"] for e in state["log_history"] if "loss" in e} == {1, 2, 3, 4}
    manifest = json.loads((out / "checkpoint-4" / "manifest.json").read_text())
    assert manifest["topology"]["world_size"] == 2
    assert {"components/rng_rank0.pt", "components/rng_rank1.pt"} <= set(manifest["files"])
    saved = yaml.safe_load((out / "checkpoint-4" / "config.yaml").read_text())
    assert saved["hardware"]["use_cpu"] is True  # switched on per process; the command never said so
    # The same command again, as its 2 processes check it before loading the model (the Trainer itself compares
    # the values that run, use_cpu switched on again): no config change.
    ns = sft.parse_args([*argv, *two])
    same = sft.build_config(ns.config, ns.overrides)
    sft._resolve_paths(same)
    assert same.hardware.use_cpu is False
    problems = preflight(same, world_size=2)
    assert problems == [], problems[0][:3000]

"""hardware.cpu_allocator=jemalloc: the recipe re-starts itself once with jemalloc preloaded.

What it changes is memory (benchmarks/results/bench_memory_jemalloc.md), never numbers: the same run under
either allocator trains to the same losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_optcore import allocator
from hf_optcore.config import TrainerConfig
from hf_optcore.preflight import preflight

REPO = Path(__file__).resolve().parents[1]
JEMALLOC = allocator.find_jemalloc()
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="no libjemalloc.so.2 (make install fetches it on Debian)")

TINY = ["--config", str(REPO / "recipes" / "configs" / "tiny_smoke.yaml"), "--no-samples", "training.max_steps=4"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", allocator._ENV_MARK)}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


def _recipe(out: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), *TINY, f"output_dir={out}", *overrides],
                          capture_output=True, text=True, cwd=REPO, env=env or _env(), timeout=600)


def test_plan_follows_the_choice(monkeypatch, tmp_path):
    fake = tmp_path / "libjemalloc.so.2"
    fake.write_bytes(b"")
    monkeypatch.setenv(allocator.ENV_LIBRARY, str(fake))
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    assert allocator.plan("system") == (None, "hardware.cpu_allocator=system")
    assert allocator.plan("jemalloc") == (str(fake), "hardware.cpu_allocator=jemalloc")
    # Already preloaded (by the user, or by the re-start): nothing to do.
    monkeypatch.setattr(allocator, "active_allocator", lambda: "jemalloc")
    assert allocator.plan("jemalloc") == (None, "jemalloc is already loaded")


def test_a_missing_jemalloc_is_a_preflight_problem_naming_the_field(monkeypatch, tmp_path):
    monkeypatch.setenv(allocator.ENV_LIBRARY, str(tmp_path / "nope.so"))
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    assert allocator.find_jemalloc() is None
    with pytest.raises(ValueError, match=r"^hardware.cpu_allocator: jemalloc was asked for but libjemalloc.so.2"):
        allocator.plan("jemalloc")
    problems = preflight(TrainerConfig.from_dict({"hardware": {"cpu_allocator": "jemalloc"}}))
    assert [p for p in problems if p.startswith("hardware.cpu_allocator")], problems
    assert not [p for p in preflight(TrainerConfig.from_dict({})) if p.startswith("hardware.cpu_allocator")]


def test_an_unknown_allocator_names_the_field():
    with pytest.raises(Exception, match="hardware.cpu_allocator"):
        TrainerConfig.from_dict({"hardware": {"cpu_allocator": "tcmalloc"}})


def test_asking_for_jemalloc_where_there_is_none_is_one_error_line_before_loading(tmp_path):
    proc = _recipe(tmp_path / "run", "hardware.cpu_allocator=jemalloc",
                   env=_env(**{allocator.ENV_LIBRARY: str(tmp_path / "missing.so")}))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hardware.cpu_allocator" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_library_path_for_scripts_that_import_the_trainer(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hf_optcore.allocator"], capture_output=True, text=True,
                          env=_env(**{allocator.ENV_LIBRARY: str(tmp_path / "missing.so")}), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: libjemalloc.so.2 not found")
    if JEMALLOC is not None:
        proc = subprocess.run([sys.executable, "-m", "hf_optcore.allocator"], capture_output=True, text=True,
                              env=_env(), timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == JEMALLOC


@needs_jemalloc
def test_the_recipe_restarts_itself_once_under_jemalloc_and_trains_the_same_losses(tmp_path):
    runs = {}
    for choice in ("jemalloc", "system"):
        out = tmp_path / choice
        proc = _recipe(out, f"hardware.cpu_allocator={choice}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[choice] = (json.loads((out / "metrics.json").read_text()), proc)
    (jem, p_jem), (system, p_system) = runs["jemalloc"], runs["system"]
    # What ran is read from the process's own memory map, not from the setting.
    assert jem["train"]["cpu_allocator"] == "jemalloc" and system["train"]["cpu_allocator"] == "system"
    assert p_jem.stderr.count("cpu allocator: jemalloc") == 1  # one re-start, logged once
    assert "cpu allocator jemalloc" in p_jem.stdout and "cpu allocator system" in p_system.stdout
    assert jem["train"]["train_loss"] == pytest.approx(system["train"]["train_loss"], rel=1e-5)
    assert jem["eval_after"]["eval_loss"] == pytest.approx(system["eval_after"]["eval_loss"], rel=1e-5)


@needs_jemalloc
def test_a_preloaded_jemalloc_is_not_preloaded_twice(tmp_path):
    out = tmp_path / "run"
    proc = _recipe(out, "hardware.cpu_allocator=jemalloc", env=_env(LD_PRELOAD=JEMALLOC))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpu allocator: jemalloc (jemalloc is already loaded)" in proc.stderr
    assert json.loads((out / "metrics.json").read_text())["train"]["cpu_allocator"] == "jemalloc"


def test_a_trainer_in_a_script_says_when_jemalloc_was_asked_for_but_not_loaded(tmp_path, caplog):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_optcore.trainer import OptCoreTrainer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)}]
    cfg = TrainerConfig.from_dict({"output_dir": str(tmp_path), "hardware": {"use_cpu": True,
                                                                             "cpu_allocator": "jemalloc"}})
    with caplog.at_level("WARNING", logger="hf_optcore.allocator"):
        OptCoreTrainer(model=model, args=cfg, train_dataset=data)
    loaded = allocator.active_allocator() == "jemalloc"
    assert loaded or "LD_PRELOAD=$(python -m hf_optcore.allocator)" in caplog.text
    assert allocator.warn_if_not_preloaded("system")


def test_peak_memory_counts_what_the_region_allocated_not_what_came_before():
    import torch

    from hf_optcore.memory_meter import PeakMemory

    earlier = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB alive before the region: in before, not extra
    meter = PeakMemory(cuda=False).start()
    block = torch.ones(256 << 20, dtype=torch.uint8)  # 256 MiB touched inside it
    del block
    mem = meter.stop()
    assert mem["before_bytes"] >= earlier.numel()
    assert mem["peak_bytes"] >= mem["before_bytes"] + (200 << 20)
    assert mem["extra_bytes"] == mem["peak_bytes"] - mem["before_bytes"]

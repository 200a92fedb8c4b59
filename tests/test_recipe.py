"""recipes/sft.py: the recipe's main() end to end, and its bad-input behaviour (exit 2, nothing written)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_optcore.recipes.sft import DEFAULT_CONFIG, main

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "model.name_or_path=tiny:llama",
    "model.lora.enabled=false",
    "model.dtype=float32",
    "training.learning_rate=3e-3",
    "training.max_steps=30",
    "training.warmup_steps=0",
    "training.per_device_train_batch_size=8",
    "training.logging_steps=5",
    "data.max_seq_len=96",
    "data.max_train_samples=240",
    "data.max_eval_samples=24",
]


def test_main_on_tiny_model_and_bundled_data(tmp_path, capsys, recwarn):
    out = tmp_path / "run"
    assert main([f"output_dir={out}", *TINY]) == 0
    assert not [w for w in recwarn if "pin_memory" in str(w.message)]  # no accelerator: no pinning, no warning
    # The report and trainer_state.json hold the evaluations before (step 0) and after training.
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 30]
    assert (out / "report.png").stat().st_size > 0 and "eval" in (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["eval_before"]["eval_loss"], metrics["eval_after"]["eval_loss"]
    assert after < before - 0.5, (before, after)  # a random byte-level model learns English bytes fast
    assert (out / "config.yaml").is_file()
    resolved = (out / "config.yaml").read_text()
    assert "tiny:llama" in resolved and "max_steps: 30" in resolved
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 3 and all("generation_after" in s for s in samples)
    printed = capsys.readouterr().out
    assert "eval loss" in printed and "->" in printed
    assert "GB peak memory" in printed and "real tokens/s" in printed  # the step's memory beside its throughput
    assert metrics["train"]["train_peak_memory_bytes"] > 0 and metrics["train"]["train_real_tokens"] > 0


def test_the_recipe_streams_the_jargon_data(tmp_path, capsys):
    out = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith(("training.max_steps", "data.max_train_samples"))]
    assert main([f"output_dir={out}", *tiny, "training.max_steps=12", "data.streaming=true", "data.buffer_size=64",
                 "--no-samples"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["train"]["streaming"] is True and metrics["data"]["train"]["format"] == "instruction"
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert before["eval_label_tokens"] == after["eval_label_tokens"] > 0  # the same 24 streamed eval rows, twice
    assert after["eval_loss"] < before["eval_loss"] - 0.3, (before, after)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all(0 <= h["padding_fraction"] < 0.5 for h in history if "padding_fraction" in h)


def test_missing_config_file_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", str(tmp_path / "missing.yaml"), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml' not found" in err
    assert not out.exists()


def test_malformed_yaml_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {learning_rate: 1e-3\n")
    assert main(["--config", str(bad), f"output_dir={tmp_path / 'run'}"]) == 2
    assert "malformed YAML at line" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_invalid_values_listed_together(tmp_path, capsys):
    assert main([f"output_dir={tmp_path / 'run'}", "training.learning_rate=-1", "ema.decay=2",
                 "ema.enabled=true", "training.optimzer=adamw"]) == 2
    err = capsys.readouterr().err
    assert "training.learning_rate: must be > 0" in err
    assert "ema.decay: must be in (0, 1)" in err
    assert "did you mean 'optimizer'" in err
    assert not (tmp_path / "run").exists()


def test_unknown_model_offline_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert main([f"output_dir={out}", "model.name_or_path=no-such-org/no-such-model-xyz", "data.max_train_samples=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-org/no-such-model-xyz" in err
    assert not out.exists()


def test_dataset_with_wrong_columns_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n' * 4)
    out = tmp_path / "run"
    assert main([f"output_dir={out}", *TINY, f"data.train_path={bad}", "data.format=instruction"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "question" in err
    assert not out.exists()


def test_script_entry_point_runs_as_a_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "sft.py"), "--config", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 2
    assert "nope.yaml' not found" in proc.stderr


def test_default_config_is_valid():
    from hf_optcore.config import TrainerConfig

    cfg = TrainerConfig.from_dict(DEFAULT_CONFIG)
    assert cfg.model.name_or_path == "bundled:smollm2-135m-instruct"
    assert cfg.model.lora.enabled and cfg.data.train_path.endswith("train.jsonl")


@pytest.mark.slow
def test_embedded_default_on_the_real_model(tmp_path):
    """The demo exactly as `make demo` runs it (real SmolLM2-135M, LoRA, Jargon), into tmp_path."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "sft.py"), f"output_dir={out}"],
        capture_output=True, text=True, cwd=REPO, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_after"]["eval_loss"] < metrics["eval_before"]["eval_loss"]
    assert (out / "adapter_config.json").is_file() and (out / "config.yaml").is_file()
    assert "eval perplexity" in proc.stdout


def test_the_embedded_default_reruns_into_its_own_directory(tmp_path):
    """The demo (no --config) is meant to be rerun: the second run replaces the first one's checkpoint; a run from
    a config file would refuse instead (tests/test_run_ownership.py)."""
    out = tmp_path / "run"
    short = [f"output_dir={out}", *[o for o in TINY if not o.startswith("training.max_steps")], "training.max_steps=2",
             "--no-samples"]
    assert main(short) == 0
    assert main([*short, "training.seed=3"]) == 0
    assert json.loads((out / "run.json").read_text())["config_fingerprint"]  # the second run owns it now

"""The ``hf-optcore`` console script: validate, show-config, list-optimizers, report, train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from hf_optcore import cli
from hf_optcore.config import TrainerConfig

REPO = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()  # tomllib is 3.11+; the project supports 3.10
    scripts = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert 'hf-optcore = "hf_optcore.cli:main"' in scripts


def test_validate_ok(tmp_path, capsys):
    cfg = _yaml(tmp_path, {"training": {"max_steps": 3}, "model": {"name_or_path": "tiny:llama"},
                           "output_dir": str(tmp_path / "run")})  # not the repository's outputs/, which may hold a run
    assert cli.main(["validate", str(cfg)]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_lists_every_problem_and_exits_2(tmp_path, capsys):
    cfg = _yaml(tmp_path, {"training": {"learning_rate": -1, "optimizer": "adamw"}, "ema": {"enabled": True}})
    rc = cli.main(["validate", str(cfg), "ema.decay=1.5", "training.lerning_rate=1", "data.train_path=/nope.jsonl"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)  # one line per problem
    assert "training.learning_rate: must be > 0, got -1" in err
    assert "ema.decay: must be in (0, 1), got 1.5" in err
    assert "training.lerning_rate: unknown key (did you mean 'learning_rate'?)" in err


def test_validate_reports_missing_data_files(tmp_path, capsys):
    rc = cli.main(["validate", "--bare", "data.train_path=/does/not/exist.jsonl"])
    assert rc == 2
    assert "data.train_path: file '/does/not/exist.jsonl' not found" in capsys.readouterr().err


def test_validate_missing_config_file(tmp_path, capsys):
    assert cli.main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_validate_exit_status_of_the_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hf_optcore.cli", "validate", "--bare", "training.max_steps=x"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "training.max_steps: expected int, got 'x'" in proc.stderr


def test_show_config_is_the_resolved_config_with_defaults(tmp_path, capsys):
    cfg = _yaml(tmp_path, {"training": {"max_steps": 7}})
    assert cli.main(["show-config", str(cfg), "model.lora.r=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    # Every field is present (defaults included) and it is exactly what `train` would run.
    assert shown["training"]["max_steps"] == 7 and shown["model"]["lora"]["r"] == 4
    assert shown["ema"]["decay"] == 0.999 and "keep_last" in shown["checkpoint"]
    from hf_optcore.recipes.sft import DEFAULT_CONFIG

    expected = TrainerConfig.from_sources(cfg, ["model.lora.r=4"], base=DEFAULT_CONFIG)
    assert TrainerConfig.from_dict(shown) == expected


def test_show_config_bare_uses_dataclass_defaults(capsys):
    assert cli.main(["show-config", "--bare", "training.max_steps=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["output_dir"] == TrainerConfig().output_dir and shown["training"]["max_steps"] == 3


def test_show_config_with_problems_exits_2(capsys):
    assert cli.main(["show-config", "--bare", "ema.bogus=1"]) == 2
    assert "ema.bogus: unknown key" in capsys.readouterr().err


def test_list_optimizers_lists_the_registry(capsys):
    from hf_optcore import optim

    assert cli.main(["list-optimizers", "--schedulers"]) == 0
    out = capsys.readouterr().out
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(optim.list_optimizers(include_aliases=False)) <= names
    assert set(optim.list_schedulers()) <= names
    adamw_line = next(line for line in out.splitlines() if line.startswith("adamw "))
    assert "betas" in adamw_line and "adamw_torch" in adamw_line


def test_list_optimizers_filter(capsys):
    assert cli.main(["list-optimizers", "--filter", "lion*"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows and all(r.startswith("lion") for r in rows)
    assert cli.main(["list-optimizers", "--filter", "zzz"]) == 2
    assert "no optimizer matches 'zzz'" in capsys.readouterr().err


def test_report_command(tmp_path, capsys):
    run = tmp_path / "run" / "checkpoint-3"
    run.mkdir(parents=True)
    rows = [{"step": s, "loss": 3.0 - s, "learning_rate": 0.1} for s in (1, 2, 3)]
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": rows}))
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    assert "report.md" in capsys.readouterr().out
    assert "| `loss` | 0 |" in (tmp_path / "run" / "report.md").read_text()
    assert cli.main(["report", str(tmp_path / "empty_missing")]) == 2


def test_train_passes_config_and_overrides_to_the_recipe(tmp_path, monkeypatch):
    from hf_optcore.recipes import sft

    seen = []
    monkeypatch.setattr(sft, "main", lambda argv=None, allow_reexec=False: seen.append((argv, allow_reexec)) or 3)
    cfg = _yaml(tmp_path, {})
    assert cli.main(["train", str(cfg), "training.max_steps=2"]) == 3
    assert cli.main(["train", "training.max_steps=2", "--no-samples"]) == 3
    # The CLI is the process's entry point: the recipe may re-start it under jemalloc (hardware.cpu_allocator).
    assert seen == [(["--config", str(cfg), "training.max_steps=2"], True), (["--no-samples", "training.max_steps=2"], True)]


def test_train_end_to_end_writes_model_and_report(tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["train", "--no-samples", "model.name_or_path=tiny:llama", "training.max_steps=2",
                   "training.logging_steps=1", f"output_dir={out}", "data.max_train_samples=16",
                   "data.max_eval_samples=8"])
    assert rc == 0
    assert (out / "config.yaml").is_file() and (out / "report.png").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    md = (out / "report.md").read_text()
    assert "| `step` | 2 |" in md and "name_or_path: tiny:llama" in md


def test_benchmark_entry_point_runs_modules_and_records_failures(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run as bench_run

    (tmp_path / "bench_fake_ok.py").write_text(
        "def run(quick):\n    return {'ratio': 2.0 if quick else 3.0}\n"
        "def to_markdown(r):\n    return f\"| ratio | {r['ratio']} |\"\n")
    (tmp_path / "bench_fake_bad.py").write_text("def run(quick):\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench_run, "BENCHMARKS", {"ok": ("bench_fake_ok", "a fake"), "bad": ("bench_fake_bad", "x")})
    report = bench_run.run_all(quick=True)
    assert report["benchmarks"]["ok"]["result"] == {"ratio": 2.0}
    assert report["benchmarks"]["bad"]["status"] == "failed" and "boom" in report["benchmarks"]["bad"]["error"]
    saved = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert saved["preset"] == "quick" and saved["machine"]["versions"]["torch"]
    md = (tmp_path / "results" / "latest.md").read_text()
    assert "| ratio | 2.0 |" in md and "**failed:** bad" in md and "python benchmarks/run.py --quick" in md
    assert bench_run.main(["--quick", "--only", "ok"]) == 0 and bench_run.main(["--quick", "--only", "bad"]) == 1


def test_training_bar_shows_real_tokens_per_second_and_padding(tmp_path):
    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import ProgressCallback

    from hf_optcore.callbacks import ThroughputProgressCallback
    from hf_optcore.tiny import build_tiny_model
    from hf_optcore.trainer import OptCoreTrainer

    cfg = TrainerConfig.from_dict({"output_dir": str(tmp_path), "model": {"lora": {"enabled": False}},
                                   "training": {"max_steps": 1, "report_to": "none"}, "hardware": {"use_cpu": True}})
    kinds = [type(c) for c in OptCoreTrainer(model=build_tiny_model("llama"), args=cfg).callback_handler.callbacks]
    assert ThroughputProgressCallback in kinds and ProgressCallback not in kinds
    quiet = OptCoreTrainer(model=build_tiny_model("llama"), args=cfg.to_training_arguments(disable_tqdm=True),
                           optcore_config=cfg)
    assert not any(isinstance(c, ProgressCallback) for c in quiet.callback_handler.callbacks)

    class _Bar:
        postfix = None

        def write(self, text):
            pass

        def set_postfix(self, values, refresh=True):
            self.postfix = values

    cb, state = ThroughputProgressCallback(), TrainerState()
    cb.training_bar = _Bar()
    state.is_world_process_zero = True
    cb.on_log(None, state, TrainerControl(),
              logs={"loss": 2.5, "real_tokens_per_second": 12345.6, "padding_fraction": 0.125, "epoch": 1.0})
    assert cb.training_bar.postfix == {"loss": "2.5", "tok/s": "12,346", "pad": "12.5%"}


def test_benchmark_entry_point_leaves_module_result_files_alone(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run as bench_run

    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_fake_writer.md").write_text("full results\n")
    (tmp_path / "bench_fake_writer.py").write_text(
        "from pathlib import Path\n"
        f"R = Path({str(results)!r})\n"
        "def run(quick):\n"
        "    (R / 'bench_fake_writer.md').write_text('| quick | table |')\n"
        "    (R / 'bench_fake_writer.json').write_text('{}')\n"
        "    return {'quick': quick}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bench_run, "RESULTS", results)
    monkeypatch.setattr(bench_run, "BENCHMARKS", {"writer": ("bench_fake_writer", "writes its own files")})
    bench_run.run_all(quick=True)
    assert "| quick | table |" in (results / "latest.md").read_text()  # its table is still reported
    assert (results / "bench_fake_writer.md").read_text() == "full results\n"
    assert not (results / "bench_fake_writer.json").exists()

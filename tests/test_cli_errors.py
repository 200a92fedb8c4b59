"""User errors never print tracebacks: one ``error:`` line each, exit status 2; ``--debug`` shows the traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from hf_optcore import cli

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "configs" / "tiny_smoke.yaml"


def run(*args: str, cwd: Path, script: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(script or ["-m", "hf_optcore.cli"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_latin1_yaml_is_one_error_line_naming_the_file(tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("training:\n  run_name: caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    line = one_error_line(run("validate", str(cfg), cwd=tmp_path))
    assert str(cfg) in line and "UTF-8" in line
    line = one_error_line(run("--config", str(cfg), "--no-samples", cwd=tmp_path, script=[str(REPO / "recipes/sft.py")]))
    assert str(cfg) in line and "UTF-8" in line


def test_overrides_after_a_flag_are_accepted(tmp_path, capsys):
    assert cli.main(["validate", str(SMOKE), "--bare", "training.max_steps=3"]) == 0
    assert cli.main(["show-config", str(SMOKE), "--bare", "training.max_steps=3", "model.lora.r=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out.split("valid\n", 1)[1])
    assert shown["training"]["max_steps"] == 3 and shown["model"]["lora"]["r"] == 4
    assert shown["model"]["name_or_path"] == "tiny:llama"  # CONFIG itself was still read
    # An override after the flag is checked like any other, not silently dropped.
    assert cli.main(["validate", str(SMOKE), "--bare", "training.max_steps=x"]) == 2
    assert "error: training.max_steps: expected int, got 'x'" in capsys.readouterr().err


def test_overrides_after_a_flag_in_a_real_process(tmp_path):
    proc = run("validate", str(SMOKE), "--bare", "training.max_steps=3", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_flag_is_still_an_argparse_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        cli.main(["validate", str(SMOKE), "--nope", "training.max_steps=3"])
    assert info.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def test_report_on_a_garbage_or_missing_trainer_state(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trainer_state.json").write_text("{not json at all")
    line = one_error_line(run("report", str(run_dir), cwd=tmp_path))
    assert str(run_dir / "trainer_state.json") in line and "not valid JSON" in line
    assert not (run_dir / "report.md").exists()
    line = one_error_line(run("report", str(tmp_path / "missing"), cwd=tmp_path))
    assert "does not exist" in line
    # --debug shows the traceback instead (exit status 1, as any uncaught exception).
    proc = run("--debug", "report", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ReportError" in proc.stderr


def test_report_on_a_state_of_the_wrong_shape(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for state in ([1, 2], {"log_history": "nope"}):
        (run_dir / "trainer_state.json").write_text(json.dumps(state))
        assert cli.main(["report", str(run_dir)]) == 2
        assert "is not a trainer state" in capsys.readouterr().err
    # Rows of the wrong shape are skipped, not fatal.
    rows = [{"step": 1, "loss": 2.0}, "junk", {"step": "x", "loss": 1.0}]
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": rows}))
    assert cli.main(["report", str(run_dir)]) == 0


def test_debug_flag_shows_the_traceback_of_a_user_error(tmp_path):
    proc = run("validate", "--debug", "--bare", "training.learning_rate=-1", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    proc = run("--no-samples", "--debug", "training.learning_rate=-1", cwd=tmp_path,
               script=[str(REPO / "recipes/sft.py")])
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_train_with_a_null_response_is_one_line_naming_the_row(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": "q", "response": "r"}] * 3 + [{"instruction": "q", "response": None}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    line = one_error_line(run("train", str(SMOKE), "--no-samples", f"data.train_path={data}",
                              f"data.eval_path={data}", f"output_dir={out}", cwd=tmp_path))
    assert line == f"error: {data}: line 4: field 'response' is null; expected a string (format 'instruction')"
    assert not out.exists()


def test_a_model_without_chat_template_while_samples_are_on_fails_before_loading(tmp_path, monkeypatch, capsys):
    from hf_optcore import tiny
    from hf_optcore.model_manager import ModelManager
    from hf_optcore.recipes import sft

    real = tiny.build_tiny_tokenizer

    def no_template(*a, **kw):
        tok = real(*a, **kw)
        tok.chat_template = None
        return tok

    monkeypatch.setattr(tiny, "build_tiny_tokenizer", no_template)
    monkeypatch.setattr(ModelManager, "load_model", lambda self: (_ for _ in ()).throw(AssertionError("loaded")))
    rc = sft.main(["--config", str(SMOKE), f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: model.chat_template: the tokenizer of 'tiny:llama' has no chat template")
    assert not (tmp_path / "out").exists()


def test_a_folder_as_config_says_it_is_a_folder(tmp_path, capsys):
    from hf_optcore.recipes import sft

    expected = f"error: config file {str(tmp_path)!r} is a directory, not a YAML file"
    assert cli.main(["validate", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == expected
    assert sft.main(["--config", str(tmp_path), "--no-samples"]) == 2
    assert capsys.readouterr().err.strip() == expected


def test_a_missing_config_with_an_equals_sign_is_not_read_as_an_override(tmp_path, capsys, monkeypatch):
    # The rule: an override is section.key=value or output_dir=value; anything else is CONFIG.
    monkeypatch.chdir(tmp_path)
    for command in ("validate", "train", "show-config"):
        assert cli.main([command, "x=y.yaml", "training.max_steps=3"]) == 2
        assert capsys.readouterr().err.strip() == ("error: config file 'x=y.yaml' not found (an argument with '=' is "
                                                   "an override only when written section.key=value or "
                                                   "output_dir=value)")
    (tmp_path / "x=y.yaml").write_text(SMOKE.read_text())  # once it exists, it is the config
    assert cli.main(["validate", "x=y.yaml", "--bare", "training.max_steps=3", f"output_dir={tmp_path / 'o'}"]) == 0
    assert capsys.readouterr().out.strip() == "x=y.yaml: valid"


def test_list_optimizers_into_a_closed_pipe_ends_quietly(tmp_path):
    # `hf-optcore list-optimizers | head -1`: the reader is gone before the output is written.
    proc = subprocess.Popen([sys.executable, "-m", "hf_optcore.cli", "list-optimizers", "--schedulers"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""

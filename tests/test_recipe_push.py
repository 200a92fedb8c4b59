"""The recipe's Hub push, end to end with only the network replaced (at huggingface_hub.HfApi), and no token in
any byte of any file a run writes."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, RepoUrl
from transformers import TrainingArguments

from hf_optcore.config import TrainerConfig
from hf_optcore.recipes.sft import main
from hf_optcore.tiny import build_tiny_model, build_tiny_tokenizer
from hf_optcore.trainer import OptCoreTrainer

SECRET = "hf_SECRETtoken0123456789abcdef"

TINY = ["--no-samples", "model.name_or_path=tiny:llama", "model.dtype=float32", "training.learning_rate=3e-3",
        "training.max_steps=4", "training.warmup_steps=0", "training.per_device_train_batch_size=4",
        "training.logging_steps=2", "data.max_seq_len=128", "data.max_train_samples=32", "data.max_eval_samples=8",
        "checkpoint.every_n_steps=2", "training.push_to_hub=true", "training.hub_model_id=someone/tiny-sft"]


@pytest.fixture
def hub(monkeypatch):
    """Replace only the network at the HfApi boundary; record what would be created and uploaded."""
    calls = {"create": [], "upload": [], "fail_upload": False}

    def create_repo(self, repo_id, **kw):
        calls["create"].append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kw):
        if calls["fail_upload"]:
            raise OSError("503 Service Unavailable")
        root = Path(folder_path)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        files = {k: v for k, v in files.items() if not any(fnmatch.fnmatch(k, pat) for pat in ignore_patterns or [])}
        calls["upload"].append({"repo_id": repo_id, "files": files, "folder": root})
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return calls


def _no_token_anywhere(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), f"the token is in {p}"


@pytest.mark.parametrize("variant,lora", [("adapter", True), ("merged", True), ("ema", False)])
def test_recipe_pushes_the_chosen_variant_with_a_model_card_after_the_local_save(tmp_path, hub, variant, lora):
    out = tmp_path / "run"
    extra = [f"training.push_variant={variant}", f"model.lora.enabled={str(lora).lower()}"]
    if variant == "ema":
        extra.append("ema.enabled=true")
    assert main([f"output_dir={out}", *TINY, *extra]) == 0
    # Created at Trainer start (a Hub that cannot be reached fails there), then again (exist_ok) by the push.
    assert set(hub["create"]) == {"someone/tiny-sft"}
    (push,) = hub["upload"]
    files = push["files"]
    if variant == "adapter":
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
        assert push["folder"] == out
    else:
        assert "model.safetensors" in files and "adapter_model.safetensors" not in files
        assert push["folder"] == out / variant
    card = files["README.md"].decode()
    for needle in ("tiny:llama", "train.jsonl", "eval_loss (before)", "eval_loss (after)", "## Configuration",
                   "learning_rate: 0.003"):
        assert needle in card, needle
    assert not any("checkpoint-" in name for name in files)  # the result, not the run's checkpoints
    _no_token_anywhere(out)


def test_a_failed_push_is_one_error_line_and_keeps_the_local_output(tmp_path, hub, capsys):
    hub["fail_upload"] = True
    out = tmp_path / "run"
    assert main([f"output_dir={out}", *TINY]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: pushing") and "503 Service Unavailable" in err[0]
    assert (out / "adapter_model.safetensors").is_file() and (out / "metrics.json").is_file()
    assert (out / "checkpoint-4" / "manifest.json").is_file()


def test_an_unreachable_hub_fails_before_training(tmp_path, monkeypatch, capsys):
    def offline(self, repo_id, **kw):
        raise ConnectionError("offline")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    out = tmp_path / "run"
    assert main([f"output_dir={out}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "cannot create the Hub repository 'someone/tiny-sft'" in err and "nothing was trained" in err
    assert not list(out.glob("checkpoint-*"))


def test_secrets_in_a_config_are_refused(tmp_path, capsys):
    assert main([f"output_dir={tmp_path / 'run'}", *TINY[:-2], f"training.extra_args={{hub_token: {SECRET}}}"]) == 2
    assert "training.extra_args.hub_token: a secret does not belong in a config" in capsys.readouterr().err


def test_hf_script_with_a_token_and_ema_writes_it_nowhere(tmp_path):
    """The HF-script way: TrainingArguments(hub_token=...) beside an EMA config; every checkpoint and the EMA
    export (transformers' save_model pickles the arguments into training_args.bin) are scanned byte by byte."""
    rows = [{"input_ids": torch.arange(i, i + 8) % 250, "labels": torch.arange(i, i + 8) % 250} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), hub_token=SECRET, use_cpu=True, report_to="none", max_steps=2,
                             save_steps=1, per_device_train_batch_size=4, disable_tqdm=True)
    trainer = OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=args, train_dataset=rows,
                             processing_class=build_tiny_tokenizer(),
                             optcore_config=TrainerConfig.from_training_arguments(args, ["ema.enabled=true"]))
    assert trainer.args.hub_token == SECRET
    trainer.train()
    assert (tmp_path / "ema" / "training_args.bin").is_file() and (tmp_path / "checkpoint-2" / "training_args.bin").is_file()
    _no_token_anywhere(tmp_path)

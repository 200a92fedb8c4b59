"""Existing HfArgumentParser scripts get the extensions as written: no flag clashes with run_clm's or TRL's argument
classes, every field parses with its default, trackers record only what the Trainer runs, model cards work with
registry names, and errors name the flag that was typed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_optcore.config import ConfigError, OptCoreTrainingArguments
from hf_optcore.config.field_map import extension_links
from hf_optcore.tiny import build_tiny_model, build_tiny_tokenizer
from hf_optcore.trainer import OptCoreTrainer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "hf_scripts" / "run_clm_style.py"
sys.path.insert(0, str(SCRIPT.parent))
from run_clm_style import DataTrainingArguments, ModelArguments  # noqa: E402


def _other_libraries_fields() -> dict[str, set[str]]:
    """Field names of the argument classes an existing script puts beside the Trainer's (beyond TrainingArguments')."""
    import peft
    import trl

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    classes = {"run_clm ModelArguments": ModelArguments, "run_clm DataTrainingArguments": DataTrainingArguments,
               "trl.ModelConfig": trl.ModelConfig, "trl.ScriptArguments": trl.ScriptArguments,
               "trl.SFTConfig": trl.SFTConfig, "trl.DPOConfig": trl.DPOConfig, "trl.GRPOConfig": trl.GRPOConfig,
               "peft.LoraConfig": peft.LoraConfig}
    return {name: {f.name for f in dataclasses.fields(cls)} - base for name, cls in classes.items()}


def test_extension_flags_clash_with_no_other_librarys_arguments():
    ours = {link.arg for link in extension_links()}
    clashes = {name: sorted(ours & fields) for name, fields in _other_libraries_fields().items() if ours & fields}
    assert clashes == {}


def test_parser_builds_beside_run_clm_and_trl_argument_classes():
    import trl

    for classes in ((ModelArguments, DataTrainingArguments, OptCoreTrainingArguments),
                    (trl.ScriptArguments, OptCoreTrainingArguments, trl.ModelConfig)):
        parser = HfArgumentParser(classes)
        parsed = parser.parse_args_into_dataclasses([
            "--output_dir", "out", "--model_name_or_path", "m", "--model_revision", "v1", "--lora_r", "8",
            "--ema_enabled", "true", "--data_batching", "bucket"] if classes[0] is trl.ScriptArguments else [
            "--output_dir", "out", "--model_name_or_path", "m", "--model_revision", "v1", "--cache_dir", "c",
            "--ema_enabled", "true", "--data_batching", "bucket"])
        args = next(p for p in parsed if isinstance(p, OptCoreTrainingArguments))
        assert args.ema_enabled is True and args.data_batching == "bucket"
        other = parsed[-1] if classes[0] is trl.ScriptArguments else parsed[0]
        assert other.model_name_or_path == "m" and other.model_revision == "v1"


def test_trackers_record_only_what_the_trainer_runs(tmp_path):
    """A full fine-tune of a local model from a Trainer script: nothing about LoRA ranks or the demo model."""
    args = OptCoreTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", ema_enabled=True)
    trainer = OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=args, processing_class=build_tiny_tokenizer())
    logged = trainer.args.to_sanitized_dict()
    from hf_optcore.config.field_map import field_links

    # The names these recipe keys had as arguments before they stopped being arguments.
    prefix = {"model": "model_", "model.lora": "lora_", "data": "data_", "training": ""}
    recipe = {prefix[link.path.rsplit(".", 1)[0]] + link.path.rsplit(".", 1)[1]
              for link in field_links() if link.kind == "recipe"}
    assert {"lora_r", "model_name_or_path", "data_train_path"} <= recipe
    assert sorted(recipe & set(logged)) == []
    assert logged["ema_enabled"] is True
    json.dumps(logged)  # what the tensorboard integration writes


def test_model_card_and_push_path_take_registry_names(tmp_path):
    """transformers' create_model_card reads args.lr_scheduler_type.value; a registry name answers it."""
    args = OptCoreTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", optim="lion",
                                    lr_scheduler_type="wsd", ema_enabled=True)
    trainer = OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=args, processing_class=build_tiny_tokenizer())
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "- lr_scheduler_type: wsd" in card and "lion" in card


def test_errors_name_the_flag_that_was_typed():
    parser = HfArgumentParser(OptCoreTrainingArguments)
    with pytest.raises(ConfigError) as err:
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--lr_multipliers", "{bad json",
                                            "--ema_enabled", "true", "--ema_decay", "2"])
    assert err.value.problems[0].startswith("--lr_multipliers: not valid JSON")
    with pytest.raises(ConfigError) as err:
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--ema_enabled", "true", "--ema_decay", "2"])
    assert err.value.problems == ["--ema_decay: must be in (0, 1), got 2.0 (config key ema.decay)"]


@pytest.mark.slow
def test_the_run_clm_style_script_runs_as_written(tmp_path):
    train = tmp_path / "train.txt"
    valid = tmp_path / "valid.txt"
    train.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(60)))
    valid.write_text("\n".join(f"held out {i}: pack my box with five dozen liquor jugs" for i in range(12)))
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--model_type", "llama", "--tokenizer_name", "tiny",
           "--train_file", str(train), "--validation_file", str(valid), "--block_size", "32",
           "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "4", "--per_device_train_batch_size", "4",
           "--optim", "lion", "--lr_scheduler_type", "wsd", "--ema_enabled", "true", "--data_batching", "bucket",
           "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads(proc.stdout.strip().splitlines()[-1])["args"]
    assert logged["optim"] == "lion" and logged["lr_scheduler_type"] == "wsd" and logged["data_batching"] == "bucket"
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_loss"] > 0 and "eval_ema_loss" in metrics and "eval_perplexity" in metrics
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "- lr_scheduler_type: wsd" in card
    assert (out / "ema").is_dir()

"""trainer.args is the single source of truth: OptCoreTrainingArguments <-> TrainerConfig, conflicts, trackers."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_optcore.config import ConfigError, OptCoreTrainingArguments, TrainerConfig
from hf_optcore.config.training_args import field_links
from hf_optcore.tiny import build_tiny_model, build_tiny_tokenizer
from hf_optcore.trainer import OptCoreTrainer

NON_DEFAULT = {
    "output_dir": "somewhere",
    "model": {"name_or_path": "tiny:gpt2", "gradient_checkpointing": True,
              "lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}},
    "training": {"learning_rate": 1e-4, "optimizer": "lion", "scheduler": "wsd", "scheduler_kwargs": {"decay_ratio": 0.2},
                 "lr_multipliers": {"lm_head": 0.5}, "warmup_steps": 0.1, "eval_strategy": "steps", "eval_steps": 5,
                 "report_to": ["tensorboard"], "extra_args": {"save_only_model": True, "logging_first_step": True}},
    "hardware": {"use_cpu": True, "fused_optimizer": "foreach", "dataloader_pin_memory": False},
    "data": {"batching": "multipack", "max_seq_len": 256},
    "checkpoint": {"every_n_steps": 10, "keep_last": 3, "keep_best": 2},
    "ema": {"enabled": True, "decay": 0.99, "warmup": True},
}


def test_every_config_field_has_one_place_in_the_arguments():
    links = field_links()
    args = [link.arg for link in links if link.kind != "recipe"]
    assert len(set(args)) == len(args)  # no two fields share an argument
    names = set(OptCoreTrainingArguments.__dataclass_fields__)
    assert all(link.arg in names or link.path in ("checkpoint.every_n_steps", "model.gradient_checkpointing",
                                                   "training.extra_args") for link in links if link.kind != "recipe")
    by_path = {link.path: link for link in links}
    assert by_path["checkpoint.keep_last"].arg == "save_total_limit"
    assert by_path["training.optimizer"].arg == "optim" and by_path["training.scheduler"].arg == "lr_scheduler_type"
    assert by_path["training.learning_rate"].hf and not by_path["ema.decay"].hf
    assert by_path["ema.decay"].arg == "ema_decay" and by_path["checkpoint.keep_best"].arg == "checkpoint_keep_best"
    # What only the recipe acts on is not a Trainer argument.
    for path in ("model.name_or_path", "model.lora.r", "model.lora.target_modules", "data.train_path",
                 "data.format", "training.push_variant"):
        assert by_path[path].kind == "recipe" and by_path[path].arg is None
    assert not {"lora_r", "model_name_or_path", "data_train_path", "lora_target_modules", "push_variant"} & names


def test_the_arguments_class_is_written_out_and_in_sync_with_the_sections():
    """The class statement's generated field block is exactly what sections.py renders (else run
    scripts/sync_training_args.py); help() and an IDE see typed fields with their help."""
    from hf_optcore.config import training_args
    from hf_optcore.config.field_map import with_argument_fields

    source = Path(training_args.__file__).read_text(encoding="utf-8")
    assert with_argument_fields(source) == source, "run: python scripts/sync_training_args.py"
    fields = {f.name: f for f in dataclasses.fields(OptCoreTrainingArguments)}
    assert fields["ema_decay"].default == 0.999 and fields["ema_decay"].metadata["help"].startswith("EMA decay")
    assert set(fields["data_batching"].metadata) == {"help"}  # HfArgumentParser hands metadata to argparse
    assert "ema_decay" in OptCoreTrainingArguments.__dataclass_fields__


@pytest.mark.parametrize("raw", [{}, NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_config_to_arguments_and_back_is_lossless(raw):
    cfg = TrainerConfig.from_dict(raw)
    args = cfg.to_training_arguments()
    assert isinstance(args, TrainingArguments)
    back = TrainerConfig.from_training_arguments(args)
    assert back.model.name_or_path == TrainerConfig().model.name_or_path  # recipe keys are not arguments ...
    assert back.with_recipe_keys_of(cfg) == cfg  # ... every other key survives the round trip
    # ... and the arguments hold the values that run, under transformers' names
    assert args.optim == cfg.training.optimizer and args.lr_scheduler_type == cfg.training.scheduler
    assert args.learning_rate == cfg.training.learning_rate and args.data_batching == cfg.data.batching
    if raw:
        assert args.save_strategy == "steps" and args.save_steps == 10 and args.save_only_model is True
        assert args.activation_checkpointing is True and args.ema_enabled is True


def test_plain_arguments_convert_with_hf_faithful_extensions_and_overrides():
    args = TrainingArguments(output_dir="x", learning_rate=1e-5, weight_decay=0.3, lr_scheduler_type="linear",
                             save_total_limit=3, save_steps=7, logging_first_step=True, report_to="none")
    cfg = TrainerConfig.from_training_arguments(args, ["ema.enabled=true", "data.batching=bucket"])
    assert (cfg.training.learning_rate, cfg.training.weight_decay, cfg.training.scheduler) == (1e-5, 0.3, "linear")
    assert cfg.training.optimizer == "adamw_torch_fused"  # transformers' default, not hf_optcore's
    assert cfg.checkpoint.every_n_steps == 7 and cfg.checkpoint.keep_last == 3
    assert cfg.training.extra_args == {"logging_first_step": True, "remove_unused_columns": True}
    assert cfg.ema.enabled and cfg.data.batching == "bucket"
    assert TrainerConfig.from_training_arguments(args).data.batching == "hf"  # without overrides: transformers' own
    again = cfg.to_training_arguments()
    assert again.save_total_limit == 3  # checkpoint.keep_last is transformers' save_total_limit (applied by hf_optcore)
    assert again.logging_first_step is True and again.remove_unused_columns is True


def test_hf_argument_parser_takes_every_extension_as_a_flat_flag():
    (args,) = HfArgumentParser(OptCoreTrainingArguments).parse_args_into_dataclasses([
        "--output_dir", "out", "--optim", "lion", "--lr_scheduler_type", "wsd", "--learning_rate", "3e-4",
        "--ema_enabled", "true", "--ema_decay", "0.99", "--data_batching", "bucket",
        "--lr_multipliers", '{"lm_head": 0.1}', "--save_total_limit", "4", "--checkpoint_keep_best", "2"])
    cfg = TrainerConfig.from_training_arguments(args)
    assert (cfg.training.optimizer, cfg.training.scheduler, cfg.training.learning_rate) == ("lion", "wsd", 3e-4)
    assert cfg.ema.enabled and cfg.ema.decay == 0.99 and cfg.data.batching == "bucket"
    assert cfg.training.lr_multipliers == {"lm_head": 0.1} and cfg.checkpoint.keep_last == 4
    assert cfg.checkpoint.keep_best == 2


def test_hf_argument_parser_defaults_equal_the_class_defaults():
    """No flag given: every field parses to its default (a Union-typed default once came back as None)."""
    (parsed,) = HfArgumentParser(OptCoreTrainingArguments).parse_args_into_dataclasses(["--output_dir", "out"])
    direct = OptCoreTrainingArguments(output_dir="out")
    differ = {f.name: (getattr(parsed, f.name), getattr(direct, f.name))
              for f in dataclasses.fields(OptCoreTrainingArguments)
              if f.init and getattr(parsed, f.name) != getattr(direct, f.name)}
    assert differ == {}


def test_bad_extension_values_fail_at_construction_naming_the_field():
    with pytest.raises(ConfigError, match=r"--optim: unknown optimizer 'lian' \(did you mean 'lion'\?\)"):
        OptCoreTrainingArguments(output_dir="x", optim="lian")
    with pytest.raises(ConfigError, match=r"--ema_decay: must be in \(0, 1\), got 1.5 \(config key ema.decay\)"):
        OptCoreTrainingArguments(output_dir="x", ema_enabled=True, ema_decay=1.5)
    with pytest.raises(ConfigError, match=r"--lr_multipliers: not valid JSON \(Expecting property name"):
        OptCoreTrainingArguments(output_dir="x", lr_multipliers="{bad json")


def _tiny_trainer(tmp_path, args, **kw):
    return OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=args,
                          processing_class=build_tiny_tokenizer(), **kw)


def test_users_training_arguments_win_where_the_config_holds_its_defaults(tmp_path):
    """A user's TrainingArguments(lr=1e-5, weight_decay=0.3, linear) beside a TrainerConfig whose own
    defaults are 2e-4 / 0 / cosine: the user's values are what runs and what trainer.args says."""
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-5, weight_decay=0.3,
                             lr_scheduler_type="linear", use_cpu=True, report_to="none", max_steps=4)
    trainer = _tiny_trainer(tmp_path, args, optcore_config=TrainerConfig.from_dict({"ema": {"enabled": True}}))
    assert (trainer.args.learning_rate, trainer.args.weight_decay, trainer.args.lr_scheduler_type) == (
        1e-5, 0.3, "linear")
    assert trainer.args.ema_enabled is True
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.3, 0.0}
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert type(trainer.lr_scheduler).__name__ == "LambdaLR"
    trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-5 * 3 / 4)  # linear decay over 4 steps


def test_a_field_both_set_differently_is_one_error_naming_every_conflict(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-5, weight_decay=0.3, use_cpu=True)
    cfg = TrainerConfig.from_dict({"training": {"learning_rate": 1e-3, "weight_decay": 0.1, "seed": 3}})
    with pytest.raises(ConfigError) as err:
        _tiny_trainer(tmp_path, args, optcore_config=cfg)
    problems = err.value.problems
    assert len(problems) == 2
    assert "training.learning_rate: the TrainingArguments say 1e-05, the TrainerConfig says 0.001" in problems[0]
    assert "training.weight_decay" in problems[1]
    # A value only the config sets (seed, left at its default in args) is taken without a conflict.
    ok = _tiny_trainer(tmp_path, TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
                       optcore_config=TrainerConfig.from_dict({"training": {"seed": 3}}))
    assert ok.args.seed == 3


def test_trackers_receive_what_ran(tmp_path):
    cfg = TrainerConfig.from_dict({"output_dir": str(tmp_path), "hardware": {"use_cpu": True},
                                   "training": {"optimizer": "lion", "scheduler": "cosine_min_lr",
                                                "learning_rate": 3e-4},
                                   "data": {"batching": "bucket"}})
    trainer = _tiny_trainer(tmp_path, cfg)
    logged = trainer.args.to_sanitized_dict()  # what the tensorboard / trackio / W&B integrations record
    assert logged["optim"] == "lion" and logged["lr_scheduler_type"] == "cosine_min_lr"
    assert logged["learning_rate"] == 3e-4 and logged["data_batching"] == "bucket"
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
                ).__name__ == "Lion"


def test_no_token_in_pickles_of_the_arguments(tmp_path):
    args = TrainerConfig.from_dict({"output_dir": str(tmp_path)}).to_training_arguments(hub_token="hf_SECRETsecret1")
    blob = pickle.dumps(args)
    assert b"SECRETsecret1" not in blob and pickle.loads(blob).hub_token is None
    torch.save(args, tmp_path / "training_args.bin")  # what transformers' save_model writes
    assert b"SECRETsecret1" not in (tmp_path / "training_args.bin").read_bytes()
    import copy

    assert copy.deepcopy(args).hub_token == "hf_SECRETsecret1"  # in-process copies keep it for the push


def test_plain_args_merged_keep_the_token_in_process(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), hub_token="hf_SECRETsecret2", use_cpu=True)
    trainer = _tiny_trainer(tmp_path, args, optcore_config=TrainerConfig.from_dict({"ema": {"enabled": True}}))
    assert trainer.args.hub_token == "hf_SECRETsecret2"
    assert "SECRETsecret2" not in trainer.optcore_config.to_yaml()


def test_training_leaves_the_users_arguments_as_given(tmp_path, recwarn):
    """transformers' own test_training_arguments_are_left_untouched, with the extensions on: train() on the CPU
    changes no field of trainer.args (pinned memory stays asked for; only torch's warning about it is silenced)."""
    # No use_cpu: transformers itself turns pinning off with it. Here the device is the CPU by default.
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", max_steps=2,
                             per_device_train_batch_size=2, save_strategy="no")
    tok = build_tiny_tokenizer()
    data = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 7, 6, 4)]
    from hf_optcore.data.collator import PaddingCollator

    trainer = OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=args, processing_class=tok,
                             train_dataset=data, data_collator=PaddingCollator(tok.pad_token_id),
                             optcore_config=TrainerConfig.from_dict({"ema": {"enabled": True}}))
    before = trainer.args.to_dict()
    trainer.train()
    assert trainer.state.global_step == 2
    after = trainer.args.to_dict()
    assert {k: (before[k], after[k]) for k in before if before[k] != after[k]} == {}
    assert trainer.args.dataloader_pin_memory is True
    assert not [w for w in recwarn if "pin_memory" in str(w.message)]


def test_a_config_knows_which_keys_were_set_explicitly(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("training:\n  learning_rate: 2.0e-4\nema:\n  enabled: true\n")
    cfg = TrainerConfig.from_yaml(yaml_file, ["data.batching=bucket"])
    assert cfg.explicit_keys() == {"training.learning_rate", "ema.enabled", "data.batching"}
    assert cfg.training.learning_rate == TrainerConfig().training.learning_rate  # set, and equal to the default
    cfg.checkpoint.keep_best = 1  # assigned in code: set too
    assert "checkpoint.keep_best" in cfg.explicit_keys()
    assert TrainerConfig().explicit_keys() == frozenset()
    assert TrainerConfig.from_dict({"model": {"lora": {"r": 8}}}).explicit_keys() == {"model.lora.r"}


def test_both_set_is_decided_on_what_was_set_never_on_equality_with_the_default(tmp_path):
    """TrainingArguments(learning_rate=1e-5) beside a YAML that says learning_rate: 2e-4 (the default, the most
    common LoRA value) is a conflict, not a silent 1e-5; left unset in the YAML, the user's 1e-5 runs."""
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-5, use_cpu=True, report_to="none")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("training:\n  learning_rate: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"training.learning_rate: the TrainingArguments say 1e-05, the "
                                          r"TrainerConfig says 0.0002"):
        _tiny_trainer(tmp_path, args, optcore_config=TrainerConfig.from_yaml(yaml_file))
    unset = TrainerConfig.from_dict({"ema": {"enabled": True}})
    assert _tiny_trainer(tmp_path, args, optcore_config=unset).args.learning_rate == 1e-5
    in_code = TrainerConfig()
    in_code.training.learning_rate = 2e-4
    with pytest.raises(ConfigError, match="training.learning_rate"):
        _tiny_trainer(tmp_path, args, optcore_config=in_code)
    # transformers' default in args, the config sets a value: the config's value runs.
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert _tiny_trainer(tmp_path, plain, optcore_config=TrainerConfig.from_yaml(yaml_file)).args.learning_rate == 2e-4


@dataclasses.dataclass
class MyArgs(TrainingArguments):
    """A script's own arguments class (module level, as pickle needs)."""

    my_field: float = 0.0


def test_a_users_arguments_subclass_trains_saves_and_reloads_with_the_extensions(tmp_path):
    """A script's own TrainingArguments subclass (run_seq2seq's, the tests' RegressionTrainingArguments) gets
    hf_optcore's fields composed over it; its checkpoints' training_args.bin pickles and loads (it once raised
    PicklingError at the first save), keeps the subclass's own field and carries no token."""
    args = MyArgs(output_dir=str(tmp_path), my_field=1.5, use_cpu=True, report_to="none", max_steps=2,
                  per_device_train_batch_size=2, save_steps=2, hub_token="hf_SECRETsecret3")
    data = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 7, 6, 4)]
    from hf_optcore.data.collator import PaddingCollator

    tok = build_tiny_tokenizer()
    trainer = OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=args, processing_class=tok,
                             train_dataset=data, data_collator=PaddingCollator(tok.pad_token_id),
                             optcore_config=TrainerConfig.from_training_arguments(args, ["ema.enabled=true"]))
    assert isinstance(trainer.args, MyArgs) and trainer.args.ema_enabled and trainer.args.my_field == 1.5
    trainer.train()
    blob = (tmp_path / "checkpoint-2" / "training_args.bin").read_bytes()
    assert b"SECRETsecret3" not in blob
    loaded = torch.load(tmp_path / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert type(loaded) is type(trainer.args) and loaded.my_field == 1.5 and loaded.hub_token is None
    assert pickle.loads(pickle.dumps(OptCoreTrainingArguments(output_dir="x"))).output_dir == "x"


def test_a_compute_loss_func_is_evaluated_as_transformers_does(tmp_path):
    """transformers passes the batch's label count to a compute_loss_func in evaluation too; so does hf_optcore."""
    from transformers import Trainer

    def summed_over_count(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"][:, :-1]
        total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else 1.0)

    rows = [{"input_ids": torch.arange(3, 3 + n), "labels": torch.arange(3, 3 + n)} for n in (5, 7, 6, 4)]
    from hf_optcore.data.collator import PaddingCollator

    collate = PaddingCollator(build_tiny_tokenizer().pad_token_id)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=2)
    model = build_tiny_model("llama", seed=0)
    theirs = Trainer(model, args, eval_dataset=rows, data_collator=collate,
                     compute_loss_func=summed_over_count).evaluate()["eval_loss"]
    ours = OptCoreTrainer(model, args, eval_dataset=rows, data_collator=collate, compute_loss_func=summed_over_count,
                          optcore_config=TrainerConfig.from_training_arguments(args, ["ema.enabled=true"])).evaluate()
    assert ours["eval_loss"] == pytest.approx(theirs, rel=1e-6)

"""TrainerConfig: round trips, overrides, and every validation path (all problems at once)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_optcore.config import (
    ConfigError,
    TrainerConfig,
    load_yaml,
    parse_overrides,
    render_reference,
)

REPO = Path(__file__).resolve().parents[1]


def _problems(raw, monkeypatch=None):
    import torch

    with pytest.raises(ConfigError) as ei, pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)  # the CPU answer, also on a GPU box
        TrainerConfig.from_dict(raw)
    return ei.value.problems


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = TrainerConfig()
    cfg.validate(cuda_available=False)
    assert TrainerConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert TrainerConfig.from_yaml(path) == cfg
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


def test_round_trip_non_defaults(tmp_path):
    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "tiny:llama", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
        "training": {"learning_rate": 3e-4, "max_steps": 7, "lr_multipliers": {"lora_B": 2.0}},
        "data": {"batching": "token_budget", "max_tokens_per_batch": 4096, "max_seq_len": 512},
        "checkpoint": {"every_n_steps": 5, "keep_last": 3, "resume_from": "auto"},
        "ema": {"enabled": True, "decay": 0.99, "warmup": True},
    }
    cfg = TrainerConfig.from_dict(raw)
    assert cfg.model.lora.r == 4 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_tokens_per_batch == 4096
    again = TrainerConfig.from_yaml(Path(tmp_path / "x.yaml")) if cfg.to_yaml(tmp_path / "x.yaml") else None
    assert again == cfg
    assert cfg.to_dict()["training"]["lr_multipliers"] == {"lora_B": 2.0}
    assert cfg.fingerprint() == TrainerConfig.from_dict(cfg.to_dict()).fingerprint()
    assert cfg.fingerprint() != TrainerConfig().fingerprint()


def test_yaml_plus_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 1e-3\n  max_steps: 10\nmodel:\n  lora:\n    r: 8\n")
    cfg = TrainerConfig.from_yaml(path, ["training.learning_rate=1e-4", "model.lora.r=4", "ema.enabled=true",
                                        "model.lora.target_modules=[q_proj, k_proj]"])
    assert cfg.training.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string; coerced to float
    assert cfg.training.max_steps == 10
    assert cfg.model.lora.r == 4
    assert cfg.ema.enabled is True
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj"]


def test_parse_overrides_errors():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides(["training.learning_rate"])
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_unknown_keys_suggest_and_all_problems_reported_together():
    problems = _problems({
        "modle": {},
        "training": {"lerning_rate": 1e-3, "max_steps": "ten"},
        "ema": {"enabled": True, "decay": 1.5},
    })
    text = "\n".join(problems)
    assert "modle: unknown section (did you mean 'model'?)" in text
    assert "training.lerning_rate: unknown key (did you mean 'learning_rate'?)" in text
    assert "training.max_steps: expected int, got 'ten'" in text
    assert "ema.decay: must be in (0, 1), got 1.5" in text
    assert len(problems) == 4


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"training": {"learning_rate": 0}}, "training.learning_rate: must be > 0, got 0"),
        ({"training": {"per_device_train_batch_size": 0}}, "training.per_device_train_batch_size: must be >= 1"),
        ({"training": {"gradient_accumulation_steps": 0}}, "training.gradient_accumulation_steps: must be >= 1"),
        ({"training": {"max_steps": -1, "num_train_epochs": 0}}, "one must be > 0"),
        ({"training": {"warmup_steps": 2.5}}, "training.warmup_steps: a value >= 1 counts steps"),
        ({"training": {"weight_decay": -0.1}}, "training.weight_decay: must be >= 0"),
        ({"training": {"adam_beta2": 1.0}}, "training.adam_beta2: must be in [0, 1)"),
        ({"training": {"eval_strategy": "steps"}}, "training.eval_steps: must be > 0 when"),
        ({"training": {"eval_strategy": "sometimes"}}, "training.eval_strategy: expected one of 'no', 'steps', 'epoch'"),
        ({"training": {"load_best_model_at_end": True}}, "needs evaluation, but training.eval_strategy is 'no'"),
        (
            {"training": {"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 4},
             "checkpoint": {"every_n_steps": 6}},
            "checkpoint.every_n_steps: must be a multiple of training.eval_steps (4)",
        ),
        ({"training": {"optimizer": "adamww"}}, "training.optimizer: unknown optimizer 'adamww' (did you mean 'adamw'?)"),
        ({"training": {"scheduler": "cosin"}}, "training.scheduler: unknown scheduler 'cosin'"),
        ({"training": {"lora_plus_ratio": 16}, "model": {"lora": {"enabled": False}}}, "LoRA+ needs model.lora.enabled"),
        ({"training": {"push_to_hub": True}}, "training.hub_model_id: required when"),
        ({"training": {"metric_for_best_model": "eval_ema_loss"}}, "needs ema.enabled and ema.evaluate"),
        ({"training": {"lr_multipliers": {"lora_B": "x"}}}, "training.lr_multipliers.lora_B: must be a number"),
        ({"hardware": {"fp16": True}}, "hardware.fp16: float16 mixed precision needs a CUDA GPU"),
        ({"hardware": {"fp16": True, "bf16": True}}, "choose one mixed-precision mode"),
        ({"hardware": {"dataloader_prefetch_factor": 2}}, "hardware.dataloader_prefetch_factor: needs"),
        ({"hardware": {"dataloader_num_workers": -1}}, "hardware.dataloader_num_workers: must be >= 0"),
        ({"model": {"lora": {"r": 0}}}, "model.lora.r: must be >= 1, got 0"),
        ({"model": {"lora": {"dropout": 1.0}}}, "model.lora.dropout: must be in [0, 1)"),
        ({"model": {"lora": {"target_modules": "everything"}}}, "model.lora.target_modules: expected 'auto'"),
        ({"model": {"lora": {"target_modules": []}}}, "an explicit list must not be empty"),
        ({"model": {"lora": {"load_in_4bit": True}}}, "QLoRA 4-bit loading needs CUDA"),
        ({"model": {"name_or_path": ""}}, "model.name_or_path: must name a model"),
        ({"model": {"dtype": "float8"}}, "model.dtype: expected one of"),
        ({"data": {"batching": "token_budget"}}, "data.max_tokens_per_batch: required when"),
        ({"data": {"max_tokens_per_batch": 100, "max_seq_len": 512}}, "must be >= data.max_seq_len (512)"),
        ({"data": {"max_seq_len": 4}}, "data.max_seq_len: must be >= 8"),
        ({"data": {"eval_split_ratio": 1.0}}, "data.eval_split_ratio: must be in [0, 1)"),
        ({"data": {"batching": "greedy"}}, "data.batching: expected one of 'random', 'bucket', 'token_budget', 'multipack'"),
        ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last: must be >= 1"),
        ({"checkpoint": {"max_consecutive_nonfinite": 0}}, "checkpoint.max_consecutive_nonfinite: must be >= 1"),
        ({"ema": {"enabled": True, "update_every": 0}}, "ema.update_every: must be >= 1, got 0"),
        ({"ema": {"enabled": True, "half_life_steps": 10, "warmup": True}}, "choose either a half-life or ema.warmup"),
        ({"ema": {"use_for_final_model": True}}, "ema.use_for_final_model: needs ema.enabled=true"),
        ({"output_dir": ""}, "output_dir: expected a non-empty string"),
        ({"training": {"max_steps": True}}, "training.max_steps: expected int, got True"),
        ({"training": "fast"}, "training: expected a mapping"),
    ],
)
def test_each_validation_path(raw, expected):
    problems = _problems(raw)
    assert any(expected in p for p in problems), problems


def test_fp16_allowed_with_cuda_only():
    cfg = TrainerConfig.from_dict({"hardware": {"fp16": True}}, validate=False)
    assert cfg.validate(cuda_available=True) is cfg
    with pytest.raises(ConfigError, match="hardware.fp16: float16 mixed precision needs a CUDA GPU"):
        cfg.validate(cuda_available=False)


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: [1e-4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml': malformed YAML at line \d+, column \d+"):
        TrainerConfig.from_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections, got list"):
        TrainerConfig.from_yaml(listy)


def test_to_training_arguments_maps_same_named_fields(tmp_path):
    cfg = TrainerConfig.from_dict({
        "output_dir": str(tmp_path),
        "training": {"learning_rate": 1e-4, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
                     "max_steps": 11, "seed": 7, "warmup_steps": 0.1, "weight_decay": 0.01,
                     "eval_strategy": "steps", "eval_steps": 5},
        "hardware": {"use_cpu": True, "bf16": True, "dataloader_num_workers": 1},
        "model": {"gradient_checkpointing": True},
        "checkpoint": {"every_n_steps": 5},
    })
    args = cfg.to_training_arguments()
    assert (args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1e-4, 3, 2)
    assert (args.max_steps, args.seed, args.warmup_steps, args.weight_decay) == (11, 7, 0.1, 0.01)
    assert args.eval_strategy == "steps" and args.eval_steps == 5
    assert args.use_cpu and args.bf16 and args.dataloader_num_workers == 1
    assert args.activation_checkpointing is True
    assert args.save_strategy == "steps" and args.save_steps == 5
    assert args.output_dir == str(tmp_path)


def test_every_field_has_help_text():
    import dataclasses

    from hf_optcore import config as c

    for cls in (c.TrainerConfig, c.ModelConfig, c.LoRAConfig, c.TrainingConfig, c.HardwareConfig, c.DataConfig,
                c.CheckpointConfig, c.EMAConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_readme_config_reference_is_in_sync():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", readme, re.S)
    assert m, "README.md lacks the generated config reference block"
    assert m.group(1).strip() == render_reference().strip(), (
        "README config reference is stale: regenerate with `hf-optcore config-reference` or "
        "python -c 'from hf_optcore.config import render_reference; print(render_reference())'"
    )


# ---- a config from someone else: duplicate keys, aliases, size and depth ------------------------------------------


def _load_error(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    (problem,) = info.value.problems
    return problem


@pytest.mark.parametrize("text, key, first, second", [
    ("training:\n  learning_rate: 1.0e-3\n  max_steps: 3\n  learning_rate: 5.0\n", "training.learning_rate", 2, 4),
    ("model:\n  lora:\n    r: 4\n    alpha: 8\n    r: 16\n", "model.lora.r", 3, 5),
    ("training: {max_steps: 3}\noutput_dir: a\ntraining: {max_steps: 4}\n", "training", 1, 3),
    ("training:\n  extra_args: {save_only_model: true, 'save_only_model': false}\n",
     "training.extra_args.save_only_model", 2, 2),
])
def test_a_key_set_twice_names_the_key_and_both_lines(tmp_path, text, key, first, second):
    # Before, the later value won silently (learning_rate 5.0 trained to an eval loss of 55).
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    assert _load_error(path) == (f"config file {str(path)!r}: duplicate key {key} at {path}:{second} (first at "
                                 f"{path}:{first}); the later value would silently win, keep one")


def test_anchors_aliases_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &base {learning_rate: 0.1, max_steps: 3}\n"
                    "training:\n  <<: *base\n  max_steps: 5\n  lr_multipliers: {a: &m 2.0, b: *m}\n")
    assert load_yaml(path) == {"base": {"learning_rate": 0.1, "max_steps": 3},
                               "training": {"learning_rate": 0.1, "max_steps": 5, "lr_multipliers": {"a": 2.0, "b": 2.0}}}


BILLION_LAUGHS = "training:\n  extra_args:\n    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))


def test_an_alias_bomb_is_refused_at_once_with_one_line(tmp_path):
    # safe_load shares aliased nodes, but merging, validation, the fingerprint and config.yaml walk 9**9 values.
    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS)
    expected = (f"error: config file {str(path)!r}, line 8: training.extra_args.l5 expands to more than 100000 "
                f"values through its aliases (*name); a config is far smaller")
    # The guard against a hang is the subprocess timeout; the refusal itself is immediate.
    proc = subprocess.run([sys.executable, "-m", "hf_optcore.cli", "validate", "--bare", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == expected, proc.stderr
    # The same bounds hold for a value given on the command line.
    bomb = "{" + ", ".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'lol'}]" for i in range(9)) + "}"
    with pytest.raises(ConfigError, match=r"override training.extra_args: cannot parse value .*expands to more than"):
        parse_overrides([f"training.extra_args={bomb}"])


def test_recursive_aliases_deep_nesting_many_aliases_and_size_are_refused(tmp_path):
    cases = {
        "rec.yaml": ("training:\n  extra_args: &x {a: [*x]}\n",
                     "line 2: training.extra_args.a[0] is an alias of a value that contains it (a recursive structure)"),
        "deep.yaml": ("training:\n  extra_args: {a: " + "[" * 300 + "]" * 300 + "}\n",
                      "line 2: nested more than 64 levels deep"),
        "aliases.yaml": ("v: &v 1\nw: [" + ", ".join(["*v"] * 200) + "]\n", "line 2: more than 128 aliases (*name); a "
                                                                            "config needs far fewer"),
    }
    for name, (text, problem) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        assert _load_error(path) == f"config file {str(path)!r}, {problem}"
    big = tmp_path / "big.yaml"
    big.write_text("model:\n  chat_template: '" + "x" * (1 << 20) + "'\n")
    assert _load_error(big) == (f"config file {str(big)!r} is {big.stat().st_size} bytes, more than a config may be "
                                f"(1048576); is it the right file?")


def test_a_folder_given_as_the_config_says_it_is_a_folder(tmp_path):
    assert _load_error(tmp_path) == f"config file {str(tmp_path)!r} is a directory, not a YAML file"


def test_an_extra_args_key_that_is_a_config_key_is_refused_not_silently_winning():
    with pytest.raises(ConfigError) as err:
        TrainerConfig.from_dict({"training": {"learning_rate": 1e-3, "extra_args": {"learning_rate": 5.0,
                                                                                     "save_steps": 3}}})
    assert err.value.problems == [
        "training.extra_args.learning_rate: is training.learning_rate; set it there, not in extra_args",
        "training.extra_args.save_steps: is checkpoint.every_n_steps; set it there, not in extra_args"]
    TrainerConfig.from_dict({"training": {"extra_args": {"save_strategy": "epoch", "logging_first_step": True}}})

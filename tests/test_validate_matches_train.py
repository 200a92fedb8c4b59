"""`hf-optcore validate` says "valid" only where the recipe starts: each case is refused by both with the same line.

Both run ``hf_optcore.recipes.sft.build_config`` and ``check_before_loading``; each case below used to pass
``validate`` and then fail in training (most with a traceback after the model had loaded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from hf_optcore import cli
from hf_optcore.recipes import sft

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "configs" / "tiny_smoke.yaml"
GOOD = {"instruction": "Define foo", "response": "A metasyntactic variable."}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _null_field(tmp):
    data = _jsonl(tmp / "train.jsonl", [GOOD] * 3 + [{"instruction": "q", "response": None}])
    return [f"data.train_path={data}"], f"{data}: line 4: field 'response' is null; expected a string (format " \
                                        f"'instruction')"


def _empty_eval_file(tmp):
    (tmp / "eval.jsonl").write_text("")
    return [f"data.eval_path={tmp / 'eval.jsonl'}"], f"{tmp / 'eval.jsonl'}: the dataset is empty (no examples)"


def _deeply_nested_json(tmp):
    data = tmp / "deep.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return [f"data.train_path={data}"], f"{data}: line 2 is JSON nested too deeply to read (an example is an object " \
                                        f"of strings and lists of turns)"


def _remote_code_model(tmp):
    model = tmp / "custom-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "no_such_arch", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    for name in ("configuration_x.py", "modeling_x.py"):
        (model / name).write_text(f"open({str(tmp / 'RAN')!r}, 'w').write('code ran')\n")
    return [f"model.name_or_path={model}"], (
        f"model.trust_remote_code: model {str(model)!r} is defined by its own code (modeling_x.XForCausalLM), which "
        f"runs when it loads; set model.trust_remote_code=true only if you trust that code")


def _unknown_extra_arg(tmp):
    return ["training.extra_args={save_only_modle: true}"], (
        "training.extra_args.save_only_modle: not a transformers.TrainingArguments field (did you mean "
        "'save_only_model'?)")


def _negative_seed(tmp):
    return ["training.seed=-1"], "training.seed: must be in [0, 2**32 - 1], got -1"


def _bf16_without_use_cpu(tmp):
    return ["hardware.bf16=true"], ("hardware.bf16: this machine has no GPU that runs bfloat16; set "
                                    "hardware.use_cpu=true to train in bfloat16 on the CPU, or hardware.bf16=false")


def _zero_max_steps(tmp):
    return ["training.max_steps=0", "training.num_train_epochs=1"], (
        "training.max_steps: 0 would train no step; use a number of optimizer steps > 0, or -1 (the default) to "
        "train training.num_train_epochs (1)")


def _metric_script(tmp):
    script = tmp / "my_metric.py"
    script.write_text(f"open({str(tmp / 'RAN')!r}, 'w').write('code ran')\n")
    return [f"training.eval_metrics=[{script}]"], (
        f"training.eval_metrics: {str(script)!r} is metric code that would run when it loads (a local script or "
        f"folder, or another owner's Hub metric); set training.trust_metric_code=true if you trust it")


def _sandbox_escape(tmp):
    # In a YAML file: the smoke config plus a template that reaches for os.system through jinja's globals.
    config = yaml.safe_load(SMOKE.read_text())
    config["data"] = {**config["data"], "train_path": str(REPO / config["data"]["train_path"]),
                      "eval_path": str(REPO / config["data"]["eval_path"])}
    config["model"]["chat_template"] = "{{ cycler.__init__.__globals__.os.system('touch %s') }}" % (tmp / "RAN")
    (tmp / "template.yaml").write_text(yaml.safe_dump(config))
    return [f"--config={tmp / 'template.yaml'}"], (
        "model.chat_template: the template tried an operation jinja's sandbox forbids (access to attribute "
        "'__init__' of 'type' object is unsafe); it was stopped, not run. Use a template that only formats the "
        "messages")


def _folder_as_data(tmp):
    (tmp / "data.jsonl").mkdir()
    return [f"data.train_path={tmp / 'data.jsonl'}"], \
        f"data.train_path: {str(tmp / 'data.jsonl')!r} is a directory, not a data file"


def _fifo_as_data(tmp):
    os.mkfifo(tmp / "pipe.jsonl")  # opened, it would block the run forever
    return [f"data.eval_path={tmp / 'pipe.jsonl'}"], \
        f"data.eval_path: {str(tmp / 'pipe.jsonl')!r} is a named pipe (FIFO), not a data file"


def _all_responses_empty(tmp):
    data = _jsonl(tmp / "train.jsonl", [{"instruction": f"q{i}", "response": " "} for i in range(32)])
    return [f"data.train_path={data}"], (
        f"{data}: field 'response' is empty in every example (32 of 32), so training would only learn to end a "
        f"turn at once; fill in the responses")


def _absurd_batch(tmp):
    return ["training.per_device_train_batch_size=99999999999999999999999"], (
        "training.per_device_train_batch_size: 99999999999999999999999 does not fit in 64 bits (the most is "
        "9223372036854775807); give a value the run can use")


def _fork_bomb_workers(tmp):
    cpus = len(os.sched_getaffinity(0))
    return ["hardware.dataloader_num_workers=100000"], (
        f"hardware.dataloader_num_workers: 100000 worker processes per training process on a machine with {cpus} "
        f"CPU(s); use at most {4 * cpus}")


CASES = [_null_field, _empty_eval_file, _deeply_nested_json, _remote_code_model, _unknown_extra_arg, _negative_seed,
         _bf16_without_use_cpu, _zero_max_steps, _metric_script, _sandbox_escape, _folder_as_data, _fifo_as_data,
         _all_responses_empty, _absurd_batch, _fork_bomb_workers]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=[c.__name__.lstrip("_") for c in CASES])
def test_validate_and_train_refuse_with_the_same_line(tmp_path, capsys, case):
    if case is _bf16_without_use_cpu and torch.cuda.is_available():
        pytest.skip("a GPU machine runs bfloat16")
    args, expected = case(tmp_path)
    config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), str(SMOKE))
    overrides = [a for a in args if not a.startswith("--config=")] + [f"output_dir={tmp_path / 'out'}"]
    capsys.readouterr()

    assert cli.main(["validate", config, *overrides]) == 2
    validate_err = capsys.readouterr().err.strip().splitlines()
    assert sft.main(["--config", config, "--no-samples", *overrides]) == 2
    train_err = capsys.readouterr().err.strip().splitlines()

    assert validate_err == [f"error: {expected}"]
    assert train_err == validate_err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "RAN").exists()  # no code from the config, the model folder or the template ran

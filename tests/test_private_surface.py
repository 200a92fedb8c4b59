"""The private transformers / Accelerate names hf_optcore relies on: few, listed, and pinned.

Each test's failure message says what changed upstream, so an upgrade of transformers that moves
one of them fails here, by name, instead of somewhere inside a training run.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

PACKAGE = Path(__file__).resolve().parents[1] / "hf_optcore"
# Every private transformers/Accelerate name hf_optcore touches, and why (the README lists the same).
ALLOWED = {
    "_save_checkpoint": "transformers writes its checkpoint; hf_optcore adds its components and manifest after it",
    "_load_rng_state": "the RNG of a resumed run is restored before the first batch is collated, not after",
    "_get_output_dir": "where transformers puts checkpoint-<step> (hyperparameter-search trials included)",
    "_setup_devices": "re-resolving the device after a GPU-less multi-process launch is switched to use_cpu",
    "_get_dataloader": "transformers builds the train dataloader around hf_optcore's batch sampler (no public hook "
                       "takes a batch sampler)",
}


def _upstream_private_names() -> set[str]:
    import accelerate
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard
    from accelerate.optimizer import AcceleratedOptimizer

    names = set()
    for cls in (Trainer, TrainingArguments, accelerate.Accelerator, AcceleratedOptimizer, DataLoaderShard,
                BatchSamplerShard):
        names |= {n for n in dir(cls) if n.startswith("_") and not n.startswith("__")}
    from hf_optcore.tiny import build_tiny_model

    trainer = Trainer(model=build_tiny_model("llama"), args=TrainingArguments(output_dir="unused", use_cpu=True))
    names |= {n for n in vars(trainer) if n.startswith("_") and not n.startswith("__")}
    names |= {n for n in vars(trainer.accelerator) if n.startswith("_") and not n.startswith("__")}
    names |= {n for n in vars(trainer.args) if n.startswith("_") and not n.startswith("__")}
    return names


def _names_used_by_hf_optcore() -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                name = node.value  # getattr(obj, "_x") / obj.__dict__.pop("_x")
            elif isinstance(node, ast.FunctionDef):
                name = node.name  # an override
            if name and name.startswith("_") and not name.startswith("__"):
                used.setdefault(name, []).append(f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}")
    return used


def test_at_most_five_private_upstream_names_each_listed():
    touched = {name: where for name, where in _names_used_by_hf_optcore().items() if name in _upstream_private_names()}
    unlisted = {name: where for name, where in touched.items() if name not in ALLOWED}
    assert not unlisted, f"hf_optcore touches private transformers/Accelerate names not in ALLOWED: {unlisted}"
    assert len(touched) <= 5, sorted(touched)


def test_save_checkpoint_writes_into_output_dir_checkpoint_step(tmp_path):
    sig = inspect.signature(Trainer._save_checkpoint)
    assert list(sig.parameters) == ["self", "model", "trial"], (
        f"transformers {transformers.__version__} changed Trainer._save_checkpoint{sig}; OptCoreTrainer._save_checkpoint "
        "calls it and then adds components + manifest to <_get_output_dir(trial)>/checkpoint-<global_step>")
    sig = inspect.signature(Trainer._get_output_dir)
    assert list(sig.parameters) == ["self", "trial"], (
        f"transformers {transformers.__version__} changed Trainer._get_output_dir{sig}")
    from hf_optcore.tiny import build_tiny_model

    trainer = Trainer(model=build_tiny_model("llama"), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                             report_to="none"))
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.state.global_step = 7
    assert trainer._get_output_dir(trial=None) == str(tmp_path)
    trainer._save_checkpoint(trainer.model, trial=None)
    assert (tmp_path / "checkpoint-7" / "trainer_state.json").is_file(), (
        f"transformers {transformers.__version__}: Trainer._save_checkpoint no longer writes "
        "<output_dir>/checkpoint-<global_step>; hf_optcore's manifest would be written beside nothing")


def test_load_rng_state_is_the_hook_that_restores_the_rng():
    sig = inspect.signature(Trainer._load_rng_state)
    assert list(sig.parameters) == ["self", "checkpoint"], (
        f"transformers {transformers.__version__} changed Trainer._load_rng_state{sig}")
    loop = inspect.getsource(Trainer._run_epoch)
    assert "self._load_rng_state(resume_from_checkpoint)" in loop, (
        f"transformers {transformers.__version__}: the training loop no longer calls self._load_rng_state on resume; "
        "OptCoreTrainer._load_rng_state would never run and a resumed run's RNG would not be restored")


def test_get_dataloader_takes_a_batch_rebalance_sampler_as_batch_sampler():
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    sig = inspect.signature(Trainer._get_dataloader)
    assert list(sig.parameters) == ["self", "dataset", "description", "batch_size", "sampler_fn", "is_training",
                                    "dataloader_key"], (
        f"transformers {transformers.__version__} changed Trainer._get_dataloader{sig}; "
        "hf_optcore.data.trainer_loader.build_train_dataloader calls it")
    source = inspect.getsource(Trainer._get_dataloader)
    assert "isinstance(sampler, BatchRebalanceSampler)" in source and '"batch_sampler"' in source, (
        f"transformers {transformers.__version__}: Trainer._get_dataloader no longer passes a BatchRebalanceSampler "
        "as batch_sampler; hf_optcore's RankAwareBatchSampler would be wrapped as a per-example sampler")
    assert issubclass(BatchRebalanceSampler, torch.utils.data.Sampler)


def test_setup_devices_is_the_cached_device_of_training_arguments(monkeypatch):
    from hf_optcore.distributed import prepare_process_group

    assert isinstance(inspect.getattr_static(TrainingArguments, "_setup_devices"), __import__("functools").cached_property), (
        f"transformers {transformers.__version__}: TrainingArguments._setup_devices is no longer a cached_property; "
        "hf_optcore.distributed.prepare_process_group drops it to re-resolve the device after setting use_cpu")
    for var in ("ACCELERATE_USE_CPU", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    class Args:
        use_cpu, deepspeed = False, None

        @property
        def device(self):
            return torch.device("cpu")

    args = Args()
    args.__dict__["_setup_devices"] = "stale"
    assert prepare_process_group(args, {"WORLD_SIZE": "2"}, accelerator=False)
    assert "_setup_devices" not in args.__dict__


@pytest.mark.parametrize("name", ["compute_loss", "prediction_step", "evaluation_loop", "evaluate", "train",
                                  "training_step", "get_batch_samples", "create_optimizer", "create_scheduler",
                                  "get_train_dataloader", "get_eval_dataloader", "get_resumed_dataloader", "log",
                                  "_save_checkpoint", "_load_rng_state"])
def test_overrides_keep_transformers_signatures(name):
    from hf_optcore.trainer import OptCoreTrainer

    theirs, ours = inspect.signature(getattr(Trainer, name)), inspect.signature(getattr(OptCoreTrainer, name))
    assert list(ours.parameters) == list(theirs.parameters), (
        f"transformers {transformers.__version__} changed Trainer.{name}{theirs}; OptCoreTrainer.{name}{ours} overrides it")

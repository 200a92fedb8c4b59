"""Checkpoints keep transformers' layout: a plain Trainer resumes from ours, and ours from a plain Trainer's."""

from __future__ import annotations

import shutil

import torch
from transformers import Trainer, TrainingArguments

from hf_optcore.checkpoint_manager import storage
from hf_optcore.config import TrainerConfig
from hf_optcore.tiny import build_tiny_model
from hf_optcore.trainer import OptCoreTrainer


def _dataset(n=24, length=12):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 250, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone()})
    return rows


def _args(out, **kw):
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6,
                             save_steps=3, logging_steps=1, use_cpu=True, report_to="none", seed=0,
                             dataloader_pin_memory=False, disable_tqdm=True, **kw)


def _ours(out):
    args = _args(out)
    cfg = TrainerConfig.from_training_arguments(args, ["ema.enabled=true", "ema.decay=0.9"])
    return OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=args, optcore_config=cfg,
                          train_dataset=_dataset())


def _plain(out):
    return Trainer(model=build_tiny_model("llama", seed=0), args=_args(out), train_dataset=_dataset())


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_plain_transformers_trainer_resumes_from_an_optcore_checkpoint(tmp_path):
    ours = _ours(tmp_path / "ours")
    ours.train()
    ckpt = tmp_path / "ours" / "checkpoint-3"
    # transformers' own files, then hf_optcore's components and the manifest that makes it count.
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "components", "config.yaml", "manifest.json"} <= names
    storage.verify(ckpt)
    resumed_dir = tmp_path / "plain"
    shutil.copytree(ckpt, resumed_dir / "checkpoint-3")
    plain = _plain(resumed_dir)
    plain.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-3"))
    assert plain.state.global_step == 6
    assert _equal(_weights(plain), _weights(ours))


def test_optcore_resumes_from_a_plain_transformers_checkpoint(tmp_path):
    plain = _plain(tmp_path / "plain")
    plain.train()
    resumed_dir = tmp_path / "ours"
    shutil.copytree(tmp_path / "plain" / "checkpoint-3", resumed_dir / "checkpoint-3")
    ours = _ours(resumed_dir)
    ours.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-3"))
    assert ours.state.global_step == 6
    assert _equal(_weights(ours), _weights(plain))
    # Its own checkpoint of step 6 is a complete hf_optcore one, EMA included.
    manifest = storage.verify(resumed_dir / "checkpoint-6")
    assert "components/ema.pt" in manifest["files"]


def test_save_total_limit_is_applied_by_hf_optcore_after_each_checkpoint_counts(tmp_path):
    args = _args(tmp_path, save_total_limit=2)
    args.save_steps = 1
    cfg = TrainerConfig.from_training_arguments(args, ["ema.enabled=true"])
    assert cfg.checkpoint.keep_last == 2
    trainer = OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=args, optcore_config=cfg,
                             train_dataset=_dataset())
    seen = []
    original = trainer.optcore_checkpointing.prune

    def prune():
        # When retention runs, the newest checkpoint is already complete: nothing is deleted before it counts.
        newest = max(tmp_path.glob("checkpoint-*"), key=storage.step_of)
        seen.append((newest.name, (newest / "manifest.json").is_file()))
        return original()

    trainer.optcore_checkpointing.prune = prune
    trainer.train()
    assert trainer.args.save_total_limit == 2  # the argument keeps the user's value
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    assert seen == [(f"checkpoint-{i}", True) for i in range(1, 7)]

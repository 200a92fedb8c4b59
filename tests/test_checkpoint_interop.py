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

"""Shared pieces of the checkpoint tests: a tiny run whose every random draw matters."""

from __future__ import annotations

import torch

from hf_optcore.config import TrainerConfig


class TokenDataset(torch.utils.data.Dataset):
    """``n`` fixed-length examples of byte tokens (deterministic)."""

    def __init__(self, n: int = 20, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, 256, (n, length), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def random_mask_collator(features):
    """Collates and masks a random quarter of the labels: it draws from the global torch RNG."""
    ids = torch.stack([f["input_ids"] for f in features])
    labels = ids.clone()
    labels[torch.rand(labels.shape) < 0.25] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def make_config(out, max_steps=12, ga=2, every=1, keep_last=100, **checkpoint):
    return TrainerConfig.from_dict({
        "output_dir": str(out),
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"max_steps": max_steps, "per_device_train_batch_size": 2, "gradient_accumulation_steps": ga,
                     "learning_rate": 1e-2, "logging_steps": 1, "scheduler": "cosine", "warmup_steps": 2,
                     "seed": 7},
        "hardware": {"use_cpu": True},
        "checkpoint": {"every_n_steps": every, "keep_last": keep_last, **checkpoint},
    })


def make_trainer(out, dropout=0.1, collator=random_mask_collator, n=20, **cfg):
    from hf_optcore.tiny import build_tiny_model
    from hf_optcore.trainer import OptCoreTrainer

    model = build_tiny_model("llama", seed=0, attention_dropout=dropout)
    return OptCoreTrainer(model=model, args=make_config(out, **cfg), train_dataset=TokenDataset(n),
                          data_collator=collator)


def step_losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e and "train_loss" not in e}


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

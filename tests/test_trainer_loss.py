"""The Trainer's chunked (logits-free) loss: the same per-step losses, updates and evaluation as the model's own."""

from __future__ import annotations

import pytest
import torch

from hf_optcore.config import TrainerConfig
from hf_optcore.tiny import build_tiny_model
from hf_optcore.trainer import OptCoreTrainer


def _rows(n=16):
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        length = 6 + (i * 7) % 17
        ids = torch.randint(0, 250, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 4) + ids[length // 4:]})
    return rows


def _run(tmp_path, chunked: bool, arch="llama", **training):
    cfg = TrainerConfig.from_dict({
        "output_dir": str(tmp_path / f"{arch}-{chunked}"), "hardware": {"use_cpu": True},
        "model": {"lora": {"enabled": False}},
        "training": {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                     "max_steps": 4, "logging_steps": 1, "gradient_accumulation_steps": 2, "seed": 0,
                     "chunked_loss": chunked, "loss_chunk_size": 16, **training},
        "checkpoint": {"save_at_end": False}})
    trainer = OptCoreTrainer(model=build_tiny_model(arch, seed=0), args=cfg, train_dataset=_rows(),
                             eval_dataset=_rows(9))
    before = trainer.evaluate()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return trainer, losses, before, trainer.evaluate()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_loss_trains_and_evaluates_as_the_models_own_loss(tmp_path, arch):
    ours, losses, before, after = _run(tmp_path, True, arch)
    theirs, ref_losses, ref_before, ref_after = _run(tmp_path, False, arch)
    assert ours._optcore_loss_support and all(ours._optcore_loss_support.values())  # it did run
    assert not theirs._optcore_loss_support
    assert len(losses) == 4
    for a, b in zip(losses, ref_losses):
        assert a == pytest.approx(b, rel=1e-5)
    for key in ("eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_label_tokens"):
        assert before[key] == pytest.approx(ref_before[key], rel=1e-5), key
        assert after[key] == pytest.approx(ref_after[key], rel=1e-5), key
    # atol 1e-5: GPT-2's key bias has a gradient of pure rounding noise (softmax ignores it), which Adam
    # normalises into steps of the learning rate's size either way.
    for (name, p), q in zip(ours.model.named_parameters(), theirs.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name


def test_label_smoothing_goes_through_the_chunked_loss_too(tmp_path):
    _, losses, _, _ = _run(tmp_path, True, label_smoothing_factor=0.1)
    _, ref, _, _ = _run(tmp_path, False, label_smoothing_factor=0.1)
    for a, b in zip(losses, ref):
        assert a == pytest.approx(b, rel=1e-5)

"""Resuming the Trainer mid-epoch continues the batch sampler's plan exactly (no replay, no skip)."""

import pytest
import torch
from conftest import record_training_batches

from hf_optcore.config import TrainerConfig
from hf_optcore.tiny import build_tiny_model


def _trainer(out, train_set, tok, batching):
    from hf_optcore.trainer import OptCoreTrainer

    cfg = TrainerConfig.from_dict({
        "output_dir": str(out),
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"max_steps": 6, "per_device_train_batch_size": 2, "logging_steps": 1, "learning_rate": 1e-3,
                     "scheduler": "constant", "report_to": "none"},
        "hardware": {"use_cpu": True, "dataloader_pin_memory": False},
        "data": {"batching": batching, "max_seq_len": 64},
        "checkpoint": {"every_n_steps": 3, "keep_last": 3},
    })
    trainer = OptCoreTrainer(build_tiny_model("llama"), cfg, train_dataset=train_set, processing_class=tok)
    seen = record_training_batches(trainer)
    return trainer, seen


@pytest.mark.parametrize("batching", ["bucket", "multipack"])
def test_resume_continues_the_epoch_where_it_stopped(tmp_path, tiny_tokenizer, batching):
    from hf_optcore.config import DataConfig, HardwareConfig, TrainingConfig
    from hf_optcore.data_manager import DataManager

    dm = DataManager(TrainingConfig(), HardwareConfig(), tiny_tokenizer, data_config=DataConfig(max_seq_len=64))
    train_set = dm.build_dataset([f"{'cd' * (i % 11)} row {i}" for i in range(60)])
    full, seen_full = _trainer(tmp_path / "full", train_set, tiny_tokenizer, batching)
    full.train()
    assert len(seen_full) == 6 and full.optcore_state["sampler"].state_dict()["consumed"] == 6
    resumed, seen_resumed = _trainer(tmp_path / "full", train_set, tiny_tokenizer, batching)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert len(seen_resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(seen_resumed, seen_full[3:]))
    assert resumed.optcore_state["sampler"].state_dict()["consumed"] == 6

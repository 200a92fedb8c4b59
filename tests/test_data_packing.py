"""Multipack isolation and loss normalisation, and the Trainer's use of DataManager's samplers."""

import inspect

import pytest
import torch
from conftest import record_training_batches

from hf_optcore.config import TrainerConfig
from hf_optcore.data.collator import PaddingCollator, count_real_tokens
from hf_optcore.data.packing import PackedDataset
from hf_optcore.data.samplers import MultipackBatchSampler
from hf_optcore.errors import DataError
from hf_optcore.tiny import build_tiny_model


def _examples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        length = int(torch.randint(4, 30, (1,), generator=g))
        ids = torch.randint(0, 250, (length,), generator=g).tolist()
        prompt = 1 + k % 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_the_unpacked_token_mean(arch, attn):
    model = build_tiny_model(arch, seed=0, attn_implementation=attn).eval()
    exs = _examples()
    collate = PaddingCollator(259)
    total, count = 0.0, 0
    for ex in exs:
        n = sum(lab != -100 for lab in ex["labels"][1:])
        total += model(**collate([ex])).loss.item() * n
        count += n
    bins = MultipackBatchSampler([len(e["input_ids"]) for e in exs], 64, rows_per_batch=8).bins
    assert len(bins) < len(exs)  # several examples really share rows
    packed = PackedDataset(exs)
    batch = collate([packed[b] for b in bins])
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert count_real_tokens(batch) == sum(len(e["input_ids"]) for e in exs) < batch["input_ids"].numel()
    # The Trainer's num_items_in_batch: labels[..., 1:] != -100, the unpacked target count.
    assert int(batch["labels"][..., 1:].ne(-100).sum()) == count
    loss = model(**batch).loss.item()
    assert loss == pytest.approx(total / count, rel=1e-5)
    # Without restarting positions the examples see each other: a different loss.
    leaky = {k: v for k, v in batch.items() if k not in ("position_ids", "use_cache")}
    assert abs(model(**leaky).loss.item() - loss) > 1e-4


def _config(tmp_path, batching, **data):
    return TrainerConfig.from_dict({
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                     "logging_steps": 1, "learning_rate": 1e-3, "scheduler": "constant", "report_to": "none"},
        "hardware": {"use_cpu": True, "dataloader_pin_memory": False},
        "data": {"batching": batching, "max_seq_len": 64, **data},
    })


@pytest.fixture
def train_set(tiny_tokenizer):
    from hf_optcore.config import DataConfig, HardwareConfig, TrainingConfig
    from hf_optcore.data_manager import DataManager

    dm = DataManager(TrainingConfig(), HardwareConfig(), tiny_tokenizer, data_config=DataConfig(max_seq_len=64))
    return dm.build_dataset([f"{'ab' * (i % 13)} item {i}" for i in range(40)])


@pytest.mark.parametrize("batching", ["multipack", "bucket"])
def test_trainer_takes_batches_from_our_sampler_and_logs_padding(tmp_path, tiny_tokenizer, train_set, batching):
    from hf_optcore.trainer import OptCoreTrainer

    trainer = OptCoreTrainer(build_tiny_model("llama"), _config(tmp_path, batching), train_dataset=train_set,
                             processing_class=tiny_tokenizer)
    seen = record_training_batches(trainer)
    trainer.train()
    sampler = trainer.optcore_state["sampler"]
    assert sampler.strategy == batching
    assert sampler.state_dict()["consumed"] == 6  # 3 steps x 2 micro-batches, not the prefetched count
    # The loop saw exactly the sampler's plan for epoch 0, in order.
    plan = list(sampler._rank_batches(0))[:6]
    ds = PackedDataset(train_set) if batching == "multipack" else train_set
    expected = [PaddingCollator(tiny_tokenizer.pad_token_id)([ds[i] for i in b])["input_ids"] for b in plan]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert 0.0 <= h["padding_fraction"] < 1.0 and h["real_tokens_per_second"] > 0
    real = sum(int(x.ne(tiny_tokenizer.pad_token_id).sum()) for x in seen)
    assert sum(h["real_tokens"] for h in logs) == real


def test_plain_training_arguments_add_no_data_metrics(tmp_path, tiny_tokenizer, train_set):
    from transformers import TrainingArguments

    from hf_optcore.trainer import OptCoreTrainer

    args = TrainingArguments(str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                             use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = OptCoreTrainer(build_tiny_model("llama"), args, train_dataset=train_set,
                             data_collator=PaddingCollator(tiny_tokenizer.pad_token_id))
    trainer.train()
    assert "sampler" not in trainer.optcore_state
    assert not any("padding_fraction" in h for h in trainer.state.log_history)


def test_multipack_refuses_an_attention_that_cannot_isolate(tmp_path, tiny_tokenizer, train_set):
    from hf_optcore.trainer import OptCoreTrainer

    model = build_tiny_model("llama")
    model.config._attn_implementation = "paged|sdpa"
    trainer = OptCoreTrainer(model, _config(tmp_path, "multipack"), train_dataset=train_set,
                             processing_class=tiny_tokenizer)
    with pytest.raises(DataError, match="isolates packed sequences .* but the model uses 'paged|sdpa'"):
        trainer.get_train_dataloader()


def test_overridden_trainer_hooks_match_installed_transformers():
    from transformers import Trainer

    assert list(inspect.signature(Trainer.get_train_dataloader).parameters) == ["self"]
    assert list(inspect.signature(Trainer.log).parameters) == ["self", "logs", "start_time"]
    assert list(inspect.signature(Trainer.training_step).parameters) == [
        "self", "model", "inputs", "num_items_in_batch"]
    from accelerate.data_loader import BatchSamplerShard

    # transformers (Trainer._get_dataloader) turns this re-sharding wrapper into a passthrough for our batch sampler.
    params = inspect.signature(BatchSamplerShard.__init__).parameters
    assert {"batch_sampler", "num_processes", "process_index"} <= set(params)

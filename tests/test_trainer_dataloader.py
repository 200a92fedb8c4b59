"""transformers builds the Trainer's train dataloader around hf_optcore's batch sampler: its options hold."""

import os
import shutil

import pytest
import torch
from conftest import record_training_batches

from hf_optcore.config import TrainerConfig
from hf_optcore.data.collator import PaddingCollator
from hf_optcore.tiny import build_tiny_model


def _config(out, batching="random", hardware=None, training=None, extra=None, **checkpoint):
    return TrainerConfig.from_dict({
        "output_dir": str(out),
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3,
                     "scheduler": "constant", "report_to": "none", "extra_args": extra or {}, **(training or {})},
        "hardware": {"use_cpu": True, "dataloader_pin_memory": False, **(hardware or {})},
        "data": {"batching": batching, "max_seq_len": 64},
        "checkpoint": {"every_n_steps": 0, "save_at_end": False, **checkpoint},
    })


@pytest.fixture
def train_set(tiny_tokenizer):
    from hf_optcore.config import DataConfig, HardwareConfig, TrainingConfig
    from hf_optcore.data_manager import DataManager

    dm = DataManager(TrainingConfig(), HardwareConfig(), tiny_tokenizer, data_config=DataConfig(max_seq_len=64))
    return dm.build_dataset([f"{'xy' * (i % 9)} line {i}" for i in range(30)])


def _trainer(cfg, dataset, tok, **kw):
    from hf_optcore.trainer import OptCoreTrainer

    return OptCoreTrainer(build_tiny_model("llama"), cfg, train_dataset=dataset, processing_class=tok, **kw)


def _plan_ids(trainer, dataset, tok, n):
    sampler = trainer.optcore_state["sampler"]
    return [PaddingCollator(tok.pad_token_id)([dataset[i] for i in b])["input_ids"]
            for b in list(sampler._rank_batches(0))[:n]]


def test_spawned_workers_come_from_multiprocessing_context(tmp_path, tiny_tokenizer, train_set):
    cfg = _config(tmp_path, "bucket", {"dataloader_num_workers": 1, "dataloader_multiprocessing_context": "spawn"})
    trainer = _trainer(cfg, train_set, tiny_tokenizer)
    loader = trainer.get_train_dataloader()
    assert loader.multiprocessing_context.get_start_method() == "spawn" and loader.num_workers == 1
    seen = record_training_batches(trainer)
    trainer.train()
    # The spawned worker collated exactly the bucket sampler's plan.
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, _plan_ids(trainer, train_set,
                                                                                     tiny_tokenizer, 3)))


class _KeysSeen(PaddingCollator):
    """Our collator, recording the columns of the examples it gets."""

    keys: set = set()

    def __call__(self, features):
        type(self).keys |= set(features[0])
        return super().__call__(features)


@pytest.mark.parametrize("remove", [True, False])
def test_remove_unused_columns_drops_what_the_model_does_not_take(tmp_path, tiny_tokenizer, train_set, remove):
    import datasets

    rows = [dict(train_set[i], text=f"line {i}") for i in range(len(train_set))]
    ds = datasets.Dataset.from_list(rows)
    _KeysSeen.keys = set()
    trainer = _trainer(_config(tmp_path, "bucket", extra={"remove_unused_columns": remove}, training={"max_steps": 1}),
                       ds, tiny_tokenizer, data_collator=_KeysSeen(tiny_tokenizer.pad_token_id))
    trainer.train()
    assert trainer.args.remove_unused_columns is remove
    assert _KeysSeen.keys == ({"input_ids", "labels"} if remove else {"input_ids", "labels", "text"})


@pytest.mark.parametrize("batching", ["random", "bucket", "multipack"])
def test_dataloader_drop_last_drops_the_incomplete_batch(tmp_path, tiny_tokenizer, train_set, batching):
    from hf_optcore.data.packing import pack_best_fit_decreasing

    items = len(pack_best_fit_decreasing(train_set.lengths, 64)) if batching == "multipack" else len(train_set)
    size = next(s for s in (4, 3, 5, 7) if items % s)  # a size that leaves an incomplete last batch
    lengths = {}
    for drop in (False, True):
        cfg = _config(tmp_path / str(drop), batching, {"dataloader_drop_last": drop},
                      training={"per_device_train_batch_size": size})
        trainer = _trainer(cfg, train_set, tiny_tokenizer)
        lengths[drop] = len(trainer.get_train_dataloader())
        sampler = trainer.optcore_state["sampler"]
        batches = list(sampler._rank_batches(0))
        if not drop:
            flat = [i for b in batches for i in (b if batching != "multipack" else [j for bin_ in b for j in bin_])]
            assert sorted(flat) == list(range(len(train_set)))  # every example once
    assert (lengths[False], lengths[True]) == (items // size + 1, items // size)
    assert all(len(b) == size for b in batches)


class _PidRecorder(torch.utils.data.Dataset):
    """A tokenized dataset whose items leave the id of the process that read them in ``folder``."""

    def __init__(self, base, folder):
        self.base, self.folder, self.lengths = base, folder, base.lengths

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        (self.folder / str(os.getpid())).touch()
        return self.base[i]


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_workers_live_across_epochs(tmp_path, tiny_tokenizer, train_set, persistent):
    pids = tmp_path / "pids"
    pids.mkdir()
    cfg = _config(tmp_path / "out", "bucket", {"dataloader_num_workers": 1,
                                               "dataloader_persistent_workers": persistent},
                  training={"max_steps": -1, "num_train_epochs": 2, "per_device_train_batch_size": 10})
    trainer = _trainer(cfg, _PidRecorder(train_set, pids), tiny_tokenizer)
    trainer.train()
    assert trainer.state.global_step == 6  # 2 epochs of 3 batches
    workers = {p.name for p in pids.iterdir()} - {str(os.getpid())}
    assert len(workers) == (1 if persistent else 2), workers


def test_resume_with_workers_continues_the_epoch_exactly(tmp_path, tiny_tokenizer, train_set):
    def run(out, resume=None):
        cfg = _config(out, "bucket", {"dataloader_num_workers": 1}, training={"max_steps": 6}, every_n_steps=3,
                      keep_last=3)
        trainer = _trainer(cfg, train_set, tiny_tokenizer)
        seen = record_training_batches(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, seen

    full, seen_full = run(tmp_path / "full")
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, seen_resumed = run(tmp_path / "resumed", str(tmp_path / "resumed" / "checkpoint-3"))
    assert len(seen_resumed) == 3 and all(torch.equal(a, b) for a, b in zip(seen_resumed, seen_full[3:]))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_create_loaders_takes_the_same_options(tiny_tokenizer):
    from hf_optcore.config import DataConfig, HardwareConfig, TrainingConfig
    from hf_optcore.data_manager import DataManager

    hw = HardwareConfig(dataloader_num_workers=1, dataloader_multiprocessing_context="forkserver",
                        dataloader_persistent_workers=True, dataloader_in_order=False, dataloader_drop_last=True)
    dm = DataManager(TrainingConfig(per_device_train_batch_size=4), hw, tiny_tokenizer,
                     data_config=DataConfig(max_seq_len=64))
    train, val = dm.create_loaders([f"row {i}" for i in range(10)], ["a b", "c d"])
    for loader in (train, val):
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        assert loader.persistent_workers and loader.in_order is False
    assert len(train) == 2  # 10 examples in batches of 4: the incomplete third is dropped


def test_token_budget_drop_last_drops_the_incomplete_step_instead_of_splitting():
    from hf_optcore.data.samplers import TokenBudgetBatchSampler

    lengths = [5, 6, 7, 8, 9, 10, 11, 30, 31]
    kept = [TokenBudgetBatchSampler(lengths, 32, num_replicas=2, rank=r, drop_last=True) for r in range(2)]
    whole = [TokenBudgetBatchSampler(lengths, 32, num_replicas=2, rank=r) for r in range(2)]
    one = TokenBudgetBatchSampler(lengths, 32)
    assert len(one) % 2 == 1
    assert len(kept[0]) == len(one) // 2 and len(whole[0]) == len(one) // 2 + 1
    # The kept steps are whole batches of the 1-process plan (none split), and fewer examples are trained on.
    plan = {tuple(sorted(b)) for b in one._rank_batches(0)}
    assert all(tuple(sorted(b)) in plan for s in kept for b in s._rank_batches(0))
    assert sum(len(b) for s in kept for b in s._rank_batches(0)) < len(lengths)

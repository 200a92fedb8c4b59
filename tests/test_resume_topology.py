"""checkpoint.allow_topology_change: another per-device batch / accumulation / world size resumes exactly or refuses.

transformers positions a resume by optimizer steps (it skips ``global_step x accumulation`` batches of the
new size). With the same examples per optimizer step, the sampler re-cuts the interrupted epoch in the saved
run's order: every later step of that epoch trains on exactly the examples the uninterrupted run trained on.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import record_training_batches

from hf_optcore.config import TrainerConfig
from hf_optcore.data.samplers import (
    BucketBatchSampler,
    MultipackBatchSampler,
    RandomBatchSampler,
    TokenBudgetBatchSampler,
)
from hf_optcore.errors import CheckpointError
from hf_optcore.tiny import build_tiny_model
from tests._checkpoint_helpers import TokenDataset


def collate(features):
    ids = torch.stack([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def run(out, batch, ga, max_steps=9, **checkpoint):
    """A tiny run over 24 examples; returns the trainer and the example ids of every micro-batch it trained on."""
    from hf_optcore.trainer import OptCoreTrainer

    cfg = TrainerConfig.from_dict({
        "output_dir": str(out),
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"max_steps": max_steps, "per_device_train_batch_size": batch, "gradient_accumulation_steps": ga,
                     "learning_rate": 1e-2, "logging_steps": 1, "scheduler": "constant", "seed": 3,
                     "report_to": "none"},
        "hardware": {"use_cpu": True, "dataloader_pin_memory": False},
        "data": {"batching": "random"},
        "checkpoint": {"every_n_steps": 2, "keep_last": 100, **checkpoint},
    })
    data = TokenDataset(24, length=8)
    ids = {tuple(row.tolist()): i for i, row in enumerate(data.rows)}
    t = OptCoreTrainer(build_tiny_model("llama", seed=0), cfg, train_dataset=data, data_collator=collate)
    seen = record_training_batches(t)
    t.train()
    return t, [[ids[tuple(row.tolist())] for row in batch] for batch in seen]


def steps(micro_batches, ga, first_step):
    """``{optimizer step: sorted example ids}`` from consecutive micro-batches, ``ga`` per step."""
    return {first_step + i // ga: sorted(sum(micro_batches[i:i + ga], [])) for i in range(0, len(micro_batches), ga)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted: per-device batch 2, accumulation 2 (4 examples a step, 6 steps an epoch), 9 steps."""
    out = tmp_path_factory.mktemp("reference")
    _, seen = run(out, batch=2, ga=2)
    return out, steps(seen, 2, 1)


@pytest.mark.parametrize("batch, ga", [(4, 1), (1, 4)], ids=["batch-doubled", "batch-halved"])
@pytest.mark.parametrize("at", [4, 8], ids=["epoch0-mid", "epoch1-mid"])
def test_another_batch_size_with_the_same_step_size_resumes_the_epoch_exactly(reference, tmp_path, batch, ga, at):
    import shutil

    ref_out, ref_steps = reference
    shutil.copytree(ref_out / f"checkpoint-{at}", tmp_path / f"checkpoint-{at}")
    t, seen = run(tmp_path, batch=batch, ga=ga, allow_topology_change=True,
                  resume_from=str(tmp_path / f"checkpoint-{at}"))
    assert t.state.global_step == 9
    got = steps(seen, ga, at + 1)
    assert sorted(got) == list(range(at + 1, 10))
    epoch_end = 6 if at < 6 else 12
    # The rest of the interrupted epoch: exactly the examples of each step of the uninterrupted run.
    assert {s: got[s] for s in got if s <= epoch_end} == {s: ref_steps[s] for s in got if s <= epoch_end}
    if at < 6:  # over that epoch every example was trained on once: the checkpoint's steps, then the resumed ones
        assert sorted(sum((ref_steps[s] if s <= at else got[s] for s in range(1, 7)), [])) == list(range(24))
    # The next epoch is this topology's own plan: no example twice.
    later = sum((got[s] for s in got if s > epoch_end), [])
    assert len(later) == len(set(later))


def test_another_step_size_is_refused_before_anything_changes(reference, tmp_path):
    import shutil

    ref_out, _ = reference
    shutil.copytree(ref_out / "checkpoint-4", tmp_path / "checkpoint-4")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError) as info:
        run(tmp_path, batch=4, ga=2, allow_topology_change=True, resume_from=str(tmp_path / "checkpoint-4"))
    assert str(info.value).startswith(
        f"checkpoint.allow_topology_change: '{tmp_path / 'checkpoint-4'}' was saved with 4 examples per optimizer step "
        f"(world_size x per_device_train_batch_size x gradient_accumulation_steps), this run has 8; transformers "
        f"positions a resume by optimizer steps")
    assert "(here gradient_accumulation_steps=1)" in str(info.value)
    with pytest.raises(CheckpointError, match=r"training.per_device_train_batch_size: 4, but checkpoint .* was "
                                              r"saved with 2; resuming would not be exact"):
        run(tmp_path, batch=4, ga=1, resume_from=str(tmp_path / "checkpoint-4"))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


# ---- the samplers alone ----------------------------------------------------------------------------


LENGTHS = [random.Random(i).randint(3, 30) for i in range(40)]


def _items(batch):
    return [i for item in batch for i in (item if isinstance(item, tuple) else (item,))]


def _step_sets(samplers, ga, epoch):
    per_rank = [s._rank_batches(epoch) for s in samplers]
    n = len(per_rank[0])
    return [sorted(i for r in per_rank for b in r[j:j + ga] for i in _items(b)) for j in range(0, n, ga)]


CASES = {
    "random batch 2x2 -> 4x1": (RandomBatchSampler, {"batch_size": 2}, {"batch_size": 4}, (1, 2), (1, 1)),
    "random batch 2x2 -> 1x4": (RandomBatchSampler, {"batch_size": 2}, {"batch_size": 1}, (1, 2), (1, 4)),
    "random 1 -> 2 processes": (RandomBatchSampler, {"batch_size": 2}, {"batch_size": 2}, (1, 2), (2, 1)),
    "bucket batch 2x2 -> 4x1": (BucketBatchSampler, {"batch_size": 2, "bucket_size_multiplier": 2},
                                {"batch_size": 4, "bucket_size_multiplier": 2}, (1, 2), (1, 1)),
    "multipack rows 2 -> 1x2": (MultipackBatchSampler, {"max_seq_len": 64, "rows_per_batch": 2},
                                {"max_seq_len": 64, "rows_per_batch": 1}, (1, 1), (1, 2)),
    "token_budget 1x2 -> 2x1": (TokenBudgetBatchSampler, {"max_tokens": 64}, {"max_tokens": 64}, (1, 2), (2, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_sampler_state_of_another_topology_continues_the_epoch_by_examples(case):
    cls, old_kw, new_kw, (w0, ga0), (w1, ga1) = CASES[case]
    old = [cls(LENGTHS, **old_kw, num_replicas=w0, rank=r, seed=5) for r in range(w0)]
    done = 3  # optimizer steps of epoch 1 already trained
    state = {**old[0].state_dict(), "epoch": 1, "consumed": done * ga0}
    new = [cls(LENGTHS, **new_kw, num_replicas=w1, rank=r, seed=5) for r in range(w1)]
    with pytest.raises(ValueError, match="the data order cannot be continued"):
        new[0].load_state_dict(state)
    for s in new:
        s.allow_topology_change = True
        s.load_state_dict(state)
    assert new[0].consumed == done * ga1
    before, after = _step_sets(old, ga0, 1), _step_sets(new, ga1, 1)
    assert after[done:] == before[done:]
    # A state saved during the re-cut epoch keeps its order when loaded again (a second resume is exact too).
    again = cls(LENGTHS, **new_kw, num_replicas=w1, rank=0, seed=5)
    again.load_state_dict(new[0].state_dict())
    assert again._rank_batches(1) == new[0]._rank_batches(1)


def test_a_position_between_two_batches_of_the_new_size_is_refused():
    old = RandomBatchSampler(LENGTHS, batch_size=2, seed=5)
    new = RandomBatchSampler(LENGTHS, batch_size=4, seed=5)
    new.allow_topology_change = True
    with pytest.raises(ValueError, match=r"the saved position \(6 items into epoch 0\) does not fall on a step "
                                         r"boundary of this topology"):
        new.load_state_dict({**old.state_dict(), "consumed": 3})

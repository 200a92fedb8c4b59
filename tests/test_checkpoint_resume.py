"""Exact resume through OptCoreTrainer: same per-step losses, weights and optimizer state."""

import shutil

import pytest
import torch

from tests._checkpoint_helpers import assert_same_tensors, make_trainer, params, step_losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    t = make_trainer(out)
    t.train()
    return out, step_losses(t), params(t.model), t.optimizer.state_dict()


# 20 examples / batch 2 = 10 micro-batches = 5 optimizer steps per epoch (accumulation 2).
@pytest.mark.parametrize("k", [3, 5, 8], ids=["epoch0-mid", "epoch-boundary", "epoch1-mid"])
def test_resume_is_bit_exact(reference, tmp_path, k):
    ref_out, ref_losses, ref_params, ref_opt = reference
    shutil.copytree(ref_out / f"checkpoint-{k}", tmp_path / f"checkpoint-{k}")
    t = make_trainer(tmp_path)
    t.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{k}"))
    # The restored log history holds steps <= k; every later entry comes from the resumed run.
    losses = {s: v for s, v in step_losses(t).items() if s > k}
    assert sorted(losses) == list(range(k + 1, 13))
    assert losses == {s: ref_losses[s] for s in losses}
    assert_same_tensors(params(t.model), ref_params)
    opt = t.optimizer.state_dict()["state"]
    for i, st in ref_opt["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(opt[i][name]), torch.as_tensor(v)), (i, name)


def test_resume_auto_picks_latest_complete(reference, tmp_path):
    ref_out, ref_losses, ref_params, _ = reference
    for k in (4, 6):
        shutil.copytree(ref_out / f"checkpoint-{k}", tmp_path / f"checkpoint-{k}")
    (tmp_path / ".tmp-checkpoint-7").mkdir()  # an interrupted save: removed, never used
    t = make_trainer(tmp_path, resume_from="auto")
    t.train()
    assert t.state.global_step == 12 and 7 in step_losses(t)
    assert not (tmp_path / ".tmp-checkpoint-7").exists()
    assert_same_tensors(params(t.model), ref_params)

"""CheckpointManager standalone: atomic saves, verification, retention, safe loading, topology."""

import os
import pickle
import random

import pytest
import torch

from hf_optcore.checkpoint_manager import CheckpointManager, select_to_keep
from hf_optcore.config import CheckpointConfig
from hf_optcore.errors import CheckpointError
from hf_optcore.tiny import build_tiny_model


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, sd):
        self.n = int(sd["n"])


def _setup(tmp_path, **cfg):
    model = build_tiny_model("llama", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    comp = Counter()
    config = CheckpointConfig(**{"keep_last": 100, **cfg})
    mgr = CheckpointManager(config, tmp_path, model, opt, sched, None, None, components={"ema": comp},
                            topology={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1})
    return mgr, model, opt, sched, comp


def _train_step(model, opt, sched):
    ids = torch.randint(0, 256, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_save_load_roundtrip_restores_everything(tmp_path):
    mgr, model, opt, sched, comp = _setup(tmp_path)
    _train_step(model, opt, sched)
    comp.n = 7
    path = mgr.save(1, {"eval_loss": 2.0})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rng_after_save = torch.get_rng_state()
    assert {"manifest.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "components"} <= {p.name for p in path.iterdir()}
    _train_step(model, opt, sched)
    comp.n = 99
    assert mgr.load("latest") == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert sched.last_epoch == 1 and comp.n == 7
    assert torch.equal(torch.get_rng_state(), rng_after_save)
    assert mgr.latest() == path and mgr.best() == path


def test_peft_model_saves_adapters_only(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model("llama", seed=0), LoraConfig(r=2, target_modules=["q_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, model)
    path = mgr.save(3)
    assert (path / "adapter_model.safetensors").is_file() and not (path / "model.safetensors").exists()
    assert os.path.getsize(path / "adapter_model.safetensors") < 20_000
    want = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.zero_()
    mgr.load(path)
    for n, p in model.named_parameters():
        if n in want:
            assert torch.equal(p, want[n]), n


def test_interrupted_save_leftovers_are_removed_and_never_listed(tmp_path):
    mgr, *_ = _setup(tmp_path)
    mgr.save(1)
    (tmp_path / ".tmp-checkpoint-2").mkdir()
    (tmp_path / ".tmp-checkpoint-2" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoint-5").mkdir()  # no manifest: not complete
    assert [c.step for c in mgr.checkpoints()] == [1]
    _setup(tmp_path)  # a new run starts
    assert not (tmp_path / ".tmp-checkpoint-2").exists()
    assert mgr.latest().name == "checkpoint-1"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_latest_falls_back_with_warning_naming_the_file(tmp_path, damage):
    mgr, model, opt, sched, _ = _setup(tmp_path)
    mgr.save(1)
    _train_step(model, opt, sched)
    bad = mgr.save(2) / "optimizer.pt"
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        bad.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        bad.unlink()
    with pytest.warns(UserWarning, match="optimizer.pt"):
        assert mgr.load("latest") == 1
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        mgr.load(tmp_path / "checkpoint-2")


def test_all_corrupt_fails_with_the_bad_files(tmp_path):
    mgr, *_ = _setup(tmp_path)
    (mgr.save(1) / "model.safetensors").write_bytes(b"x")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="model.safetensors"):
        mgr.load("latest")


def test_loading_never_unpickles_objects(tmp_path):
    mgr, *_ = _setup(tmp_path)
    path = mgr.save(1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    # Forge a consistent manifest so only the weights_only refusal can stop it.
    torch.save({"x": Evil()}, path / "scheduler.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    import json

    from hf_optcore.checkpoint_manager.storage import sha256_of

    m = json.loads((path / "manifest.json").read_text())
    m["files"]["scheduler.pt"] = {"size": (path / "scheduler.pt").stat().st_size, "sha256": sha256_of(path / "scheduler.pt")}
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="scheduler.pt.*weights_only"):
        mgr.load(path)


def test_topology_change_is_an_error_unless_allowed(tmp_path):
    mgr, *_ = _setup(tmp_path)
    mgr.save(1)
    mgr.topology["gradient_accumulation_steps"] = 4
    # The one topology wording (hf_optcore.checkpoint_manager.topology), as preflight and the Trainer report it.
    with pytest.raises(CheckpointError, match=r"training.gradient_accumulation_steps: 4, but checkpoint .* was saved "
                                              r"with 1; resuming would not be exact"):
        mgr.load("latest")
    mgr.config.allow_topology_change = True
    assert mgr.load("latest") == 1


def test_retention_keeps_exactly_the_predicted_set_after_mtime_scramble(tmp_path):
    mgr, *_ = _setup(tmp_path, keep_last=2, keep_best=2, keep_every_n_steps=4)
    mgr.metric_for_best_model = "eval_loss"
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 6.0, 5: 0.5, 6: 3.0, 7: 7.0, 8: 9.0, 9: 2.0, 10: 8.0}
    for step, loss in losses.items():
        mgr.save(step, {"eval_loss": loss})
        rnd = random.Random(step)
        for c in mgr.checkpoints():  # the newest-looking directory is never the newest step
            t = rnd.uniform(1e8, 2e9)
            os.utime(c.path, (t, t))
    # last 2: 9, 10; best 2 by loss: 5 (0.5), 2 (1.0); milestones: 4, 8.
    assert [c.step for c in mgr.checkpoints()] == [2, 4, 5, 8, 9, 10]
    assert mgr.best().name == "checkpoint-5"


def test_select_to_keep_rules():
    ckpts = {10: 0.3, 20: 0.9, 30: None, 40: float("nan"), 50: 0.1}
    assert select_to_keep(ckpts, keep_last=1, keep_best=1, greater_is_better=True) == {50, 20}
    assert select_to_keep(ckpts, keep_last=1, keep_best=0, greater_is_better=False) == {50}
    assert select_to_keep(ckpts, keep_last=1, keep_best=2, protect=[10, 99]) == {50, 10}
    assert select_to_keep({}, 1, 1) == set()

"""EMAManager alone (pure torch): the math, swapping, state, LoRA, DDP/DTensor, config errors."""

import copy

import pytest
import torch
from torch import nn

from hf_optcore.config import EMAConfig
from hf_optcore.ema_manager import EMAManager


def _cfg(**kw):
    return EMAConfig(enabled=True, **kw)


def _random_steps(model, k, seed=0):
    """Perturb every trainable weight k times, returning the weights after each step (float64)."""
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(k):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        history.append({n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad})
    return history


def _reference(w0, history, decays):
    """Closed form: e_k = prod(d) w0 + sum_i (1 - d_i) prod_{j > i} d_j w_i, in float64."""
    out = {}
    for name, w in w0.items():
        k = len(history)
        total = torch.tensor(decays, dtype=torch.float64).prod() * w
        for i in range(k):
            tail = torch.tensor(decays[i + 1:], dtype=torch.float64).prod()
            total = total + (1 - decays[i]) * tail * history[i][name]
        out[name] = total
    return out


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


@pytest.mark.parametrize("kw", [dict(decay=0.9), dict(decay=0.99, warmup=True, warmup_gamma=1.0, warmup_power=0.75),
                                dict(decay=0.5, half_life_steps=3.0)])
def test_update_matches_float64_closed_form(kw):
    model = _mlp()
    w0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    history = _random_steps(model, 7)
    # Replay the same weights into a fresh model, updating after each step.
    model2 = _mlp()
    ema2 = EMAManager(_cfg(**kw), model2)
    decays = [ema2.get_decay(s) for s in range(1, 8)]
    for step, weights in enumerate(history, start=1):
        with torch.no_grad():
            for n, p in model2.named_parameters():
                p.copy_(weights[n])
        assert ema2.update(step)
    ref = _reference(w0, history, decays)
    for name, expected in ref.items():
        torch.testing.assert_close(ema2.shadow[name].double(), expected, rtol=0, atol=2e-6)
    assert ema2.num_updates == 7 and ema2.step == 7
    if kw.get("half_life_steps"):
        assert decays[0] == pytest.approx(0.5 ** (1 / 3))
    if kw.get("warmup"):
        assert decays[0] == pytest.approx(1 - 2 ** -0.75) and max(decays) <= 0.99


def test_warmup_first_update_copies_and_is_capped():
    ema = EMAManager(_cfg(decay=0.9, warmup=True, start_step=5), _mlp())
    assert ema.get_decay(5) == 0.0
    assert ema.get_decay(10 ** 6) == 0.9


def test_update_every_and_start_step():
    model = _mlp()
    ema = EMAManager(_cfg(decay=0.5, update_every=3, start_step=2), model)
    changed = []
    for step in range(1, 9):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        changed.append(ema.update(step))
    # step 1 < start_step: copy; then updates at 2, 5, 8.
    assert changed == [True, True, False, False, True, False, False, True]
    assert ema.num_updates == 3


def test_apply_restore_bit_exact_and_context():
    model = _mlp()
    ema = EMAManager(_cfg(decay=0.7), model)
    _random_steps(model, 3)
    ema.update()
    before = copy.deepcopy(model.state_dict())
    with ema.applied():
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[n])
        assert not torch.equal(model[0].weight, before["0.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="nothing to restore"):
        ema.restore()
    ema.apply()
    with pytest.raises(RuntimeError, match="already applied"):
        ema.apply()
    ema.restore()


def test_half_precision_weights_get_fp32_shadows():
    model = _mlp(torch.bfloat16)
    ema = EMAManager(_cfg(decay=0.999), model)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    w = model[0].weight.detach().float().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    # A bf16 shadow could not represent this 0.001 step on values of order 0.1-1.
    expected = 0.999 * w + 0.001 * model[0].weight.detach().float()
    torch.testing.assert_close(ema.shadow["0.weight"], expected, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading means anything only off the CPU (GPU check)")
def test_offload_to_cpu_keeps_shadows_on_the_cpu():
    model = nn.Linear(4, 4).cuda()
    ema = EMAManager(_cfg(decay=0.5, offload_to_cpu=True), model)
    assert all(s.device.type == "cpu" for s in ema.shadow.values())
    with torch.no_grad():
        model.weight.add_(1.0)
    expected = 0.5 * ema.shadow["weight"] + 0.5 * model.weight.detach().cpu()
    ema.update()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    assert EMAManager(_cfg(decay=0.5), model).shadow["weight"].device.type == "cuda"


def test_buffers_are_averaged_when_included():
    model = nn.BatchNorm1d(4)
    ema = EMAManager(_cfg(decay=0.5, include_buffers=True), model)
    assert "buffer:running_mean" in ema.shadow and "buffer:num_batches_tracked" not in ema.shadow
    with torch.no_grad():
        model.running_mean.fill_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow["buffer:running_mean"], torch.full((4,), 1.0))


def test_state_dict_roundtrip_continues_identically():
    model = _mlp()
    ema = EMAManager(_cfg(decay=0.8, warmup=True), model)
    hist = _random_steps(model, 4)
    for step in range(1, len(hist) + 1):
        ema.update(step)
    saved = copy.deepcopy(ema.state_dict())
    fresh = EMAManager(_cfg(decay=0.8, warmup=True), model)
    fresh.load_state_dict(saved)
    assert fresh.step == 4 and fresh.num_updates == 4
    _random_steps(model, 1, seed=1)
    ema.update(), fresh.update()
    for n in ema.shadow:
        assert torch.equal(ema.shadow[n], fresh.shadow[n])


def test_load_state_dict_rejects_other_model():
    ema = EMAManager(_cfg(), _mlp())
    other = EMAManager(_cfg(), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="tracked tensors differ"):
        ema.load_state_dict(other.state_dict())


def test_lora_tracks_adapters_only(tiny_model):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    ema = EMAManager(_cfg(), model)
    names = ema.tracked_names()
    assert names and all("lora_" in n for n in names)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ema.num_tracked_elements() == trainable < sum(p.numel() for p in model.parameters()) // 10


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = _mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = EMAManager(_cfg(decay=0.5), ddp)
        assert ema.tracked_names() == [n for n, _ in model.named_parameters()]
        with torch.no_grad():
            model[0].weight.add_(2.0)
        ema.update()
        torch.testing.assert_close(ema.shadow["0.weight"], model[0].weight.detach() - 1.0)
    finally:
        dist.destroy_process_group()


def test_dtensor_shards_are_averaged_locally(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        lin = nn.Linear(4, 4)
        lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
        ema = EMAManager(_cfg(decay=0.5), lin)
        assert type(ema.shadow["weight"]) is torch.Tensor  # a plain local shard, not a DTensor
        with torch.no_grad():
            lin.weight.add_(1.0)
        trained = lin.weight.to_local().detach().clone()
        ema.update()
        torch.testing.assert_close(ema.shadow["weight"], trained - 0.5)
        with ema.applied():
            assert torch.equal(lin.weight.to_local(), ema.shadow["weight"])
        assert torch.equal(lin.weight.to_local(), trained)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kw,msg", [
    (dict(decay=1.5), r"ema.decay must be in \(0, 1\), got 1.5"),
    (dict(decay=0.0), r"ema.decay must be in \(0, 1\), got 0.0"),
    (dict(update_every=0), "ema.update_every must be >= 1, got 0"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        EMAManager(_cfg(**kw), _mlp())


def test_nothing_trainable_is_an_error():
    model = _mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        EMAManager(_cfg(), model)

"""hf_optcore's fused LoRA forward: peft's losses and gradients, peft's files, fewer saved bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.autograd.graph import saved_tensors_hooks

from hf_optcore.config import HardwareConfig, LoRAConfig, ModelConfig, TrainingConfig
from hf_optcore.model_manager import ModelManager
from hf_optcore.model_manager.lora_fused import fuse_lora_layers, is_fused, unfuse_lora_layers
from hf_optcore.tiny import build_tiny_model

VOCAB = 260


def _pair(arch="llama", seed=0, **lora):
    """(peft's model, the same model with fused layers), identical weights; B initialised non-zero."""
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    if arch == "gpt2":
        lora["fan_in_fan_out"] = True
    plain = get_peft_model(build_tiny_model(arch, seed=seed), LoraConfig(**lora))
    fused = copy.deepcopy(plain)
    assert fuse_lora_layers(fused) > 0
    return plain.train(), fused.train()


def _step(model, ids, seed=7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout draws in both models
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ids(seed=0, b=3, t=10):
    return torch.randint(0, VOCAB - 4, (b, t), generator=torch.Generator().manual_seed(seed))


def _assert_equal_step(plain, fused, ids, rel=2e-6):
    # Gradients differ from peft's only in float32 summation order: about 1e-6 of the largest gradient, the
    # same size as peft's own distance from a float64 computation (test_fused_is_as_accurate_as_peft).
    (l_p, g_p), (l_f, g_f) = _step(plain, ids), _step(fused, ids)
    assert torch.equal(l_p, l_f), (l_p.item(), l_f.item())  # the forward is peft's, bit for bit
    assert g_p.keys() == g_f.keys() and g_p
    for name, g in g_p.items():
        err = (g_f[name] - g).abs().max().item()
        assert err <= rel * g.abs().max().item() + 1e-12, f"{name}: {err}"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_fused_lora_equals_peft(arch, dropout):
    plain, fused = _pair(arch, lora_dropout=dropout)
    _assert_equal_step(plain, fused, _ids())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_is_as_accurate_as_peft(dropout):
    plain, fused = _pair("qwen2", lora_dropout=dropout)
    exact = copy.deepcopy(plain).double()
    ids = _ids(8)
    (_, g_p), (_, g_f), (_, g_64) = _step(plain, ids), _step(fused, ids), _step(exact, ids)
    for name, g in g_64.items():
        scale = g.abs().max().item()
        err_fused = (g_f[name].double() - g).abs().max().item() / scale
        err_peft = (g_p[name].double() - g).abs().max().item() / scale
        assert err_fused <= 1.5 * err_peft + 1e-6, (name, err_fused, err_peft)


def test_trainable_bias_and_non_power_of_two_scaling():
    plain, fused = _pair("qwen2", lora_alpha=5, bias="all")  # qwen2's q/k/v carry biases
    assert any(n.endswith("base_layer.bias") and p.requires_grad for n, p in fused.named_parameters())
    _assert_equal_step(plain, fused, _ids(1))


def test_eval_mode_and_disabled_adapters_match_peft():
    plain, fused = _pair(lora_dropout=0.3)
    ids = _ids(2)
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, fused(input_ids=ids).logits)
        with fused.disable_adapter():
            base_out = fused(input_ids=ids).logits
        with plain.disable_adapter():
            assert torch.equal(plain(input_ids=ids).logits, base_out)


def test_dora_falls_back_to_peft_exactly():
    plain, fused = _pair(use_dora=True)
    (l_p, g_p), (l_f, g_f) = _step(plain, _ids(3)), _step(fused, _ids(3))
    assert torch.equal(l_p, l_f)
    assert all(torch.equal(g_p[n], g_f[n]) for n in g_p)  # peft's own path: bitwise the same


def test_fused_saves_no_more_bytes_than_peft_and_much_less_with_dropout():
    def saved_bytes(model, ids):
        seen = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(seen.values())

    ids = _ids(4, b=4, t=64)
    plain, fused = _pair(lora_dropout=0.0)
    assert saved_bytes(fused, ids) <= saved_bytes(plain, ids)
    plain, fused = _pair(lora_dropout=0.1)
    # peft keeps the float32 dropout noise and the dropped input per layer; fused keeps a bool mask.
    assert saved_bytes(fused, ids) < 0.8 * saved_bytes(plain, ids)


def test_unfuse_restores_peft_forward():
    _, fused = _pair()
    n = sum(is_fused(m) for m in fused.modules())
    assert unfuse_lora_layers(fused) == n and not any(is_fused(m) for m in fused.modules())


def _manager(**lora):
    return ModelManager(ModelConfig(name_or_path="tiny:llama", lora=LoRAConfig(**{"r": 4, **lora})),
                        HardwareConfig(use_cpu=True), TrainingConfig(seed=3))


def test_model_manager_fuses_and_adapters_stay_plain_peft_files(tmp_path):
    mm = _manager(dropout=0.0)
    model = mm.load_model()
    layers = [m for m in model.modules() if is_fused(m)]
    assert len(layers) == len(mm.lora_report.module_names)
    ids = _ids(5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # move B away from zero so the adapter changes the output
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    base = build_tiny_model("llama", seed=3)  # ModelManager seeds tiny models with training.seed
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert not any(is_fused(m) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours, rtol=0, atol=1e-6)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_checkpointed_lora_without_input_require_grads_gives_the_same_gradients():
    plain = _manager(dropout=0.0).load_model()
    mm = ModelManager(ModelConfig(name_or_path="tiny:llama", gradient_checkpointing=True,
                                  lora=LoRAConfig(r=4, dropout=0.0)), HardwareConfig(use_cpu=True), TrainingConfig(seed=3))
    ckpt = mm.load_model()
    # Non-reentrant checkpointing needs no grad on the embeddings' output: the hook is not installed.
    assert not getattr(ckpt.get_base_model(), "_require_grads_hook", None)
    with torch.no_grad():
        for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
            q.copy_(p + 0.01 * torch.randn_like(p) if "lora_B" in n else p)
            p.copy_(q)
    ids = _ids(6)
    (l_a, g_a), (l_b, g_b) = _step(plain.train(), ids), _step(ckpt.train(), ids)
    assert torch.allclose(l_a, l_b, rtol=1e-6)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-5, atol=1e-7)


_FRAGMENT = """
import sys, torch
from pathlib import Path
def rss_mib():
    line = [x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS")][0]
    return int(line.split()[1]) >> 10
if sys.argv[1] == "fixed":
    from hf_optcore.model_manager.cpu_memory import set_malloc_mmap_threshold
    assert set_malloc_mmap_threshold()
t = torch.ones(4 << 20); del t  # a 16 MiB tensor freed: glibc's dynamic threshold rises to 16 MiB
base = rss_mib()
big, pins = [], []
for _ in range(40):
    big.append(torch.ones(2 << 20))  # 8 MiB, like an activation
    pins.append(torch.ones(16 << 10))  # a small tensor that outlives it (a LoRA gradient, an x @ A^T)
del big
print(rss_mib() - base)
"""


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_fixed_mmap_threshold_returns_freed_activations_to_the_os():
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    kept = {mode: int(subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True,
                                     check=True).stdout.split()[-1]) for mode in ("default", "fixed")}
    assert kept["default"] > 200  # 320 MiB freed but held in a fragmented heap
    assert kept["fixed"] < 20

"""The logits-free causal-LM loss equals each model's own loss and gradients, and never holds [tokens, vocab]."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_optcore.evaluator import token_statistics
from hf_optcore.loss import (
    VERIFIED_MODEL_TYPES,
    causal_lm_loss,
    chunked_linear_cross_entropy,
    output_head_bypassed,
    supports_logits_free,
)
from hf_optcore.tiny import build_tiny_model, tiny_config

VOCAB = 260
CHUNK = 7  # several chunks and a partial last one on every batch below


def _batch(seed: int = 0, b: int = 3, t: int = 12, prompt: int = 4, pad: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 4, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    labels = ids.clone()
    labels[:, :prompt] = -100  # completion-only: prompt tokens take no loss
    if pad:
        mask[-1, -3:] = 0  # right padding on the last row
        labels[-1, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _model(arch: str, **overrides):
    model = build_tiny_model(arch, seed=0, **overrides)
    return model.train()  # with its dropout: each forward below starts from the same seed


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _reference(model, inputs, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    loss = model(**inputs, **kw).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _ours(model, inputs, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    loss, _ = causal_lm_loss(model, inputs, chunk_size=CHUNK, **kw)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same(ref, ours, rel=1e-5):
    (l_ref, g_ref), (l_ours, g_ours) = ref, ours
    assert torch.isfinite(l_ref)
    assert abs(l_ours.item() - l_ref.item()) <= rel * abs(l_ref.item()), (l_ours.item(), l_ref.item())
    assert g_ref.keys() == g_ours.keys()
    for name, g in g_ref.items():
        err = (g_ours[name] - g).abs().max().item()
        assert err <= rel * g.abs().max().item() + 1e-9, f"{name}: max abs error {err}"


@pytest.mark.parametrize("arch", sorted(VERIFIED_MODEL_TYPES))
def test_loss_and_gradients_equal_the_models_own(arch):
    model = _model(arch)
    assert supports_logits_free(model)[0]
    inputs = _batch()
    _assert_same(_reference(model, inputs), _ours(model, inputs))


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_heads(tied):
    model = _model("llama", tie_word_embeddings=tied)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is emb.weight) == tied
    inputs = _batch(1)
    _assert_same(_reference(model, inputs), _ours(model, inputs))


def test_packed_rows_with_position_ids():
    model = _model("llama")
    ids = torch.randint(0, VOCAB - 4, (2, 16), generator=torch.Generator().manual_seed(3))
    # Row 0 packs sequences of 5, 7 and 4 tokens; row 1 packs 10 and 6. Each sequence's first label is -100.
    position_ids = torch.tensor([list(range(5)) + list(range(7)) + list(range(4)),
                                 list(range(10)) + list(range(6))])
    labels = ids.clone()
    labels[position_ids == 0] = -100
    # use_cache=False as the packing collator sends it: only without a cache does transformers derive the
    # block-diagonal mask from position_ids.
    inputs = {"input_ids": ids, "position_ids": position_ids, "labels": labels, "use_cache": False}
    _assert_same(_reference(model, inputs), _ours(model, inputs))


def test_collator_shift_labels_are_used_as_given():
    model = _model("qwen2")
    inputs = _batch(2)
    shift = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
    ref = _reference(model, inputs)
    ours = _ours(model, {**inputs, "labels": torch.full_like(shift, -100), "shift_labels": shift})
    _assert_same(ref, ours)


@pytest.mark.parametrize("num_items", [50, torch.tensor(50)])
def test_num_items_in_batch_normalises_the_sum(num_items):
    model = _model("llama")
    inputs = _batch(4)
    ref = _reference(model, inputs, num_items_in_batch=num_items)
    _assert_same(ref, _ours(model, inputs, num_items_in_batch=num_items))
    assert abs(ref[0].item() - _reference(model, inputs)[0].item()) > 1e-3  # the sum really was divided by 50


@pytest.mark.parametrize("num_items", [None, 40])
def test_label_smoothing_matches_label_smoother(num_items):
    from transformers.trainer_pt_utils import LabelSmoother

    model = _model("gpt2")
    inputs = _batch(5)
    smoother = LabelSmoother(epsilon=0.1)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    ref_loss = smoother(model(**no_labels), inputs["labels"], shift_labels=True, num_items_in_batch=num_items)
    ref_loss.backward()
    ref = (ref_loss.detach(), _grads(model))
    _assert_same(ref, _ours(model, inputs, label_smoothing=0.1, num_items_in_batch=num_items))


def test_lora_on_the_head_and_fused_lora_layers():
    from peft import LoraConfig, get_peft_model

    from hf_optcore.model_manager.lora_fused import fuse_lora_layers

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                       init_lora_weights=False))
    assert supports_logits_free(model)[0]
    inputs = _batch(6)
    ref = _reference(model, inputs)
    assert any("lm_head.lora_A" in n for n in ref[1])
    _assert_same(ref, _ours(model, inputs))
    assert fuse_lora_layers(model) == 3  # two q_proj and lm_head; the head's forward is swapped and restored around a fused forward
    _assert_same(ref, _ours(model, inputs))
    assert "forward" in model.base_model.model.lm_head.__dict__


def test_all_labels_ignored_gives_the_models_nan_and_zero_gradients_with_num_items():
    model = _model("llama")
    inputs = _batch(7)
    inputs["labels"][:] = -100
    loss, _ = causal_lm_loss(model, inputs)
    assert torch.isnan(loss) and torch.isnan(model(**inputs).loss)
    loss, _ = causal_lm_loss(model, inputs, num_items_in_batch=8)
    loss.backward()
    assert loss.item() == 0.0 and model.lm_head.weight.grad is not None


def test_stats_equal_the_evaluators_full_logits_statistics():
    model = _model("llama").eval()
    inputs = _batch(8)
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        ref_stats, ref_preds = token_statistics(logits, inputs["labels"])
        loss, stats = causal_lm_loss(model, inputs, chunk_size=CHUNK, return_predictions=True)
    torch.testing.assert_close(stats.per_example, ref_stats, rtol=1e-6, atol=1e-6)
    assert torch.equal(stats.predictions, ref_preds)
    assert torch.equal(stats.targets, inputs["labels"][:, 1:])
    assert abs(loss.item() - (stats.nll_sum / stats.num_tokens).item()) < 1e-6
    assert stats.num_correct.item() == ((ref_preds == inputs["labels"][:, 1:]) & (ref_preds != -100)).sum().item()


def test_stats_in_training_are_recorded_once_and_kept_after_backward():
    model = _model("llama")
    inputs = _batch(9)
    loss, stats = causal_lm_loss(model, inputs, chunk_size=CHUNK, return_stats=True)
    before = stats.per_example.clone()
    loss.backward()
    assert torch.equal(stats.per_example, before)
    assert stats.num_tokens.item() == (inputs["labels"][:, 1:] != -100).sum().item()


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns whose last dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_larger_than_a_chunk_of_logits_in_forward_or_backward():
    vocab, chunk = 1000, 32
    model = build_tiny_model("llama", seed=0, vocab_size=vocab)
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    with _LargestTensor(vocab) as ours:
        loss, _ = causal_lm_loss(model, inputs, chunk_size=chunk)
        loss.backward()
    with _LargestTensor(vocab) as hf:
        model(**inputs).loss.backward()
    assert hf.largest >= 4 * 64 * vocab  # the model's own loss holds [B, T, V]
    assert ours.largest <= chunk * vocab


def test_prompt_tokens_never_reach_the_head():
    model = _model("llama")
    inputs = _batch(10, b=2, t=40, prompt=30, pad=False)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    causal_lm_loss(model, inputs, chunk_size=1024)
    hook.remove()
    # The bypassed call inside the model's forward sees [B, T, H]; the one real head call sees the 2 x 10 label
    # tokens (positions 29..38 predict the completion tokens 30..39).
    assert seen == [(2, 40, 16), (20, 16)]


def test_output_head_bypass_restores_the_head_even_on_error():
    model = _model("llama")
    own = model.lm_head.__dict__.get("forward")
    assert own is None
    with pytest.raises(RuntimeError):
        with output_head_bypassed(model) as head:
            x = torch.randn(2, 16)
            assert head(x) is x
            raise RuntimeError("boom")
    assert "forward" not in model.lm_head.__dict__
    x = torch.randn(2, 16)
    assert model.lm_head(x).shape == (2, VOCAB)


def test_chunked_cross_entropy_alone_matches_torch():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(3, 11, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (3, 11), generator=g)
    targets[0, :5] = -100
    ref = torch.nn.functional.cross_entropy(head(hidden).reshape(-1, 50), targets.reshape(-1), reduction="sum")
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight, head.bias])
    ours, _ = chunked_linear_cross_entropy(hidden, head, targets, chunk_size=4)
    grads = torch.autograd.grad(ours, [hidden, head.weight, head.bias])
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_supports_logits_free_says_why_not():
    import transformers

    from hf_optcore.wrapping import base_model

    ok, why = supports_logits_free(_model("llama"))
    assert ok, why
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0))
    ok, why = supports_logits_free(gemma2)
    assert not ok and ("gemma2" in why or "softcapping" in why)
    llama = _model("llama")
    llama.config.logit_scale = 0.5
    ok, why = supports_logits_free(llama)
    assert not ok and "logit_scale" in why
    assert base_model(llama) is llama
    assert not supports_logits_free(torch.nn.Linear(2, 2))[0]
    assert tiny_config("llama").model_type in VERIFIED_MODEL_TYPES


@pytest.mark.parametrize("find_unused", [True, False])
def test_under_ddp_with_an_untied_trainable_head(tmp_path, find_unused):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = _model("llama", tie_word_embeddings=False)
        inputs = _batch(11)
        ref = _reference(model, inputs)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
        for _ in range(2):  # a second step: DDP raises there when the first left a parameter marked twice
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1234)
            loss, _ = causal_lm_loss(ddp, inputs, chunk_size=CHUNK)
            loss.backward()
            _assert_same(ref, (loss.detach(), _grads(model)))
    finally:
        dist.destroy_process_group()


def test_bfloat16_model_matches_its_own_float32_upcast_loss():
    model = _model("llama").to(torch.bfloat16)
    inputs = _batch(12)
    (l_ref, g_ref), (l_ours, g_ours) = _reference(model, inputs), _ours(model, inputs)
    assert l_ref.dtype == l_ours.dtype == torch.float32
    assert abs(l_ours.item() - l_ref.item()) <= 1e-5 * abs(l_ref.item())  # the same bf16 logits, upcast alike
    for name, g in g_ref.items():
        assert g_ours[name].dtype == torch.bfloat16
        assert (g_ours[name].float() - g.float()).abs().max() <= 2e-2 * g.float().abs().max(), name


def test_a_second_backward_through_the_loss_is_refused():
    model = _model("llama")
    loss, _ = causal_lm_loss(model, _batch(13), chunk_size=CHUNK)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()

"""ModelManager loading: sources, fail-fast errors, tokenizer fix-ups, dtype/attention, LoRA + checkpointing."""

import os
import time

import pytest
import torch

from hf_optcore.config import HardwareConfig, LoRAConfig, ModelConfig, TrainerConfig, TrainingConfig
from hf_optcore.errors import ModelLoadError
from hf_optcore.model_manager import LoRATargetError, ModelManager, loading
from hf_optcore.tiny import build_tiny_model, build_tiny_tokenizer


def _mm(**model_kw):
    lora = model_kw.pop("lora", {})
    return ModelManager(ModelConfig(lora=LoRAConfig(**lora), **model_kw), HardwareConfig(use_cpu=True), TrainingConfig())


def _saved_tiny(tmp_path, tokenizer):
    folder = tmp_path / "local_model"
    build_tiny_model("llama", seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- sources and fail-fast errors -----------------------------------------------------------


def test_tiny_source_is_seeded_and_lora_wrapped():
    a, b = _mm(name_or_path="tiny:qwen2"), _mm(name_or_path="tiny:qwen2")
    ma, mb = a.load_model(), b.load_model()
    assert type(ma).__name__ == "PeftModelForCausalLM"
    for (na, pa), (nb, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert a.load_tokenizer().pad_token == "<|pad|>"


@pytest.mark.parametrize(
    "name, message",
    [
        ("/no/such/folder", r"'/no/such/folder' is not an existing folder or file"),
        ("nobody-here/not-a-model-xyz", r"Hub model 'nobody-here/not-a-model-xyz' is not in the local Hugging Face cache "
                                        r"and HF_HUB_OFFLINE is set"),
        ("tiny:transformerxl", r"unknown tiny architecture 'transformerxl'.*valid: .*tiny:llama"),
        ("bundled:gpt5", r"unknown bundled model 'bundled:gpt5'; valid: bundled:smollm2-135m-instruct"),
        ("missing.gguf", r"GGUF file 'missing.gguf' does not exist"),
    ],
)
def test_unknown_sources_fail_before_anything_loads(name, message, monkeypatch):
    monkeypatch.setattr(loading, "_hub_offline", lambda: True)
    calls = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: calls.append(a))
    mm = _mm(name_or_path=name)
    with pytest.raises(ModelLoadError, match=message):
        mm.load_tokenizer()
    with pytest.raises(ModelLoadError, match=r"model.name_or_path"):
        mm.load_model()
    assert calls == []


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match=r"has no config.json, so it is not a saved model"):
        _mm(name_or_path=str(tmp_path)).load_model()


def test_local_folder_with_chat_template_override(tmp_path):
    folder = _saved_tiny(tmp_path, build_tiny_tokenizer())
    mm = _mm(name_or_path=str(folder), chat_template="{{ messages[0]['content'] }}!", lora={"enabled": False})
    tok = mm.load_tokenizer()
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi!"
    model = mm.load_model()
    assert torch.equal(model.model.embed_tokens.weight, build_tiny_model("llama", seed=3).model.embed_tokens.weight)


def test_missing_chat_template_is_a_clear_error(tmp_path):
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    mm = _mm(name_or_path=str(_saved_tiny(tmp_path, tok)))
    mm.load_tokenizer()
    with pytest.raises(ModelLoadError, match=r"data.format=chat: the tokenizer of .* has no chat template"):
        mm.require_chat_template()


# ---- tokenizer fix-ups ----------------------------------------------------------------------


def test_missing_pad_reuses_eos_without_resizing(tmp_path):
    folder = _saved_tiny(tmp_path, build_tiny_tokenizer(pad_token=False))
    mm = _mm(name_or_path=str(folder), lora={"enabled": False})
    tok = mm.load_tokenizer()
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and mm.added_tokens == []
    assert mm.load_model().get_input_embeddings().weight.shape[0] == 260


def _tokenizer_without_pad_or_eos(vocab_has_pad: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    if vocab_has_pad:
        vocab["<|pad|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=None)


@pytest.mark.parametrize("vocab_has_pad", [True, False])
def test_missing_pad_and_eos_adds_a_token_and_mean_initialised_rows(tmp_path, vocab_has_pad):
    folder = tmp_path / "m"
    model0 = build_tiny_model("gpt2", seed=1, vocab_size=257 if vocab_has_pad else 256)
    model0.save_pretrained(folder)
    _tokenizer_without_pad_or_eos(vocab_has_pad).save_pretrained(folder)
    mm = _mm(name_or_path=str(folder), lora={"enabled": False})
    tok = mm.load_tokenizer()
    assert tok.pad_token == "<|pad|>" and len(tok) == 257
    model = mm.load_model()
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 257
    if vocab_has_pad:  # the token existed: nothing added, nothing resized
        assert mm.added_tokens == []
        torch.testing.assert_close(emb, model0.get_input_embeddings().weight)
    else:
        assert mm.added_tokens == ["<|pad|>"]
        torch.testing.assert_close(emb[256], model0.get_input_embeddings().weight.mean(0))
        torch.testing.assert_close(emb[:256], model0.get_input_embeddings().weight)
        assert model.get_output_embeddings().weight.shape[0] == 257


def test_resize_sets_untied_head_rows_to_mean():
    model = build_tiny_model("llama", seed=0, tie_word_embeddings=False)
    head0 = model.get_output_embeddings().weight.detach().clone()
    ModelManager.resize_embeddings(model, 262)
    head = model.get_output_embeddings().weight
    assert head.shape[0] == 262 and head.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(head[260:], head0.mean(0, keepdim=True).expand(2, -1))


# ---- dtype, attention, switches -------------------------------------------------------------


def test_dtype_and_attention_are_applied():
    model = _mm(name_or_path="tiny:llama", dtype="bfloat16", attn_implementation="eager",
                lora={"enabled": False}).load_model()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert _mm(name_or_path="tiny:llama").torch_dtype() == torch.float32  # auto on CPU


def test_unavailable_kernels_and_qlora_fail_with_clear_errors(monkeypatch):
    import transformers.utils as tu

    monkeypatch.setattr(tu, "is_flash_attn_2_available", lambda: False)
    monkeypatch.setattr(tu, "is_liger_kernel_available", lambda: False)
    with pytest.raises(ModelLoadError, match=r"'flash_attention_2' needs the flash-attn package"):
        _mm(name_or_path="tiny:llama", attn_implementation="flash_attention_2").load_model()
    mm = ModelManager(ModelConfig(name_or_path="tiny:llama"), HardwareConfig(use_liger_kernel=True))
    with pytest.raises(ModelLoadError, match=r"hardware.use_liger_kernel: true, but liger-kernel is not installed"):
        mm.load_model()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match=r"QLoRA needs a CUDA GPU and the bitsandbytes package; CUDA available: False"):
        _mm(name_or_path="tiny:llama", lora={"load_in_4bit": True}).load_model()


def test_dora_rslora_modules_to_save_reach_peft():
    model = _mm(name_or_path="tiny:llama", lora={"use_dora": True, "use_rslora": True, "r": 4,
                                                   "modules_to_save": ["lm_head"]}).load_model()
    cfg = model.peft_config["default"]
    assert cfg.use_dora and cfg.use_rslora and cfg.r == 4 and "lm_head" in cfg.modules_to_save
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in names)
    assert any("lm_head.modules_to_save" in n for n in names)
    with pytest.raises(LoRATargetError, match=r"model.lora.modules_to_save: 'score' matches no module"):
        _mm(name_or_path="tiny:llama", lora={"modules_to_save": ["score"]}).load_model()


def test_lora_with_gradient_checkpointing_trains(tiny_tokenizer):
    cfg = TrainerConfig.from_dict({"model": {"name_or_path": "tiny:llama", "gradient_checkpointing": True,
                                             "lora": {"r": 4, "dropout": 0.0}}})
    mm = ModelManager(cfg.model, cfg.hardware, cfg.training)
    tok = mm.load_tokenizer()
    model = mm.load_model()
    assert model.get_base_model().is_activation_checkpointing
    assert model.get_base_model().config.use_cache is False
    base_before = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tok(["the jargon file, version 4"] * 4, return_tensors="pt")["input_ids"]
    losses = []
    for _ in range(25):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert torch.equal(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, base_before)


# ---- GGUF -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_gguf_converts_once_into_a_trainable_cache(tmp_path, monkeypatch):
    stale = tmp_path / ".smollm2-135m-instruct.tmp-1-dead"  # a killed conversion's leftovers
    stale.mkdir(parents=True)
    mm = _mm(name_or_path="bundled:smollm2-135m-instruct", cache_dir=str(tmp_path), lora={"r": 4})
    tok = mm.load_tokenizer()
    final = tmp_path / "smollm2-135m-instruct"
    assert (final / "hf_optcore_conversion.json").is_file() and (final / "model.safetensors").is_file()
    assert tok.pad_token is not None and tok.chat_template
    model = mm.load_model()
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
    assert len(mm.lora_report.module_names) == 7 * model.get_base_model().config.num_hidden_layers
    x = tok("Hello, how are you today? The hacker's dictionary.", return_tensors="pt")["input_ids"]
    loss = model(input_ids=x, labels=x).loss
    assert torch.isfinite(loss) and loss.item() < 15
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # Second manager: the cache is used, the GGUF loader is never called again.
    stamp = os.stat(final / "model.safetensors").st_mtime_ns
    real = __import__("transformers").AutoModelForCausalLM.from_pretrained

    def no_gguf(*a, **k):
        assert "gguf_file" not in k, "GGUF converted twice"
        return real(*a, **k)

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_gguf)
    t = time.perf_counter()
    _mm(name_or_path="bundled:smollm2-135m-instruct", cache_dir=str(tmp_path), lora={"enabled": False}).load_model()
    assert os.stat(final / "model.safetensors").st_mtime_ns == stamp
    assert time.perf_counter() - t < 60

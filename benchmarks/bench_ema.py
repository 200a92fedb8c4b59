"""EMA update cost: hf_optcore's EMAManager against torch.optim.swa_utils.AveragedModel, side by side.

    python benchmarks/bench_ema.py            # full settings
    python benchmarks/bench_ema.py --quick    # small settings (shared CPU)

Three cases, each timed in one process with the two implementations interleaved (A, B, A, B, ...)
and the median per-update time reported:

- ``lora_model``: the demo recipe's model (SmolLM2-135M architecture, random weights, LoRA r=16 on
  the auto targets). EMAManager averages the trainable adapters, the only weights that change;
  AveragedModel(get_ema_multi_avg_fn) averages what it is given, the whole model.
- ``lora_same_tensors``: both average exactly the adapter tensors (AveragedModel over a
  ParameterList holding them): the per-call overhead on many small tensors.
- ``full_same_tensors``: full fine-tuning, both average every weight of a smaller Llama.

Then EMA's share of a training step on the demo recipe: one LoRA forward/backward/AdamW step on a
batch of the recipe's size, against one EMA update. Results go to benchmarks/results/bench_ema.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hf_optcore.config import EMAConfig  # noqa: E402
from hf_optcore.ema_manager import EMAManager  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DECAY = 0.999


def _smollm2_like(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _lora(model):
    import peft

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))


def _nudge(params):
    with torch.no_grad():
        torch._foreach_add_(params, 1e-4)


def _time_pair(fn_a, fn_b, nudge, reps: int, inner: int) -> tuple[float, float]:
    """Median seconds per call of fn_a and fn_b, interleaved so both see the same machine load."""
    for _ in range(2):
        fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(reps):
        nudge()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn_a()
        ta.append((time.perf_counter() - t0) / inner)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn_b()
        tb.append((time.perf_counter() - t0) / inner)
    return statistics.median(ta), statistics.median(tb)


def _compare(ours_model: nn.Module, theirs_model: nn.Module, reps: int, inner: int) -> dict:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = EMAManager(EMAConfig(enabled=True, decay=DECAY), ours_model)
    averaged = AveragedModel(theirs_model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    averaged.update_parameters(theirs_model)  # the first call only copies
    trainable = [p for p in ours_model.parameters() if p.requires_grad]
    ours, theirs = _time_pair(ema.update, lambda: averaged.update_parameters(theirs_model),
                              lambda: _nudge(trainable), reps, inner)
    return {
        "ours_ms": ours * 1e3, "averaged_model_ms": theirs * 1e3, "ratio": ours / theirs,
        "ours_tensors": len(ema.shadow), "ours_elements": ema.num_tracked_elements(),
        "averaged_model_elements": sum(p.numel() for p in averaged.module.parameters()),
    }


def _step_share(model, batch: int, seq: int, reps: int) -> dict:
    """One LoRA training step (forward, backward, AdamW) against one EMA update on the same model."""
    ema = EMAManager(EMAConfig(enabled=True, decay=0.95, warmup=True), model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.train()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    steps, updates = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ema.update()
        updates.append(time.perf_counter() - t0)
    s, u = statistics.median(steps), statistics.median(updates)
    return {"step_ms": s * 1e3, "ema_update_ms": u * 1e3, "ema_share": u / (s + u), "batch": batch, "seq": seq}


def run(quick: bool = False) -> dict:
    """Measure every case; ``quick`` uses fewer layers and repetitions (for a shared CPU)."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    layers = 30  # SmolLM2-135M's depth: the same tensor count as the demo
    reps, inner = (7, 5) if quick else (21, 10)
    out: dict = {"quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(), "decay": DECAY}

    model = _lora(_smollm2_like(layers))
    out["lora_model"] = _compare(model, model, reps, inner)
    adapters = nn.ParameterList([p for p in model.parameters() if p.requires_grad])
    # Cheap per call, so many repetitions: the median must stand above the shared machine's noise.
    out["lora_same_tensors"] = _compare(adapters, adapters, 3 * reps, 2 * inner)

    full = _smollm2_like(4 if quick else 8)
    out["full_same_tensors"] = _compare(full, full, max(3, reps // 3), 2)
    del full

    # Shorter sequences than the recipe's make the step cheaper, so the share measured is an upper bound.
    out["step_share"] = _step_share(model, batch=8, seq=64 if quick else 128, reps=2 if quick else 5)
    out["targets"] = {"ratio_at_most": 0.6, "ema_share_at_most": 0.03}
    return out


def _markdown(r: dict) -> str:
    lines = [
        "# EMA update: EMAManager vs torch.optim.swa_utils.AveragedModel(get_ema_multi_avg_fn)",
        "",
        f"torch {r['torch']}, {r['threads']} CPU thread(s), decay {r['decay']}, "
        f"{'quick (small) settings on a shared CPU' if r['quick'] else 'full settings'}; median per update.",
        "",
        "| case | EMAManager ms | AveragedModel ms | ratio | elements averaged (ours / AveragedModel) |",
        "|---|---|---|---|---|",
    ]
    for case in ("lora_model", "lora_same_tensors", "full_same_tensors"):
        c = r[case]
        lines.append(f"| {case} | {c['ours_ms']:.3f} | {c['averaged_model_ms']:.3f} | {c['ratio']:.2f}x | "
                     f"{c['ours_elements']:,} / {c['averaged_model_elements']:,} |")
    s = r["step_share"]
    lines += ["", f"EMA share of a demo-recipe LoRA training step (batch {s['batch']} x {s['seq']} tokens): "
              f"step {s['step_ms']:.1f} ms, EMA update {s['ema_update_ms']:.3f} ms, "
              f"share {100 * s['ema_share']:.3f}%."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (shared CPU)")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_ema.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bench_ema.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()

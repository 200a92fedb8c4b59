"""Optimizer step time on a ~21M-parameter Llama: every available registered optimizer, and AdamW kernels.

    python benchmarks/bench_optimizers.py            # full settings (20 timed steps each)
    python benchmarks/bench_optimizers.py --quick    # small settings (shared CPU)

The model (hidden 512, 4 layers, vocab 8192, untied head: 21.0M parameters) is built from a
LlamaConfig with random weights and given fixed random gradients once, so only ``optimizer.step()``
is timed. Every optimizer is built by :class:`~hf_optcore.optimizer_manager.OptimizerManager` from
the registry exactly as a run would build it (parameter groups with weight decay 0.01), warmed up,
then timed over interleaved rounds (each round steps every optimizer once, so a load spike on the
shared CPU hits all of them alike); the median per-step time is reported with its ratio to AdamW
(foreach, the CPU default). AdamW is also timed with each kernel: fused, foreach, for-loop.
Results go to benchmarks/results/bench_optimizers.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hf_optcore.config import HardwareConfig, TrainingConfig  # noqa: E402
from hf_optcore.optim import list_optimizers  # noqa: E402
from hf_optcore.optimizer_manager import OptimizerManager  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BASELINE = "adamw (foreach)"


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def _cases() -> list[tuple[str, str, str]]:
    """(label, registry name, fused_optimizer) for every optimizer that can be built here."""
    cases = [(f"adamw ({k})", "adamw", k) for k in ("fused", "foreach", "for-loop")]
    for name in list_optimizers(include_aliases=False, available_only=True):
        if name != "adamw":  # timed above, once per kernel
            cases.append((name, name, "auto"))
    return cases


def run(quick: bool = False) -> dict:
    """Time every case; returns ``{"settings": ..., "results": [{label, ms_per_step, ratio_vs_adamw}]}``."""
    steps, warmup = (5, 2) if quick else (20, 3)
    torch.set_num_threads(1)  # the CPU is shared; one thread keeps the comparison stable
    base = _model()
    n_params = sum(p.numel() for p in base.parameters())
    runs = {}
    for label, name, kernel in _cases():
        model = copy.deepcopy(base)
        for p, q in zip(model.parameters(), base.parameters()):
            p.grad = q.grad.clone()
        t = TrainingConfig(optimizer=name, learning_rate=1e-4, weight_decay=0.01)
        opt = OptimizerManager(t, model, hardware=HardwareConfig(fused_optimizer=kernel)).create_optimizer()
        for _ in range(warmup):
            opt.step()
        runs[label] = (opt, [])
    for _ in range(steps):
        for opt, times in runs.values():
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
    med = {label: statistics.median(times) * 1e3 for label, (_, times) in runs.items()}
    results = [{"label": label, "ms_per_step": round(ms, 2), "ratio_vs_adamw": round(ms / med[BASELINE], 3)}
               for label, ms in med.items()]
    return {
        "benchmark": "bench_optimizers",
        "settings": {"quick": quick, "timed_steps": steps, "warmup_steps": warmup, "threads": 1,
                     "params": n_params, "torch": torch.__version__, "device": "cpu"},
        "baseline": BASELINE,
        "results": results,
    }


def to_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Optimizer step on a {s['params'] / 1e6:.1f}M-parameter Llama, CPU, {s['threads']} thread, "
        f"median of {s['timed_steps']} interleaved steps (shared machine{', quick settings' if s['quick'] else ''}).",
        "",
        f"| optimizer | ms / step | x {report['baseline']} |",
        "|---|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['label']} | {r['ms_per_step']:.1f} | {r['ratio_vs_adamw']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings for a shared CPU")
    args = parser.parse_args(argv)
    report = run(quick=args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_optimizers.json").write_text(json.dumps(report, indent=2) + "\n")
    md = to_markdown(report)
    (RESULTS / "bench_optimizers.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()

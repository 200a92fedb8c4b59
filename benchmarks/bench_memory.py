"""Peak training memory with LoRA and gradient checkpointing on and off: ``python benchmarks/bench_memory.py [--quick]``.

Each of the four settings (full / LoRA x checkpointing off / on) trains one epoch of the same
fixed examples through OptCoreTrainer in a fresh process, so that one setting's allocations
cannot hide another's. Memory is the process's peak resident set during training above its
resident set just before (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), or
``torch.cuda.max_memory_allocated`` on a GPU. Ratios are against full fine-tuning without
checkpointing, measured in the same run.

Presets: ``--quick``: a 4-layer llama (hidden 256) built from config, 32 examples of 256 tokens;
full: the demo model (SmolLM2-135M-Instruct, bundled) on 16 examples of 512 tokens, batch 4
(about 5 GiB resident for full fine-tuning on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SETTINGS = [("full", False), ("full", True), ("lora", False), ("lora", True)]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _child(spec: dict) -> dict:
    """One setting, in this process: build, train one epoch, report memory and time."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from hf_optcore.config import TrainerConfig
    from hf_optcore.model_manager import ModelManager
    from hf_optcore.trainer import OptCoreTrainer

    cfg = TrainerConfig.from_dict({
        "output_dir": spec["out"],
        "model": {"name_or_path": spec["model"], "dtype": "float32", "gradient_checkpointing": spec["checkpointing"],
                  "lora": {"enabled": spec["mode"] == "lora", "r": 16, "alpha": 32, "dropout": 0.0}},
        "training": {"per_device_train_batch_size": spec["batch"], "num_train_epochs": 1, "logging_steps": 1000,
                     "report_to": "none", "learning_rate": 1e-4, "scheduler": "constant"},
        "hardware": {"use_cpu": not torch.cuda.is_available()},
        "checkpoint": {"every_n_steps": 0},
    })
    mgr = ModelManager(cfg.model, cfg.hardware, cfg.training)
    if spec["model"].startswith("tiny:"):
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=256, intermediate_size=688,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=1024))
        if spec["mode"] == "lora":
            model = mgr.apply_lora(model)
    else:
        model = mgr.load_model()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, min(vocab, 256), (spec["examples"], spec["seq_len"]),
                        generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r.clone()} for r in ids]

    def collate(rows):
        x = torch.stack([r["input_ids"] for r in rows])
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}

    trainer = OptCoreTrainer(model=model, args=cfg, train_dataset=data, data_collator=collate)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_ok = _reset_peak()
        before = _rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return {
        "mode": spec["mode"], "checkpointing": spec["checkpointing"], "trainable_params": trainable,
        "steps": trainer.state.global_step, "examples": spec["examples"],
        "peak_bytes": peak, "before_bytes": before, "train_peak_extra_bytes": max(0, peak - before),
        "seconds": round(seconds, 3), "train_loss": out.training_loss,
        "meter": "cuda.max_memory_allocated" if cuda else ("VmHWM after clear_refs" if reset_ok else "VmHWM"),
    }


def run(quick: bool = True) -> dict:
    """Run the four settings side by side (one fresh process each); returns results and ratios."""
    import tempfile

    import torch
    import transformers

    preset = ({"model": "tiny:llama-256", "seq_len": 256, "examples": 32, "batch": 8} if quick else
              {"model": "bundled:smollm2-135m-instruct", "seq_len": 512, "examples": 16, "batch": 4})
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, ckpt in SETTINGS:
            spec = {**preset, "mode": mode, "checkpointing": ckpt, "out": str(Path(tmp) / f"{mode}-{ckpt}")}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                  capture_output=True, text=True, timeout=3600, cwd=REPO)
            if proc.returncode != 0:
                raise RuntimeError(f"bench_memory {mode} checkpointing={ckpt} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]["train_peak_extra_bytes"] or 1
    for r in rows:
        r["peak_extra_vs_full_no_ckpt"] = round(r["train_peak_extra_bytes"] / base, 3)
        r["time_vs_full_no_ckpt"] = round(r["seconds"] / rows[0]["seconds"], 3)
    return {
        "name": "memory",
        "quick": quick,
        "preset": preset,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "note": "one epoch of the same examples per setting, each in a fresh process; shared CPU" if quick else
                "one epoch of the same examples per setting, each in a fresh process",
        "rows": rows,
    }


def to_markdown(res: dict) -> str:
    """A markdown table of :func:`run`'s result."""
    p = res["preset"]
    lines = [f"Peak training memory, {p['model']}, {p['examples']} examples x {p['seq_len']} tokens, batch {p['batch']}"
             f" ({res['device']}; {res['rows'][0]['meter']}). Ratios vs full fine-tuning without checkpointing.", "",
             "| setting | trainable params | peak extra (MiB) | ratio | epoch time (s) | time ratio |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        name = f"{r['mode']}{' + grad ckpt' if r['checkpointing'] else ''}"
        lines.append(f"| {name} | {r['trainable_params']:,} | {r['train_peak_extra_bytes'] / 2**20:.1f} | "
                     f"{r['peak_extra_vs_full_no_ckpt']:.2f} | {r['seconds']:.2f} | {r['time_vs_full_no_ckpt']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, small settings (shared CPU)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return {}
    res = run(quick=a.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_memory.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "bench_memory.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()

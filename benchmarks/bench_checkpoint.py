"""Checkpoint cost side by side: ``python benchmarks/bench_checkpoint.py [--quick]``.

1. Save time of one checkpoint of the same state: ``transformers.Trainer._save_checkpoint``,
   hf_optcore's atomic protocol (fsync + sha256 manifest + rename), and the same without fsync.
2. Launch-to-first-resumed-step at a late step: a fresh process that resumes from step N and
   runs one step, with ``transformers.Trainer`` and with ``OptCoreTrainer`` (sha256 verification
   of the checkpoint included).
Results go to benchmarks/results/bench_checkpoint.{json,md}. The CPU is shared, so settings are small.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import sys, time, json
t0 = float(sys.argv[3])
sys.path.insert(0, {root!r})
import torch; torch.set_num_threads(1)
from transformers import Trainer, TrainerCallback
from tests._checkpoint_helpers import TokenDataset, make_config, random_mask_collator
from hf_optcore.tiny import build_tiny_model
from hf_optcore.trainer import OptCoreTrainer
kind, out = sys.argv[1], sys.argv[2]
class Stop(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        print(json.dumps({{"first_step_s": time.time() - t0}}), flush=True); control.should_training_stop = True
cfg = make_config(out, max_steps={steps} + 5, every=0, ga=1)
model = build_tiny_model("llama", seed=0, hidden_size={hidden}, intermediate_size={hidden} * 2)
ds = TokenDataset({n})
if kind == "hf":
    t = Trainer(model=model, args=cfg.to_training_arguments(save_strategy="no"), train_dataset=ds, data_collator=random_mask_collator)
else:
    t = OptCoreTrainer(model=model, args=cfg, train_dataset=ds, data_collator=random_mask_collator)
t.add_callback(Stop())
t.train(resume_from_checkpoint=sys.argv[4])
"""


def _trainer(kind, out, hidden, n, steps):
    from transformers import Trainer

    from hf_optcore.tiny import build_tiny_model
    from hf_optcore.trainer import OptCoreTrainer
    from tests._checkpoint_helpers import TokenDataset, make_config, random_mask_collator

    cfg = make_config(out, max_steps=steps, every=steps, ga=1)
    model = build_tiny_model("llama", seed=0, hidden_size=hidden, intermediate_size=hidden * 2)
    if kind == "hf":
        args = cfg.to_training_arguments(save_strategy="steps", save_steps=steps)
        return Trainer(model=model, args=args, train_dataset=TokenDataset(n), data_collator=random_mask_collator)
    return OptCoreTrainer(model=model, args=cfg, train_dataset=TokenDataset(n), data_collator=random_mask_collator)


def _time_saves(trainer, repeats, durable=True):
    times = []
    for i in range(repeats):
        trainer.state.global_step = 1000 + i
        if hasattr(trainer, "optcore_checkpointing"):
            trainer.optcore_checkpointing.durable = durable
        t0 = time.perf_counter()
        trainer._save_checkpoint(trainer.model_wrapped, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(quick: bool = True) -> dict:
    """Measure both comparisons; return the results dict (also written to benchmarks/results)."""
    import torch

    torch.set_num_threads(1)
    hidden, n = (64, 64) if quick else (256, 256)
    late = 20 if quick else 100
    repeats = 3 if quick else 7
    tmp = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    res: dict = {"settings": {"hidden_size": hidden, "examples": n, "late_step": late, "repeats": repeats,
                              "note": "shared 2-core CPU, small settings"}}
    try:
        ckpts = {}
        for kind in ("hf", "optcore"):
            out = tmp / kind
            t = _trainer(kind, out, hidden, n, late)
            t.train()
            ckpts[kind] = next(out.glob(f"checkpoint-{late}"))
            res[f"save_s_{kind}"] = _time_saves(t, repeats)
            if kind == "optcore":
                res["save_s_optcore_no_fsync"] = _time_saves(t, repeats, durable=False)
        res["save_ratio_atomic_vs_hf"] = res["save_s_optcore"] / res["save_s_hf"]
        res["save_ratio_atomic_vs_no_fsync"] = res["save_s_optcore"] / res["save_s_optcore_no_fsync"]
        child = CHILD.format(root=str(ROOT), steps=late, hidden=hidden, n=n)
        for kind in ("hf", "optcore"):
            samples = []
            for _ in range(2 if quick else 3):
                out = tmp / f"resume_{kind}"
                shutil.rmtree(out, ignore_errors=True)
                shutil.copytree(ckpts[kind], out / ckpts[kind].name)
                r = subprocess.run([sys.executable, "-c", child, kind, str(out), repr(time.time()),
                                    str(out / ckpts[kind].name)], capture_output=True, text=True, timeout=600,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
                line = [ln for ln in r.stdout.splitlines() if ln.startswith('{"first_step_s"')]
                if not line:
                    raise RuntimeError(f"resume child ({kind}) failed: {r.stderr[-2000:]}")
                samples.append(json.loads(line[0])["first_step_s"])
            res[f"resume_first_step_s_{kind}"] = min(samples)
        res["resume_ratio_optcore_vs_hf"] = res["resume_first_step_s_optcore"] / res["resume_first_step_s_hf"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_checkpoint.json").write_text(json.dumps(res, indent=1))
    md = ["| measurement | transformers.Trainer | hf_optcore | ratio |", "|---|---|---|---|",
          f"| save one checkpoint (s) | {res['save_s_hf']:.3f} | {res['save_s_optcore']:.3f} "
          f"(no fsync {res['save_s_optcore_no_fsync']:.3f}) | {res['save_ratio_atomic_vs_hf']:.2f}x |",
          f"| launch to first resumed step at step {late} (s) | {res['resume_first_step_s_hf']:.2f} | "
          f"{res['resume_first_step_s_optcore']:.2f} | {res['resume_ratio_optcore_vs_hf']:.2f}x |"]
    (out_dir / "bench_checkpoint.md").write_text("\n".join(md) + "\n\n" + res["settings"]["note"] + "\n")
    return res


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))

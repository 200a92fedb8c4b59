"""The GPU checks hf_optcore cannot run on its CPU CI: bf16, fused AdamW, torch.compile, FSDP2.

    python scripts/gpu_check.py                      # on a machine with one CUDA GPU (about 2 minutes)
    python scripts/gpu_check.py --dry-run            # anywhere: print the plan, run nothing on CUDA

Each check trains a tiny llama (``hf_optcore.tiny``, no download) for a few steps and compares
against a float32 / eager / unsharded reference run on the same GPU:

1. ``bf16``: ``hardware.bf16`` through OptCoreTrainer; losses finite and within 0.05 of fp32.
2. ``fused_adamw``: ``hardware.fused_optimizer=fused`` builds AdamW with ``fused=True``; its
   weights after 5 steps match the foreach kernel's within 1e-4.
3. ``torch_compile``: ``hardware.torch_compile`` through OptCoreTrainer; losses within 1e-3 of eager.
4. ``fsdp2_trainer``: ``accelerate launch --config_file recipes/accelerate/fsdp2.yaml
   --num_processes 1`` of ``tests/distributed/train_tiny.py`` with EMA and a checkpoint:
   Accelerate really runs FSDP (sharded DTensor parameters), the run finishes, a checkpoint is
   written, and a resume from it reproduces the last steps' losses.
5. ``fsdp2_raw``: ``tests/distributed/fsdp2_cpu.py`` (torch ``fully_shard``, EMA on the shards,
   DCP checkpoint) launched with torchrun on the GPU machine, full run then resume.
6. ``chunked_loss``: ``hf_optcore.loss.causal_lm_loss`` on CUDA (Liger's fused kernel when
   ``liger-kernel`` is installed, else the chunk loop) equals the model's own loss and gradients.
7. ``memory_bench``: ``benchmarks/bench_memory.py --quick`` on the GPU (``max_memory_allocated``);
   its table is saved beside the results.

Results go to stdout as a table and to ``--out`` (default ``gpu_check.json``); the exit status is
1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEVICE = "cuda"  # --device cpu runs the in-process checks on the CPU (a smoke test of this script)

CHECKS: dict[str, str] = {
    "bf16": "OptCoreTrainer with hardware.bf16=true: losses finite, within 0.05 of an fp32 run",
    "fused_adamw": "hardware.fused_optimizer=fused gives torch AdamW(fused=True); weights match foreach within 1e-4",
    "torch_compile": "hardware.torch_compile=true: losses within 1e-3 of the eager run",
    "fsdp2_trainer": "accelerate launch --config_file recipes/accelerate/fsdp2.yaml (1 GPU): distributed_type FSDP, "
                     "sharded params, EMA + checkpoint + exact resume through OptCoreTrainer",
    "fsdp2_raw": "torch fully_shard on the GPU machine: EMA on shards, DCP checkpoint, exact resume",
    "chunked_loss": "causal_lm_loss on CUDA (Liger when installed) equals the model's loss and gradients",
    "memory_bench": "benchmarks/bench_memory.py --quick on CUDA (max_memory_allocated), table saved",
}


class _Tokens:
    """Fixed-length random tokens (built lazily so --dry-run imports no torch)."""

    def __init__(self, n: int = 64, seq_len: int = 32):
        import torch

        self.ids = torch.randint(0, 256, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _collate(rows):
    import torch

    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _train(out: Path, **overrides) -> list[float]:
    """A few OptCoreTrainer steps on the GPU; returns the per-step losses."""
    from hf_optcore.config import TrainerConfig
    from hf_optcore.tiny import build_tiny_model
    from hf_optcore.trainer import OptCoreTrainer

    raw = {
        "output_dir": str(out),
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"max_steps": 5, "logging_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                     "report_to": "none", "seed": 0, "scheduler": "constant"},
        "hardware": {"use_cpu": DEVICE == "cpu"},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        raw[section][name] = value
    trainer = OptCoreTrainer(model=build_tiny_model("llama", seed=0), args=TrainerConfig.from_dict(raw),
                             train_dataset=_Tokens(), data_collator=_collate)
    trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def check_bf16(tmp: Path) -> str:
    ref = _train(tmp / "fp32")
    bf16 = _train(tmp / "bf16", hardware__bf16=True)
    assert all(math.isfinite(x) for x in bf16), f"non-finite bf16 losses {bf16}"
    gap = max(abs(a - b) for a, b in zip(ref, bf16))
    assert gap < 0.05, f"bf16 losses differ from fp32 by {gap:.4f} (> 0.05): {bf16} vs {ref}"
    return f"max |bf16 - fp32| loss gap {gap:.4f}"


def check_fused_adamw(tmp: Path) -> str:
    import torch

    from hf_optcore.config import TrainerConfig
    from hf_optcore.optimizer_manager import OptimizerManager
    from hf_optcore.tiny import build_tiny_model

    weights = {}
    for kernel in ("fused", "foreach"):
        cfg = TrainerConfig.from_dict({"model": {"lora": {"enabled": False}},
                                       "hardware": {"fused_optimizer": kernel},
                                       "training": {"learning_rate": 1e-3}})
        model = build_tiny_model("llama", seed=0).to(DEVICE)
        opt = OptimizerManager(cfg.training, model, hardware=cfg.hardware).create_optimizer()
        inner = getattr(opt, "optimizer", opt)
        if kernel == "fused":
            assert inner.defaults.get("fused") is True, f"expected AdamW(fused=True), got defaults {inner.defaults}"
        ids = _Tokens().ids[:8].to(DEVICE)
        for _ in range(5):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        weights[kernel] = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    gap = (weights["fused"] - weights["foreach"]).abs().max().item()
    assert gap < 1e-4, f"fused and foreach AdamW weights differ by {gap:.2e} after 5 steps"
    return f"fused=True; max weight gap vs foreach {gap:.2e}"


def check_torch_compile(tmp: Path) -> str:
    eager = _train(tmp / "eager")
    compiled = _train(tmp / "compiled", hardware__torch_compile=True)
    gap = max(abs(a - b) for a, b in zip(eager, compiled))
    assert gap < 1e-3, f"compiled losses differ from eager by {gap:.2e}: {compiled} vs {eager}"
    return f"max |compiled - eager| loss gap {gap:.2e}"


def check_chunked_loss(tmp: Path) -> str:
    import torch

    from hf_optcore.loss import _liger_available, causal_lm_loss
    from hf_optcore.tiny import build_tiny_model

    model = build_tiny_model("llama", seed=0).to(DEVICE)
    ids = _Tokens().ids[:8].to(DEVICE)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    ref = model(**batch).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    rel = abs(loss.item() - ref.item()) / abs(ref.item())
    gap = max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), ref_grads))
    assert rel < 1e-5 and gap < 1e-5, f"chunked loss off by {rel:.2e} (relative), gradients by {gap:.2e}"
    return f"loss rel gap {rel:.1e}, grad gap {gap:.1e}; Liger {'used' if _liger_available() else 'not installed'}"


def check_memory_bench(tmp: Path) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_memory.py"), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = REPO / "benchmarks" / "results" / "bench_memory.md"
    return f"table in {table} (copy it into the README with the date)"


def _launch(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def check_fsdp2_trainer(tmp: Path) -> str:
    script = str(REPO / "tests" / "distributed" / "train_tiny.py")
    base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "recipes" / "accelerate" / "fsdp2.yaml"), "--num_processes", "1", script]
    _launch([*base, "--out", str(tmp / "fsdp"), "--batch", "4", "--save-every", "3", "--ema"])
    full = json.loads((tmp / "fsdp" / "result.json").read_text())
    assert "FSDP" in full["distributed_type"], f"Accelerate ran {full['distributed_type']}, not FSDP"
    assert full["sharded_params"], "parameters are not DTensors: FSDP2 did not shard the model"
    ckpt = tmp / "fsdp" / "checkpoint-3"
    assert ckpt.is_dir(), f"no checkpoint written: {sorted(p.name for p in (tmp / 'fsdp').iterdir())}"
    _launch([*base, "--out", str(tmp / "fsdp_resumed"), "--batch", "4", "--save-every", "3", "--ema",
             "--resume", str(ckpt)])
    resumed = json.loads((tmp / "fsdp_resumed" / "result.json").read_text())
    for step in ("4", "5", "6"):
        assert resumed["losses"][step] == full["losses"][step], (step, resumed["losses"], full["losses"])
    assert resumed["ranks"] == full["ranks"], "weights or EMA differ after the resume"
    return f"{full['distributed_type']}, sharded, resume exact (losses {full['losses']})"


def check_fsdp2_raw(tmp: Path) -> str:
    script = str(REPO / "tests" / "distributed" / "fsdp2_cpu.py")
    out = tmp / "raw"
    out.mkdir()
    for phase in ("full", "resume"):
        _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", script,
                 "--out", str(out), "--phase", phase])
    full = json.loads((out / "full.json").read_text())
    resumed = json.loads((out / "resume.json").read_text())
    assert all(resumed["losses"][s] == full["losses"][s] for s in resumed["losses"]), "resume is not exact"
    assert resumed["ema"] == full["ema"]
    return "fully_shard + EMA + DCP resume exact"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the checks; run nothing on CUDA")
    ap.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="run only these checks")
    ap.add_argument("--out", default="gpu_check.json", help="where to write the results (JSON)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke-test the in-process checks on the CPU (not a GPU verdict)")
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = a.device
    names = a.only or list(CHECKS)
    if a.dry_run:
        print("gpu_check --dry-run: would run, on one CUDA GPU:")
        for name in names:
            print(f"  {name:14s} {CHECKS[name]}")
        print("nothing was run; without --dry-run this needs torch.cuda.is_available()")
        return 0

    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; run with --dry-run to see the plan", file=sys.stderr)
        return 2
    cuda = DEVICE == "cuda"
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke test, not a GPU verdict)",
               "torch": torch.__version__, "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
               "checks": {}}
    funcs = {"bf16": check_bf16, "fused_adamw": check_fused_adamw, "torch_compile": check_torch_compile,
             "fsdp2_trainer": check_fsdp2_trainer, "fsdp2_raw": check_fsdp2_raw, "chunked_loss": check_chunked_loss,
             "memory_bench": check_memory_bench}
    failed = 0
    with tempfile.TemporaryDirectory() as tmpdir:
        for name in names:
            tmp = Path(tmpdir) / name
            tmp.mkdir()
            t0 = time.perf_counter()
            try:
                detail, ok = funcs[name](tmp), True
            except Exception as exc:  # noqa: BLE001 - every check is reported, none stops the others
                detail, ok = f"{type(exc).__name__}: {exc}", False
                failed += 1
            results["checks"][name] = {"ok": ok, "detail": detail, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{'PASS' if ok else 'FAIL'}  {name:14s} {detail}", flush=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"results in {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

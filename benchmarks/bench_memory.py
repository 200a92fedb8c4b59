"""Peak memory and time of one training step, hf_optcore beside plain transformers + peft.

    python benchmarks/bench_memory.py            # the demo model (SmolLM2-135M), 8 x 512 tokens: ~30 min on 2 cores
    python benchmarks/bench_memory.py --quick    # 4 layers of SmolLM2's shape from config, 4 x 512 tokens: minutes
    python benchmarks/bench_memory.py --only bare --modes lora lora_gc

For each mode (full fine-tuning, LoRA r=16 on every linear layer, LoRA + activation checkpointing)
two kinds of step run, each case in a fresh process so one case's allocations cannot hide another's:

- **bare step** (forward + backward, no optimizer): the plain transformers + peft model with the
  model's own loss (``hf``), the model hf_optcore's ``ModelManager`` builds with the model's own loss
  (``optcore``), and the same with hf_optcore's chunked, logits-free loss (``optcore + chunked``);
- **Trainer step** (forward, backward, AdamW step): ``transformers.Trainer`` on the plain model, and
  ``OptCoreTrainer`` on the ``ModelManager`` model with ``training.chunked_loss`` off and on;
- **evaluation** (LoRA only, the demo's model): ``evaluate()`` over the 115 held-out Jargon terms,
  ``transformers.Trainer`` on the plain peft model against ``OptCoreTrainer`` (token-weighted, chunked).

Memory on CPU is the process's peak resident set (``VmHWM``) over the measured steps, absolute
(model and runtime included, what a user sees) and above the resident set just before; on CUDA it
is ``torch.cuda.max_memory_allocated``. Time is the last of ``--steps`` steps (default 2: the first
one warms up). Every case trains on the same random tokens and reports its loss, so the rows are
the same computation. On a shared machine the times are indicative only; memory is not affected.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hf_optcore.allocator import active_allocator
from hf_optcore.memory_meter import PeakMemory

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODES = ("full", "full_gc", "lora", "lora_gc")
CASES = (("bare", "hf"), ("bare", "optcore"), ("bare", "optcore+chunked"),
         ("trainer", "hf"), ("trainer", "optcore"), ("trainer", "optcore+chunked"),
         ("eval", "hf"), ("eval", "optcore+chunked"))
EVAL_BATCH = 16  # the recipe's per_device_eval_batch_size
LABELS = {("bare", "hf"): "transformers + peft, model's loss", ("bare", "optcore"): "hf_optcore model, model's loss",
          ("bare", "optcore+chunked"): "hf_optcore model + chunked loss",
          ("trainer", "hf"): "transformers.Trainer", ("trainer", "optcore"): "OptCoreTrainer, chunked_loss=false",
          ("trainer", "optcore+chunked"): "OptCoreTrainer (chunked_loss=true)",
          ("eval", "hf"): "transformers.Trainer.evaluate()", ("eval", "optcore+chunked"): "OptCoreTrainer.evaluate()"}
PRESETS = {
    "quick": {"model": "config:llama-49k", "batch": 4, "seq_len": 512, "steps": 2},
    "full": {"model": "bundled:smollm2-135m-instruct", "batch": 8, "seq_len": 512, "steps": 2},
}
_LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def _config_model(vocab: int):
    """The quick preset's model: SmolLM2's vocabulary and width, 4 layers (logits dominate, as in the real one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                                        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                        max_position_embeddings=2048))


def _hf_model(spec: dict):
    """What a plain transformers + peft script builds: the model, its checkpointing, peft's LoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    if spec["model"].startswith("config:"):
        model = _config_model(49152)
    else:
        from hf_optcore.model_manager.loading import convert_gguf, default_cache_root, resolve_source

        path = convert_gguf(resolve_source(spec["model"]), default_cache_root(None))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if spec["mode"].endswith("_gc") and spec["kind"] == "bare":  # the Trainer case enables it through its arguments
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec["mode"].startswith("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=_LORA["r"], lora_alpha=_LORA["alpha"], lora_dropout=_LORA["dropout"],
                                                 target_modules=_LORA["target_modules"], task_type="CAUSAL_LM"))
    return model


def _optcore_config(spec: dict, out: str):
    from hf_optcore.config import TrainerConfig

    return TrainerConfig.from_dict({
        "output_dir": out,
        "model": {"name_or_path": spec["model"] if not spec["model"].startswith("config:") else "tiny:llama",
                  "dtype": "float32", "gradient_checkpointing": spec["mode"].endswith("_gc"),
                  "lora": {"enabled": spec["mode"].startswith("lora"), **_LORA}},
        "training": {"per_device_train_batch_size": spec["batch"], "max_steps": spec["steps"], "logging_steps": 1000,
                     "report_to": "none", "learning_rate": 1e-4, "scheduler": "constant", "optimizer": "adamw_torch",
                     "chunked_loss": spec["stack"].endswith("chunked"), "max_grad_norm": 1.0, "write_report": False},
        "data": {"batching": "random"},
        "hardware": {"use_cpu": not spec["cuda"]},
        "checkpoint": {"every_n_steps": 0},
    })


def _optcore_model(spec: dict, cfg):
    from hf_optcore.model_manager import ModelManager

    mgr = ModelManager(cfg.model, cfg.hardware, cfg.training, cpu_mmap_threshold=spec.get("cpu_mmap_threshold"))
    if spec["model"].startswith("config:"):
        return mgr.prepare_model(_config_model(49152))
    return mgr.load_model()


def _child(spec: dict) -> dict:
    """One case, in this process."""
    import torch

    torch.set_num_threads(spec["threads"])
    spec["cuda"] = torch.cuda.is_available()
    device = torch.device("cuda" if spec["cuda"] else "cpu")
    out = tempfile.mkdtemp(prefix="bench_memory_")
    cfg = _optcore_config(spec, out) if spec["stack"].startswith("optcore") else None
    model = _hf_model(spec) if spec["stack"] == "hf" else _optcore_model(spec, cfg)
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (spec["batch"] * spec["steps"], spec["seq_len"]), generator=g)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meter = PeakMemory(spec["cuda"])
    times, losses = [], []

    if spec["kind"] == "eval":
        return _eval_case(spec, model, cfg, out, meter, trainable, device)
    if spec["kind"] == "bare":
        from hf_optcore.loss import causal_lm_loss

        model.to(device).train()
        meter.start()
        for step in range(spec["steps"]):
            x = ids[step * spec["batch"]:(step + 1) * spec["batch"]].to(device)
            batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            if spec["stack"].endswith("chunked"):
                loss, _ = causal_lm_loss(model, batch)
            else:
                loss = model(**batch).loss
            loss.backward()
            if spec["cuda"]:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        mem = meter.stop()
    else:
        from transformers import TrainerCallback

        class _StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if spec["cuda"]:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - self.t0)

        data = [{"input_ids": r, "labels": r.clone()} for r in ids]

        def collate(rows):
            x = torch.stack([r["input_ids"] for r in rows])
            return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}

        if spec["stack"] == "hf":
            from transformers import Trainer, TrainingArguments

            args = TrainingArguments(
                output_dir=out, per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                learning_rate=1e-4, lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1000,
                report_to=[], save_strategy="no", use_cpu=not spec["cuda"], disable_tqdm=True,
                activation_checkpointing=spec["mode"].endswith("_gc"),
                activation_checkpointing_kwargs={"use_reentrant": False}, dataloader_pin_memory=spec["cuda"])
            trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                              callbacks=[_StepTimer()])
        else:
            from hf_optcore.trainer import OptCoreTrainer

            trainer = OptCoreTrainer(model=model, args=cfg, train_dataset=data, data_collator=collate,
                                     callbacks=[_StepTimer()])
        meter.start()
        result = trainer.train()
        mem = meter.stop()
        losses.append(result.training_loss)
    return {**{k: spec[k] for k in ("kind", "stack", "mode")}, **mem, "trainable_params": trainable,
            "step_seconds": round(times[-1], 3), "all_step_seconds": [round(t, 3) for t in times],
            "loss": round(losses[-1], 5), "device": device.type,
            "allocator": active_allocator()}


def _eval_case(spec: dict, model, cfg, out: str, meter: PeakMemory, trainable: int, device) -> dict:
    """``evaluate()`` over the recipe's held-out Jargon terms (all 115), tokenized as the recipe does."""
    from hf_optcore.config import DataConfig, HardwareConfig, ModelConfig, TrainingConfig
    from hf_optcore.data.collator import PaddingCollator
    from hf_optcore.data_manager import DataManager
    from hf_optcore.model_manager import ModelManager

    tok = ModelManager(ModelConfig(name_or_path="bundled:smollm2-135m-instruct")).load_tokenizer()
    data = DataConfig(train_path=str(REPO / "data/jargon/eval.jsonl"), eval_path=str(REPO / "data/jargon/eval.jsonl"),
                      format="instruction", max_seq_len=spec["seq_len"], max_train_samples=8)
    _, eval_ds = DataManager(TrainingConfig(), HardwareConfig(), tok, data_config=data).load_datasets()
    collate = PaddingCollator(tok.pad_token_id)
    if spec["stack"] == "hf":
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(output_dir=out, per_device_eval_batch_size=EVAL_BATCH, report_to=[],
                                 use_cpu=not spec["cuda"], disable_tqdm=True, dataloader_pin_memory=spec["cuda"],
                                 remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, eval_dataset=eval_ds, data_collator=collate)
    else:
        from hf_optcore.trainer import OptCoreTrainer

        cfg.training.per_device_eval_batch_size = EVAL_BATCH
        trainer = OptCoreTrainer(model=model, args=cfg, eval_dataset=eval_ds, data_collator=collate)
    meter.start()
    t0 = time.perf_counter()
    metrics = trainer.evaluate()
    seconds = time.perf_counter() - t0
    mem = meter.stop()
    return {**{k: spec[k] for k in ("kind", "stack", "mode")}, **mem, "trainable_params": trainable,
            "step_seconds": round(seconds, 3), "all_step_seconds": [round(seconds, 3)],
            "loss": round(metrics["eval_loss"], 5), "eval_examples": len(eval_ds), "device": device.type,
            "allocator": active_allocator()}


def run(quick: bool = True, only: str | None = None, modes: tuple[str, ...] = MODES, steps: int | None = None,
        threads: int = 2, cpu_mmap_threshold: int | None = None, cases: list[str] | None = None,
        allocator: str = "system") -> dict:
    """Every (mode, case) in a fresh process; returns the rows and the ratios the README quotes.

    ``allocator``: ``system`` (the C library's malloc) or ``jemalloc`` preloaded into every case's process,
    with the settings the recipe uses (:mod:`hf_optcore.allocator`).
    """
    import torch
    import transformers

    preset = dict(PRESETS["quick" if quick else "full"])
    if steps:
        preset["steps"] = steps
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if allocator == "jemalloc":
        from hf_optcore.allocator import JEMALLOC_CONF, find_jemalloc

        lib = find_jemalloc()
        if lib is None:
            raise SystemExit("error: --allocator jemalloc: libjemalloc.so.2 not found (make install fetches it)")
        env.update(LD_PRELOAD=lib, MALLOC_CONF=os.environ.get("MALLOC_CONF", JEMALLOC_CONF))
    rows = []
    for mode in modes:
        for kind, stack in CASES:
            if (only and kind != only) or (kind == "eval" and mode != "lora"):  # evaluation: the demo's LoRA model
                continue
            if cases and f"{mode}:{kind}:{stack}" not in cases and f"{kind}:{stack}" not in cases:
                continue
            spec = {**preset, "mode": mode, "kind": kind, "stack": stack, "threads": threads,
                    "cpu_mmap_threshold": cpu_mmap_threshold}
            print(f"[memory] {mode:8s} {kind:8s} {stack} ...", flush=True, file=sys.stderr)
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                  capture_output=True, text=True, timeout=3600, cwd=REPO)
            if proc.returncode != 0:
                raise RuntimeError(f"bench_memory {mode} {kind} {stack} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    _ratios(rows)
    return {"name": "memory", "quick": quick, "preset": preset, "torch": torch.__version__,
            "transformers": transformers.__version__, "device": rows[0]["device"] if rows else "cpu",
            "threads": threads, "cpu_mmap_threshold": cpu_mmap_threshold, "allocator": allocator, "rows": rows}


def _ratios(rows: list[dict]) -> None:
    """Each row against the plain transformers row of the same mode and kind, and LoRA against full fine-tuning."""
    ref = {(r["mode"], r["kind"]): r for r in rows if r["stack"] == "hf"}
    full = {(r["kind"], r["stack"]): r for r in rows if r["mode"] == "full"}
    for r in rows:
        base = ref.get((r["mode"], r["kind"]))
        if base:
            r["peak_vs_hf"] = round(r["peak_bytes"] / base["peak_bytes"], 3)
            r["time_vs_hf"] = round(r["step_seconds"] / base["step_seconds"], 3)
        f = full.get((r["kind"], r["stack"]))
        if f and r["mode"] != "full":
            r["peak_vs_full"] = round(r["peak_bytes"] / f["peak_bytes"], 3)


def to_markdown(res: dict) -> str:
    """The result as a markdown table (one per kind of step)."""
    p = res["preset"]
    gb = 1e9 if res["device"] == "cpu" else 2**30
    unit = "GB" if res["device"] == "cpu" else "GiB"
    meter = res["rows"][0]["meter"] if res["rows"] else ""
    mmap = f"; hf_optcore rows with cpu_mmap_threshold={res['cpu_mmap_threshold']}" if res.get("cpu_mmap_threshold") else ""
    if res.get("allocator", "system") != "system":
        mmap += f"; every case under {res['allocator']} (LD_PRELOAD)"
    lines = [f"Peak memory of a training step, {p['model']}, batch {p['batch']} x {p['seq_len']} tokens, "
             f"{res['device']} ({meter}; {res['threads']} threads{mmap}); time = step {p['steps']} of {p['steps']}. "
             "Ratios: against the plain transformers row of the same mode (`vs HF`) and against the same case "
             "with full fine-tuning (`vs full`).", ""]
    names = {"full": "full fine-tune", "full_gc": "full + checkpointing", "lora": "LoRA r=16 all-linear",
             "lora_gc": "LoRA + checkpointing"}
    for kind, title in (("bare", "Bare step (forward + backward)"), ("trainer", "Trainer step (AdamW)"),
                        ("eval", f"Evaluation of the 115 held-out Jargon terms, batch {EVAL_BATCH} (time: the whole "
                                 "evaluate())")):
        rows = [r for r in res["rows"] if r["kind"] == kind]
        if not rows:
            continue
        lines += [f"**{title}**", "", f"| mode | case | peak ({unit}) | step extra ({unit}) | vs HF | vs full | "
                  "step (s) | time vs HF | loss |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            vs_full = f"{r['peak_vs_full']:.2f}" if "peak_vs_full" in r else "–"
            lines.append(f"| {names[r['mode']]} | {LABELS[(kind, r['stack'])]} | {r['peak_bytes'] / gb:.2f} | "
                         f"{r['extra_bytes'] / gb:.2f} | {r.get('peak_vs_hf', 1):.2f} | {vs_full} | "
                         f"{r['step_seconds']:.2f} | {r.get('time_vs_hf', 1):.2f} | {r['loss']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4-layer model from config, batch 4 x 512 (shared CPU)")
    ap.add_argument("--only", choices=["bare", "trainer", "eval"], help="only bare steps, Trainer steps or evaluations")
    ap.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    ap.add_argument("--steps", type=int, help="steps per case (default 2; the last one is timed)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per case (default 2)")
    ap.add_argument("--cpu-mmap-threshold", type=int, help="ModelManager(cpu_mmap_threshold=...) for the hf_optcore "
                    "rows (bytes, e.g. 1048576): lower CPU peaks, slower steps")
    ap.add_argument("--cases", nargs="*", help="only these cases, as kind:stack or mode:kind:stack "
                    "(e.g. bare:hf lora_gc:trainer:optcore+chunked)")
    ap.add_argument("--allocator", choices=["system", "jemalloc"], default="system",
                    help="malloc of every case's process (jemalloc: as hardware.cpu_allocator preloads it)")
    ap.add_argument("--out", default="bench_memory", help="result files benchmarks/results/OUT.{json,md}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return {}
    res = run(quick=a.quick, only=a.only, modes=tuple(a.modes), steps=a.steps, threads=a.threads,
              cpu_mmap_threshold=a.cpu_mmap_threshold, cases=a.cases, allocator=a.allocator)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.out}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{a.out}.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()

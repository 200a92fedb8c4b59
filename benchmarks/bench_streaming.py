"""Data larger than memory: streamed vs in-memory batching, resume time vs step, peak memory vs corpus size.

    python benchmarks/bench_streaming.py            # the full preset (200k-row corpus; about 15 minutes here)
    python benchmarks/bench_streaming.py --quick    # a smoke run (20k rows)

Four measurements, each side by side with its alternative in the same run:

* **padding on the Jargon data** (SmolLM2 tokens, max_seq_len 512, batch 8): the in-memory samplers
  (``bucket`` with its default mega-batch, ``token_budget``, ``multipack``) vs the same strategy streamed
  from a look-ahead window of 64, 512 and 4096 examples; ``random`` for scale;
* **throughput at equal work**: ``OptCoreTrainer`` on the Jargon data in memory vs streamed (``bucket``,
  the same steps of batch 8; a small Llama with SmolLM2's vocabulary, as in ``bench_batching``): real
  tokens/s of the training loop, and of the whole run including reading and tokenizing the data;
* **resume time vs step** on a generated 200k-row corpus: from a checkpoint at step 10 and at step 1,000,
  the seconds from ``train()`` to the first resumed step, hf_optcore's stream (seeks to its position) vs
  ``transformers.Trainer`` on a streaming ``datasets.IterableDataset`` of the same file (skips the consumed
  batches by reading and tokenizing them again);
* **peak RSS vs corpus size**: a streamed run and an in-memory run over 20k and 200k rows, each in a fresh
  process (its ``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
JARGON = REPO / "data" / "jargon" / "train.jsonl"
BATCH = 8
MAX_SEQ_LEN = 512
BUFFERS = (64, 512, 4096)
WORDS = ("hack kludge cruft grok foo bar baz frob twiddle wizard daemon bogon crock lossage mung glitch winnage "
         "phase hairy elegant spaghetti").split()


# ---- padding on the Jargon data ---------------------------------------------------------------------


def _jargon_examples(tokenizer) -> list[dict]:
    from hf_optcore.config import DataConfig, HardwareConfig, TrainingConfig
    from hf_optcore.data_manager import DataManager

    dm = DataManager(TrainingConfig(), HardwareConfig(), tokenizer,
                     data_config=DataConfig(format="instruction", max_seq_len=MAX_SEQ_LEN))
    rows = [json.loads(line) for line in JARGON.read_text(encoding="utf-8").splitlines() if line.strip()]
    return dm.build_dataset(rows, str(JARGON)).examples


def _padding(widths_and_real: list[tuple[int, int, int]]) -> float:
    """1 - real / padded over batches given as (rows, width, real tokens)."""
    real = sum(r for _, _, r in widths_and_real)
    return round(1 - real / sum(n * w for n, w, _ in widths_and_real), 4)


def _in_memory_padding(strategy: str, lengths: list[int]) -> float:
    from hf_optcore.data.samplers import BATCHING_STRATEGIES

    cls = BATCHING_STRATEGIES[strategy]
    if strategy == "token_budget":
        sampler = cls(lengths, BATCH * 256)
    elif strategy == "multipack":
        sampler = cls(lengths, MAX_SEQ_LEN, 3)
    else:
        sampler = cls(lengths, BATCH)
    out = []
    for batch in sampler:
        rows = [sum(lengths[i] for i in b) for b in batch] if strategy == "multipack" else [lengths[i] for i in batch]
        out.append((len(rows), max(rows), sum(rows)))
    return _padding(out)


def _streamed_padding(strategy: str, examples: list[dict], buffer: int) -> float:
    from hf_optcore.data.stream_batching import StreamBatcher

    kw = {"max_tokens": BATCH * 256} if strategy == "token_budget" else {"max_seq_len": MAX_SEQ_LEN} \
        if strategy == "multipack" else {}
    batcher = StreamBatcher(strategy, 3 if strategy == "multipack" else BATCH, buffer, seed=0, **kw)
    out = []

    def take():
        while batcher.ready():
            rows = [len(r["input_ids"]) for r in batcher.pop()]
            out.append((len(rows), max(rows), sum(rows)))

    for e in examples:
        batcher.add(e)
        take()
    batcher.end_pass()
    take()
    return _padding(out)


def padding_table(tokenizer) -> dict:
    examples = _jargon_examples(tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    table = {"examples": len(examples), "rows": {}}
    for strategy in ("random", "bucket", "token_budget", "multipack"):
        row = {"in_memory": _in_memory_padding(strategy, lengths)}
        for b in BUFFERS:
            row[f"stream_{b}"] = _streamed_padding(strategy, examples, b)
        table["rows"][strategy] = row
    return table


# ---- throughput at equal work ------------------------------------------------------------------------


def _small_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_SEQ_LEN,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _config(out: Path, steps: int, streaming: bool, **data):
    from hf_optcore.config import TrainerConfig

    return TrainerConfig.from_dict({
        "output_dir": str(out),
        "model": {"lora": {"enabled": False}},
        "training": {"max_steps": steps, "per_device_train_batch_size": BATCH, "learning_rate": 1e-3,
                     "logging_steps": max(1, steps // 4), "scheduler": "constant", "report_to": "none",
                     "write_report": False, "seed": 0},
        "hardware": {"use_cpu": True, "dataloader_pin_memory": False},
        "data": {"train_path": str(JARGON), "format": "instruction", "max_seq_len": MAX_SEQ_LEN, "batching": "bucket",
                 "streaming": streaming, "buffer_size": 512, "eval_split_ratio": 0, **data},
        "checkpoint": {"every_n_steps": 0, "save_at_end": False},
    })


def throughput(tokenizer, steps: int, tmp: Path) -> dict:
    from hf_optcore.data_manager import DataManager
    from hf_optcore.trainer import OptCoreTrainer

    out = {}
    for name, streaming, workers in (("in_memory", False, 0), ("streamed", True, 0), ("streamed_1_worker", True, 1)):
        cfg = _config(tmp / f"tp-{name}", steps, streaming)
        cfg.hardware.dataloader_num_workers = workers
        started = time.perf_counter()
        dm = DataManager(cfg.training, cfg.hardware, tokenizer, data_config=cfg.data)
        train, _ = dm.load_datasets()
        load = time.perf_counter() - started
        trainer = OptCoreTrainer(_small_model(len(tokenizer)), cfg, train_dataset=train, data_collator=dm.collator,
                                 processing_class=tokenizer)
        result = trainer.train()
        meter = trainer.optcore_data_meter
        real, padded = meter.run_real + meter.real, meter.run_total + meter.total
        runtime = result.metrics["train_runtime"]
        out[name] = {
            "load_seconds": round(load, 2), "train_seconds": round(runtime, 2), "real_tokens": real,
            "padding": round(1 - real / padded, 4), "real_tokens_per_second": round(real / runtime, 1),
            "end_to_end_tokens_per_second": round(real / (runtime + load), 1)}
    m = out["in_memory"]
    for name in ("streamed", "streamed_1_worker"):
        s = out[name]
        s["ratio_loop"] = round(s["real_tokens_per_second"] / m["real_tokens_per_second"], 3)
        s["ratio_end_to_end"] = round(s["end_to_end_tokens_per_second"] / m["end_to_end_tokens_per_second"], 3)
    return out


# ---- a generated corpus; resume time and memory ------------------------------------------------------------


def make_corpus(path: Path, rows: int) -> Path:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            n = rng.randint(4, 60)
            fh.write(json.dumps({"text": f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")
    return path


def _first_step_probe():
    """A callback that records when the first step of a (resumed) ``train()`` begins."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        at = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.at is None:
                self.at = time.perf_counter()

    return FirstStep()


def _resume_run(kind: str, corpus: Path, out: Path, steps: int, resume: bool) -> float:
    """Train ``steps`` steps (saving at the end), or resume from that checkpoint: seconds to the first step."""
    from transformers import Trainer, TrainingArguments

    from hf_optcore.data.collator import PaddingCollator
    from hf_optcore.tiny import build_tiny_model, build_tiny_tokenizer
    from hf_optcore.trainer import OptCoreTrainer

    tok = build_tiny_tokenizer()
    max_steps = steps + 3 if resume else steps
    if kind == "hf_optcore":
        from hf_optcore.config import TrainerConfig
        from hf_optcore.data.stream_sources import FileStream

        cfg = TrainerConfig.from_dict({
            "output_dir": str(out), "model": {"lora": {"enabled": False}},
            "training": {"max_steps": max_steps, "per_device_train_batch_size": BATCH, "logging_steps": 100,
                         "report_to": "none", "write_report": False, "scheduler": "constant"},
            "hardware": {"use_cpu": True, "dataloader_pin_memory": False},
            "data": {"streaming": True, "batching": "bucket", "buffer_size": 1024, "max_seq_len": 256},
            "checkpoint": {"every_n_steps": 0, "save_at_end": True, "keep_last": 5, "verify": False,
                           "allow_changes": ["training.max_steps"]},
        })
        trainer = OptCoreTrainer(build_tiny_model("llama"), cfg, train_dataset=FileStream(str(corpus)),
                                 processing_class=tok)
    else:
        import datasets

        ds = datasets.load_dataset("json", data_files=str(corpus), split="train", streaming=True)
        ds = ds.map(lambda r: {"input_ids": tok(r["text"])["input_ids"][:256]}, remove_columns=["text"])
        args = TrainingArguments(str(out), max_steps=max_steps, per_device_train_batch_size=BATCH, use_cpu=True,
                                 report_to="none", logging_steps=100, save_strategy="steps", save_steps=steps,
                                 lr_scheduler_type="constant",
                                 dataloader_pin_memory=False, disable_tqdm=True)
        trainer = Trainer(build_tiny_model("llama"), args, train_dataset=ds, data_collator=PaddingCollator(0))
    probe = _first_step_probe()
    trainer.add_callback(probe)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{steps}") if resume else None)
    return round(probe.at - started, 3)


def resume_times(corpus: Path, tmp: Path, steps: tuple[int, ...], repeats: int = 3) -> dict:
    """Best of ``repeats`` resumes, each from a fresh copy of the checkpoint (a shared machine is noisy)."""
    import shutil

    out = {}
    for kind in ("hf_optcore", "transformers"):
        for k in steps:
            run_dir = tmp / f"resume-{kind}-{k}"
            _resume_run(kind, corpus, run_dir, k, resume=False)
            times = []
            for r in range(repeats):
                again = tmp / f"resume-{kind}-{k}-{r}"
                shutil.copytree(run_dir / f"checkpoint-{k}", again / f"checkpoint-{k}")
                times.append(_resume_run(kind, corpus, again, k, resume=True))
            out[f"{kind}_step_{k}"] = min(times)
    return out


def _child_rss(mode: str, corpus: str, steps: int) -> None:
    """In a fresh process: a short run over ``corpus``, streamed or in memory; prints the peak RSS in MB."""
    from hf_optcore.config import TrainerConfig
    from hf_optcore.data_manager import DataManager
    from hf_optcore.tiny import build_tiny_model, build_tiny_tokenizer
    from hf_optcore.trainer import OptCoreTrainer

    torch.set_num_threads(1)
    tok = build_tiny_tokenizer()
    cfg = TrainerConfig.from_dict({
        "output_dir": tempfile.mkdtemp(), "model": {"lora": {"enabled": False}},
        "training": {"max_steps": steps, "per_device_train_batch_size": BATCH, "logging_steps": 100,
                     "report_to": "none", "write_report": False},
        "hardware": {"use_cpu": True, "dataloader_pin_memory": False},
        "data": {"train_path": corpus, "streaming": mode == "streamed", "batching": "bucket", "buffer_size": 1024,
                 "max_seq_len": 256, "eval_split_ratio": 0},
        "checkpoint": {"every_n_steps": 0, "save_at_end": False},
    })
    dm = DataManager(cfg.training, cfg.hardware, tok, data_config=cfg.data)
    train, _ = dm.load_datasets()
    OptCoreTrainer(build_tiny_model("llama"), cfg, train_dataset=train, data_collator=dm.collator,
                   processing_class=tok).train()
    # VmHWM, not ru_maxrss: a child exec'd from a large parent inherits the parent's ru_maxrss.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": round(int(hwm.split()[1]) / 1024, 1)}))


def peak_rss(corpora: dict[str, Path], steps: int) -> dict:
    out = {}
    for mode in ("streamed", "in_memory"):
        for name, path in corpora.items():
            proc = subprocess.run([sys.executable, __file__, "--child-rss", mode, str(path), str(steps)],
                                  capture_output=True, text=True, timeout=3000, cwd=REPO)
            if proc.returncode != 0:
                raise RuntimeError(f"rss child {mode} {name} failed: {proc.stderr[-2000:]}")
            out.setdefault(mode, {})[name] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return out


# ---- the whole benchmark -------------------------------------------------------------------------------


def run(quick: bool = False) -> dict:
    from bench_batching import _tokenizer

    started = time.time()
    torch.set_num_threads(1)
    tokenizer = _tokenizer()
    big = 20_000 if quick else 200_000
    result: dict = {"preset": "quick" if quick else "full"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        result["padding_jargon"] = padding_table(tokenizer)
        result["throughput_jargon"] = throughput(tokenizer, 12 if quick else 24, tmp)
        corpus = make_corpus(tmp / f"corpus-{big}.jsonl", big)
        small = make_corpus(tmp / f"corpus-{big // 10}.jsonl", big // 10)
        result["resume_seconds"] = {"corpus_rows": big, **resume_times(corpus, tmp, (10, 100 if quick else 1000))}
        result["peak_rss_mb"] = {"steps": 50, **peak_rss({f"{big // 10}_rows": small, f"{big}_rows": corpus}, 50)}
    result["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_streaming.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (RESULTS / "bench_streaming.md").write_text(to_markdown(result) + "\n", encoding="utf-8")
    return result


def to_markdown(result: dict) -> str:
    pad = result["padding_jargon"]
    lines = [f"Padding on the Jargon data ({pad['examples']} examples, SmolLM2 tokens, max_seq_len {MAX_SEQ_LEN}, "
             f"batch {BATCH}; multipack 3 rows):", "",
             "| strategy | in memory | " + " | ".join(f"stream, window {b}" for b in BUFFERS) + " |",
             "|---|---|" + "---|" * len(BUFFERS)]
    for strategy, row in pad["rows"].items():
        lines.append(f"| {strategy} | {row['in_memory']:.1%} | "
                     + " | ".join(f"{row[f'stream_{b}']:.1%}" for b in BUFFERS) + " |")
    tp = result["throughput_jargon"]
    lines += ["", "Throughput at equal work (bucket, the same steps of batch 8):", "",
              "| run | reading + tokenizing (s) | training (s) | padding | real tokens/s (loop) | "
              "real tokens/s (whole run) |", "|---|---|---|---|---|---|"]
    for name in ("in_memory", "streamed", "streamed_1_worker"):
        r = tp[name]
        ratios = f" ({r['ratio_loop']:.2f}x)" if "ratio_loop" in r else ""
        ratio_all = f" ({r['ratio_end_to_end']:.2f}x)" if "ratio_end_to_end" in r else ""
        lines.append(f"| {name.replace('_', ' ')} | {r['load_seconds']} | {r['train_seconds']} | {r['padding']:.1%} | "
                     f"{r['real_tokens_per_second']:,.0f}{ratios} | {r['end_to_end_tokens_per_second']:,.0f}{ratio_all} |")
    rs = result["resume_seconds"]
    steps = sorted({int(k.rsplit("_", 1)[1]) for k in rs if k.startswith("hf_optcore_step_")})
    lines += ["", f"Seconds from `train()` to the first resumed step ({rs['corpus_rows']:,}-row corpus):", "",
              "| resumed at | " + " | ".join(f"step {s:,}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for kind in ("hf_optcore", "transformers"):
        lines.append(f"| {kind} | " + " | ".join(f"{rs[f'{kind}_step_{s}']}" for s in steps) + " |")
    rss = result["peak_rss_mb"]
    names = list(rss["streamed"])
    lines += ["", f"Peak RSS (MB) of a {rss['steps']}-step run, each in a fresh process:", "",
              "| data | " + " | ".join(n.replace("_", " ") for n in names) + " |", "|---|" + "---|" * len(names)]
    for mode in ("streamed", "in_memory"):
        lines.append(f"| {mode.replace('_', ' ')} | " + " | ".join(f"{rss[mode][n]:,.0f}" for n in names) + " |")
    lines.append(f"\n(whole benchmark: {result.get('seconds', '?')} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child-rss", nargs=3, metavar=("MODE", "CORPUS", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_rss:
        _child_rss(a.child_rss[0], a.child_rss[1], int(a.child_rss[2]))
        return 0
    print(to_markdown(run(a.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

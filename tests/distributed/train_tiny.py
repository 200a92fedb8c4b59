"""Launched by tests/test_distributed.py: a few steps of a tiny llama through OptCoreTrainer.

    python tests/distributed/train_tiny.py --out DIR --batch 4                       # 1 process
    accelerate launch --multi_gpu --num_processes 2 tests/distributed/train_tiny.py --out DIR --batch 2

Rank 0 writes ``DIR/result.json``: the per-step losses and logged real-token counts, the world size
the Trainer formed, and per rank a digest of the final weights (and of the EMA shadows when
``--ema``) and the real tokens that rank itself trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from hf_optcore.config import TrainerConfig  # noqa: E402
from hf_optcore.tiny import build_tiny_model  # noqa: E402
from hf_optcore.trainer import OptCoreTrainer  # noqa: E402

SEQ_LEN = 16
N_EXAMPLES = 64


class FixedLengthTokens(torch.utils.data.Dataset):
    """Random token sequences of one length, so a token-mean loss splits exactly across ranks."""

    def __init__(self, n: int = N_EXAMPLES, seq_len: int = SEQ_LEN):
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, 256, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class StreamedTokens(torch.utils.data.IterableDataset):
    """The same examples, streamed in order (no ``__len__``: Accelerate shards it, not hf_optcore's sampler)."""

    def __init__(self):
        self.ids = FixedLengthTokens().ids

    def __iter__(self):
        for row in self.ids:
            yield {"input_ids": row, "labels": row.clone()}


def collate(rows):
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": torch.stack([r["labels"] for r in rows]),
            "attention_mask": torch.ones_like(ids)}


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--use-cpu", action="store_true", help="set hardware.use_cpu (else rely on auto-detection)")
    ap.add_argument("--ema", action="store_true")
    ap.add_argument("--iterable", action="store_true", help="stream the data (Accelerate shards it)")
    ap.add_argument("--stream", action="store_true",
                    help="the same examples as a JSONL file streamed by hf_optcore (data.streaming; each rank reads "
                         "every other row, in order)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (as if killed) after this many steps")
    a = ap.parse_args(argv)

    cfg = TrainerConfig.from_dict({
        "output_dir": a.out,
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"learning_rate": 1e-2, "per_device_train_batch_size": a.batch, "max_steps": a.steps,
                     "logging_steps": 1, "optimizer": "adamw", "scheduler": "constant", "seed": 0,
                     "max_grad_norm": 1.0, "report_to": "none"},
        "hardware": {"use_cpu": a.use_cpu},
        "checkpoint": {"every_n_steps": a.save_every, "keep_last": 10},
        "ema": {"enabled": a.ema, "decay": 0.9},
    })
    model = build_tiny_model("llama", seed=0)
    dataset, collator = StreamedTokens() if a.iterable else FixedLengthTokens(), collate
    if a.stream:
        from hf_optcore.data.collator import PaddingCollator
        from hf_optcore.data.stream_sources import FileStream

        path = Path(a.out, "stream.jsonl")
        Path(a.out).mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n" for row in FixedLengthTokens().ids))
        cfg.data.streaming, cfg.data.buffer_size = True, 0  # the stream's own order: ranks interleave its rows
        dataset, collator = FileStream(str(path)), PaddingCollator(0)
    trainer = OptCoreTrainer(model=model, args=cfg, train_dataset=dataset, data_collator=collator)
    if a.stop_after is not None:
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= a.stop_after:
                    control.should_training_stop = True

        trainer.add_callback(_Stop())
    observed = {"real": 0}  # this rank's own real tokens, to check the logged count is the sum over ranks
    meter_observe = trainer.optcore_data_meter.observe

    def observe(real_tokens, total_tokens):
        observed["real"] += int(real_tokens)
        meter_observe(real_tokens, total_tokens)

    trainer.optcore_data_meter.observe = observe
    trainer.train(resume_from_checkpoint=a.resume)

    ema_digest = None
    ema = trainer.optcore_state.get("ema")
    if ema is not None:
        sd = ema.state_dict()
        shadows = [v for _, v in sorted(_flatten(sd).items()) if torch.is_tensor(v) and v.is_floating_point()]
        ema_digest = digest(shadows)
    model_digest = digest(p for _, p in sorted(trainer.model.named_parameters()))
    mine = {"model": model_digest, "ema": ema_digest, "observed_real_tokens": observed["real"]}
    gathered = [None] * trainer.args.world_size
    if trainer.args.world_size > 1:
        torch.distributed.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if trainer.is_world_process_zero():
        losses = {int(r["step"]): r["loss"] for r in trainer.state.log_history if "loss" in r}
        Path(a.out, "result.json").write_text(json.dumps({
            "world_size": trainer.args.world_size,
            "use_cpu": trainer.args.use_cpu,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "sharded_params": any(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
            "losses": losses,
            "real_tokens": {int(r["step"]): r["real_tokens"] for r in trainer.state.log_history if "real_tokens" in r},
            "global_step": trainer.state.global_step,
            "ranks": gathered,
        }, indent=1))
    return 0


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, (list, tuple)) else []):
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (dict, list, tuple)):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


if __name__ == "__main__":
    from hf_optcore.distributed import exit_process

    exit_process(main())

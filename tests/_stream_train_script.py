"""A tiny streamed training run for the streaming tests (killed with SIGKILL and resumed):

    python tests/_stream_train_script.py OUT DATA [--batching bucket] [--workers 1] [--kill-after 8] ...

Trains a tiny Llama on the stream of DATA (a JSONL file, or a directory of shards) with ``data.streaming``,
resuming automatically from OUT's latest complete checkpoint. Appends one line per micro-batch to
``OUT/batches.jsonl`` (step, a digest of its input_ids and labels) as it trains, and writes the final weights
to ``OUT/final.pt``. ``--kill-after N`` sends itself SIGKILL right after the checkpoint of step N is complete.
"""

import argparse
import hashlib
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_optcore.config import TrainerConfig  # noqa: E402
from hf_optcore.data.collator import PaddingCollator  # noqa: E402
from hf_optcore.data.stream_sources import FileStream  # noqa: E402
from hf_optcore.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


class RandomMaskCollator(PaddingCollator):
    """Pads, then masks a random quarter of the labels: it draws from the RNG of wherever it runs."""

    def __call__(self, features):
        batch = super().__call__(features)
        batch["labels"][torch.rand(batch["labels"].shape) < 0.25] = -100
        return batch


class KillAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("data")
    ap.add_argument("--batching", default="bucket")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--kill-after", type=int, default=None)
    ap.add_argument("--random-collator", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainerConfig.from_dict({
        "output_dir": a.out,
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"max_steps": a.max_steps, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                     "logging_steps": 1, "scheduler": "cosine", "warmup_steps": 2, "seed": 3, "report_to": "none",
                     "write_report": False},
        "hardware": {"use_cpu": True, "dataloader_num_workers": a.workers, "dataloader_pin_memory": False},
        "data": {"streaming": True, "batching": a.batching, "buffer_size": a.buffer, "max_seq_len": 48,
                 "max_tokens_per_batch": 128},
        "checkpoint": {"every_n_steps": a.every, "keep_last": 10, "resume_from": "auto"},
    })
    tok = build_tiny_tokenizer()
    collator = RandomMaskCollator(tok.pad_token_id) if a.random_collator else PaddingCollator(tok.pad_token_id)
    from hf_optcore.trainer import OptCoreTrainer

    trainer = OptCoreTrainer(build_tiny_model("llama", seed=0, attention_dropout=0.1), cfg,
                             train_dataset=FileStream(a.data), data_collator=collator, processing_class=tok)
    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "batches.jsonl"), "a", encoding="utf-8")  # noqa: SIM115 - kept open while training
    original = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        h = hashlib.sha256(inputs["input_ids"].numpy().tobytes() + inputs["labels"].numpy().tobytes()).hexdigest()
        log.write(json.dumps({"step": trainer.state.global_step + 1, "batch": h}) + "\n")
        log.flush()
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = recording_step
    if a.kill_after is not None:
        trainer.add_callback(KillAfterSave(a.kill_after))
    trainer.train()
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, os.path.join(a.out, "final.pt"))


if __name__ == "__main__":
    main()

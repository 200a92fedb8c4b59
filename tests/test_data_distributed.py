"""A real 2-process gloo run: each rank trains on disjoint data, all of it, in the same number of steps.

Run as a test (it launches itself under ``accelerate launch --multi_gpu --num_processes 2``);
the ``__main__`` block is the per-rank worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
N_EXAMPLES = 37  # odd: the batch count does not divide evenly by the world size
STRATEGIES = ("bucket", "multipack", "token_budget")


def _examples():
    # Example k is made only of token 100 + k: the tokens of a batch name its examples.
    return [{"input_ids": [100 + k] * (3 + (k * 7) % 20), "labels": [100 + k] * (3 + (k * 7) % 20)}
            for k in range(N_EXAMPLES)]


def _worker(out: Path) -> None:
    import torch

    from hf_optcore.config import TrainerConfig
    from hf_optcore.data.encoding import TokenizedDataset
    from hf_optcore.tiny import build_tiny_model, build_tiny_tokenizer
    from hf_optcore.trainer import OptCoreTrainer

    torch.set_num_threads(1)
    result = {}
    for batching in STRATEGIES:
        cfg = TrainerConfig.from_dict({
            "output_dir": str(out / batching),
            "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
            "training": {"num_train_epochs": 1, "per_device_train_batch_size": 2, "logging_steps": 1,
                         "report_to": "none", "scheduler": "constant"},
            "hardware": {"use_cpu": True, "dataloader_pin_memory": False},
            "data": {"batching": batching, "max_seq_len": 32, "max_tokens_per_batch": 64},
        })
        trainer = OptCoreTrainer(build_tiny_model("llama"), cfg, train_dataset=TokenizedDataset(_examples()),
                                 processing_class=build_tiny_tokenizer())
        seen: list[list[int]] = []
        original = trainer.training_step

        def spy(model, inputs, num_items_in_batch=None, _seen=seen, _orig=original):
            ids = inputs["input_ids"]
            _seen.append(sorted({int(t) - 100 for t in ids.unique() if 100 <= int(t) < 100 + N_EXAMPLES}))
            return _orig(model, inputs, num_items_in_batch)

        trainer.training_step = spy
        trainer.train()
        result[batching] = {"batches": seen, "steps": trainer.state.global_step,
                            "world_size": trainer.args.world_size,
                            "sampler_len": len(trainer.optcore_state["sampler"])}
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_gloo_ranks_get_disjoint_data_and_equal_steps(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(Path(__file__).resolve()), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for batching in STRATEGIES:
        r0, r1 = ranks[0][batching], ranks[1][batching]
        assert r0["world_size"] == r1["world_size"] == 2
        assert r0["steps"] == r1["steps"] == r0["sampler_len"] == len(r0["batches"]) == len(r1["batches"])
        got0 = [k for b in r0["batches"] for k in b]
        got1 = [k for b in r1["batches"] for k in b]
        assert not set(got0) & set(got1), batching  # disjoint
        assert sorted(got0 + got1) == list(range(N_EXAMPLES)), batching  # all of it, once


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    _worker(parser.parse_args().out)
    from hf_optcore.distributed import exit_process

    exit_process(0)  # a multi-process run ends without interpreter finalization (see exit_process)

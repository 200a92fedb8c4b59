"""Evaluator alone: token-weighted loss against a hand computation, EMA side by side, plug-in metrics."""

import math

import pytest
import torch

from hf_optcore.config import EMAConfig, TrainingConfig
from hf_optcore.ema_manager import EMAManager
from hf_optcore.evaluator import Evaluator, token_statistics

PAD = 259


def _examples():
    g = torch.Generator().manual_seed(3)
    lengths = [5, 17, 9, 30, 4, 12, 22]
    out = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100  # a masked prompt, as completion-only SFT does
        out.append((ids, labels))
    return out


def _batches(examples, batch_size):
    batches = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        t = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), t), PAD)
        labels = torch.full((len(chunk), t), -100)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, : len(x)], labels[j, : len(y)], mask[j, : len(x)] = x, y, 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _hand_nll(model, examples):
    """Sum of -log p(label) over every shifted label token, one unpadded example at a time."""
    total, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
            for t in range(len(ids) - 1):
                y = int(labels[t + 1])
                if y != -100:
                    total -= float(logp[t, y])
                    count += 1
                    correct += int(int(logp[t].argmax()) == y)
    return total, count, correct


def test_token_weighted_loss_matches_hand_computation(tiny_model):
    examples = _examples()
    batches = _batches(examples, 3)  # batches of 3, 3 and 1 examples, very unequal token counts
    res = Evaluator(TrainingConfig(), tiny_model, batches, "cpu").evaluate()
    nll, count, correct = _hand_nll(tiny_model, examples)
    assert res["label_tokens"] == count
    assert res["loss"] == pytest.approx(nll / count, abs=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert res["token_accuracy"] == pytest.approx(correct / count)
    # What Trainer.evaluate reports: the mean of the model's per-batch mean losses.
    with torch.no_grad():
        mean_of_means = sum(float(tiny_model(**b).loss) for b in batches) / len(batches)
    assert abs(mean_of_means - res["loss"]) > 1e-3
    # And the token-weighted loss does not depend on how the examples are batched.
    res1 = Evaluator(TrainingConfig(), tiny_model, _batches(examples, 1), "cpu").evaluate()
    assert res1["loss"] == pytest.approx(res["loss"], abs=1e-6)


def test_labels_default_to_input_ids_without_padding(tiny_model):
    examples = [(ids, ids.clone()) for ids, _ in _examples()]
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _batches(examples, 4)]
    res = Evaluator(TrainingConfig(), tiny_model, batches, "cpu").evaluate()
    nll, count, _ = _hand_nll(tiny_model, examples)
    assert res["label_tokens"] == count
    assert res["loss"] == pytest.approx(nll / count, abs=1e-5)


def test_ema_metrics_side_by_side_and_weights_restored(tiny_model):
    ema = EMAManager(EMAConfig(enabled=True, decay=0.5), tiny_model)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    batches = _batches(_examples(), 4)
    res = Evaluator(TrainingConfig(), tiny_model, batches, "cpu", use_amp=True, ema_manager=ema).evaluate()
    for key in ("loss", "perplexity", "token_accuracy", "ema_loss", "ema_perplexity", "ema_token_accuracy"):
        assert math.isfinite(res[key]), key
    assert res["ema_loss"] != res["loss"]
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, trained[n]), n
    with ema.applied():
        direct = Evaluator(TrainingConfig(), tiny_model, batches, "cpu").evaluate()
    assert direct["loss"] == res["ema_loss"]
    assert tiny_model.training is True  # mode restored too


def test_token_statistics_ignores_masked_positions():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = 10.0
    labels = torch.tensor([[7, 2, -100, -100]])
    stats, preds = token_statistics(logits, labels)
    assert stats[0, 1] == 1 and stats[0, 2] == 1
    assert stats[0, 0] == pytest.approx(-torch.log_softmax(logits[0, 0], -1)[2].item())
    assert preds.tolist() == [[2, -100, -100]]


def test_empty_label_set_gives_nan_not_crash(tiny_model):
    b = _batches(_examples()[:2], 2)[0]
    b["labels"].fill_(-100)
    res = Evaluator(TrainingConfig(), tiny_model, [b], "cpu").evaluate()
    assert math.isnan(res["loss"]) and res["label_tokens"] == 0


METRIC_SCRIPT = '''
import datasets
import evaluate


class MatchRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="share of equal predictions", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"match_rate": sum(p == r for p, r in zip(predictions, references)) / len(predictions)}
'''


def test_a_local_metric_script_runs_only_with_trust_metric_code(tiny_model, tmp_path):
    from hf_optcore.evaluator import EvalTotals

    script = tmp_path / "match_rate.py"
    script.write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n" + METRIC_SCRIPT)
    refused = (f"training.eval_metrics: {str(script)!r} is metric code that would run when it loads (a local script "
               f"or folder, or another owner's Hub metric); set training.trust_metric_code=true if you trust it")
    with pytest.raises(ValueError) as info:
        Evaluator(TrainingConfig(eval_metrics=[str(script)]), tiny_model, _batches(_examples(), 3), "cpu").evaluate()
    assert str(info.value) == refused
    with pytest.raises(ValueError) as info:
        EvalTotals(None, metrics=[str(script)])  # the Trainer's evaluation
    assert str(info.value) == refused
    for name in ("someone/their-metric", str(tmp_path)):  # another owner's Hub metric, a local folder
        with pytest.raises(ValueError, match="is metric code that would run"):
            EvalTotals(None, metrics=[name])
    assert not (tmp_path / "RAN").exists()
    res = Evaluator(TrainingConfig(eval_metrics=[str(script)], trust_metric_code=True), tiny_model,
                    _batches(_examples(), 3), "cpu").evaluate()
    assert (tmp_path / "RAN").exists() and res["match_rate"] == pytest.approx(res["token_accuracy"])


def test_evaluate_metric_plugs_in_by_local_path(tiny_model, tmp_path):
    script = tmp_path / "match_rate.py"
    script.write_text(METRIC_SCRIPT)
    cfg = TrainingConfig(eval_metrics=[str(script)], trust_metric_code=True)
    ema = EMAManager(EMAConfig(enabled=True, decay=0.5), tiny_model)
    res = Evaluator(cfg, tiny_model, _batches(_examples(), 3), "cpu", ema_manager=ema).evaluate()
    assert res["match_rate"] == pytest.approx(res["token_accuracy"])
    assert res["ema_match_rate"] == pytest.approx(res["ema_token_accuracy"])


def test_unknown_metric_name_is_a_clear_error(tiny_model, tmp_path):
    cfg = TrainingConfig(eval_metrics=[str(tmp_path / "nope.py")], trust_metric_code=True)
    with pytest.raises(ValueError, match="training.eval_metrics: cannot load evaluate metric"):
        Evaluator(cfg, tiny_model, _batches(_examples(), 3), "cpu").evaluate()


# ---- two processes (gloo) -------------------------------------------------------------------

WORKER = '''
import json, sys
import torch
torch.set_num_threads(1)
from hf_optcore import OptCoreTrainer
from hf_optcore.config import TrainerConfig
from hf_optcore.tiny import build_tiny_model

out = sys.argv[1]
g = torch.Generator().manual_seed(11)
rows = []
for i in range(7):  # odd count, unequal lengths: the 2-process shards are uneven and padded by Accelerate
    n = 5 + (i * 11) % 23
    ids = torch.randint(0, 256, (n,), generator=g).tolist()
    rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})

def collate(batch):
    t = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), t), 259); lab = torch.full((len(batch), t), -100)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for j, r in enumerate(batch):
        n = len(r["input_ids"])
        ids[j, :n] = torch.tensor(r["input_ids"]); lab[j, :n] = torch.tensor(r["labels"]); mask[j, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}

cfg = TrainerConfig.from_dict({"output_dir": out, "model": {"lora": {"enabled": False}},
    "training": {"per_device_eval_batch_size": 2, "max_steps": 1},
    "hardware": {"use_cpu": True, "dataloader_pin_memory": False}, "ema": {"enabled": True, "decay": 0.9}})
trainer = OptCoreTrainer(build_tiny_model("llama", seed=0), args=cfg, eval_dataset=rows, data_collator=collate)
ema = trainer.optcore_state["ema"].manager
with torch.no_grad():
    for s in ema.shadow.values():
        s.mul_(0.9)  # EMA weights that differ from the live ones
metrics = trainer.evaluate()
if trainer.args.process_index == 0:
    metrics["world_size"] = trainer.args.world_size
    json.dump(metrics, open(out + "/metrics.json", "w"))
from hf_optcore.distributed import exit_process
exit_process(0)
'''


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_evaluation_equals_one_process(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "eval_worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(repo), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        out.mkdir()
        cmd = [sys.executable]
        if nproc > 1:
            cmd += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
        proc = subprocess.run(cmd + [str(script), str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[nproc] = json.loads((out / "metrics.json").read_text())
    one, two = results[1], results[2]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["eval_label_tokens"] == one["eval_label_tokens"]  # Accelerate's padding samples are not counted
    for key in ("eval_loss", "eval_token_accuracy", "eval_ema_loss", "eval_ema_token_accuracy"):
        assert abs(two[key] - one[key]) < 1e-6, (key, one[key], two[key])
    assert one["eval_ema_loss"] != one["eval_loss"]


def _standalone_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    from hf_optcore.tiny import build_tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = build_tiny_model("llama", seed=0)
        examples = _examples()[:6]
        mine = examples[rank::world]  # a sampler that does not pad: 3 examples per rank
        res = Evaluator(TrainingConfig(), model, _batches(mine, 2), "cpu").evaluate()
        if rank == 0:
            torch.save(res, out_file)
    except BaseException:
        dist.destroy_process_group()
        raise
    from hf_optcore.distributed import exit_process

    exit_process(0)  # destroys the group; skips the finalization that can abort gloo workers


@pytest.mark.slow
@pytest.mark.multiprocess
def test_standalone_evaluator_sums_across_a_torch_distributed_group(tmp_path, tiny_model):
    import torch.multiprocessing as mp

    out = tmp_path / "res.pt"
    mp.spawn(_standalone_worker, args=(2, str(tmp_path / "pg"), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    one = Evaluator(TrainingConfig(), tiny_model, _batches(_examples()[:6], 2), "cpu").evaluate()
    assert two["label_tokens"] == one["label_tokens"]
    assert abs(two["loss"] - one["loss"]) < 1e-6 and two["token_accuracy"] == pytest.approx(one["token_accuracy"])

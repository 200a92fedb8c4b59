"""Evaluation extends transformers': the loss is weighted by tokens over the whole set where it is the token
cross-entropy (the model's own or the chunked loss, through a user's compute_loss that returns it unchanged);
a custom loss (a compute_loss returning something else, a compute_loss_func) and a model whose loss is not a
token loss get transformers' own eval_loss and no perplexity; compute_metrics runs in the same single pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_optcore.config import TrainerConfig
from hf_optcore.tiny import build_tiny_model
from hf_optcore.trainer import OptCoreTrainer


def _rows(n=7):
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):  # unequal lengths: the mean of batch means is not the token mean
        length = 4 + (i * 5) % 13
        ids = torch.randint(0, 250, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 3] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _collate(batch):
    t = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), t), 0)
    lab = torch.full((len(batch), t), -100)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for j, r in enumerate(batch):
        n = len(r["input_ids"])
        ids[j, :n], lab[j, :n], mask[j, :n] = r["input_ids"], r["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def _token_mean_nll(model, rows):
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=r["input_ids"][None]).logits[0, :-1].float()
            target = r["labels"][1:]
            nll += nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            tokens += int((target != -100).sum())
    return nll / tokens


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, use_cpu=True, report_to="none",
                             disable_tqdm=True)


def _ours(tmp_path, cls=OptCoreTrainer, overrides=(), **kw):
    args = _args(tmp_path)
    return cls(model=build_tiny_model("llama", seed=0), args=args, eval_dataset=_rows(), data_collator=_collate,
               optcore_config=TrainerConfig.from_training_arguments(args, list(overrides)), **kw)


def test_eval_loss_is_the_token_mean_not_the_mean_of_batch_means(tmp_path):
    ours = _ours(tmp_path)
    metrics = ours.evaluate()
    expected = _token_mean_nll(ours.model, _rows())
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert metrics["eval_label_tokens"] == sum(int((r["labels"][1:] != -100).sum()) for r in _rows())
    hf = Trainer(model=ours.model, args=_args(tmp_path), eval_dataset=_rows(), data_collator=_collate).evaluate()
    assert abs(hf["eval_loss"] - expected) > 1e-4  # transformers' mean of batch means differs on this data


def _transformers_eval_loss(tmp_path, **kw):
    """What transformers.Trainer itself reports for the same model, data and loss hooks."""
    cls = kw.pop("cls", Trainer)
    trainer = cls(model=build_tiny_model("llama", seed=0), args=_args(tmp_path), eval_dataset=_rows(),
                  data_collator=_collate, **kw)
    return trainer.evaluate()["eval_loss"]


def test_a_users_compute_loss_that_changes_the_loss_gets_transformers_eval_loss(tmp_path):
    """A compute_loss returning something else than the token cross-entropy (here twice it, through super()) is a
    custom loss: eval_loss is transformers' own value for it, and there is no perplexity of a custom loss."""
    def doubled_over(base):
        class Doubled(base):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch)
                return (2 * loss, outputs) if return_outputs else 2 * loss
        return Doubled

    doubled = _ours(tmp_path, cls=doubled_over(OptCoreTrainer)).evaluate()
    assert doubled["eval_loss"] == pytest.approx(_transformers_eval_loss(tmp_path, cls=doubled_over(Trainer)),
                                                 rel=1e-6)
    assert "eval_perplexity" not in doubled and "eval_token_accuracy" not in doubled


def test_a_users_own_loss_that_never_calls_super_gets_transformers_eval_loss(tmp_path):
    class Own(OptCoreTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            loss = outputs.loss + 1.0  # a per-batch token mean, shifted
            return (loss, outputs) if return_outputs else loss

    class OwnHF(Trainer):
        compute_loss = Own.compute_loss

    own = _ours(tmp_path, cls=Own).evaluate()
    assert own["eval_loss"] == pytest.approx(_transformers_eval_loss(tmp_path, cls=OwnHF), rel=1e-6)
    assert "eval_perplexity" not in own and "eval_token_accuracy" not in own


def test_a_users_compute_loss_returning_the_token_loss_keeps_the_token_weighting(tmp_path):
    """A compute_loss that adds logging but returns super()'s loss unchanged is still the token loss: eval_loss is
    the whole set's token mean and the perplexity is exp of it."""
    seen = []

    class Logged(OptCoreTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            seen.append(1)
            return out

    metrics = _ours(tmp_path, cls=Logged).evaluate()
    expected = _token_mean_nll(build_tiny_model("llama", seed=0), _rows())
    assert seen and metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)


def test_compute_loss_func_is_respected(tmp_path):
    def halved(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        target = labels[:, 1:]
        total = nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        return 0.5 * total / (num_items_in_batch if num_items_in_batch is not None else (target != -100).sum())

    metrics = _ours(tmp_path, compute_loss_func=halved).evaluate()
    assert metrics["eval_loss"] == pytest.approx(_transformers_eval_loss(tmp_path, compute_loss_func=halved),
                                                 rel=1e-6)
    assert "eval_perplexity" not in metrics


def test_compute_metrics_runs_once_in_the_same_pass(tmp_path):
    calls = []

    def compute_metrics(pred):
        calls.append(pred.predictions.shape[0])
        return {"seen": float(pred.predictions.shape[0])}

    metrics = _ours(tmp_path, compute_metrics=compute_metrics).evaluate()
    assert calls == [7] and metrics["eval_seen"] == 7.0 and "eval_loss" in metrics


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(2, 1)

    def forward(self, x, labels=None):
        y = self.w(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(y, labels), "logits": y}


def test_a_model_whose_loss_is_not_a_token_loss_gets_transformers_evaluation(tmp_path):
    torch.manual_seed(0)
    rows = [{"x": torch.randn(2), "labels": torch.randn(())} for _ in range(7)]
    model = Regression()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, use_cpu=True, report_to="none")
    theirs = Trainer(model=model, args=args, eval_dataset=rows).evaluate()
    ours = OptCoreTrainer(model=model, args=args, eval_dataset=rows,
                          optcore_config=TrainerConfig.from_training_arguments(args, ["ema.enabled=true"])).evaluate()
    assert ours["eval_loss"] == theirs["eval_loss"]
    assert "eval_perplexity" not in ours and "eval_ema_loss" in ours

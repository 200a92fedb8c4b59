"""Per-token evaluation statistics shared by the Trainer's evaluation and the standalone :class:`Evaluator`.

:class:`EvalTotals` adds up one evaluation pass of the Trainer (token-weighted loss, NLL, tokens, argmax hits
over every batch and rank); :func:`token_statistics` computes per-example statistics from logits (the path
for models the chunked loss does not cover); :func:`load_eval_metrics` loads ``evaluate`` metrics; :func:`evaluation_divergence` says whether an evaluation
after training shows a run that diverged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100

__all__ = ["EvalTotals", "causal_lm_label_counts", "evaluation_divergence", "load_eval_metrics",
           "token_statistics"]


def token_statistics(logits: torch.Tensor, labels: torch.Tensor,
                     shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``[nll_sum, tokens, correct]`` (float64, shape ``[B, 3]``) and shifted predictions.

    Args:
        logits: ``[B, T, V]`` next-token logits.
        labels: ``[B, T]`` labels, ``-100`` where no loss is taken (shifted by one here, as
            Hugging Face causal LMs do inside their loss).
        shifted: ``labels`` are already the next-token targets (a collator's ``shift_labels``).

    Returns:
        ``(stats, predictions)``; ``predictions`` is ``[B, T - 1]`` (``[B, T]`` when shifted) argmax
        with ``-100`` where the label is ignored.
    """
    if shifted:
        logits, target = logits.float(), labels.to(logits.device)
    else:
        logits = logits[:, :-1, :].float()
        target = labels[:, 1:].to(logits.device)
    mask = target != IGNORE_INDEX
    nll = nn.functional.cross_entropy(
        logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    pred = logits.argmax(dim=-1)
    stats = torch.stack(
        [nll.double().sum(1), mask.sum(1).double(), ((pred == target) & mask).sum(1).double()], dim=1
    )
    return stats, pred.masked_fill(~mask, IGNORE_INDEX)


def causal_lm_label_counts(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor | None:
    """Per-example numbers of label tokens of a causal-LM batch (after the shift), or None when the batch
    holds no token labels of a causal LM (then its loss is not a token loss and is not weighted here)."""
    shift = inputs.get("shift_labels") if hasattr(inputs, "get") else None
    if isinstance(shift, torch.Tensor):
        return (shift != IGNORE_INDEX).sum(-1)
    labels = inputs.get("labels") if hasattr(inputs, "get") else None
    ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.is_floating_point():
        return None
    if isinstance(ids, torch.Tensor) and ids.shape != labels.shape:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from hf_optcore.wrapping import base_model

    if type(base_model(model)).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return None
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


class EvalTotals:
    """The sums of one evaluation pass: token-weighted loss, NLL, tokens and argmax hits over every rank.

    The Trainer feeds it per batch: :meth:`begin_batch` with the batch's per-example label-token
    counts, then whatever the loss path knows exactly (:meth:`observe_outputs` with the model's
    logits, or :meth:`observe_stats` from a logits-free loss), then :meth:`end_batch` with the
    batch loss. The totals stand for the whole set only while every batch's loss is the token
    cross-entropy those statistics describe (or its label-smoothed form): a user's ``compute_loss``
    that returns something else (its own loss, or the model's plus a term) makes the pass a custom
    loss, whose ``eval_loss`` is transformers' own and which has no perplexity (:meth:`metrics` is
    then empty). Per-example sums are gathered with ``gather_for_metrics``, which drops the examples
    that Accelerate repeated to even out the last batch across ranks.

    Args:
        accelerator: the Trainer's ``Accelerator`` (None: one process).
        metrics: ``evaluate`` metric names, paths or modules computed on next-token predictions.
        trust_code: let metrics that are code from elsewhere load (see :func:`load_eval_metrics`).
        label_smoothing: the loss is label-smoothed (it is then not the NLL, and is weighted as given).
    """

    def __init__(self, accelerator: Any = None, metrics: Iterable[Any] = (), trust_code: bool = False,
                 label_smoothing: bool = False):
        self.accelerator = accelerator
        self.totals = torch.zeros(4, dtype=torch.float64)  # loss sum, NLL sum, tokens, correct
        self.exact = True  # every batch so far had a token loss with its statistics
        self.label_smoothing = label_smoothing
        self.loss_only = True  # the batch's logits are not wanted (no compute_metrics): the chunked loss may run
        self.modules = load_eval_metrics(metrics, trust_code=trust_code)
        self._counts: torch.Tensor | None = None
        self._stats: torch.Tensor | None = None
        self._preds: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin_batch(self, counts: torch.Tensor) -> None:
        self._counts, self._stats, self._preds = counts, None, None

    def observe_stats(self, stats: torch.Tensor, predictions: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None) -> None:
        """Exact per-example ``[nll_sum, tokens, correct]`` (and shifted predictions/labels) of the batch."""
        if self._counts is None:
            return
        self._stats = stats.detach().double()
        if predictions is not None and labels is not None:
            self._preds = (predictions, labels)

    def observe_outputs(self, outputs: Any, inputs: dict[str, Any]) -> None:
        """The model's outputs of the batch: statistics from its logits, one example at a time (no full upcast)."""
        logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
        labels = inputs.get("shift_labels")
        shifted = labels is not None
        if labels is None:
            labels = inputs.get("labels")
        if self._counts is None or not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
            return
        rows, preds = [], []
        for i in range(logits.shape[0]):
            stats, pred = token_statistics(logits[i:i + 1], labels[i:i + 1], shifted=shifted)
            rows.append(stats)
            preds.append(pred)
        self.observe_stats(torch.cat(rows), torch.cat(preds), labels if shifted else labels[:, 1:])

    def end_batch(self, loss: torch.Tensor | None) -> None:
        counts = self._counts
        if counts is None:
            return
        n = counts.double().cpu()
        if self._stats is not None and loss is not None:
            nll, tokens, correct = self._stats.cpu().unbind(-1)
            if self.label_smoothing:
                loss_sum = float(loss) * n  # label-smoothed: the batch's token mean is what is weighted
            elif self._is_token_mean(loss, nll, tokens):
                loss_sum = nll
            else:
                self.exact = False  # the returned loss is not the cross-entropy: a custom loss
                loss_sum = nll
        else:
            self.exact = False
            nll, tokens, correct = n * 0, n, n * 0
            loss_sum = nll
        rows = torch.stack([loss_sum, nll, tokens, correct], dim=-1)
        if self.accelerator is not None:
            rows = self.accelerator.gather_for_metrics(rows.to(self.accelerator.device)).cpu()
        self.totals += rows.sum(0)
        if self._preds is not None and self.modules:
            self._add_to_metrics(*self._preds)
        self._counts = self._stats = self._preds = None

    @staticmethod
    def _is_token_mean(loss: torch.Tensor, nll: torch.Tensor, tokens: torch.Tensor) -> bool:
        """Whether ``loss`` is the batch's token-mean cross-entropy (to the rounding of a bf16 forward)."""
        total = float(tokens.sum())
        if total == 0:
            return True
        return math.isclose(float(loss), float(nll.sum()) / total, rel_tol=1e-3, abs_tol=1e-5)

    def _add_to_metrics(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        if self.accelerator is not None:
            acc = self.accelerator
            preds = acc.gather_for_metrics(acc.pad_across_processes(preds.to(acc.device), dim=1, pad_index=IGNORE_INDEX))
            labels = acc.gather_for_metrics(acc.pad_across_processes(labels.contiguous().to(acc.device), dim=1,
                                                                     pad_index=IGNORE_INDEX))
        mask = labels.reshape(-1) != IGNORE_INDEX
        p, r = preds.reshape(-1)[mask].tolist(), labels.reshape(-1).to(preds.device)[mask].tolist()
        for module in self.modules:
            module.add_batch(predictions=p, references=r)

    def metrics(self) -> dict[str, float]:
        """``loss``, ``perplexity``, ``token_accuracy``, ``label_tokens`` and the extra metrics of a pass whose every
        batch had a token loss; empty when no batch was counted or the loss is a custom one (see the class)."""
        loss_sum, nll, tokens, correct = self.totals.tolist()
        if tokens == 0 or not self.exact:
            return {}
        loss = loss_sum / tokens
        mean_nll = nll / tokens
        out = {"loss": loss, "perplexity": math.exp(mean_nll) if mean_nll < 700 else float("inf"),
               "token_accuracy": correct / tokens, "label_tokens": int(tokens)}
        for module in self.modules:
            for key, value in (module.compute() or {}).items():
                out[key if key not in out else f"{getattr(module, 'name', 'metric')}_{key}"] = value
        return out


def load_eval_metrics(names: Iterable[Any], trust_code: bool = False) -> list[Any]:
    """Load ``evaluate`` metrics by name or local script path (objects with ``compute`` pass through).

    Hub names (``"accuracy"``) need network access the first time; a local path to a metric
    script or folder works offline.

    Args:
        names: metric names, paths or metric objects.
        trust_code: allow metrics that are code from elsewhere (a local script or folder, another owner's
            Hub metric; see :func:`hf_optcore._validation.is_metric_code`), which runs when it loads
            (``training.trust_metric_code``, default False).

    Raises:
        ValueError: a metric cannot be loaded, or is such code and ``trust_code`` is False (nothing is run).
    """
    from hf_optcore._validation import is_metric_code

    modules = []
    for name in names:
        if hasattr(name, "compute") and hasattr(name, "add_batch"):
            modules.append(name)
            continue
        if not trust_code and is_metric_code(name):
            raise ValueError(f"training.eval_metrics: {str(name)!r} is metric code that would run when it loads (a "
                             f"local script or folder, or another owner's Hub metric); set "
                             f"training.trust_metric_code=true if you trust it")
        try:
            import evaluate
        except ImportError as exc:  # pragma: no cover - evaluate is a dependency
            raise ImportError(f"training.eval_metrics: {name!r} needs the `evaluate` package ({exc})") from exc
        try:
            # In memory: every rank computes on gathered predictions, so no shared cache files.
            modules.append(evaluate.load(name, keep_in_memory=True))
        except Exception as exc:
            raise ValueError(
                f"training.eval_metrics: cannot load evaluate metric {name!r} ({type(exc).__name__}: {exc}); "
                "valid: an `evaluate` metric name (needs network the first time) or a local metric script path"
            ) from exc
    return modules


def evaluation_divergence(after: dict[str, float], before: dict[str, float] | None = None,
                          vocab_size: int | None = None, prefix: str = "eval_") -> str | None:
    """Why the evaluation ``after`` training shows that the run diverged, or None when it does not.

    A run diverged when its loss after training (``{prefix}loss``, and with EMA ``{prefix}ema_loss``) is not a
    finite number, when its perplexity overflows (is infinite), or when its perplexity is more than twice the
    vocabulary size (worse than half as good as guessing every token uniformly) and higher than ``before``
    training. Such weights are not a result: the recipe exits with status 3, as for a non-finite training loss.

    Args:
        after: the metrics of the evaluation after training (``Trainer.evaluate``'s dict).
        before: the metrics of the evaluation before training (default None: not compared).
        vocab_size: the model's vocabulary size (default None: the perplexity bound is not applied).
        prefix: the metric key prefix (default ``"eval_"``).
    """
    for name in ("loss", "ema_loss"):
        key = f"{prefix}{name}"
        loss = after.get(key)
        if not isinstance(loss, (int, float)):
            continue
        if not math.isfinite(loss):
            return f"{key} after training is {loss}"
        ppl_key = f"{prefix}{name.replace('loss', 'perplexity')}"
        ppl = after.get(ppl_key, math.exp(loss) if loss < 700 else float("inf"))
        if not math.isfinite(ppl):
            return f"{key} after training is {loss:.4g} and its perplexity overflows ({ppl_key} {ppl})"
        prior = (before or {}).get(key)
        prior = prior if isinstance(prior, (int, float)) and math.isfinite(prior) else None
        if vocab_size and ppl > 2 * vocab_size and (prior is None or loss > prior):
            since = f", up from {prior:.4g} before training" if prior is not None else ""
            return (f"{key} after training is {loss:.4g}{since} (perplexity {ppl:.3g}, more than twice the "
                    f"{vocab_size} of a uniform guess over the vocabulary)")
    return None

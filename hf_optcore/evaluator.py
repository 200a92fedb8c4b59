"""Token-exact evaluation of causal LMs, with live and EMA metrics side by side.

The evaluation loss is the mean negative log-likelihood over *every* label token of the
evaluation set on every rank: ``sum(token NLL) / number of tokens``. The mean of per-batch
means that ``Trainer.evaluate`` reports weights a short batch as much as a long one and so
depends on batch composition; this does not, and it is identical with 1 or N processes.
Perplexity is ``exp(loss)``; token accuracy counts argmax hits over the same tokens.

Labels follow the training convention of Hugging Face causal LMs: ``labels`` equal to
``input_ids`` with ``-100`` on masked positions, shifted by one inside the loss; a batch
without ``labels`` uses ``input_ids`` with padding (``attention_mask == 0``) masked.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hf_optcore.distributed import rank_and_world

logger = logging.getLogger(__name__)

__all__ = ["EvalTotals", "Evaluator", "causal_lm_label_counts", "load_eval_metrics", "token_statistics"]

IGNORE_INDEX = -100
# Kernel arguments that HF models take through **kwargs (packed sequences, flash attention).
_PASS_THROUGH = {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}
_CORE = ("loss", "perplexity", "token_accuracy")


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
    batch loss. Without exact statistics the batch's loss counts for each of its tokens (its token
    mean times its tokens), so a user's ``compute_loss`` or ``compute_loss_func`` is still weighted
    by tokens. Per-example sums are gathered with ``gather_for_metrics``, which drops the examples
    that Accelerate repeated to even out the last batch across ranks.

    Args:
        accelerator: the Trainer's ``Accelerator`` (None: one process).
        metrics: ``evaluate`` metric names, paths or modules computed on next-token predictions.
    """

    def __init__(self, accelerator: Any = None, metrics: Iterable[Any] = ()):
        self.accelerator = accelerator
        self.totals = torch.zeros(4, dtype=torch.float64)  # loss sum, NLL sum, tokens, correct
        self.exact = True
        self.loss_only = True  # the batch's logits are not wanted (no compute_metrics): the chunked loss may run
        self.modules = load_eval_metrics(metrics)
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
        if self._stats is not None:
            nll, tokens, correct = self._stats.cpu().unbind(-1)
            # A loss with label smoothing is not the NLL: its value (the batch's token mean) is what is weighted.
            smoothed = loss is not None and self._label_smoothed(loss, nll, tokens)
            loss_sum = float(loss) * n if smoothed else nll
        else:
            self.exact = False
            loss_sum = (float(loss) if loss is not None else float("nan")) * n
            nll, tokens, correct = loss_sum, n, torch.zeros_like(n)
        rows = torch.stack([loss_sum, nll, tokens, correct], dim=-1)
        if self.accelerator is not None:
            rows = self.accelerator.gather_for_metrics(rows.to(self.accelerator.device)).cpu()
        self.totals += rows.sum(0)
        if self._preds is not None and self.modules:
            self._add_to_metrics(*self._preds)
        self._counts = self._stats = self._preds = None

    @staticmethod
    def _label_smoothed(loss: torch.Tensor, nll: torch.Tensor, tokens: torch.Tensor) -> bool:
        total = float(tokens.sum())
        return total > 0 and not math.isclose(float(loss), float(nll.sum()) / total, rel_tol=1e-4, abs_tol=1e-6)

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
        """``loss``, ``perplexity``, ``num_tokens`` and, where every batch had exact statistics, ``token_accuracy``
        and the extra metrics; empty when no batch was counted."""
        loss_sum, nll, tokens, correct = self.totals.tolist()
        if tokens == 0:
            return {}
        loss = loss_sum / tokens
        mean_nll = nll / tokens
        out = {"loss": loss, "perplexity": math.exp(mean_nll) if mean_nll < 700 else float("inf"),
               "num_tokens": int(tokens)}
        if self.exact:
            out["token_accuracy"] = correct / tokens
            for module in self.modules:
                for key, value in (module.compute() or {}).items():
                    out[key if key not in out else f"{getattr(module, 'name', 'metric')}_{key}"] = value
        return out


def load_eval_metrics(names: Iterable[Any]) -> list[Any]:
    """Load ``evaluate`` metrics by name or local script path (objects with ``compute`` pass through).

    Hub names (``"accuracy"``) need network access the first time; a local path to a metric
    script or folder works offline.
    """
    modules = []
    for name in names:
        if hasattr(name, "compute") and hasattr(name, "add_batch"):
            modules.append(name)
            continue
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


def _forward_keys(model: nn.Module) -> set[str] | None:
    """Batch keys the model's forward accepts (None: accept all)."""
    from hf_optcore.wrapping import base_model

    base = base_model(model)
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return None
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        named |= _PASS_THROUGH
    return named


class Evaluator:
    """Token-weighted loss, perplexity and token accuracy, live and (optionally) with EMA weights.

    Args:
        config: a :class:`~hf_optcore.config.TrainingConfig`; its ``eval_metrics`` (if any) names
            extra ``evaluate`` metrics computed on next-token predictions vs. labels.
        model: the model to evaluate (a ``PreTrainedModel``, ``PeftModel`` or DDP-wrapped one).
        val_loader: iterable of dict batches with ``input_ids`` and ``labels`` or ``attention_mask``.
        device: where batches are moved (default: the model's device).
        use_amp: autocast the forward (bfloat16, float16 where unsupported) on CUDA; ignored on CPU,
            where autocast would be slower and change the numbers.
        ema_manager: an :class:`~hf_optcore.ema_manager.EMAManager`; when given, every
            ``evaluate()`` also reports ``ema_*`` metrics computed with the EMA weights swapped in.
        metrics: ``evaluate`` metric names, paths or modules (default: ``config.eval_metrics``).
        accelerator: an ``accelerate.Accelerator`` whose prepared ``val_loader`` is sharded across
            ranks; its ``gather_for_metrics`` drops the samples it duplicated to even out the shards.
            Without one, an initialised ``torch.distributed`` group sums the statistics (the loader
            must then not duplicate samples).
        autocast: a callable returning the context the forward runs in (overrides ``use_amp``).
        prepare_batch: a callable applied to each batch instead of moving it to ``device``.
    """

    def __init__(
        self,
        config: Any,
        model: nn.Module,
        val_loader: Iterable[dict[str, Any]],
        device: torch.device | str | None = None,
        use_amp: bool = True,
        ema_manager: Any = None,
        metrics: Iterable[Any] | None = None,
        *,
        accelerator: Any = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        prepare_batch: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        self.config = config
        self.model = model
        self.val_loader = val_loader
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.device = torch.device(device)
        self.use_amp = use_amp
        self.ema_manager = ema_manager
        names = list(metrics) if metrics is not None else list(getattr(config, "eval_metrics", None) or [])
        self.metric_names = names
        self.accelerator = accelerator
        self._autocast = autocast
        self._prepare_batch = prepare_batch
        self._keys = _forward_keys(model)
        self._logits_free: bool | None = None

    # ---- public -------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Evaluate the live weights, then the EMA weights when an ``ema_manager`` is set.

        Returns:
            ``loss``, ``perplexity``, ``token_accuracy``, ``num_tokens``, any extra metrics, and
            with EMA the same prefixed ``ema_`` (``num_tokens`` excepted).
        """
        results = self.evaluate_weights()
        if self.ema_manager is not None:
            with self.ema_manager.applied():
                ema = self.evaluate_weights()
            results.update({f"ema_{k}": v for k, v in ema.items() if k != "num_tokens"})
        return results

    @torch.no_grad()
    def evaluate_weights(self) -> dict[str, float]:
        """One pass over ``val_loader`` with whatever weights the model holds now."""
        was_training = self.model.training
        self.model.eval()
        modules = load_eval_metrics(self.metric_names)
        totals = torch.zeros(3, dtype=torch.float64)
        try:
            with self._forward_context():
                for batch in self.val_loader:
                    stats, preds, labels = self._batch(batch)
                    totals += self._gather(stats).sum(0).cpu()
                    if modules:
                        self._add_to_metrics(modules, preds, labels)
            if self.accelerator is None and rank_and_world()[1] > 1:
                import torch.distributed as dist

                # The statistics were not gathered per batch: sum them once here.
                t = totals.to(self._collective_device())
                dist.all_reduce(t)
                totals = t.cpu()
        finally:
            self.model.train(was_training)
        nll, tokens, correct = totals.tolist()
        if tokens == 0:
            logger.warning("Evaluator: the evaluation data holds no label token (all labels are -100)")
            loss = acc = float("nan")
        else:
            loss, acc = nll / tokens, correct / tokens
        out = {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else float("inf"),
            "token_accuracy": acc,
            "num_tokens": int(tokens),
        }
        for module in modules:
            for key, value in (module.compute() or {}).items():
                out[key if key not in out else f"{getattr(module, 'name', 'metric')}_{key}"] = value
        return out

    # ---- internals ----------------------------------------------------------------------

    def _forward_context(self) -> contextlib.AbstractContextManager:
        if self._autocast is not None:
            return self._autocast()
        if self.use_amp and self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def _batch(self, batch: dict[str, Any]):
        if self._prepare_batch is not None:
            batch = self._prepare_batch(batch)
        else:
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"]
            if batch.get("attention_mask") is not None:
                labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        inputs = {
            k: v for k, v in batch.items()
            if k not in ("labels", "num_items_in_batch") and (self._keys is None or k in self._keys)
        }
        if self._logits_free is None:
            from hf_optcore.loss import supports_logits_free

            self._logits_free = supports_logits_free(self.model)[0]
        if self._logits_free:
            from hf_optcore.loss import causal_lm_loss

            # Statistics chunk by chunk: no [tokens, vocabulary] logits for the batch, no upcast copy.
            _, stats = causal_lm_loss(self.model, {**inputs, "labels": labels}, return_stats=True,
                                      return_predictions=True)
            return stats.per_example, stats.predictions, stats.targets
        # No labels to the model: the loss is computed here, per token, without its normalisation.
        outputs = self.model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", outputs[0])
        rows = [token_statistics(logits[i:i + 1], labels[i:i + 1]) for i in range(logits.shape[0])]  # no full upcast
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]), labels[:, 1:]

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator is not None:
            return self.accelerator.gather_for_metrics(t)
        return t

    def _add_to_metrics(self, modules: list[Any], preds: torch.Tensor, labels: torch.Tensor) -> None:
        if self.accelerator is not None:
            preds = self.accelerator.gather_for_metrics(
                self.accelerator.pad_across_processes(preds, dim=1, pad_index=IGNORE_INDEX))
            labels = self.accelerator.gather_for_metrics(
                self.accelerator.pad_across_processes(labels.contiguous(), dim=1, pad_index=IGNORE_INDEX))
        elif rank_and_world()[1] > 1:
            import torch.distributed as dist

            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (preds.cpu(), labels.cpu()))
            preds = torch.cat([pr.reshape(-1) for pr, _ in parts])
            labels = torch.cat([lab.reshape(-1) for _, lab in parts])
        mask = labels.reshape(-1) != IGNORE_INDEX
        p, r = preds.reshape(-1)[mask].tolist(), labels.reshape(-1)[mask].tolist()
        for module in modules:
            module.add_batch(predictions=p, references=r)

    def _collective_device(self) -> torch.device:
        import torch.distributed as dist

        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

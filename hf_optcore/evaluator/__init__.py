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
from hf_optcore.evaluator.totals import (
    IGNORE_INDEX,
    EvalTotals,
    causal_lm_label_counts,
    evaluation_divergence,
    load_eval_metrics,
    token_statistics,
)

logger = logging.getLogger(__name__)

__all__ = ["EvalTotals", "Evaluator", "causal_lm_label_counts", "evaluation_divergence", "load_eval_metrics",
           "token_statistics"]

# Kernel arguments that HF models take through **kwargs (packed sequences, flash attention).
_PASS_THROUGH = {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}


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
        metrics: ``evaluate`` metric names, paths or modules (default: ``config.eval_metrics``, whose local
            scripts and other owners' Hub metrics load only with ``config.trust_metric_code``; a list given here
            is the caller's own choice and loads as given).
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
        self._trust_metric_code = metrics is not None or bool(getattr(config, "trust_metric_code", False))
        self.accelerator = accelerator
        self._autocast = autocast
        self._prepare_batch = prepare_batch
        self._keys = _forward_keys(model)
        self._logits_free: bool | None = None

    # ---- public -------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Evaluate the live weights, then the EMA weights when an ``ema_manager`` is set.

        Returns:
            ``loss``, ``perplexity``, ``token_accuracy``, ``label_tokens``, any extra metrics, and
            with EMA the same prefixed ``ema_`` (``label_tokens`` excepted).
        """
        results = self.evaluate_weights()
        if self.ema_manager is not None:
            with self.ema_manager.applied():
                ema = self.evaluate_weights()
            results.update({f"ema_{k}": v for k, v in ema.items() if k != "label_tokens"})
        return results

    @torch.no_grad()
    def evaluate_weights(self) -> dict[str, float]:
        """One pass over ``val_loader`` with whatever weights the model holds now."""
        was_training = self.model.training
        self.model.eval()
        modules = load_eval_metrics(self.metric_names, trust_code=self._trust_metric_code)
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
            "label_tokens": int(tokens),
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

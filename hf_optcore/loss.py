"""Causal-LM loss and evaluation statistics that never hold ``[tokens, vocabulary]`` logits for the whole batch.

A causal LM's largest tensor is its logits: 8 x 512 tokens x 49k vocabulary is 0.8 GB in float32,
and the loss keeps two or three tensors that size alive at once (the logits, their log-softmax
and its gradient). Here the model runs with its output head answering with its own input, so
its forward returns the final hidden states; the real head is then applied to 1,024 label
tokens at a time, each chunk's cross-entropy computed in float32 and, in training, its gradient
back-propagated through the head at once (the chunk's logits buffer becomes its gradient), so
the largest tensor is one ``[chunk, vocabulary]`` float32 buffer and nothing is recomputed.
Positions whose label is ``-100`` (prompts, padding, packed-row boundaries) never reach the head.

Two layers:

- :func:`chunked_linear_cross_entropy` (pure torch): hidden states, a head module (any callable
  module: ``nn.Linear``, a tied head, peft's ``lora.Linear``), targets -> summed loss and optional
  per-example statistics.
- :func:`causal_lm_loss` (Hugging Face aware): a model (bare, DDP, torch.compile, ``PeftModel``)
  and the Trainer's batch -> the loss exactly as ``model(**inputs).loss`` / ``LabelSmoother``
  define it. :func:`supports_logits_free` says where that is exact; elsewhere callers use the
  model's own loss.

On CUDA with ``liger-kernel`` installed and a plain ``nn.Linear`` head, training uses Liger's
fused linear cross-entropy instead of the chunk loop (this path cannot run on the CPU machines
the tests use; it is exercised only where a GPU and Liger are present).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IGNORE_INDEX",
    "VERIFIED_MODEL_TYPES",
    "LossStats",
    "causal_lm_loss",
    "chunked_linear_cross_entropy",
    "output_head_bypassed",
    "supports_logits_free",
]

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024
# Model types whose loss tests/test_loss.py checks against the model's own (tiny models from config).
VERIFIED_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "gemma", "gpt_neox", "falcon", "opt", "mixtral",
})
# Config attributes that change the logits after the head (soft-capping, scaling): never exact here.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_NOT_FOR_THE_MODEL = ("labels", "shift_labels", "num_items_in_batch")


@dataclass
class LossStats:
    """Exact per-example statistics of one batch, computed chunk by chunk.

    Attributes:
        per_example: ``[B, 3]`` float64 ``[nll_sum, label_tokens, argmax_correct]`` per example (the
            rows :meth:`hf_optcore.evaluator.EvalTotals.observe_stats` takes).
        loss_sum: the summed (label-smoothed, when smoothing is on) loss before normalisation, detached.
        predictions: argmax next-token predictions aligned with ``targets`` (``-100`` where the label
            is ignored), when requested; ``[B, T - 1]`` for shifted ``labels``, ``[B, T]`` for ``shift_labels``.
        targets: the next-token labels the statistics were taken over (same shape as ``predictions``).
    """

    per_example: torch.Tensor
    loss_sum: torch.Tensor
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    @property
    def nll_sum(self) -> torch.Tensor:
        return self.per_example[:, 0].sum()

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.per_example[:, 1].sum()

    @property
    def num_correct(self) -> torch.Tensor:
        return self.per_example[:, 2].sum()


# ---- pure torch ---------------------------------------------------------------------------------


class _Recorder:
    """Per-example ``[nll_sum, tokens, correct]`` sums and argmax predictions, filled chunk by chunk."""

    def __init__(self, rows: int, device: torch.device, want_preds: bool):
        self.stats = torch.zeros(rows, 3, dtype=torch.float64, device=device)
        self.preds: list[torch.Tensor] | None = [] if want_preds else None

    def add(self, logits: torch.Tensor, target: torch.Tensor, nll: torch.Tensor, example: torch.Tensor) -> None:
        pred = logits.argmax(dim=-1)
        rows = torch.stack([nll.double(), torch.ones_like(nll, dtype=torch.float64), (pred == target).double()], dim=1)
        self.stats.index_add_(0, example, rows)
        if self.preds is not None:
            self.preds.append(pred)


def _chunk(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor, label_smoothing: float,
           params: list[torch.Tensor], recorder: _Recorder | None, example: torch.Tensor | None, grad_hidden: bool):
    """One chunk's summed loss and its gradients wrt ``hidden`` (when ``grad_hidden``) and ``params``.

    The gradient of the loss wrt the logits is written into the float32 logits buffer itself
    (softmax minus the smoothed one-hot), so a chunk holds one ``[chunk, V]`` float32 tensor (two
    when the head computes in a lower precision).
    """
    want_grads = grad_hidden or bool(params)
    h = hidden.detach().requires_grad_(grad_hidden)
    with torch.set_grad_enabled(want_grads):
        out = head(h)
    # float32 however the head computes: transformers' ForCausalLMLoss upcasts the same way. For a float32
    # head this is `out` itself, overwritten below (nothing in a linear head's backward reads its output).
    logits = out.detach().float()
    vocab = logits.shape[-1]
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(1, target.unsqueeze(1)).squeeze(1)
    if label_smoothing == 0.0:
        loss = nll.sum()
    else:
        # LabelSmoother: (1 - eps) * NLL + eps * mean over the vocabulary of -log p, per label token;
        # sum_v -log p_v = V * lse - sum_v logit_v.
        smooth = vocab * lse - logits.sum(dim=-1)
        loss = (1.0 - label_smoothing) * nll.sum() + (label_smoothing / vocab) * smooth.sum()
    if recorder is not None:
        recorder.add(logits, target, nll, example)
    if not want_grads:
        return loss, None, []
    grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
    if label_smoothing:
        grad.sub_(label_smoothing / vocab)
    grad.scatter_add_(1, target.unsqueeze(1), grad.new_full((target.shape[0], 1), label_smoothing - 1.0))
    inputs = ([h] if h.requires_grad else []) + params
    grads = torch.autograd.grad(out, inputs, grad_outputs=grad.to(out.dtype), allow_unused=True)
    grad_h = grads[0] if h.requires_grad else None
    return loss, grad_h, list(grads[1:] if h.requires_grad else grads)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed chunked cross-entropy whose gradients are computed chunk by chunk in the forward.

    Each chunk's logits exist once: the forward turns them into the loss and, in place, into their
    gradient, and back-propagates that through the head right away (no recomputation in the
    backward); the backward only scales the stored gradients of the hidden states and of the head's
    trainable parameters by the incoming gradient (the loss scale, 1 / num_items, ...).
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, label_smoothing, chunk_size, recorder, example, *params):
        n = targets.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        loss = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            ex = example[start:end] if example is not None else None
            part, g_h, g_p = _chunk(head, hidden[start:end], targets[start:end], label_smoothing, list(params),
                                    recorder, ex, grad_hidden is not None)
            loss += part
            if grad_hidden is not None:
                grad_hidden[start:end] = g_h
            for i, g in enumerate(g_p):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        ctx.has_hidden_grad = grad_hidden is not None
        ctx.param_has_grad = [g is not None for g in grad_params]
        ctx.save_for_backward(*([grad_hidden] if grad_hidden is not None else []),
                              *[g for g in grad_params if g is not None])
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("the chunked loss's stored gradients were consumed by a first backward; "
                               "backward through it twice (retain_graph) is not supported")
        ctx.used = True
        saved = list(ctx.saved_tensors)
        # In place: these buffers were made for this backward, and scaling them costs no second copy.
        grad_hidden = saved.pop(0).mul_(grad_loss) if ctx.has_hidden_grad else None
        grads = [saved.pop(0).mul_(grad_loss) if has else None for has in ctx.param_has_grad]
        return (grad_hidden, None, None, None, None, None, None, *grads)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    return_stats: bool = False,
    return_predictions: bool = False,
) -> tuple[torch.Tensor, LossStats | None]:
    """Summed cross-entropy of ``head(hidden)`` against ``targets``, ``chunk_size`` label tokens at a time.

    With autograd on, each chunk's gradients (wrt ``hidden`` and the head's trainable parameters) are
    computed in the forward as soon as its logits exist, and stored until the backward scales them:
    no chunk is recomputed, and the largest tensor is one chunk's float32 logits.

    Args:
        hidden: ``[..., H]`` inputs of the head (for a causal LM, already aligned with ``targets``).
        head: the module producing logits from ``[n, H]`` (called as a module, so hooks and peft's
            LoRA layers run).
        targets: ``hidden.shape[:-1]`` class indices; ``ignore_index`` rows never reach the head.
        chunk_size: label tokens per head call.
        ignore_index: target value that takes no loss (default -100).
        label_smoothing: LabelSmoother's epsilon (0 = plain NLL).
        return_stats: also return :class:`LossStats` (one row per leading index of a 2-D ``targets``).
        return_predictions: include argmax predictions in the stats (implies ``return_stats``).

    Returns:
        ``(loss_sum, stats_or_None)``: ``loss_sum`` is a float32 scalar, the *sum* over label tokens
        (callers divide by their token count). Backward through it once (no ``retain_graph`` reuse).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden shape without its last "
                         f"dimension {tuple(hidden.shape[:-1])}")
    return_stats = return_stats or return_predictions
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(hidden.device)
    rows = (flat_targets != ignore_index).nonzero().squeeze(1)
    n = rows.numel()
    # One gather of the label rows (its backward is one scatter into a [tokens, H] gradient).
    if n == flat_targets.numel():
        h_valid, t_valid = flat_hidden, flat_targets
    else:
        h_valid, t_valid = flat_hidden.index_select(0, rows), flat_targets.index_select(0, rows)
    per_row = targets.shape[-1] if targets.dim() >= 2 else max(flat_targets.numel(), 1)
    n_examples = flat_targets.numel() // per_row if targets.dim() >= 2 else 1
    recorder = _Recorder(n_examples, hidden.device, return_predictions) if return_stats else None
    example = rows // per_row if return_stats else None
    params = [p for p in head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []

    if n == 0:
        # Keep the head and the hidden states in the graph (DDP waits for every trainable parameter).
        loss_sum = head(flat_hidden[:1]).float().sum() * 0.0
    elif torch.is_grad_enabled() and (h_valid.requires_grad or params):
        loss_sum = _LinearCrossEntropy.apply(h_valid, t_valid, head, label_smoothing, chunk_size, recorder, example,
                                             *params)
    else:
        loss_sum = h_valid.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_size):
            ex = example[start:start + chunk_size] if example is not None else None
            part, _, _ = _chunk(head, h_valid[start:start + chunk_size], t_valid[start:start + chunk_size],
                                label_smoothing, [], recorder, ex, False)
            loss_sum += part

    stats = None
    if recorder is not None:
        predictions = None
        if return_predictions:
            predictions = torch.full_like(flat_targets, ignore_index)
            if n:
                predictions[rows] = torch.cat(recorder.preds)
            predictions = predictions.view(targets.shape)
        stats = LossStats(per_example=recorder.stats, loss_sum=loss_sum.detach(), predictions=predictions,
                          targets=targets if return_predictions else None)
    return loss_sum, stats


# ---- Hugging Face layer -------------------------------------------------------------------------


def _base(model: nn.Module) -> nn.Module:
    from hf_optcore.wrapping import base_model

    return base_model(model)


def _identity_forward(x, *args, **kwargs):
    return x


def _touching_forward(params: list[torch.Tensor]):
    def forward(x, *args, **kwargs):
        # x + 0 * (one element of each head parameter): the values are x's, and the head's parameters are
        # in the graph of the model's output, where DDP(find_unused_parameters=True) looks for them.
        return x + sum(p.reshape(-1)[0] for p in params) * 0.0
    return forward


def _head_unseen_by_ddp(model: nn.Module, head: nn.Module) -> list[torch.Tensor]:
    """Trainable head parameters that DDP with ``find_unused_parameters`` would mark unused after the forward."""
    if not (isinstance(model, nn.parallel.DistributedDataParallel) and model.find_unused_parameters):
        return []
    in_embeddings = {id(p) for p in _base(model).get_input_embeddings().parameters()}
    return [p for p in head.parameters() if p.requires_grad and id(p) not in in_embeddings]


@contextlib.contextmanager
def output_head_bypassed(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, the output head of ``model`` returns its input; yields the head module.

    The forward of the *instance* is swapped (an instance attribute shadowing the class's), so the
    model's own forward, and any wrapper around it (DDP, Accelerate, peft), run unchanged and return
    the final hidden states where they would return logits. An instance-level ``forward`` that was
    there before (Accelerate's device hooks, hf_optcore's fused LoRA) is put back on exit, always.
    Under ``DistributedDataParallel(find_unused_parameters=True)`` the bypass adds ``0 *`` one element
    of each trainable head parameter, so DDP does not mark the head unused before its gradients arrive.

    Why a swap and not a public switch: transformers has none that returns only the final hidden states.
    ``output_hidden_states=True`` with ``logits_to_keep=1`` would, but it keeps every layer's hidden states
    alive until the loss (under activation checkpointing that is layers x batch x tokens x hidden more memory,
    the very memory checkpointing saves), and a PEFT/DDP/compiled wrapper would still run the head once.
    """
    head = _base(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(_base(model)).__name__} has no output embeddings to bypass")
    own = head.__dict__.get("forward")
    unseen = _head_unseen_by_ddp(model, head)
    head.forward = _touching_forward(unseen) if unseen else _identity_forward
    try:
        yield head
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward


def _sharded(model: nn.Module) -> str | None:
    for m in (model, _base(model)):
        name = type(m).__name__
        if name in ("FullyShardedDataParallel", "DeepSpeedEngine") or name.startswith("FSDP"):
            return f"the model is wrapped by {name}"
    for name, p in _base(model).named_parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            return f"parameter {name} is a DTensor (FSDP2 / tensor parallel)"
        if hasattr(p, "ds_id"):
            return f"parameter {name} is partitioned by DeepSpeed ZeRO-3"
    return None


def supports_logits_free(model: nn.Module) -> tuple[bool, str]:
    """Whether :func:`causal_lm_loss` gives exactly the model's own loss for ``model``.

    True only for a causal LM whose type is in :data:`VERIFIED_MODEL_TYPES`, with an output head,
    no transformation of the logits after the head (soft-capping, logit scaling), and parameters
    that are not sharded (FSDP, DeepSpeed ZeRO-3, tensor parallel: the head's weight is not whole on
    this rank). Otherwise the caller uses the model's own loss.

    Returns:
        ``(ok, reason)``; ``reason`` says why not (or what was verified).
    """
    base = _base(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not callable(getattr(base, "get_output_embeddings", None)):
        return False, f"{type(base).__name__} is not a transformers model"
    if base.get_output_embeddings() is None:
        return False, f"{type(base).__name__} has no output embeddings (not a causal LM head model)"
    if model_type not in VERIFIED_MODEL_TYPES:
        return False, (f"model type {model_type!r} is not verified against its own loss (verified: "
                       f"{', '.join(sorted(VERIFIED_MODEL_TYPES))})")
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return False, f"config.{attr}={value!r} transforms the logits after the head"
    sharded = _sharded(model)
    if sharded:
        return False, sharded
    return True, f"{model_type}: verified"


def _liger_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, ignore_index: int,
                label_smoothing: float) -> torch.Tensor | None:
    """Liger's fused linear cross-entropy (summed) when it applies: CUDA, liger-kernel, a plain nn.Linear head."""
    if not hidden.is_cuda or type(head) is not nn.Linear or not _liger_available():
        return None
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), bias=head.bias,
        ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
    if isinstance(out, tuple):  # some versions return (loss, z_loss, ...)
        out = out[0]
    return getattr(out, "loss", out).float()


@functools.cache
def _liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    label_smoothing: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
    return_stats: bool = False,
    return_predictions: bool = False,
    use_liger: bool = True,
) -> tuple[torch.Tensor, LossStats | None]:
    """The causal-LM loss of one batch without ``[tokens, vocabulary]`` logits; equal to the model's own loss.

    Contract (what the Trainer's ``compute_loss`` and evaluation rely on):

    - ``model`` is what the Trainer calls: bare, DDP / DataParallel, torch.compile or ``PeftModel``;
      it is called once, as ``model(**model_inputs, use_cache=False)``, with every key of ``inputs``
      except ``labels``, ``shift_labels`` and ``num_items_in_batch`` (so ``position_ids`` of packed
      rows, ``cu_seq_lens_*`` and the like reach it), while its output head returns its input.
    - Targets: ``inputs["shift_labels"]`` when present (already next-token, ``[B, T]``), else
      ``labels`` shifted by one as transformers' ``ForCausalLMLoss`` does (last position ignored).
      ``-100`` takes no loss; packed rows need ``-100`` at each row start (collators put it there).
    - Normalisation: ``sum / num_items_in_batch`` when given (the Trainer's count over gradient
      accumulation and, with ``average_tokens_across_devices``, ranks: the caller applies the same
      ``loss *= num_processes`` as ``Trainer.compute_loss``), else the mean over this batch's label tokens.
    - ``label_smoothing`` > 0 gives ``LabelSmoother``'s value: ``(1 - eps) * NLL + eps * mean_v(-log p_v)``
      per label token, normalised the same way.
    - A MoE model's router auxiliary loss is added as its forward adds it with labels
      (``router_aux_loss_coef * aux_loss``, when it returns one).
    - With autograd on, the head's share of the backward runs inside this call (chunk by chunk) and
      its results wait for ``loss.backward()``, which may run once; under ``torch.no_grad()``
      (evaluation) only the loss and statistics are computed.
    - Call only where :func:`supports_logits_free` is true; a user's ``compute_loss`` or
      ``compute_loss_func`` takes precedence (the caller then does not call this at all).

    Args:
        model: the model (any wrapper above).
        inputs: the batch: ``input_ids``, ``attention_mask``, ``labels``; optionally ``position_ids``,
            ``shift_labels`` and other model kwargs.
        num_items_in_batch: label tokens the loss is normalised by (default: this batch's).
        label_smoothing: ``TrainingArguments.label_smoothing_factor``.
        chunk_size: label tokens per head call (default 1024).
        ignore_index: label value that takes no loss.
        return_stats: also return per-example ``[nll_sum, tokens, correct]`` (for evaluation).
        return_predictions: include argmax predictions in the stats.
        use_liger: in training on CUDA, use Liger's fused kernel when installed and the head is a
            plain ``nn.Linear`` (not when statistics are requested).

    Returns:
        ``(loss, stats)``: ``loss`` a float32 scalar with autograd; ``stats`` a :class:`LossStats` or None.
    """
    labels = inputs.get("labels")
    shift_labels = inputs.get("shift_labels")
    if labels is None and shift_labels is None:
        raise ValueError("causal_lm_loss: inputs has neither 'labels' nor 'shift_labels'; keys: "
                         f"{', '.join(sorted(inputs))}")
    model_inputs = {k: v for k, v in inputs.items() if k not in _NOT_FOR_THE_MODEL}
    model_inputs.setdefault("use_cache", False)
    with output_head_bypassed(model) as head:
        outputs = model(**model_inputs)
    hidden = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if shift_labels is not None:
        targets = shift_labels.to(hidden.device)
    else:
        labels = labels.to(hidden.device)
        targets = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"causal_lm_loss: labels of shape {tuple(targets.shape)} do not match the model's "
                         f"hidden states {tuple(hidden.shape)} (did the model keep only some positions?)")

    loss_sum = None
    if use_liger and not (return_stats or return_predictions) and torch.is_grad_enabled():
        loss_sum = _liger_loss(hidden, head, targets, ignore_index, label_smoothing)
    stats = None
    if loss_sum is None:
        loss_sum, stats = chunked_linear_cross_entropy(
            hidden, head, targets, chunk_size=chunk_size, ignore_index=ignore_index,
            label_smoothing=label_smoothing, return_stats=return_stats, return_predictions=return_predictions)
        if stats is not None and return_predictions and shift_labels is None:
            # Drop the last position (it has no next token), as transformers' shift does.
            stats.predictions, stats.targets = stats.predictions[..., :-1], labels[..., 1:]

    if num_items_in_batch is not None:
        denominator = num_items_in_batch.to(loss_sum.device) if torch.is_tensor(num_items_in_batch) \
            else num_items_in_batch
    else:
        denominator = (targets != ignore_index).sum()
    loss = loss_sum / denominator

    aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
    coef = getattr(_base(model), "router_aux_loss_coef", None)
    if aux is not None and coef is not None:
        loss = loss + coef * aux.to(loss.device)
    return loss, stats

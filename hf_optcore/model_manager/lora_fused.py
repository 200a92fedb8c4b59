"""A leaner forward/backward for peft's LoRA linear layers, with peft's modules and files unchanged.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as five autograd nodes. That
saves no more tensors than the base layer alone would (``x`` once, ``x @ A^T`` of width ``r``),
but every step allocates and frees three extra ``[tokens, out_features]`` tensors in the forward
and as many in the backward, and with ``lora_dropout > 0`` it keeps two float32 copies of the
input per adapted layer (the dropout noise and the dropped input) until the backward.

:func:`fuse_lora_layers` gives each eligible ``peft.tuners.lora.Linear`` an instance-level
``forward`` that runs the same computation as one autograd function: one output tensor written in
place, one input-gradient tensor in the backward, and for dropout a boolean mask (a quarter of a
float32 copy) instead of two float copies. The module tree, parameter names, ``state_dict``,
``save_pretrained`` / ``PeftModel.from_pretrained`` and ``merge_and_unload`` are peft's own; a
layer in any state the fused path does not cover (DoRA or another variant, several active
adapters, merged or disabled adapters, ``adapter_names`` batches, ``lora_bias``, a trainable base
weight, autocast or mixed dtypes) runs peft's forward, checked on every call.

The forward output is bitwise peft's; gradients differ only by float rounding order (the
``scaling`` factor is applied to ``grad @ B`` instead of to ``grad``), exact when ``scaling`` is a
power of two.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FUSED_ATTR", "fuse_lora_layers", "is_fused", "unfuse_lora_layers"]

FUSED_ATTR = "_hf_optcore_fused_lora"


def _base_kind(base: nn.Module) -> str | None:
    if type(base) is nn.Linear:
        return "linear"
    if type(base).__name__ == "Conv1D" and getattr(base, "weight", None) is not None and base.weight.dim() == 2:
        return "conv1d"  # transformers' GPT-2 layer: weight stored in x out, forward = addmm(bias, x, W)
    return None


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return Linear


class _FusedLoRALinear(torch.autograd.Function):
    """``base(x) + scaling * (dropout(x) @ A^T) @ B^T`` as one node; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, p, kind):
        if p > 0.0:
            # The same RNG draws and arithmetic as torch's CPU dropout (empty_like().bernoulli_(1-p),
            # div_(1-p), x * noise), so the dropped input equals peft's bit for bit on CPU.
            noise = torch.empty_like(x).bernoulli_(1.0 - p)
            noise.div_(1.0 - p)
            x_drop = x * noise
            mask = noise.ne(0)
            del noise
        else:
            x_drop, mask = x, None
        if kind == "linear":
            out = F.linear(x, weight, bias)
        else:
            out = torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(*x.shape[:-1], weight.shape[1])
        x_a = F.linear(x_drop, lora_a)
        delta = F.linear(x_a, lora_b)
        delta.mul_(scaling)
        out.add_(delta)
        del delta, x_drop
        ctx.save_for_backward(x, weight, lora_a, lora_b, x_a, mask)
        ctx.scaling, ctx.p, ctx.kind, ctx.has_bias = scaling, p, kind, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, x_a, mask = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        xa = x_a.reshape(-1, x_a.shape[-1])
        noise = None
        if mask is not None:
            noise = mask.to(x.dtype)
            noise.div_(1.0 - ctx.p)
        grad_x = grad_bias = grad_a = grad_b = None
        g_xa = (g @ lora_b).mul_(s)  # [tokens, r]: the gradient reaching x @ A^T
        if need_b:
            grad_b = (g.t() @ xa).mul_(s)
        if need_a:
            x2 = x.reshape(-1, x.shape[-1])
            x_drop = x2 * noise.reshape(x2.shape) if noise is not None else x2
            grad_a = g_xa.t() @ x_drop
            del x_drop
        if need_x:
            grad_x = g @ (weight if ctx.kind == "linear" else weight.t())
            if noise is None:
                grad_x.addmm_(g_xa, lora_a)
            else:
                grad_x.addcmul_(g_xa @ lora_a, noise.reshape(grad_x.shape))
            grad_x = grad_x.view(x.shape)
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def _fused_plan(layer, x, args, kwargs):
    """``(adapter, p, kind)`` when this call can take the fused path, else None (peft's forward runs)."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(name, False):
        return None
    base = layer.base_layer
    kind = _base_kind(base)
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if kind is None or type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_b.bias is not None:
        return None
    if base.weight.requires_grad or torch.is_autocast_enabled(x.device.type):
        return None
    if not (x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
        return None
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Identity):
        p = 0.0
    elif type(dropout) is nn.Dropout and not dropout.inplace:
        p = float(dropout.p) if dropout.training else 0.0
    else:
        return None
    if p >= 1.0:
        return None
    return name, p, kind


def _fused_forward(self, x, *args, **kwargs):
    plan = _fused_plan(self, x, args, kwargs)
    if plan is None:
        return type(self).forward(self, x, *args, **kwargs)
    name, p, kind = plan
    base = self.base_layer
    return _FusedLoRALinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                  float(self.scaling[name]), p, kind)


def is_fused(module: nn.Module) -> bool:
    """Whether :func:`fuse_lora_layers` gave ``module`` the fused forward."""
    return bool(getattr(module, FUSED_ATTR, False))


def fuse_lora_layers(model: nn.Module) -> int:
    """Give every peft ``lora.Linear`` in ``model`` whose base is ``nn.Linear`` or GPT-2's ``Conv1D`` the fused forward.

    Other LoRA layer types (embeddings, convolutions, quantized bases, 3-D expert parameters) are
    left as peft made them. Each fused layer still checks its state on every call and runs peft's
    forward when the fused path does not apply (see the module docstring), so calling this before
    or after ``set_adapter`` / ``enable_adapter_layers`` / DoRA is always correct.

    Args:
        model: a ``PeftModel`` or any module containing peft LoRA layers.

    Returns:
        How many layers now have the fused forward.
    """
    cls = _lora_linear_class()
    if cls is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is cls and _base_kind(module.base_layer) is not None:
            if not is_fused(module):
                module.forward = types.MethodType(_fused_forward, module)
                setattr(module, FUSED_ATTR, True)
            count += 1
    return count


def unfuse_lora_layers(model: nn.Module) -> int:
    """Undo :func:`fuse_lora_layers` (peft's class forward runs again); returns how many layers changed."""
    count = 0
    for module in model.modules():
        if is_fused(module):
            del module.forward
            delattr(module, FUSED_ATTR)
            count += 1
    return count

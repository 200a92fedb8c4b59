"""Parameter groups: weight-decay exclusions, per-module learning-rate multipliers, LoRA+.

Pure torch. Rules, applied to every trainable parameter (frozen ones are left out):

- no weight decay when one of ``no_decay_patterns`` (case-insensitive substrings, default
  ``bias``, ``norm``, ``embed``) is in the parameter's name *or* in the class name of the module
  that owns it (so GPT-2's ``wte`` (``Embedding``) and ``ln_1`` (``LayerNorm``) are caught too);
  ``[]`` decays everything;
- learning rate ``lr x multiplier``, where the multiplier comes from the longest pattern of
  ``lr_multipliers`` that is a substring of the name (1.0 when none matches);
- LoRA+ : ``lora_B`` (and ``lora_embedding_B``) parameters get a further ``x lora_plus_ratio``.

Parameters with the same (decay, learning rate) share a group; groups are ordered by their first
parameter in ``named_parameters()`` order, and empty groups never appear.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["ParamGroup", "build_param_groups", "format_param_groups"]

_LORA_B = ("lora_b", "lora_embedding_b")


@dataclass
class ParamGroup:
    """One resolved group: its parameters, their names, learning rate and weight decay."""

    names: list[str] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    lr: float = 0.0
    weight_decay: float = 0.0

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def to_optimizer_group(self, with_names: bool = False) -> dict:
        """The dict a ``torch.optim.Optimizer`` takes (``param_names`` when ``with_names``)."""
        group = {"params": list(self.params), "lr": self.lr, "weight_decay": self.weight_decay}
        if with_names:
            group["param_names"] = list(self.names)
        return group

    def summary(self) -> dict:
        return {"names": list(self.names), "num_tensors": len(self.params), "num_params": self.num_params,
                "lr": self.lr, "weight_decay": self.weight_decay}


def _no_decay_by_module(model: nn.Module, patterns: tuple[str, ...]) -> set[int]:
    types = patterns
    out: set[int] = set()
    if not types:
        return out
    for module in model.modules():
        cls = type(module).__name__.lower()
        if any(t in cls for t in types):
            out.update(id(p) for p in module.parameters(recurse=False))
    return out


def _multiplier(name: str, lr_multipliers: dict) -> float:
    low = name.lower()
    hits = [pat for pat in lr_multipliers if str(pat).lower() in low]
    return float(lr_multipliers[max(hits, key=len)]) if hits else 1.0


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    no_decay_patterns: Iterable[str] = ("bias", "norm", "embed"),
    lr_multipliers: Optional[dict] = None,
    lora_plus_ratio: Optional[float] = None,
) -> list[ParamGroup]:
    """Resolve the optimizer parameter groups of ``model`` (see the module docstring for the rules).

    Args:
        model: the model (its ``named_parameters()`` are grouped; shared tensors appear once).
        lr: base learning rate.
        weight_decay: decay of the parameters not excluded.
        no_decay_patterns: case-insensitive substrings of a parameter name or of its module's class name
            that mean no decay.
        lr_multipliers: ``{name substring: multiplier}``; the longest matching pattern wins.
        lora_plus_ratio: LoRA+ ratio for ``lora_B`` learning rates (None: off).

    Returns:
        The non-empty groups, in order of first appearance.
    """
    patterns = tuple(p.lower() for p in no_decay_patterns)
    by_module = _no_decay_by_module(model, patterns)
    multipliers = dict(lr_multipliers or {})
    groups: dict[tuple[bool, float], ParamGroup] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        low = name.lower()
        decays = weight_decay > 0 and id(param) not in by_module and not any(p in low for p in patterns)
        group_lr = lr * _multiplier(name, multipliers)
        if lora_plus_ratio is not None and any(tag in low for tag in _LORA_B):
            group_lr *= float(lora_plus_ratio)
        key = (decays, group_lr)
        if key not in groups:
            groups[key] = ParamGroup(lr=group_lr, weight_decay=weight_decay if decays else 0.0)
        groups[key].names.append(name)
        groups[key].params.append(param)
    return list(groups.values())


def format_param_groups(groups: list[ParamGroup], max_names: int = 4) -> str:
    """A few readable lines describing ``groups`` (logged once when the optimizer is built)."""
    lines = [f"{len(groups)} parameter group(s), {sum(g.num_params for g in groups):,} trainable parameters:"]
    for i, g in enumerate(groups):
        shown = ", ".join(g.names[:max_names]) + (f", ... (+{len(g.names) - max_names})" if len(g.names) > max_names else "")
        lines.append(f"  [{i}] {len(g.params)} tensors, {g.num_params:,} params, lr={g.lr:.3g}, "
                     f"weight_decay={g.weight_decay:g}: {shown}")
    return "\n".join(lines)

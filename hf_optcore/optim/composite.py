"""One optimizer object made of several: Muon on hidden matrices, AdamW on everything else.

The Trainer, Accelerate, LR schedulers and checkpoints all expect *one* ``torch.optim.Optimizer``.
:class:`CompositeOptimizer` is one: its ``param_groups`` list holds the very group dicts of its
parts (so a scheduler that sets ``group["lr"]`` drives both), and every part shares its ``state``
mapping (parameters are disjoint), so the stock ``Optimizer.state_dict`` / ``load_state_dict``
cover all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch

__all__ = ["CompositeOptimizer", "MUON_EXCLUDE_PATTERNS", "build_muon", "is_muon_param"]

# Embeddings and the output head are 2-D but are not "hidden" matrices: Muon is not for them.
MUON_EXCLUDE_PATTERNS = ("embed", "wte", "wpe", "lm_head", "output_layer", "score")


class CompositeOptimizer(torch.optim.Optimizer):
    """Steps several optimizers over disjoint parameters as one optimizer.

    Args:
        optimizers: the parts, each already built over its own parameters.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("CompositeOptimizer: needs at least one optimizer")
        self.optimizers = list(optimizers)
        params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        if len(params) != len({id(p) for p in params}):
            raise ValueError("CompositeOptimizer: a parameter belongs to more than one part")
        super().__init__(params, {})
        self._link([g for opt in self.optimizers for g in opt.param_groups])

    def _link(self, groups: list[dict]) -> None:
        # After load_state_dict the base class has made new group dicts and a new state: hand them back
        # to the parts, in order, so that nothing drifts.
        self.param_groups = groups
        start = 0
        for opt in self.optimizers:
            n = len(opt.param_groups)
            opt.param_groups = groups[start:start + n]
            opt.state = self.state
            start += n

    @torch.no_grad()
    def step(self, closure=None):
        """Step every part (``closure`` is evaluated once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by a composite of the same layout (group order: parts in order)."""
        super().load_state_dict(state_dict)
        self._link(self.param_groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "optimizers") and len(self.param_groups) > 0:
            raise NotImplementedError("CompositeOptimizer: add parameter groups to a part, then rebuild")
        super().add_param_group(param_group)


def is_muon_param(name: str, param: torch.Tensor, exclude: Iterable[str] = MUON_EXCLUDE_PATTERNS) -> bool:
    """True for a 2-D hidden weight matrix (not an embedding, head, norm or bias)."""
    low = name.lower()
    return param.ndim == 2 and not any(pat in low for pat in exclude)


def build_muon(
    param_groups: list[dict],
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adjust_lr_fn: Optional[str] = "match_rms_adamw",
    exclude_patterns: Iterable[str] = MUON_EXCLUDE_PATTERNS,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
) -> CompositeOptimizer:
    """``torch.optim.Muon`` on the 2-D hidden matrices of each group, ``torch.optim.AdamW`` on the rest.

    Each input group (with ``params`` and ``param_names``, plus its own ``lr`` / ``weight_decay``) is
    split in two, so learning-rate multipliers and no-decay rules carry over to both parts.

    Args:
        param_groups: groups with ``params`` and ``param_names``.
        lr, weight_decay: defaults for groups that do not set them.
        betas, eps, foreach, fused: the AdamW part's settings.
        momentum, nesterov, ns_steps, adjust_lr_fn: the Muon part's settings. The default
            ``adjust_lr_fn="match_rms_adamw"`` scales Muon's update to AdamW's RMS, so one learning rate
            serves both parts.
        exclude_patterns: name substrings of 2-D parameters that stay on AdamW (embeddings, head).
    """
    exclude = tuple(p.lower() for p in exclude_patterns)
    muon_groups, adam_groups = [], []
    for group in param_groups:
        names = group.get("param_names")
        if names is None or len(names) != len(group["params"]):
            raise ValueError("muon: every parameter group needs 'param_names' to tell hidden matrices apart")
        opts = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        hidden = [p for n, p in zip(names, group["params"]) if is_muon_param(n, p, exclude)]
        rest = [p for n, p in zip(names, group["params"]) if not is_muon_param(n, p, exclude)]
        if hidden:
            muon_groups.append({**opts, "params": hidden})
        if rest:
            adam_groups.append({**opts, "params": rest})
    parts: list[torch.optim.Optimizer] = []
    if muon_groups:
        parts.append(torch.optim.Muon(muon_groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn))
    if adam_groups:
        parts.append(torch.optim.AdamW(adam_groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                       foreach=foreach, fused=fused))
    return CompositeOptimizer(parts)

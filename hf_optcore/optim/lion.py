"""Lion (EvoLved Sign Momentum, Chen et al. 2023), in pure torch with a foreach path.

Per parameter, with momentum ``m``, gradient ``g``, learning rate ``lr`` and decoupled weight
decay ``wd``::

    update = sign(beta1 * m + (1 - beta1) * g)
    p      = p * (1 - lr * wd) - lr * update
    m      = beta2 * m + (1 - beta2) * g
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["Lion"]


class Lion(torch.optim.Optimizer):
    """Sign-of-momentum optimizer; one state tensor per parameter (half of AdamW's memory).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default ``1e-4``; typically 3-10x smaller than AdamW's).
        betas: ``(beta1, beta2)``: interpolation for the update and for the momentum (default ``(0.9, 0.99)``).
        weight_decay: decoupled weight decay (default ``0.0``).
        foreach: use the multi-tensor ``torch._foreach_*`` kernels (default ``None``: on when all tensors
            of a group are on one device type).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        foreach: Optional[bool] = None,
    ):
        if not lr >= 0.0:
            raise ValueError(f"Lion: lr must be >= 0, got {lr}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Lion: betas[{i}] must be in [0, 1), got {b}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, moms = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                moms.append(state["exp_avg"])
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device.type for p in params}) == 1 and not torch.jit.is_scripting()
            fn = _foreach_lion if foreach else _loop_lion
            beta1, beta2 = group["betas"]
            fn(params, grads, moms, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
        return loss


def _loop_lion(params, grads, moms, *, lr, beta1, beta2, weight_decay):
    for p, g, m in zip(params, grads, moms):
        update = m.lerp(g, 1.0 - beta1).sign_()
        if weight_decay != 0.0:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(update, alpha=-lr)
        m.lerp_(g, 1.0 - beta2)


def _foreach_lion(params, grads, moms, *, lr, beta1, beta2, weight_decay):
    updates = torch._foreach_lerp(moms, grads, 1.0 - beta1)
    torch._foreach_sign_(updates)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_lerp_(moms, grads, 1.0 - beta2)

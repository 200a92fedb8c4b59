"""Model wrappers: what hf_optcore looks through to reach the model's own module.

A model reaches hf_optcore wrapped by DDP / DataParallel (``.module``), torch.compile
(``._orig_mod``) or peft (``PeftModel``); parameter names, saving and the output head are those of
the module underneath. This is the one place that knows the wrappers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["base_model", "is_peft_model", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel and torch.compile wrappers (a ``PeftModel`` stays a ``PeftModel``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def is_peft_model(model: Any) -> bool:
    """True for a peft ``PeftModel`` (a model with adapters that can be saved alone or merged)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under every wrapper, peft included (its ``config``, ``forward`` signature)."""
    model = unwrap_model(model)
    if hasattr(model, "get_base_model"):
        model = unwrap_model(model.get_base_model())
    return model

"""The built-in optimizers, registered by family (torch, Lion, Adafactor, schedule-free, Muon, HF names)."""

from __future__ import annotations

import torch

from hf_optcore.optim.composite import build_muon
from hf_optcore.optim.hf_names import HF_OPTIMIZER_PACKAGES, hf_factory
from hf_optcore.optim.lion import Lion
from hf_optcore.optim.registry import _ALIASES, _OPTIMIZERS, register_alias, register_optimizer


def _register_torch() -> None:
    adam = dict(has_betas=True, has_eps=True, supports_foreach=True, supports_fused=True)
    register_optimizer("adamw", torch.optim.AdamW, description="AdamW (torch; fused kernel by default)", **adam)
    register_optimizer("adam", torch.optim.Adam, description="Adam with L2 weight decay (torch)", **adam)
    register_optimizer("sgd", torch.optim.SGD, description="SGD; momentum / nesterov via optimizer_kwargs",
                       has_momentum=True, supports_foreach=True, supports_fused=True)
    register_optimizer("adagrad", torch.optim.Adagrad, description="Adagrad (torch)",
                       has_eps=True, supports_foreach=True, supports_fused=True)
    register_optimizer("rmsprop", torch.optim.RMSprop, description="RMSprop; momentum via optimizer_kwargs",
                       has_eps=True, has_momentum=True, supports_foreach=True)


def _adafactor(param_groups, **kwargs):
    from transformers.optimization import Adafactor

    return Adafactor(param_groups, **kwargs)


def _register_factored() -> None:
    register_optimizer("lion", Lion, description="Lion: sign of interpolated momentum (pure torch, foreach)",
                       has_betas=True, supports_foreach=True)
    # transformers' Adafactor with an external learning rate, as Trainer(optim="adafactor") builds it.
    register_optimizer("adafactor", _adafactor, description="Adafactor (transformers), factored second moments",
                       package="transformers",
                       defaults={"scale_parameter": False, "relative_step": False, "warmup_init": False})


def _schedulefree(cls_name: str):
    def build(param_groups, **kwargs):
        import schedulefree

        return getattr(schedulefree, cls_name)(param_groups, **kwargs)

    build.__name__ = cls_name
    return build


def _register_schedule_free() -> None:
    common = dict(schedule_free=True, supports_foreach=True, package="schedulefree")
    register_optimizer("schedule_free_adamw", _schedulefree("AdamWScheduleFree"),
                       description="Schedule-free AdamW (schedulefree): no LR schedule, eval at the average",
                       has_betas=True, has_eps=True, **common)
    register_optimizer("schedule_free_sgd", _schedulefree("SGDScheduleFree"),
                       description="Schedule-free SGD with momentum (schedulefree)", has_momentum=True, **common)


def _register_muon() -> None:
    register_optimizer("muon", build_muon,
                       description="Muon (torch.optim.Muon) on 2-D hidden matrices + AdamW on the rest, one object",
                       has_betas=True, has_eps=True, has_momentum=True, supports_foreach=True, supports_fused=True,
                       needs_param_names=True)


def _register_hf_names() -> None:
    register_alias("adamw_torch", "adamw")
    for name, (package, pip_name) in HF_OPTIMIZER_PACKAGES.items():
        if name in _OPTIMIZERS or name in _ALIASES:
            continue  # built natively above
        register_optimizer(name, hf_factory(name), description=f"transformers' optim={name!r}",
                           has_betas=True, has_eps=True, needs_model=True, package=package, pip_name=pip_name)


def register_builtin_optimizers() -> None:
    """Register every built-in optimizer (idempotent: runs once at import of ``hf_optcore.optim``)."""
    if "adamw" in _OPTIMIZERS:
        return
    _register_torch()
    _register_factored()
    _register_schedule_free()
    _register_muon()
    _register_hf_names()

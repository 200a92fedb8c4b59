"""Every name of transformers' ``OptimizerNames``, usable through the registry.

Names that hf_optcore builds natively (``sgd``, ``adafactor``, ``schedule_free_adamw``, ...) or
aliases (``adamw_torch``) need nothing here; every other name is delegated to transformers' own
factory, ``Trainer.get_optimizer_cls_and_kwargs``, so it behaves exactly as with ``optim=<name>``.
The name list is static so that listing and validating names never imports transformers;
``tests/test_optim_registry.py`` checks it against the installed ``OptimizerNames``.
"""

from __future__ import annotations

import tempfile
from typing import Any, Optional

# name -> (import name of the package it needs or None, pip name)
HF_OPTIMIZER_PACKAGES: dict[str, tuple[Optional[str], Optional[str]]] = {
    "adamw_torch": (None, None),
    "adamw_torch_fused": (None, None),
    "adamw_torch_xla": ("torch_xla", "torch_xla"),
    "adamw_torch_npu_fused": ("torch_npu", "torch_npu"),
    "adafactor": (None, None),
    "adamw_anyprecision": ("torchdistx", "torchdistx"),
    "adamw_torch_4bit": ("torchao", "torchao"),
    "adamw_torch_8bit": ("torchao", "torchao"),
    "ademamix": ("bitsandbytes", "bitsandbytes"),
    "sgd": (None, None),
    "adagrad": (None, None),
    "adamw_bnb_8bit": ("bitsandbytes", "bitsandbytes"),
    "adamw_8bit": ("bitsandbytes", "bitsandbytes"),
    "ademamix_8bit": ("bitsandbytes", "bitsandbytes"),
    "lion_8bit": ("bitsandbytes", "bitsandbytes"),
    "lion_32bit": ("bitsandbytes", "bitsandbytes"),
    "paged_adamw_32bit": ("bitsandbytes", "bitsandbytes"),
    "paged_adamw_8bit": ("bitsandbytes", "bitsandbytes"),
    "paged_ademamix_32bit": ("bitsandbytes", "bitsandbytes"),
    "paged_ademamix_8bit": ("bitsandbytes", "bitsandbytes"),
    "paged_lion_32bit": ("bitsandbytes", "bitsandbytes"),
    "paged_lion_8bit": ("bitsandbytes", "bitsandbytes"),
    "rmsprop": (None, None),
    "rmsprop_bnb": ("bitsandbytes", "bitsandbytes"),
    "rmsprop_bnb_8bit": ("bitsandbytes", "bitsandbytes"),
    "rmsprop_bnb_32bit": ("bitsandbytes", "bitsandbytes"),
    "galore_adamw": ("galore_torch", "galore-torch"),
    "galore_adamw_8bit": ("galore_torch", "galore-torch"),
    "galore_adafactor": ("galore_torch", "galore-torch"),
    "galore_adamw_layerwise": ("galore_torch", "galore-torch"),
    "galore_adamw_8bit_layerwise": ("galore_torch", "galore-torch"),
    "galore_adafactor_layerwise": ("galore_torch", "galore-torch"),
    "lomo": ("lomo_optim", "lomo-optim"),
    "adalomo": ("lomo_optim", "lomo-optim"),
    "grokadamw": ("grokadamw", "grokadamw"),
    "schedule_free_radam": ("schedulefree", "schedulefree"),
    "schedule_free_adamw": ("schedulefree", "schedulefree"),
    "schedule_free_sgd": ("schedulefree", "schedulefree"),
    "apollo_adamw": ("apollo_torch", "apollo-torch"),
    "apollo_adamw_layerwise": ("apollo_torch", "apollo-torch"),
    "stable_adamw": ("optimi", "torch-optimi"),
}

# Settings that transformers reads from TrainingArguments for some of these optimizers (GaLore/APOLLO
# target modules, optim_args "key=value,..."), passed through training.optimizer_kwargs.
_HF_ARGS_KEYS = ("optim_args", "optim_target_modules")


def hf_factory(name: str):
    """A registry factory that builds HF optimizer ``name`` with transformers' own code."""

    def build(param_groups: list[dict], model: Any = None, **kwargs: Any):
        from transformers import Trainer, TrainingArguments

        hf_args = {k: kwargs.pop(k) for k in _HF_ARGS_KEYS if k in kwargs}
        betas = kwargs.pop("betas", (0.9, 0.999))
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp,
                optim=name,
                learning_rate=kwargs.pop("lr", 1e-3),
                weight_decay=kwargs.pop("weight_decay", 0.0),
                adam_beta1=betas[0],
                adam_beta2=betas[1],
                adam_epsilon=kwargs.pop("eps", 1e-8),
                warmup_steps=kwargs.pop("warmup_steps", 0),
                report_to="none",
                **hf_args,
            )
            cls, hf_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        hf_kwargs = {**hf_kwargs, **kwargs}
        from transformers.trainer_optimizer import is_optimizer_factory

        if is_optimizer_factory(cls):
            return cls()(model, **hf_kwargs)
        # GaLore/APOLLO/LOMO/layer-wise choose their own parameters ("params", "model", "optimizer_dict").
        for own in ("optimizer_dict", "model", "params"):
            if own in hf_kwargs:
                target = hf_kwargs.pop(own)
                hf_kwargs.pop("params", None)
                hf_kwargs.pop("model", None)
                return cls(target, **hf_kwargs)
        return cls(param_groups, **hf_kwargs)

    build.__name__ = f"hf_{name}"
    return build

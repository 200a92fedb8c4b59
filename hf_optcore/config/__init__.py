"""Layered, validated configuration for hf_optcore.

``TrainerConfig`` composes six section dataclasses (``model``, ``training``, ``hardware``,
``data``, ``checkpoint``, ``ema``) plus a top-level ``output_dir``. It is built from a dict, a
YAML file and dotted ``section.key=value`` overrides, and validated *before* any model or data
is touched: every problem is collected and raised at once in one :class:`ConfigError`, each
line naming the dotted path, the value given and what would be valid.

It is the nested view of :class:`~hf_optcore.config.training_args.OptCoreTrainingArguments`,
the ``transformers.TrainingArguments`` subclass the Trainer holds:
:meth:`TrainerConfig.to_training_arguments` and :meth:`TrainerConfig.from_training_arguments`
convert both ways, derived from the field definitions in ``sections.py``.
"""

from hf_optcore.config.parsing import load_yaml, parse_overrides
from hf_optcore.config.sections import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EMAConfig,
    HardwareConfig,
    LoRAConfig,
    ModelConfig,
    TrainingConfig,
)
from hf_optcore.config.trainer_config import TrainerConfig, render_reference

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "HardwareConfig",
    "LoRAConfig",
    "ModelConfig",
    "OptCoreTrainingArguments",
    "TrainerConfig",
    "TrainingConfig",
    "load_yaml",
    "parse_overrides",
    "render_reference",
]


def __getattr__(name):
    # Subclasses transformers.TrainingArguments: built on first use so that config-only users never import transformers.
    if name == "OptCoreTrainingArguments":
        from hf_optcore.config import training_args

        return training_args.OptCoreTrainingArguments
    raise AttributeError(f"module 'hf_optcore.config' has no attribute {name!r}")

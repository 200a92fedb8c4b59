"""Layered, validated configuration for hf_optcore.

``TrainerConfig`` composes six section dataclasses (``model``, ``training``, ``hardware``,
``data``, ``checkpoint``, ``ema``) plus a top-level ``output_dir``. It is built from a dict, a
YAML file and dotted ``section.key=value`` overrides, and validated *before* any model or data
is touched: every problem is collected and raised at once in one :class:`ConfigError`, each
line naming the dotted path, the value given and what would be valid.

It is the nested view of :class:`OptCoreTrainingArguments`, the ``transformers.TrainingArguments``
subclass the Trainer holds: :meth:`TrainerConfig.to_training_arguments` and
:meth:`TrainerConfig.from_training_arguments` convert both ways, along the map of ``field_map.py``
derived from the field definitions in ``sections.py``.

Modules, each importing only those above it: ``sections`` (the dataclasses) -> ``parsing`` (YAML,
overrides, coercion) -> ``field_map`` (which field is which argument) -> ``training_args`` (the
arguments classes) -> ``conversion`` (both directions, merging) -> ``trainer_config`` (TrainerConfig).
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
from hf_optcore.config.training_args import OptCoreArguments, OptCoreTrainingArguments, arguments_class_for

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "HardwareConfig",
    "LoRAConfig",
    "ModelConfig",
    "OptCoreArguments",
    "OptCoreTrainingArguments",
    "TrainerConfig",
    "TrainingConfig",
    "arguments_class_for",
    "load_yaml",
    "parse_overrides",
    "render_reference",
]


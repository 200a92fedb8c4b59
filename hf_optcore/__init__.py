"""hf_optcore: a correct, measured, faster ``transformers.Trainer`` for causal-LM fine-tuning."""

from hf_optcore.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EMAConfig,
    HardwareConfig,
    LoRAConfig,
    ModelConfig,
    TrainerConfig,
    TrainingConfig,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "GenericTrainer",
    "HardwareConfig",
    "LoRAConfig",
    "ModelConfig",
    "OptCoreTrainer",
    "TrainerConfig",
    "TrainingConfig",
    "__version__",
]


def __getattr__(name):
    # The trainer imports transformers' Trainer (slow); config-only users should not pay for it.
    if name in ("OptCoreTrainer", "GenericTrainer"):
        from hf_optcore import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_optcore' has no attribute {name!r}")

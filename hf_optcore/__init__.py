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
    "EMAManager",
    "Evaluator",
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
    if name == "EMAManager":
        from hf_optcore.ema_manager import EMAManager

        return EMAManager
    if name == "Evaluator":
        from hf_optcore.evaluator import Evaluator

        return Evaluator
    raise AttributeError(f"module 'hf_optcore' has no attribute {name!r}")

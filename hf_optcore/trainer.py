"""``OptCoreTrainer``: a drop-in :class:`transformers.Trainer` with hf_optcore's extensions.

Given plain :class:`~transformers.TrainingArguments` and no hf_optcore option, every override
below calls ``super()`` unchanged, so the run is bit-identical to ``transformers.Trainer``
(``tests/test_trainer_equivalence.py`` pins this). The extensions are opted into by passing a
:class:`~hf_optcore.config.TrainerConfig` as ``args`` (or ``optcore_config=``).
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import Trainer, TrainingArguments

from hf_optcore.config import TrainerConfig

logger = logging.getLogger(__name__)

__all__ = ["GenericTrainer", "OptCoreTrainer"]


class OptCoreTrainer(Trainer):
    """``transformers.Trainer`` plus hf_optcore's managers.

    Args:
        model: the model to train (``PreTrainedModel``, ``PeftModel`` or ``nn.Module``).
        args: a :class:`TrainerConfig` (turns the extensions on) or plain ``TrainingArguments``
            (behaves exactly like ``transformers.Trainer``).
        optcore_config: a ``TrainerConfig`` to use beside explicit ``TrainingArguments``.
        *positional, **kwargs: everything ``transformers.Trainer`` takes, unchanged.
    """

    def __init__(
        self,
        model: Any = None,
        args: TrainerConfig | TrainingArguments | None = None,
        *positional: Any,
        optcore_config: TrainerConfig | None = None,
        **kwargs: Any,
    ):
        if isinstance(args, TrainerConfig):
            optcore_config = args
            args = args.to_training_arguments()
        self.optcore_config: TrainerConfig | None = optcore_config
        super().__init__(model, args, *positional, **kwargs)

    @property
    def extensions_enabled(self) -> bool:
        """True when a TrainerConfig was given; False means plain ``transformers.Trainer``."""
        return self.optcore_config is not None


GenericTrainer = OptCoreTrainer

"""``OptCoreTrainer``: a drop-in :class:`transformers.Trainer` with hf_optcore's extensions.

Given plain :class:`~transformers.TrainingArguments` and no hf_optcore option, every override
below calls ``super()`` unchanged, so the run is bit-identical to ``transformers.Trainer``
(``tests/test_trainer_equivalence.py`` pins this). The extensions are opted into by passing a
:class:`~hf_optcore.config.TrainerConfig` as ``args`` (or ``optcore_config=``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from transformers import Trainer, TrainingArguments

from hf_optcore.callbacks import TrainingReportCallback
from hf_optcore.config import TrainerConfig
from hf_optcore.distributed import prepare_process_group, verify_process_group

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
        # Components whose state goes into every checkpoint, by key: each has state_dict() and
        # load_state_dict() (EMA: "ema", train batch sampler: "sampler", ...). CheckpointManager
        # saves and restores exactly these.
        self.optcore_state: dict[str, Any] = {}
        if optcore_config is not None and args is not None:
            # A GPU-less multi-process launch forms a gloo group only with use_cpu (distributed.py).
            prepare_process_group(args)
        super().__init__(model, args, *positional, **kwargs)
        if optcore_config is not None:
            verify_process_group(self.args)
            self.add_callback(TrainingReportCallback(optcore_config))

    @property
    def extensions_enabled(self) -> bool:
        """True when a TrainerConfig was given; False means plain ``transformers.Trainer``."""
        return self.optcore_config is not None

    # ---- evaluation ---------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if not self.extensions_enabled:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        # Schedule-free optimizers must be evaluated at their averaged point (issue 3).
        with self._optimizer_eval_mode():
            return self._optcore_evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def _optcore_evaluate(self, eval_dataset, ignore_keys, metric_key_prefix) -> dict[str, float]:
        """Token-weighted live (and EMA) evaluation (issue 5 replaces this body)."""
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def _optimizer_eval_mode(self) -> contextlib.AbstractContextManager:
        """Context in which the optimizer's parameters are the ones to evaluate or save (issue 3)."""
        return contextlib.nullcontext()


GenericTrainer = OptCoreTrainer

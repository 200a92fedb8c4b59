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
from transformers.trainer_callback import ProgressCallback

from hf_optcore.callbacks import (
    CheckpointCallback,
    DataThroughputCallback,
    ThroughputProgressCallback,
    TrainingReportCallback,
)
from hf_optcore.config import TrainerConfig
from hf_optcore.distributed import prepare_process_group, verify_process_group
from hf_optcore.optim import optimizer_eval_mode
from hf_optcore.optimizer_manager import OptimizerManager

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
            verify_process_group(self.args, accelerator=self.accelerator)
            self.add_callback(TrainingReportCallback(optcore_config))
            # The same bar as transformers', with real tokens/s and padding beside it.
            if self.pop_callback(ProgressCallback) is not None:
                self.add_callback(ThroughputProgressCallback())
            if optcore_config.ema.enabled:
                from hf_optcore.callbacks import EMACallback

                # Before the checkpoint callback: a step's checkpoint holds that step's EMA (issue 5).
                self._optcore_ema = EMACallback(optcore_config.ema, lambda: self.model, self._optcore_ema_train_end)
                self._optcore_ema.ensure_manager()  # fails now, not at step 1, when nothing is trainable
                self.add_callback(self._optcore_ema)
                self.optcore_state["ema"] = self._optcore_ema
            from hf_optcore.checkpoint_manager.trainer_hooks import TrainerCheckpointing

            # Atomic saves, exact resume, preemption and non-finite steps (issue 6).
            self.optcore_checkpointing = TrainerCheckpointing(self)
            self.add_callback(CheckpointCallback(self.optcore_checkpointing))
            # Padding fraction and real tokens/s in the logs; the sampler's position (issue 4).
            self.optcore_data_meter = DataThroughputCallback(
                gradient_accumulation_steps=self.args.gradient_accumulation_steps)
            self.add_callback(self.optcore_data_meter)
            from hf_optcore.data.trainer_loader import default_collator

            # transformers' default collators cannot pad labels nor pack (issue 4); a user's own stays.
            self.data_collator = default_collator(optcore_config.data, self.processing_class, self.data_collator)

    @property
    def extensions_enabled(self) -> bool:
        """True when a TrainerConfig was given; False means plain ``transformers.Trainer``."""
        return self.optcore_config is not None

    # ---- optimizer and scheduler ----------------------------------------------------------

    def create_optimizer(self, model=None):
        if not self.extensions_enabled or self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        # TrainingArguments.optim knows only HF's names: the optimizer comes from hf_optcore's registry.
        cfg = self.optcore_config
        self.optimizer_manager = OptimizerManager(cfg.training, self.model if model is None else model,
                                                  hardware=cfg.hardware)
        self.optimizer = self.optimizer_manager.create_optimizer()
        if getattr(self.accelerator, "scaler", None) is not None:
            # The fp16 GradScaler (Accelerate's) travels in every checkpoint beside the optimizer.
            self.optcore_state["grad_scaler"] = self.accelerator.scaler
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if not self.extensions_enabled or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        # The schedule comes from hf_optcore's scheduler registry (warmup as steps or ratio).
        manager = getattr(self, "optimizer_manager", None) or OptimizerManager(
            self.optcore_config.training, self.model, hardware=self.optcore_config.hardware)
        self.lr_scheduler = manager.create_scheduler(
            num_training_steps, optimizer=self.optimizer if optimizer is None else optimizer)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- evaluation ---------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if not self.extensions_enabled:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        # Schedule-free optimizers must be evaluated at their averaged point (issue 3).
        with self._optimizer_eval_mode():
            return self._optcore_evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def _optcore_evaluate(self, eval_dataset, ignore_keys, metric_key_prefix) -> dict[str, float]:
        """Token-weighted loss, perplexity and token accuracy over every eval token on every rank,
        live and (with ``ema.evaluate``) EMA side by side, logged as ``Trainer.evaluate`` logs."""
        import time

        from transformers.trainer_utils import speed_metrics

        from hf_optcore.evaluator import Evaluator

        override = eval_dataset is not None
        eval_dataset = eval_dataset if override else self.eval_dataset
        if isinstance(eval_dataset, dict):  # one evaluation per named set, as Trainer.evaluate does
            metrics = {}
            for name, ds in eval_dataset.items():
                metrics.update(self._optcore_evaluate(ds if override else name, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if self.is_deepspeed_enabled and self.deepspeed is None:
            # DeepSpeed evaluated before training needs HF's own inference setup.
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self._memory_tracker.start()
        dataloader = self.get_eval_dataloader(eval_dataset)
        start_time = time.time()
        model = self._optcore_eval_model()
        self.callback_handler.eval_dataloader = dataloader
        ema_cfg = self.optcore_config.ema
        ema = self._optcore_ema.ensure_manager() if ema_cfg.enabled and ema_cfg.evaluate else None
        evaluator = Evaluator(
            self.optcore_config.training, model, dataloader, self.args.device, use_amp=False, ema_manager=ema,
            accelerator=self.accelerator, autocast=self.autocast_smart_context_manager,
            prepare_batch=self._prepare_inputs,
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in evaluator.evaluate().items()}
        if self.compute_metrics is not None:
            # The user's compute_metrics still runs on HF's predictions; the loss is ours.
            out = self.evaluation_loop(dataloader, "Evaluation", None, ignore_keys, metric_key_prefix)
            metrics = {**out.metrics, **metrics}
        num_samples = self.num_examples(dataloader) if hasattr(dataloader, "__len__") else None
        metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=num_samples,
                                     num_steps=len(dataloader) if hasattr(dataloader, "__len__") else None))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def _optcore_eval_model(self):
        """The model to evaluate, prepared by Accelerate as ``Trainer.evaluation_loop`` prepares it."""
        model = self._wrap_model(self.model, training=False)
        if len(self.accelerator._models) == 0 and model is self.model:
            fsdp = self.is_fsdp_enabled and not self.args.torch_compile
            model = self.accelerator.prepare(model) if fsdp else self.accelerator.prepare_model(model, evaluation_mode=True)
            if self.is_fsdp_enabled:
                self.model = model
            if model is not self.model:
                self.model_wrapped = model
        return model

    def _optcore_ema_train_end(self, ema) -> None:
        """Save the EMA weights as their own loadable model in ``output_dir/ema`` (an adapter for a
        PeftModel); with ``ema.use_for_final_model`` they also become the weights saved and pushed."""
        import os
        from pathlib import Path

        import torch

        metric = self.args.metric_for_best_model or ""
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best and metric.removeprefix("eval_").startswith("ema_"):
            # The best checkpoint was chosen by an EMA metric: its EMA, not the last step's, is the result.
            file = Path(best) / "components" / "ema.pt"
            if file.is_file():
                ema.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
            else:
                logger.warning("best checkpoint %s holds no EMA state; exporting the last step's EMA", best)
        with self._optimizer_eval_mode(), ema.applied():
            # save_model gathers FSDP/DeepSpeed shards and writes only an adapter for a PeftModel.
            self.save_model(os.path.join(self.args.output_dir, "ema"), _internal_call=True)
        if self.optcore_config.ema.use_for_final_model:
            ema.copy_to_model()

    def _optimizer_eval_mode(self) -> contextlib.AbstractContextManager:
        """Context in which the optimizer's parameters are the ones to evaluate or save: a schedule-free
        optimizer switches to eval() inside and back to train() after; other optimizers are left alone."""
        if not self.extensions_enabled:
            return contextlib.nullcontext()
        return optimizer_eval_mode(self.optimizer)

    # ---- checkpoints and faults (issue 6) --------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        if not self.extensions_enabled:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        # checkpoint.resume_from (auto | path) and the argument resolve to a verified checkpoint.
        path = self.optcore_checkpointing.begin_train(resume_from_checkpoint)
        try:
            output = super().train(path, trial, ignore_keys_for_eval)
        finally:
            self.optcore_checkpointing.end_train()
        if self.optcore_checkpointing.preempted:
            raise SystemExit(0)  # preempted: a complete checkpoint was written at this step
        return output

    def _save_checkpoint(self, model, trial) -> None:
        if not self.extensions_enabled:
            return super()._save_checkpoint(model, trial)
        # Atomic, manifest-verified, retained by step and metric; schedule-free saved at eval point.
        with self._optimizer_eval_mode():
            self.optcore_checkpointing.save(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        if not self.extensions_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # safetensors only (a PeftModel: its adapters); never unpickles.
        self.optcore_checkpointing.load_model(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if not self.extensions_enabled or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        # Our file layout, torch.load(weights_only=True); the scaler comes with it.
        self.optcore_checkpointing.load_optimizer_and_scheduler(checkpoint)

    def _load_scaler(self, checkpoint) -> None:
        if not self.extensions_enabled:
            return super()._load_scaler(checkpoint)
        # Already restored by _load_optimizer_and_scheduler (CheckpointManager.load_training_state).

    def _load_rng_state(self, checkpoint) -> None:
        if not self.extensions_enabled:
            return super()._load_rng_state(checkpoint)
        # RNG is restored before the first batch is collated, not after it (see trainer_hooks).
        self.optcore_checkpointing.load_rng_at_epoch_start(checkpoint)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if not self.extensions_enabled:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        # Brackets the collation of training batches, whose RNG state a checkpoint must record.
        self.optcore_checkpointing.before_pull()
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.optcore_checkpointing.after_pull(len(batch_samples))
        return batch_samples, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.extensions_enabled:
            # Meter padding and real tokens (issue 4); the collator's count is no model input.
            inputs = self._observe_batch(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.extensions_enabled:
            # A non-finite micro-batch loss makes the whole optimizer step skipped (or stops).
            self.optcore_checkpointing.observe_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.extensions_enabled:
            # Last point before optimizer.step(): a non-finite step is skipped here (or stops).
            self.optcore_checkpointing.check_grad_norm(grad_norm)
        return grad_norm


    # ---- data: samplers, collation, throughput (issue 4) -----------------------------------

    def get_train_dataloader(self):
        if not self.extensions_enabled or self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            return super().get_train_dataloader()
        # data.batching's rank-aware, resumable batch sampler and the padding/packing collator.
        from hf_optcore.data.trainer_loader import build_train_dataloader
        from hf_optcore.data_manager import dataset_lengths, make_batch_sampler

        cfg = self.optcore_config
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed

        def make_sampler(dataset, world, rank):
            return make_batch_sampler(cfg.data, dataset_lengths(dataset), self.args.per_device_train_batch_size,
                                      seed, num_replicas=world, rank=rank)

        loader, sampler = build_train_dataloader(self, make_sampler)
        self.optcore_state["sampler"] = sampler
        self.optcore_data_meter.sampler = sampler
        return loader

    def _observe_batch(self, inputs):
        from hf_optcore.data.collator import count_real_tokens

        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if ids is not None:
            self.optcore_data_meter.observe(count_real_tokens(inputs), ids.numel())
        return inputs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.extensions_enabled and "loss" in logs:
            # Training logs carry padding fraction and real tokens/s since the previous log, over all ranks.
            logs.update(self.optcore_data_meter.pop_metrics(reduce=self._optcore_sum_over_ranks))
        super().log(logs, start_time)

    def _optcore_sum_over_ranks(self, counts: list[int]) -> list[int]:
        """``counts`` summed over the data-parallel ranks (every rank logs the loss at the same steps)."""
        if self.args.world_size <= 1:
            return counts
        import torch

        summed = self.accelerator.reduce(torch.tensor(counts, dtype=torch.int64, device=self.args.device), "sum")
        return [int(x) for x in summed.tolist()]


GenericTrainer = OptCoreTrainer

"""``OptCoreMixin``: hf_optcore's extensions for any ``transformers.Trainer``; ``OptCoreTrainer`` = mixin + Trainer.

Every override below calls ``super()``, so the mixin composes by the MRO with whatever Trainer comes after it:
``class OptCoreTrainer(OptCoreMixin, Trainer)`` here, ``class MySFT(OptCoreMixin, SFTTrainer)`` for TRL (see
:mod:`hf_optcore.trl`), a mixin over ``Seq2SeqTrainer``. Given arguments without hf_optcore's fields and no
``optcore_config``, every override passes straight through, so the run is bit-identical to the Trainer it extends
(``tests/test_trainer_equivalence.py`` pins this). The extensions are on when the Trainer holds hf_optcore's
arguments (:class:`~hf_optcore.config.OptCoreArguments`): passed directly (an ``HfArgumentParser`` script), built
from a :class:`~hf_optcore.config.TrainerConfig` given as ``args``, or merged from your ``TrainingArguments`` and
``optcore_config=``. ``trainer.args`` then holds every hyperparameter that runs; ``trainer.optcore_config`` is its
nested view.

transformers' own code does the work wherever it can: it builds optimizers and schedulers it knows,
writes and loads checkpoints (its layout, its FSDP/DeepSpeed paths), runs the evaluation loop and
the Hub push. hf_optcore adds to it: registry optimizers, its batching, components and a manifest
after transformers' save, a token-weighted loss and EMA weights around transformers' evaluation.
Private transformers names used (each pinned by ``tests/test_private_surface.py``):
``Trainer._save_checkpoint``, ``Trainer._load_rng_state``, ``Trainer._get_output_dir``,
``Trainer._get_dataloader`` (in :mod:`hf_optcore.data.trainer_loader`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import time
import typing
import warnings
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from hf_optcore.allocator import warn_if_not_preloaded
from hf_optcore.callbacks import (
    CheckpointCallback,
    DataThroughputCallback,
    ThroughputProgressCallback,
    TrainingReportCallback,
)
from hf_optcore.config import ConfigError, OptCoreArguments, TrainerConfig
from hf_optcore.config.conversion import args_to_config
from hf_optcore.distributed import prepare_process_group, verify_process_group, wrap_for_data_parallel_before_training
from hf_optcore.evaluator.totals import EvalTotals, causal_lm_label_counts
from hf_optcore.optim import optimizer_eval_mode

logger = logging.getLogger(__name__)

__all__ = ["GenericTrainer", "OptCoreMixin", "OptCoreTrainer", "resolve_arguments"]


def resolve_arguments(args: Any, optcore_config: TrainerConfig | None, base: type = TrainingArguments) -> Any:
    """The arguments a Trainer with the mixin holds: hf_optcore's when any extension is asked for (a TrainerConfig
    as ``args``, or an ``optcore_config``), else the caller's own, untouched.

    Args:
        args: what the caller passed as ``args`` (``TrainingArguments``, a subclass, a TrainerConfig or None).
        optcore_config: the ``optcore_config=`` keyword.
        base: the ``TrainingArguments`` class a TrainerConfig becomes (the Trainer's own, e.g. TRL's ``SFTConfig``).
    """
    if isinstance(args, TrainerConfig):
        if optcore_config is not None:
            raise ConfigError(["pass the TrainerConfig either as args or as optcore_config, not both"])
        return args.to_training_arguments(args.arguments_base or base)
    if optcore_config is None:
        return args
    if args is None:
        return optcore_config.to_training_arguments(optcore_config.arguments_base or base)
    from hf_optcore.config.conversion import merge_arguments

    return merge_arguments(args, optcore_config)


@functools.cache
def _arguments_base_of(trainer_cls: type) -> type:
    """The ``TrainingArguments`` class a Trainer class's own ``__init__`` names for ``args`` (TRL's ``SFTTrainer``:
    ``SFTConfig``), read from its annotation; ``TrainingArguments`` when it names none."""
    for cls in trainer_cls.__mro__:
        if cls is OptCoreMixin or "__init__" not in vars(cls) or issubclass(cls, OptCoreMixin):
            continue
        param = inspect.signature(cls.__init__).parameters.get("args")
        annotation = getattr(param, "annotation", inspect.Parameter.empty)
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, vars(sys.modules[cls.__module__]))  # noqa: S307 - the class's own text
            except Exception:
                continue
        candidates = [a for a in (typing.get_args(annotation) or (annotation,))
                      if isinstance(a, type) and issubclass(a, TrainingArguments)]
        if candidates:
            return max(candidates, key=lambda a: len(a.__mro__))  # the most derived one
        if cls is Trainer:
            break
    return TrainingArguments


def _parent_defines(trainer_cls: type, name: str) -> bool:
    """Whether a class between the mixin and ``transformers.Trainer`` in the MRO overrides ``name`` (TRL's
    ``SFTTrainer.compute_loss``): the mixin then stands aside for what that class computes itself."""
    mro = trainer_cls.__mro__
    after = mro[mro.index(OptCoreMixin) + 1:]
    for cls in after:
        if cls is Trainer:
            return False
        if name in vars(cls):
            return True
    return False


class OptCoreMixin:
    """hf_optcore's extensions for a ``transformers.Trainer`` (or any subclass placed after it in the bases).

    Args:
        *args, **kwargs: everything the Trainer after the mixin takes, unchanged. Its ``args`` may also be a
            :class:`TrainerConfig` (extensions on) or hf_optcore's arguments; plain ``TrainingArguments`` (or TRL's
            configs) behave exactly like the Trainer's own.
        optcore_config: a ``TrainerConfig`` whose extensions apply on top of plain ``args``; a field both set to
            different values is a ``ConfigError`` naming it.
    """

    def __init__(self, *args: Any, optcore_config: TrainerConfig | None = None, **kwargs: Any):
        # Where `args` sits depends on the Trainer (DPOTrainer: model, ref_model, args): bind by the parent's own
        # signature and hand it back the same way.
        signature = inspect.signature(super().__init__)
        if "args" in signature.parameters:
            bound = signature.bind_partial(*args, **kwargs)
            given = bound.arguments.get("args")
        else:  # a parent taking *args/**kwargs: transformers' order (model, args, ...)
            bound, given = None, kwargs.get("args", args[1] if len(args) > 1 else None)
        resolved = resolve_arguments(given, optcore_config, _arguments_base_of(type(self)))
        if bound is not None:
            bound.arguments["args"] = resolved
            args, kwargs = bound.args, bound.kwargs
        elif "args" in kwargs or len(args) <= 1:
            kwargs["args"] = resolved
        else:
            args = (args[0], resolved, *args[2:])
        recipe = given if isinstance(given, TrainerConfig) else optcore_config
        self._optcore_on = isinstance(resolved, OptCoreArguments)
        # The recipe keys (model.*, data files) are not arguments: the view takes them from the config given.
        self._optcore_recipe_config = recipe
        # Components whose state goes into every checkpoint, by key (each has state_dict() / load_state_dict()).
        self.optcore_state: dict[str, Any] = {}
        self._optcore_scheduler_built = False
        self._optcore_eval: EvalTotals | None = None
        self._optcore_loss_support: dict[int, bool] = {}
        if self._optcore_on:
            # A GPU-less multi-process launch forms a gloo group only with use_cpu (distributed.py).
            prepare_process_group(resolved)
        super().__init__(*args, **kwargs)
        if self._optcore_on:
            self._init_extensions()

    def _init_extensions(self) -> None:
        cfg = self.optcore_config
        verify_process_group(self.args, accelerator=self.accelerator)
        warn_if_not_preloaded(cfg.hardware.cpu_allocator)  # a process cannot switch malloc once it runs
        if self.args.dataloader_pin_memory and self.args.device.type == "cpu":
            # Pinned memory only speeds up copies to an accelerator; on the CPU torch says so at every dataloader
            # iteration, inside the training loop where no context manager of ours reaches. The only way to keep
            # the user's arguments as given is a filter for that one message of that one module.
            warnings.filterwarnings("ignore", message=r"'pin_memory' argument is set as true but no accelerator",
                                    module=r"torch\.utils\.data\.dataloader")
        if cfg.training.write_report:
            self.add_callback(TrainingReportCallback(lambda: self.optcore_config))
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(ThroughputProgressCallback())  # transformers' bar, with real tokens/s and padding
        from hf_optcore.checkpoint_manager.trainer_checkpointing import TrainerCheckpointing

        self.optcore_checkpointing = TrainerCheckpointing(self)
        if cfg.ema.enabled:
            from hf_optcore.callbacks import EMACallback

            # Added before the checkpoint callback: a step's checkpoint holds that step's EMA.
            self._optcore_ema = EMACallback(cfg.ema, lambda: self.model, self._optcore_ema_train_end,
                                            step_skipped=lambda: self.optcore_checkpointing.guard.last_step_skipped)
            if any(p.requires_grad for p in self.model.parameters()):
                self._optcore_ema.ensure_manager()  # built on the model as passed; re-bound if train() replaces it
            self.add_callback(self._optcore_ema)
            self.optcore_state["ema"] = self._optcore_ema
        self.add_callback(CheckpointCallback(self.optcore_checkpointing))
        self.optcore_data_meter = DataThroughputCallback(gradient_accumulation_steps=self.args.gradient_accumulation_steps)
        self.add_callback(self.optcore_data_meter)
        if cfg.data.batching != "hf":
            from hf_optcore.data.trainer_loader import default_collator

            # transformers' default collators cannot pad labels nor pack; a user's own collator stays.
            self.data_collator = default_collator(cfg.data, self.processing_class, self.data_collator)

    @property
    def extensions_enabled(self) -> bool:
        """True when the Trainer holds ``OptCoreTrainingArguments``; False means plain ``transformers.Trainer``."""
        return self._optcore_on

    @property
    def optcore_config(self) -> TrainerConfig | None:
        """The nested :class:`TrainerConfig` view of ``self.args`` (None without the extensions); its recipe keys
        (``model.*``, data files) are those of the TrainerConfig the Trainer was given, else their defaults."""
        if not self._optcore_on:
            return None
        view = args_to_config(self.args, TrainerConfig, validate=False)
        recipe = self._optcore_recipe_config
        return view.with_recipe_keys_of(recipe) if recipe is not None else view

    # ---- optimizer and scheduler ----------------------------------------------------------

    def _registry_builds_optimizer(self) -> bool:
        """False when transformers builds the optimizer itself: one of its names and no hf_optcore option set."""
        from transformers.training_args import OptimizerNames

        t, h = self.optcore_config.training, self.optcore_config.hardware
        own_options = t.lr_multipliers or t.lora_plus_ratio or t.optimizer_kwargs or h.fused_optimizer != "auto"
        return t.optimizer not in {o.value for o in OptimizerNames} or bool(own_options)

    def create_optimizer(self, model=None):
        if (not self._optcore_on or self.optimizer is not None or self.optimizer_cls_and_kwargs is not None
                or not self._registry_builds_optimizer()):
            return super().create_optimizer(model)
        from hf_optcore.optimizer_manager import OptimizerManager

        cfg = self.optcore_config
        # An hf_optcore registry optimizer (or option); transformers then wraps it as it wraps its own.
        self.optimizer_manager = OptimizerManager(cfg.training, self.model if model is None else model,
                                                  hardware=cfg.hardware)
        self.optimizer = self.optimizer_manager.create_optimizer()
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        from transformers.trainer_utils import SchedulerType

        if not self._optcore_on or self.lr_scheduler is not None or (
                not getattr(self, "optimizer_manager", None)
                and self.optcore_config.training.scheduler in {s.value for s in SchedulerType}):
            return super().create_scheduler(num_training_steps, optimizer)
        from hf_optcore.optimizer_manager import OptimizerManager

        # hf_optcore's scheduler registry (also for its own optimizers, e.g. schedule-free ones' constant schedule).
        manager = getattr(self, "optimizer_manager", None) or OptimizerManager(
            self.optcore_config.training, self.model, hardware=self.optcore_config.hardware)
        self.lr_scheduler = manager.create_scheduler(
            num_training_steps, optimizer=self.optimizer if optimizer is None else optimizer)
        self._optcore_scheduler_built = True
        return self.lr_scheduler

    # ---- loss and evaluation -----------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        totals = self._optcore_eval
        if totals is not None and self.compute_loss_func is None:
            # Evaluating: each batch's loss is its local token mean, weighted by its own tokens (EvalTotals), not
            # normalised by a count gathered over ranks. A compute_loss_func keeps transformers' count: its loss is
            # a custom one, whose eval_loss is transformers' own.
            num_items_in_batch = None
        if not self._chunked_loss_applies(model, inputs, return_outputs):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if totals is not None and return_outputs:
                totals.observe_outputs(out[1], inputs)  # the evaluation adds up its batch's statistics
            return out
        from hf_optcore.loss import causal_lm_loss

        # The model's own loss without whole-batch logits; normalised exactly as transformers' compute_loss does.
        counted = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, stats = causal_lm_loss(
            model, inputs, num_items_in_batch=counted, label_smoothing=self.args.label_smoothing_factor,
            chunk_size=self.args.loss_chunk_size, return_stats=totals is not None,
            return_predictions=totals is not None and bool(totals.modules))
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and counted is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if stats is not None:
            totals.observe_stats(stats.per_example, stats.predictions, stats.targets)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _chunked_loss_applies(self, model, inputs, return_outputs: bool) -> bool:
        """The chunked loss runs where it is exact and nobody asked for logits or their own loss."""
        if not self._optcore_on or not self.args.chunked_loss or self.compute_loss_func is not None:
            return False
        if _parent_defines(type(self), "compute_loss") and not self._optcore_loss_is_models_own(inputs):
            return False  # the Trainer after the mixin computes its own loss (TRL's DPO, GRPO, SFT with dft)
        if not hasattr(inputs, "get") or (inputs.get("labels") is None and inputs.get("shift_labels") is None):
            return False
        if return_outputs and (self._optcore_eval is None or not self._optcore_eval.loss_only):
            return False  # the outputs' logits are wanted (compute_metrics, predict)
        from hf_optcore.loss import supports_logits_free

        key = id(model)
        if key not in self._optcore_loss_support:
            ok, reason = supports_logits_free(model)
            self._optcore_loss_support[key] = ok
            logger.info("chunked loss %s: %s", "on" if ok else "off (the model's own loss runs)", reason)
        return self._optcore_loss_support[key]

    def _optcore_loss_is_models_own(self, inputs) -> bool:
        """For a Trainer whose ``compute_loss`` the mixin sits in front of: True where that loss is exactly the
        model's own causal-LM loss, so the chunked loss may compute it instead (:mod:`hf_optcore.trl` says so for
        TRL's SFT with ``loss_type="nll"``). Default: False, the Trainer's own loss runs."""
        return False

    def _optcore_ema_pass(self) -> contextlib.AbstractContextManager:
        """Around the evaluation pass with the EMA weights: a Trainer that collects its own metrics during
        ``compute_loss`` (TRL) keeps that pass's values apart from the live pass's here. Default: nothing."""
        return contextlib.nullcontext()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if not self._optcore_on:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        started = time.perf_counter()
        try:
            # A schedule-free optimizer is evaluated at its averaged point.
            with self._optimizer_eval_mode():
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._optcore_not_training(time.perf_counter() - started)

    def _optcore_not_training(self, seconds: float) -> None:
        """Real tokens/s counts training time only: an evaluation's or a save's time is taken out."""
        meter = getattr(self, "optcore_data_meter", None)
        if meter is not None:
            meter.exclude(seconds)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        if not self._optcore_on:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        wrap_for_data_parallel_before_training(self)  # an evaluation before train() must not break DDP
        # transformers' loop, with the loss weighted by tokens over every batch and rank; then the same loop
        # with the EMA weights swapped in, reported beside the live metrics (one log, one on_evaluate).
        output = self._token_weighted_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        ema_cfg = self.optcore_config.ema
        if (ema_cfg.enabled and ema_cfg.evaluate and description == "Evaluation"
                and any(p.requires_grad for p in self.model.parameters())):
            handler = self.callback_handler
            # One evaluation to the callbacks: evaluation_loop fires on_prediction_step per batch (the progress bar)
            # and has no switch for it, so the second pass runs with the handler's list empty, then put back.
            callbacks, handler.callbacks = handler.callbacks, []
            try:
                with self._optcore_ema.ensure_manager().applied(), self._optcore_ema_pass():
                    ema = self._token_weighted_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                                    metric_key_prefix)
            finally:
                handler.callbacks = callbacks
            prefix = f"{metric_key_prefix}_"
            for key, value in ema.metrics.items():
                name = key[len(prefix):] if key.startswith(prefix) else key
                if not name.endswith(("_runtime", "_per_second", "preparation_time")) and name != "label_tokens":
                    output.metrics[f"{prefix}ema_{name}"] = value
        return output

    def _token_weighted_loop(self, dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix):
        training = self.optcore_config.training
        self._optcore_eval = EvalTotals(self.accelerator, metrics=training.eval_metrics,
                                        trust_code=training.trust_metric_code,
                                        label_smoothing=self.args.label_smoothing_factor > 0)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            totals, self._optcore_eval = self._optcore_eval, None
        # Token-weighted over every batch and rank where the loss is a token loss; else transformers' own eval_loss.
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in totals.metrics().items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        totals = self._optcore_eval
        counts = causal_lm_label_counts(model, inputs) if totals is not None else None
        if counts is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        totals.begin_batch(counts)
        totals.loss_only = prediction_loss_only
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        totals.end_batch(loss)
        return loss, logits, labels

    def _optcore_ema_train_end(self, ema) -> None:
        """Save the EMA weights as their own loadable model in ``output_dir/ema`` (an adapter for a
        PeftModel); with ``ema.use_for_final_model`` they also become the weights saved and pushed."""
        from pathlib import Path

        metric = self.args.metric_for_best_model or ""
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best and metric.removeprefix("eval_").startswith("ema_"):
            # The best checkpoint was chosen by an EMA metric: its EMA, not the last step's, is the result.
            from hf_optcore.checkpoint_manager.components import component_file

            file = Path(best) / component_file("ema")
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
        """Inside, a schedule-free optimizer's parameters are the point to evaluate or save."""
        return optimizer_eval_mode(self.optimizer) if self._optcore_on else contextlib.nullcontext()

    # ---- checkpoints and faults -------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        if not self._optcore_on:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        # checkpoint.resume_from (auto | path) and the argument resolve to a verified checkpoint.
        path = self.optcore_checkpointing.begin_train(resume_from_checkpoint)
        if self._optcore_scheduler_built:  # a second train() needs a schedule for its own length
            self.lr_scheduler, self._optcore_scheduler_built = None, False
        try:
            output = super().train(path, trial, ignore_keys_for_eval)
        finally:
            self.optcore_checkpointing.end_train()
        if self.optcore_checkpointing.preempted:
            preemption = self.optcore_checkpointing.preemption
            where = self.optcore_checkpointing.latest()
            print(f"stopped by {'Ctrl-C' if preemption.interrupted else 'a signal'} at step {self.state.global_step}; "
                  f"checkpoint saved in {where}; resume with checkpoint.resume_from=auto", flush=True)
            raise SystemExit(preemption.exit_status)
        return output

    def _save_checkpoint(self, model, trial) -> None:
        if not self._optcore_on:
            return super()._save_checkpoint(model, trial)
        started = time.perf_counter()
        try:
            self._optcore_save_checkpoint(model, trial)
        finally:
            self._optcore_not_training(time.perf_counter() - started)

    def _optcore_save_checkpoint(self, model, trial) -> None:
        # transformers writes its checkpoint (its layout and savers); then components, manifest last, retention.
        parent = super()

        def transformers_save():
            with self._optimizer_eval_mode():
                parent._save_checkpoint(model, trial)

        self.optcore_checkpointing.save(self._get_output_dir(trial=trial), transformers_save)

    def _load_rng_state(self, checkpoint) -> None:
        if not self._optcore_on or not self.optcore_checkpointing.owns_rng(checkpoint):
            return super()._load_rng_state(checkpoint)
        # Restored before the first batch is collated, not after it (see checkpoint_manager/trainer_checkpointing.py).
        self.optcore_checkpointing.load_rng_at_epoch_start()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if not self._optcore_on:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        # Brackets the collation of training batches, whose RNG state a checkpoint must record.
        self.optcore_checkpointing.before_pull()
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.optcore_checkpointing.after_pull(len(batch_samples))
        return batch_samples, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._optcore_on:
            self._observe_batch(inputs)  # padding and real tokens
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._optcore_on:
            # A non-finite micro-batch loss makes the whole optimizer step skipped (or stops).
            self.optcore_checkpointing.guard.observe_loss(loss)
        return loss

    # ---- data: samplers, collation, throughput -----------------------------------------------

    def get_train_dataloader(self):
        from hf_optcore.data.streaming import build_stream_loader, is_stream

        if self._optcore_on and self.optcore_config.data.batching != "hf" and is_stream(self.train_dataset):
            return build_stream_loader(self)  # read, checked, tokenized and batched on the fly; resumed by position
        if (not self._optcore_on or self.optcore_config.data.batching == "hf" or self.train_dataset is None
                or not hasattr(self.train_dataset, "__len__")):
            return super().get_train_dataloader()
        # data.batching's rank-aware, resumable batch sampler and the padding/packing collator.
        from hf_optcore.data.trainer_loader import build_train_dataloader
        from hf_optcore.data_manager import dataset_lengths, make_batch_sampler

        cfg = self.optcore_config
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed

        def make_sampler(dataset, world, rank):
            return make_batch_sampler(cfg.data, dataset_lengths(dataset), self.args.per_device_train_batch_size,
                                      seed, num_replicas=world, rank=rank, drop_last=self.args.dataloader_drop_last)

        loader, sampler = build_train_dataloader(self, make_sampler)
        self.optcore_state["sampler"] = sampler
        self.optcore_data_meter.sampler = sampler
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        from hf_optcore.data.streaming import eval_stream, is_stream

        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if self._optcore_on and not isinstance(dataset, str) and is_stream(dataset):
            # A streamed eval set, checked and tokenized on the fly; transformers batches and evaluates it.
            return super().get_eval_dataloader(eval_stream(self, dataset))
        return super().get_eval_dataloader(eval_dataset)

    def get_resumed_dataloader(self, dataloader, num_batches):
        stream = self.optcore_state.get("stream") if self._optcore_on else None
        if stream is None or stream.loader is not dataloader:
            return super().get_resumed_dataloader(dataloader, num_batches)
        # A stream is positioned by the checkpoint's stream state (nothing consumed is read again), not skipped.
        self.optcore_checkpointing.restore_components()
        return dataloader if stream.loaded else super().get_resumed_dataloader(dataloader, num_batches)

    def _observe_batch(self, inputs) -> None:
        from hf_optcore.data.collator import count_real_tokens

        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if isinstance(ids, torch.Tensor):
            self.optcore_data_meter.observe(count_real_tokens(inputs), ids.numel())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._optcore_on and "loss" in logs:
            # Training logs carry padding fraction and real tokens/s since the previous log, over all ranks.
            logs.update(self.optcore_data_meter.pop_metrics(reduce=self._optcore_sum_over_ranks))
            self.optcore_checkpointing.guard.honest_loss(logs)  # on_nonfinite=ignore: a NaN loss logs nan, not 0
            stream = self.optcore_state.get("stream")
            if stream is not None and self.optcore_config.data.on_bad_row == "skip":
                logs["bad_rows_skipped"] = self._optcore_sum_over_ranks([stream.bad_rows_skipped()])[0]
        super().log(logs, start_time)

    def _optcore_sum_over_ranks(self, counts: list[int]) -> list[int]:
        """``counts`` summed over the data-parallel ranks (every rank logs the loss at the same steps)."""
        if self.args.world_size <= 1:
            return counts
        summed = self.accelerator.reduce(torch.tensor(counts, dtype=torch.int64, device=self.args.device), "sum")
        return [int(x) for x in summed.tolist()]


class OptCoreTrainer(OptCoreMixin, Trainer):
    """``transformers.Trainer`` with hf_optcore's extensions (:class:`OptCoreMixin`).

    Args:
        model: the model to train (``PreTrainedModel``, ``PeftModel`` or ``nn.Module``).
        args: ``TrainingArguments`` (plain: behaves exactly like ``transformers.Trainer``),
            ``OptCoreTrainingArguments`` or a :class:`TrainerConfig` (extensions on).
        optcore_config: a ``TrainerConfig`` whose extensions apply on top of plain ``args``; a field both set to
            different values is a ``ConfigError`` naming it.
        *positional, **kwargs: everything ``transformers.Trainer`` takes, unchanged.
    """


GenericTrainer = OptCoreTrainer

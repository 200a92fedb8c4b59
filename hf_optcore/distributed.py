"""Make a launched multi-process job actually form a process group.

``accelerate launch --multi_gpu --num_processes 2`` (or ``torchrun``) on a machine without a
GPU starts two processes with ``WORLD_SIZE=2`` and ``LOCAL_RANK`` set. Unless the Trainer is told
``use_cpu=True``, Accelerate's ``PartialState`` picks no backend (it only chooses gloo for CPU
when asked for the CPU), so every process trains alone on the whole dataset and writes the same
checkpoints: a silent waste that looks like success. This module detects that situation, fixes
it by turning on ``use_cpu`` (which makes Accelerate form a gloo group), and checks afterwards
that the group the Trainer formed has as many processes as were launched.

Accelerate remains the engine: nothing here initialises a process group itself.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from hf_optcore.errors import OptCoreError

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedSetupError",
    "barrier",
    "rank_and_world",
    "launched_world_size",
    "needs_cpu_process_group",
    "prepare_process_group",
    "requested_backend_fallback",
    "verify_process_group",
    "wrap_for_data_parallel_before_training",
]

_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class DistributedSetupError(OptCoreError, RuntimeError):
    """A launched multi-process job cannot (or did not) form a process group of the right size."""


def launched_world_size(environ: dict[str, str] | None = None) -> int:
    """Number of processes the launcher started (``WORLD_SIZE`` and the MPI equivalents), else 1.

    Args:
        environ: the environment to read (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    for var in _WORLD_SIZE_VARS:
        raw = env.get(var)
        if raw:
            try:
                return max(1, int(raw))
            except ValueError:
                raise DistributedSetupError(f"environment variable {var} must be an integer, got {raw!r}") from None
    return 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised torch.distributed group, ``(0, 1)`` without one.

    The one "is this distributed" probe of hf_optcore.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (a no-op without a multi-process group)."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def _accelerator_available() -> bool:
    import torch

    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def _truthy(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def needs_cpu_process_group(args: Any, environ: dict[str, str] | None = None, accelerator: bool | None = None) -> bool:
    """True when a multi-process launch would leave each process training alone.

    That is: more than one process was launched, no accelerator (CUDA, XPU, ...) is visible, and
    neither ``args.use_cpu`` nor ``ACCELERATE_USE_CPU`` asks Accelerate for the CPU backend.

    Args:
        args: the ``TrainingArguments`` the Trainer will use.
        environ: the environment to read (default ``os.environ``).
        accelerator: whether an accelerator is visible (default: ask torch).
    """
    env = os.environ if environ is None else environ
    if launched_world_size(env) <= 1:
        return False
    if getattr(args, "use_cpu", False) or _truthy(env.get("ACCELERATE_USE_CPU")):
        return False
    if accelerator is None:
        accelerator = _accelerator_available()
    return not accelerator


def prepare_process_group(args: Any, environ: dict[str, str] | None = None, accelerator: bool | None = None) -> bool:
    """Turn on ``args.use_cpu`` when a GPU-less multi-process launch would not form a group.

    Call it before the Trainer resolves its device. DeepSpeed cannot run this way, so a
    DeepSpeed config on a GPU-less multi-process launch is an error rather than a fix.

    Args:
        args: the ``TrainingArguments``; modified in place.
        environ: the environment to read (default ``os.environ``).
        accelerator: whether an accelerator is visible (default: ask torch).

    Returns:
        True when ``use_cpu`` was switched on.
    """
    if not needs_cpu_process_group(args, environ, accelerator):
        return False
    world = launched_world_size(environ)
    if getattr(args, "deepspeed", None):
        raise DistributedSetupError(
            f"{world} processes were launched with a DeepSpeed config but no GPU is visible; DeepSpeed needs GPUs. "
            "Launch with recipes/accelerate/cpu_ddp.yaml (or --multi_gpu plus hardware.use_cpu=true) on a CPU machine"
        )
    args.use_cpu = True
    # TrainingArguments caches the device it resolved (Accelerate state included). Re-resolve it
    # now: the Trainer builds its Accelerator from that state before it touches args again.
    args.__dict__.pop("_setup_devices", None)
    _ = args.device
    logger.warning(
        "%d processes were launched but no GPU is visible and use_cpu was not set: each process would have trained "
        "alone. hf_optcore set use_cpu=True so Accelerate forms a gloo process group (set hardware.use_cpu=true to "
        "silence this).",
        world,
    )
    return True


def verify_process_group(args: Any, environ: dict[str, str] | None = None, accelerator: Any = None) -> None:
    """Raise :class:`DistributedSetupError` unless the Trainer's world size is the launched one.

    Also warns when an FSDP / DeepSpeed launch fell back to DDP (:func:`requested_backend_fallback`).

    Args:
        args: the ``TrainingArguments`` after the Trainer resolved its device.
        environ: the environment to read (default ``os.environ``).
        accelerator: the Trainer's ``Accelerator`` (for the fallback warning).
    """
    if accelerator is not None:
        message = requested_backend_fallback(accelerator.distributed_type, environ)
        if message:
            logger.warning(message)
    launched = launched_world_size(environ)
    formed = int(getattr(args, "world_size", 1))
    if formed > 1:
        _destroy_process_group_at_exit()
    if launched > 1 and formed != launched:
        raise DistributedSetupError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but the Trainer formed a process group of "
            f"{formed} (parallel_mode={getattr(args, 'parallel_mode', '?')}); each process would train alone on the "
            "whole dataset. On a CPU machine set hardware.use_cpu=true (TrainingArguments(use_cpu=True)); on GPUs "
            "check that CUDA is visible to every process"
        )


_SHUTDOWN_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    """Tear the process group down before interpreter exit.

    Left to static destructors, gloo's worker threads are destroyed while still joinable and the
    process aborts ("terminate called without an active exception", exit -6) after a run that
    finished; measured on about half of 2-process CPU runs here.
    """
    global _SHUTDOWN_REGISTERED
    if _SHUTDOWN_REGISTERED:
        return
    import atexit

    import torch.distributed as dist

    def _shutdown():
        # No barrier here: a rank exiting on an error must not wait for peers that never come.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(_shutdown)
    _SHUTDOWN_REGISTERED = True


def exit_process(code: int = 0):
    """End a training process with ``code``; in a multi-process run, without interpreter finalization.

    Gloo keeps tensors referenced from its worker threads after ``destroy_process_group`` (the
    device mesh and DDP hold the group); when the interpreter frees them at finalization the
    process may abort (SIGABRT, "terminate called without an active exception") although every
    file was written, turning a finished run into a failed launch. Seen on 2-process CPU runs here
    now and then, more under load. Single-process runs exit normally.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.destroy_process_group()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def requested_backend_fallback(distributed_type: Any, environ: dict[str, str] | None = None) -> str | None:
    """A message when the launcher asked for FSDP or DeepSpeed but Accelerate runs something else.

    With the Trainer on CPU (``use_cpu``) Accelerate runs plain DDP (``MULTI_CPU``) even under an
    FSDP config: nothing is sharded, each rank holds the whole model. That is correct training,
    but not what was asked for, so it is said out loud.

    Args:
        distributed_type: ``trainer.accelerator.distributed_type``.
        environ: the environment to read (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    kind = str(getattr(distributed_type, "value", distributed_type)).upper()
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if _truthy(env.get(flag)) and name not in kind:
            return (f"the launcher asked for {name} but Accelerate runs {kind} (the Trainer is on the CPU): the "
                    "model is replicated on every process, not sharded. FSDP and DeepSpeed need GPUs; see "
                    "scripts/gpu_check.py")
    return None


def wrap_for_data_parallel_before_training(trainer: Any) -> None:
    """Wrap ``trainer``'s model for DDP before an evaluation that precedes training.

    transformers' evaluation_loop prepares an unprepared model with Accelerate in evaluation mode,
    which marks it prepared without wrapping it; train() then gets the bare model back from
    Accelerate and each rank trains alone on its shard (measured: per-step losses of 2 processes x
    batch 4 drift from 1 process x batch 8 by 6e-3 within 6 steps). Prepared for training here,
    the model is evaluated unwrapped (under no_grad) and train() finds it already wrapped.
    """
    from accelerate.utils import DistributedType

    ddp = {DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.MULTI_XPU,
           DistributedType.MULTI_NPU, DistributedType.MULTI_MLU, DistributedType.MULTI_SDAA,
           DistributedType.MULTI_MUSA, DistributedType.MULTI_HPU, DistributedType.MULTI_NEURON}
    if (not trainer.is_in_train and trainer.model_wrapped is trainer.model and trainer.args.world_size > 1
            and trainer.accelerator.distributed_type in ddp and any(p.requires_grad for p in trainer.model.parameters())):
        trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)

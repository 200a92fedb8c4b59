"""Fault handling that needs no training framework: preemption signals, non-finite steps, a full disk."""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from hf_optcore.distributed import rank_and_world
from hf_optcore.errors import CheckpointError, OptCoreError

logger = logging.getLogger(__name__)


class NonFiniteError(OptCoreError, FloatingPointError):
    """Training hit a non-finite loss or gradient norm and was told (or forced) to stop."""


class StorageFullError(CheckpointError):
    """A checkpoint could not be written: no space left (or a quota or file-size limit); earlier ones are intact."""


_FREE_MARGIN = 1 << 20  # after a failed write, less than this free on the filesystem means it filled up


def storage_full_reason(exc: BaseException, directory: str | os.PathLike) -> str | None:
    """Why writing into ``directory`` failed when it is for lack of space, else None.

    The exception chain is searched for ``ENOSPC`` / ``EDQUOT`` / ``EFBIG`` (or their messages: safetensors
    reports ``os error 28``). torch's archive writer reports only ``unexpected pos`` or ``iostream error``, so for
    any other failure the files and filesystem of ``directory`` are asked: a file that stopped at the process's
    file-size limit (RLIMIT_FSIZE), or under 1 MiB left on the filesystem, means the write ran out of room.
    """
    seen, cur = set(), exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code, text = getattr(cur, "errno", None), str(cur)
        if code == errno.ENOSPC or "No space left on device" in text or "os error 28" in text:
            return "no space left on device"
        if code == errno.EDQUOT or "Disk quota exceeded" in text:
            return "no space left (disk quota exceeded)"
        if code == errno.EFBIG or "File too large" in text:
            return "file too large (over the file size limit, ulimit -f)"
        cur = cur.__cause__ or cur.__context__
    path = Path(directory)
    if _reached_file_size_limit(path):
        return "file too large (over the file size limit, ulimit -f)"
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return "no space left on device" if st.f_bavail * st.f_frsize < _FREE_MARGIN else None


def _reached_file_size_limit(path: Path) -> bool:
    """Whether a file under ``path`` stopped at this process's RLIMIT_FSIZE (torch's writer hides the EFBIG)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return False
    if limit == resource.RLIM_INFINITY or not path.is_dir() or path.is_symlink():
        return False
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                if os.lstat(os.path.join(dirpath, name)).st_size >= limit:
                    return True
            except OSError:
                continue
    return False


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) into a flag that the loop checks at the end of each optimizer step.

    The loop then saves a checkpoint at the step boundary and stops. ``received`` is the first
    signal that arrived (``signal.SIGINT`` for a Ctrl-C: a run stopped that way should exit with
    status ``128 + SIGINT`` = 130, see :attr:`exit_status`). A second SIGINT does not wait for the
    step: it restores the previous SIGINT handler and raises :class:`KeyboardInterrupt` at once.
    SIGINT is left alone when it was ignored (a background job started with ``nohup`` or ``&``).

    Args:
        signals: the signals to catch (default SIGTERM, SIGUSR1 where the platform has it, and SIGINT).
    """

    def __init__(self, signals: tuple[int, ...] | None = None):
        if signals is None:
            signals = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT)
                            if s is not None)
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def interrupted(self) -> bool:
        """True when the stop was asked for with Ctrl-C (SIGINT) rather than by a scheduler."""
        return self.received == signal.SIGINT

    @property
    def exit_status(self) -> int | None:
        """The status a run stopped by the signal should exit with: 130 after SIGINT (the shell's
        convention for Ctrl-C), 0 after SIGTERM/SIGUSR1 (a preemption, saved and resumable); None without one."""
        if self.received is None:
            return None
        return 128 + signal.SIGINT if self.interrupted else 0

    def install(self) -> bool:
        """Install the handlers; False (with a warning) when not in the main thread."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("preemption handling needs the main thread; SIGTERM will not save a checkpoint")
            return False
        for sig in self.signals:
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the closest.
            signal.signal(sig, prev if prev is not None else self._default_handler(sig))
        self._previous.clear()

    @staticmethod
    def _default_handler(sig: int) -> Any:
        return signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        if signum == signal.SIGINT and self.received is not None:
            # A second Ctrl-C: the user will not wait for the step to end.
            previous = self._previous.pop(signum, None)
            signal.signal(signum, previous if previous is not None else self._default_handler(signum))
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            logger.warning("received SIGINT (Ctrl-C): finishing the current step, then saving a checkpoint and "
                           "stopping; press Ctrl-C again to abort at once without saving")
        else:
            logger.warning("received signal %s: finishing the current step, then saving and exiting", name)

    def requested(self) -> bool:
        """Whether any rank received a signal (all-reduced in a process group, so all ranks agree)."""
        flag = self.received is not None
        if rank_and_world()[1] > 1:
            t = torch.tensor([1.0 if flag else 0.0])
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag


def _is_finite(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(float(value))


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # a DTensor shard (FSDP2): each rank checks what it holds
    return to_local() if callable(to_local) else t


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every element of ``tensors`` is finite, on every rank (one reduction over all of them)."""
    local = [_local(t.detach()) for t in tensors if t is not None]
    ok = True
    if local:
        norms = torch._foreach_norm(local)
        ok = bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all())
    if rank_and_world()[1] > 1:
        flag = torch.tensor([0.0 if ok else 1.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        ok = bool(flag.item() == 0)
    return ok


class NonFiniteGuard:
    """Decides, before each optimizer step, whether it is skipped (or the run stops); checks the weights after it.

    A step is bad when a micro-batch loss or a gradient is non-finite on any rank. A skipped step
    changes nothing: the caller drops the gradients (the optimizer then leaves parameters and
    moments alone) and puts the scheduler back. An update that leaves non-finite *weights* (a
    learning rate of inf, an overflow) cannot be undone by skipping later steps: it stops the run
    at once, before anything is saved, so the last checkpoint stays the resume point.

    ``"ignore"`` takes every step whatever it holds, as transformers does, and saves checkpoints as transformers
    does; but it is not a way to get a NaN model reported as a result: a logging interval with a non-finite
    micro-batch loss logs ``nan`` (transformers' ``logging_nan_inf_filter`` would log the other losses' mean, or
    0), and a run that ends with non-finite weights, or a non-finite loss in its last step, ends in
    :class:`NonFiniteError` (:meth:`check_final`) like any diverged run.

    Args:
        on_nonfinite: ``"skip"``, ``"stop"``, or ``"ignore"``.
        max_consecutive: stop after this many consecutive bad steps.
    """

    def __init__(self, on_nonfinite: str = "skip", max_consecutive: int = 5):
        self.on_nonfinite = on_nonfinite
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_steps: list[int] = []
        self.last_step_skipped = False
        self.first_bad_step: int | None = None  # the first optimizer step with a non-finite loss (any mode)
        self.first_bad_save: int | None = None  # "ignore": the first step saved with non-finite weights
        self._bad_loss = False
        self._last_step_bad = False
        self._bad_since_log = False

    def observe_loss(self, loss: Any) -> None:
        """Record a micro-batch loss; a non-finite one marks the current optimizer step bad."""
        if not _is_finite(loss):
            self._bad_loss = True
            self._bad_since_log = True

    def honest_loss(self, logs: dict[str, float]) -> None:
        """With ``"ignore"``, a training log whose interval saw a non-finite loss reports ``loss: nan``."""
        if "loss" not in logs:
            return
        if self.on_nonfinite == "ignore" and self._bad_since_log:
            logs["loss"] = float("nan")
        self._bad_since_log = False

    def should_skip(self, grads: list[torch.Tensor], step: int) -> bool:
        """Decide on optimizer step ``step + 1`` from its losses and gradients; True when it is to be skipped.

        Raises:
            NonFiniteError: with ``on_nonfinite="stop"``, or after ``max_consecutive`` bad steps.
        """
        if self.on_nonfinite == "ignore":
            self._last_step_bad = self._bad_loss
            if self._bad_loss and self.first_bad_step is None:
                self.first_bad_step = step + 1
            self._bad_loss = self.last_step_skipped = False
            return False  # transformers' behaviour: the step is taken whatever it holds
        bad = not all_finite(grads + ([torch.tensor(float("nan"))] if self._bad_loss else []))
        self._bad_loss = False
        self.last_step_skipped = False
        if not bad:
            self.consecutive = 0
            return False
        self.consecutive += 1
        if self.first_bad_step is None:
            self.first_bad_step = step + 1
        what = f"non-finite loss or gradients at optimizer step {step + 1}"
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"{what}; checkpoint.on_nonfinite is 'stop', so training stops here "
                                 f"(the last saved checkpoint is intact)")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{what}: {self.consecutive} consecutive non-finite steps reached "
                f"checkpoint.max_consecutive_nonfinite={self.max_consecutive}; training stops "
                f"(the last saved checkpoint is intact)"
            )
        logger.warning("%s: step skipped (%d in a row)", what, self.consecutive)
        self.skipped_steps.append(step + 1)
        self.last_step_skipped = True
        return True

    def check_weights(self, params: list[torch.Tensor], step: int) -> None:
        """Raise :class:`NonFiniteError` when the update of step ``step + 1`` left a non-finite weight."""
        if self.on_nonfinite != "ignore" and not all_finite(params):
            raise NonFiniteError(
                f"the update of optimizer step {step + 1} left non-finite weights (a learning rate too high, or an "
                f"overflow); training stops without saving them (the last saved checkpoint is intact)"
            )

    def observe_saved_weights(self, params: list[torch.Tensor], step: int) -> None:
        """With ``"ignore"``, note whether the checkpoint of ``step`` holds non-finite weights (every rank calls it)."""
        if self.on_nonfinite == "ignore" and self.first_bad_save is None and not all_finite(params):
            self.first_bad_save = step

    def last_good_step(self) -> int | None:
        """Checkpoints before this step hold weights that were finite and trained on finite losses (None: all)."""
        bad = [s for s in (self.first_bad_step, self.first_bad_save) if s is not None]
        return min(bad) if bad else None

    def check_final(self, params: list[torch.Tensor], step: int) -> None:
        """With ``"ignore"``, at the end of training: raise :class:`NonFiniteError` when the weights are non-finite
        or the last step's loss was (the other modes never let a non-finite update through)."""
        if self.on_nonfinite != "ignore":
            return
        weights_ok = all_finite(params)
        if weights_ok and not self._last_step_bad:
            return
        what = "non-finite weights" if not weights_ok else f"a non-finite loss at its last step ({step})"
        since = f" (the first non-finite loss was at optimizer step {self.first_bad_step})" if self.first_bad_step else ""
        raise NonFiniteError(f"training ended with {what}{since}; checkpoint.on_nonfinite is 'ignore', which takes "
                             f"every step as transformers does, but a non-finite model is not a result")

"""Fault handling that needs no training framework: preemption signals and non-finite steps."""

from __future__ import annotations

import logging
import math
import signal
import threading
from typing import Any

import torch

from hf_optcore.distributed import rank_and_world
from hf_optcore.errors import OptCoreError

logger = logging.getLogger(__name__)


class NonFiniteError(OptCoreError, FloatingPointError):
    """Training hit a non-finite loss or gradient norm and was told (or forced) to stop."""


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

    Args:
        on_nonfinite: ``"skip"``, ``"stop"``, or ``"ignore"`` (no check: transformers' behaviour).
        max_consecutive: stop after this many consecutive bad steps.
    """

    def __init__(self, on_nonfinite: str = "skip", max_consecutive: int = 5):
        self.on_nonfinite = on_nonfinite
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_steps: list[int] = []
        self.last_step_skipped = False
        self._bad_loss = False

    def observe_loss(self, loss: Any) -> None:
        """Record a micro-batch loss; a non-finite one marks the current optimizer step bad."""
        if not _is_finite(loss):
            self._bad_loss = True

    def should_skip(self, grads: list[torch.Tensor], step: int) -> bool:
        """Decide on optimizer step ``step + 1`` from its losses and gradients; True when it is to be skipped.

        Raises:
            NonFiniteError: with ``on_nonfinite="stop"``, or after ``max_consecutive`` bad steps.
        """
        if self.on_nonfinite == "ignore":
            self._bad_loss = self.last_step_skipped = False
            return False  # transformers' behaviour: the step is taken whatever it holds
        bad = not all_finite(grads + ([torch.tensor(float("nan"))] if self._bad_loss else []))
        self._bad_loss = False
        self.last_step_skipped = False
        if not bad:
            self.consecutive = 0
            return False
        self.consecutive += 1
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

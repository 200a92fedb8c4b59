"""PreemptionHandler: Ctrl-C (SIGINT) behaves like SIGTERM; a second Ctrl-C aborts at once."""

import os
import signal
import time

import pytest

from hf_optcore.checkpoint_manager.faults import PreemptionHandler


def _send(sig: int) -> None:
    os.kill(os.getpid(), sig)
    # Python runs the handler in the main thread at its next check; give it that chance here.
    for _ in range(100):
        time.sleep(0.001)


@pytest.fixture
def handler():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    h = PreemptionHandler()
    assert h.install()
    yield h
    h.uninstall()
    for s, prev in before.items():
        signal.signal(s, prev)


def test_sigint_sets_the_flag_like_sigterm(handler):
    assert not handler.requested() and handler.exit_status is None
    _send(signal.SIGINT)  # no KeyboardInterrupt: the loop stops at the step boundary instead
    assert handler.requested()
    assert handler.received == signal.SIGINT and handler.interrupted
    assert handler.exit_status == 130


def test_sigterm_is_a_preemption_that_exits_0(handler):
    _send(signal.SIGTERM)
    assert handler.requested() and handler.received == signal.SIGTERM
    assert not handler.interrupted and handler.exit_status == 0


def test_a_second_sigint_aborts_at_once_and_restores_the_previous_handler(handler):
    _send(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _send(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert handler.received == signal.SIGINT  # the first signal is what the run reports
    # A third Ctrl-C is Python's own again.
    with pytest.raises(KeyboardInterrupt):
        _send(signal.SIGINT)


def test_sigint_after_sigterm_aborts(handler):
    _send(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        _send(signal.SIGINT)
    assert handler.received == signal.SIGTERM


def test_uninstall_restores_every_handler():
    h = PreemptionHandler()
    h.install()
    assert signal.getsignal(signal.SIGINT) == h._handle
    h.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        h = PreemptionHandler()
        h.install()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        _send(signal.SIGINT)
        assert not h.requested()
        h.uninstall()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)

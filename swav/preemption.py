"""Cluster preemption: SIGTERM / SIGUSR1 request a checkpoint and a clean stop (issue 8).

The handler only records the signal; the training loop checks it at the next step boundary,
all ranks agree on it (all-reduce), save a checkpoint and exit with status ``128 + signal``
(143 for SIGTERM, 138 for SIGUSR1). Data-loader workers ignore these signals, so that a signal
sent to the whole process group (``scancel``, ``kill -TERM -PGID``) does not kill them before the
main process has saved -- except a SIGTERM from their own parent: ``multiprocessing`` ends daemonic
children with SIGTERM at interpreter exit and the DataLoader uses it for stuck workers, and a worker
that ignored those would make the main process hang at exit (seen after any training error with
persistent workers). A worker therefore waits for SIGTERM in a small thread (``sigwaitinfo``), which
sees the sender: the parent's SIGTERM ends the worker, anyone else's is ignored.

Example:
    >>> import os, signal
    >>> with StopSignals() as stop:
    ...     os.kill(os.getpid(), signal.SIGUSR1)
    ...     stop.received == signal.SIGUSR1
    True
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

__all__ = ["STOP_SIGNALS", "StopSignals", "ignore_stop_signals", "exit_code_for_signal"]

logger = logging.getLogger(__name__)

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


def exit_code_for_signal(signum: int) -> int:
    """The shell convention for a process stopped by a signal: 128 + signal number."""
    return 128 + int(signum)


def ignore_stop_signals() -> None:
    """For DataLoader workers: ignore SIGTERM/SIGUSR1, except a SIGTERM sent by the parent process.

    Call it from the main thread of the worker (``worker_init_fn``), before it starts other threads.
    Without ``sigwaitinfo`` (not Linux/BSD) every SIGTERM is ignored.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sigterm = getattr(signal, "SIGTERM", None)
    if sigterm is None or not hasattr(signal, "sigwaitinfo") or not hasattr(signal, "pthread_sigmask"):
        return
    signal.signal(sigterm, _ignore)  # not SIG_IGN: an ignored signal is discarded before sigwaitinfo sees it
    signal.pthread_sigmask(signal.SIG_BLOCK, {sigterm})  # threads started from now on inherit the mask
    threading.Thread(target=_obey_parent_sigterm, args=(os.getppid(),), name="swav-sigterm", daemon=True).start()


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM delivered to a thread that does not block it (started before the mask was set)."""


def _obey_parent_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(exit_code_for_signal(signal.SIGTERM))  # what the default action would report


class StopSignals:
    """Context manager that records the first stop signal instead of dying; restores handlers on exit.

    Installs nothing when not called from the main thread (Python allows handlers only there).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            self.received = signum
            logger.warning("received %s: will save a checkpoint and stop at the next step boundary",
                           signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

"""Cluster preemption: SIGTERM / SIGUSR1 request a checkpoint and a clean stop (issue 8).

The handler only records the signal; the training loop checks it at the next step boundary,
all ranks agree on it (all-reduce), save a checkpoint and exit with status ``128 + signal``
(143 for SIGTERM, 138 for SIGUSR1). Data-loader workers ignore these signals, so that a signal
sent to the whole process group does not kill them before the main process has saved.

Example:
    >>> import os, signal
    >>> with StopSignals() as stop:
    ...     os.kill(os.getpid(), signal.SIGUSR1)
    ...     stop.received == signal.SIGUSR1
    True
"""
from __future__ import annotations

import logging
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
    """Ignore SIGTERM/SIGUSR1 in this process (for DataLoader workers)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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

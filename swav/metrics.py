"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step or epoch), TensorBoard, rate and ETA.

Only the main rank writes. On resume, records newer than the resumed step (written after the
checkpoint by the interrupted run) are dropped, so the file reads as one uninterrupted run.
TensorBoard event files go to ``<run>/tensorboard`` when the ``tensorboard`` package is installed.

Example:
    >>> import json, tempfile, pathlib
    >>> run = tempfile.mkdtemp()
    >>> writer = MetricsWriter(run, tensorboard=False)
    >>> writer.write({"step": 1, "loss": 4.2})
    >>> writer.close()
    >>> json.loads(pathlib.Path(run, "metrics.jsonl").read_text())["loss"]
    4.2
    >>> format_duration(3725)
    '1h02m'
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

__all__ = ["MetricsWriter", "RateMeter", "format_duration", "interactive", "progress_bar", "progress_line",
           "truncate_metrics"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m'``; ``75`` -> ``'1m15s'``; unknown -> ``'?'``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def truncate_metrics(output_dir: str | os.PathLike, after_step: int, *,
                     renumber: Callable[[int], int] | None = None) -> int:
    """Drop records whose ``step`` exceeds ``after_step``; returns how many were dropped.

    ``renumber`` (a resume that changed the global batch or the epoch length, hence the step numbering)
    maps each kept record's step to the new numbering, the file's one kept as ``step_before_renumbering``,
    so that the records of the resumed run follow on. ``after_step`` is in the file's numbering.
    """
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) > after_step:
            dropped += 1
        elif renumber is not None and isinstance(record, dict) and isinstance(record.get("step"), int):
            record.setdefault("step_before_renumbering", record["step"])
            record["step"] = renumber(record["step"])
            kept.append(json.dumps(record))
        else:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    return dropped


class MetricsWriter:
    """Append JSON lines (flushed per record) and mirror numeric values to TensorBoard."""

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first step; TensorBoard drops the events an interrupted run logged from
        there on (as ``metrics.jsonl`` is truncated), instead of showing those steps twice."""
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = open(Path(output_dir) / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed: metrics go to %s only", METRICS_FILE)
            else:
                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class RateMeter:
    """Images per second over the last interval and ETA for the remaining steps."""

    def __init__(self, images_per_step: int, total_steps: int, start_step: int) -> None:
        self.images_per_step = images_per_step
        self.total_steps = total_steps
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._start_step = start_step
        self._start_time = self._last_time

    def update(self, step: int) -> tuple[float, float]:
        """``(images/s since the previous call, seconds left)`` at global ``step`` (steps done)."""
        now = time.perf_counter()
        steps = step - self._last_step
        rate = steps * self.images_per_step / max(now - self._last_time, 1e-9)
        overall = (step - self._start_step) / max(now - self._start_time, 1e-9)
        eta = (self.total_steps - step) / overall if overall > 0 else float("inf")
        self._last_step, self._last_time = step, now
        return rate, eta


def interactive() -> bool:
    """Whether a progress bar can redraw itself: stderr is a terminal, or this runs in a Jupyter kernel
    (whose stderr is not a terminal, but where tqdm draws a notebook widget)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_line(log: logging.Logger, message: str, *args: Any) -> None:
    """A progress report line: logged at INFO where logging is set up (the ``swav`` command sets it up), else
    printed on stderr, so that ``progress=True`` in a script whose output goes to a file still reports."""
    if log.hasHandlers():
        log.info(message, *args)
    else:
        print(time.strftime("%H:%M:%S ") + (message % args if args else message), file=sys.stderr, flush=True)


class _LogProgress:
    """What :func:`progress_bar` gives where stderr is not a terminal: a log line every ``interval_s``
    seconds and one at the end, each with the count, the rate and the time left."""

    def __init__(self, total: int | None, initial: int, unit: str, desc: str, interval_s: float) -> None:
        self.total, self.n, self.unit, self.desc, self.interval_s = total, initial, unit, desc, interval_s
        self._initial = initial
        self._start = self._last = time.perf_counter()
        self._postfix = ""

    def __enter__(self) -> "_LogProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None and self.n > self._initial:
            self._log()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self._last >= self.interval_s:
            self._log()

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def _log(self) -> None:
        self._last = now = time.perf_counter()
        rate = (self.n - self._initial) / max(now - self._start, 1e-9)
        done = f"{self.n:,}/{self.total:,} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%)" \
            if self.total else f"{self.n:,} {self.unit}"
        eta = (self.total - self.n) / rate if self.total and rate > 0 else float("nan")
        progress_line(logger, "%s: %s, %.1f %s/s, %s left%s", self.desc, done, rate, self.unit,
                      format_duration(eta), f"; {self._postfix}" if self._postfix else "")


def progress_bar(*, total: int | None, unit: str, desc: str, enabled: bool = True, initial: int = 0,
                 interval_s: float = 30.0) -> Any:
    """A tqdm bar on an interactive terminal or in a notebook (:func:`interactive`); elsewhere (stderr
    redirected to a file, a cluster job's log) a line every ``interval_s`` seconds with the count, rate and
    time left (:func:`progress_line`), so that the log holds no carriage-return redraws. ``enabled=False``:
    neither. Use as a context manager with ``update(n)``.

    Example:
        >>> with progress_bar(total=10, unit="img", desc="demo", enabled=False) as bar:
        ...     bar.update(10)
    """
    if enabled and interactive():
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, unit=unit, desc=desc)
    if enabled:
        return _LogProgress(total, initial, unit, desc, interval_s)
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=True)

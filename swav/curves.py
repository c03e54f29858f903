"""Training curves as PNG from a run folder's ``metrics.jsonl`` (issue 7).

The curves that tell whether SwAV training works: the loss against the collapse value ln K
(SPEC §4: a loss stuck at ln K means collapse), the learning rate (SPEC §9 warm-up + cosine),
how many prototypes are in use, and the k-NN accuracy when the run measured it (SPEC §11).
Plots use matplotlib's object API with the Agg canvas (no display, no global pyplot state).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CURVE_KEYS", "curve_series", "plot_training_curves", "read_metrics"]

logger = logging.getLogger(__name__)

#: curve name -> accepted keys in a metrics record, first match wins
CURVE_KEYS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "train/loss"),
    "ln_k": ("ln_k", "lnK", "ln K", "collapse_loss", "log_num_prototypes"),
    "lr": ("lr", "learning_rate", "train/lr"),
    "prototypes_in_use": ("prototypes_in_use", "prototypes_used", "used_prototypes",
                          "train/prototypes_in_use"),
    "knn": ("knn_top1", "knn_accuracy", "knn_acc", "knn", "eval/knn_top1"),
}
_TITLES = {"loss": ("training loss", "loss"), "lr": ("learning rate", "lr"),
           "prototypes_in_use": ("prototypes in use", "prototypes"), "knn": ("k-NN accuracy", "top-1")}


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` (a run folder or the file itself).

    A torn last line (a run killed while writing) is skipped with a warning; any other bad
    line raises ValueError naming it.

    Example:
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> _ = open(os.path.join(d, "metrics.jsonl"), "w").write('{"step": 1, "loss": 2.0}\\n{"st')
        >>> read_metrics(d)
        [{'step': 1, 'loss': 2.0}]
    """
    file = Path(path)
    if file.is_dir():
        file = file / "metrics.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"path: no metrics file at {file}; expected a run folder holding metrics.jsonl")
    with open(file, encoding="utf-8") as fh:
        lines = [line for line in fh.read().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                logger.warning("%s: ignoring the torn last line %d", file, number)
                break
            raise ValueError(f"{file}: line {number} is not JSON ({exc})") from exc
        if isinstance(record, dict):
            records.append(record)
    return records


def _first(record: dict[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def curve_series(records: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """``name -> (steps, values)`` for every curve of :data:`CURVE_KEYS` present in the records.

    The x value is ``step`` (or the record's position when a record has none). ``ln_k`` falls
    back to ``ln(num_prototypes)`` when only the prototype count was logged.

    Example:
        >>> curve_series([{"step": 0, "loss": 8.0, "lr": 0.1}, {"step": 5, "loss": 7.5}])["loss"]
        ([0.0, 5.0], [8.0, 7.5])
    """
    series: dict[str, tuple[list[float], list[float]]] = {}
    for position, record in enumerate(records):
        step = _first(record, ("step", "global_step", "iteration"))
        x = float(position) if step is None else step
        for name, keys in CURVE_KEYS.items():
            value = _first(record, keys)
            if value is None and name == "ln_k":
                count = _first(record, ("num_prototypes", "K"))
                value = math.log(count) if count and count > 0 else None
            if value is not None:
                xs, ys = series.setdefault(name, ([], []))
                xs.append(x)
                ys.append(value)
    return series


def _figure_png(draw: Any, size: tuple[float, float] = (5.0, 3.2)) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    draw(fig.add_subplot(1, 1, 1))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_training_curves(source: str | os.PathLike | Sequence[dict[str, Any]],
                         output_dir: str | os.PathLike | None = None) -> dict[str, bytes]:
    """PNG bytes (and, with ``output_dir``, files ``<name>.png``) of every available curve.

    ``source`` is a run folder, a ``metrics.jsonl`` file or a list of records. Curves: ``loss``
    (with the ln K collapse line when known), ``lr``, ``prototypes_in_use``, ``knn``.

    Example:
        >>> pngs = plot_training_curves([{"step": s, "loss": 8 - s / 10, "ln_k": 8.0} for s in range(5)])
        >>> sorted(pngs), pngs["loss"][:4]
        (['loss'], b'\\x89PNG')
    """
    records = source if isinstance(source, (list, tuple)) else read_metrics(source)
    series = curve_series(records)
    pngs: dict[str, bytes] = {}
    for name in ("loss", "lr", "prototypes_in_use", "knn"):
        if name not in series:
            continue
        xs, ys = series[name]
        title, ylabel = _TITLES[name]

        def draw(ax: Any, xs: list[float] = xs, ys: list[float] = ys, name: str = name,
                 title: str = title, ylabel: str = ylabel) -> None:
            ax.plot(xs, ys, color="tab:blue", linewidth=1.2, marker="o" if len(xs) < 30 else None,
                    label=ylabel)
            if name == "loss" and "ln_k" in series:
                ln_k = series["ln_k"][1][-1]
                ax.axhline(ln_k, color="tab:red", linestyle="--", linewidth=1.0,
                           label=f"ln K = {ln_k:.3f} (collapse)")
                ax.legend(loc="best", fontsize=8)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)

        pngs[name] = _figure_png(draw)
    if not pngs:
        logger.warning("no known curve in the metrics (looked for %s)",
                       ", ".join(k for keys in CURVE_KEYS.values() for k in keys[:1]))
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in pngs.items():
            (out / f"{name}.png").write_bytes(data)
    return pngs

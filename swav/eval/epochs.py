"""The epoch loop shared by the supervised read-outs (linear probe, fine-tuning) and its result.

Both protocols of SPEC §11 train for a fixed number of epochs with a per-epoch learning-rate
schedule, evaluate on the test set after every epoch, and report top-1/top-5 of the last epoch and
of the best epoch (the official scripts report the best; we report both).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from swav.metrics import format_duration, interactive, progress_line

__all__ = ["ClassifierResult", "cosine_epoch_factor", "multistep_epoch_factor", "run_epochs"]

logger = logging.getLogger(__name__)


@dataclass
class ClassifierResult:
    """Accuracies (percent) of a trained classifier; ``best_epoch`` is 1-based.

    ``history`` has one dict per epoch: ``epoch``, ``lr`` (of the first parameter group),
    ``train_loss``, ``test_loss``, ``top1``, ``top5``.

    Example:
        >>> r = ClassifierResult.from_history([{"epoch": 1, "top1": 50.0, "top5": 90.0}])
        >>> r.top1_best, r.best_epoch
        (50.0, 1)
    """

    top1_last: float
    top5_last: float
    top1_best: float
    top5_best: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_history(cls, history: Sequence[dict[str, float]]) -> ClassifierResult:
        """Build from per-epoch records; the best epoch is the first with the highest top-1."""
        if not history:
            raise ValueError("history: needs at least one epoch record, got none")
        best = max(history, key=lambda h: h["top1"])
        last = history[-1]
        return cls(
            top1_last=last["top1"],
            top5_last=last["top5"],
            top1_best=best["top1"],
            top5_best=best["top5"],
            best_epoch=int(best["epoch"]),
            history=list(history),
        )

    def to_dict(self) -> dict:
        """Plain dict for JSON output."""
        return asdict(self)


def cosine_epoch_factor(epoch: int, epochs: int, final_fraction: float = 0.0) -> float:
    """Cosine multiplier of the base learning rate for 0-based ``epoch`` of ``epochs``.

    The official linear evaluation steps ``CosineAnnealingLR(T_max=epochs)`` once per epoch:
    epoch 0 uses the base rate, the last epoch a rate just above ``final_fraction``.

    Example:
        >>> [round(cosine_epoch_factor(e, 4), 3) for e in range(4)]
        [1.0, 0.854, 0.5, 0.146]
    """
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def multistep_epoch_factor(epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """Step multiplier: ``gamma`` to the number of milestones reached by 0-based ``epoch``.

    Matches ``MultiStepLR`` stepped once per epoch (official semi-supervised: x0.2 at 12 and 16).

    Example:
        >>> [multistep_epoch_factor(e, (2, 3), 0.1) for e in range(4)]
        [1.0, 1.0, 0.1, 0.010000000000000002]
    """
    return gamma ** sum(epoch >= m for m in milestones)


def _log_info(log: logging.Logger, message: str, *args: Any) -> None:
    log.info(message, *args)


def run_epochs(
    optimizer: torch.optim.Optimizer | Any,
    *,
    epochs: int,
    lr_factor: Callable[[int], float],
    train_epoch: Callable[[int], float],
    evaluate: Callable[[], dict[str, float]],
    progress: bool = False,
    desc: str = "epochs",
) -> ClassifierResult:
    """Train ``epochs`` epochs, setting every group's lr to its initial lr x ``lr_factor(epoch)``.

    ``optimizer`` is anything with torch-style ``param_groups`` (dicts with an ``"lr"``).
    ``train_epoch(epoch)`` returns the mean training loss; ``evaluate()`` returns at least
    ``top1`` and ``top5`` (and optionally ``loss``) on the test set.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> r = run_epochs(opt, epochs=2, lr_factor=lambda e: 1.0, train_epoch=lambda e: 0.0,
        ...                evaluate=lambda: {"top1": 1.0, "top5": 2.0})
        >>> r.top1_last, len(r.history)
        (1.0, 2)
    """
    if epochs < 1:
        raise ValueError(f"epochs: must be >= 1, got {epochs}")
    from tqdm.auto import tqdm

    base_lrs = [group["lr"] for group in optimizer.param_groups]
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    # a bar on an interactive terminal only: the log line of each epoch (with the time left) is the progress
    # report in a redirected log, which a bar would fill with carriage-return redraws
    with tqdm(range(epochs), desc=desc, unit="epoch", disable=not (progress and interactive())) as bar:
        for epoch in bar:
            factor = lr_factor(epoch)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            train_loss = train_epoch(epoch)
            metrics = evaluate()
            record = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": float(train_loss),
                "test_loss": float(metrics.get("loss", float("nan"))),
                "top1": float(metrics["top1"]),
                "top5": float(metrics["top5"]),
            }
            history.append(record)
            bar.set_postfix(loss=f"{train_loss:.3f}", top1=f"{record['top1']:.2f}")
            elapsed = time.perf_counter() - start
            (progress_line if progress and not interactive() else _log_info)(
                logger,
                "epoch %d/%d lr %.4g train loss %.4f test top1 %.2f top5 %.2f (%s per epoch, %s left)",
                epoch + 1,
                epochs,
                record["lr"],
                train_loss,
                record["top1"],
                record["top5"],
                format_duration(elapsed / (epoch + 1)),
                format_duration(elapsed / (epoch + 1) * (epochs - epoch - 1)),
            )
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base
    return ClassifierResult.from_history(history)

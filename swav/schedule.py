"""Per-step learning rate: linear warm-up then cosine decay (SPEC §9), the official formula.

warm-up: ``linspace(start_warmup, base_lr, warmup_epochs * steps_per_epoch)``;
then for t = 0 .. T-1 (T = remaining steps): ``final + 0.5 (base - final)(1 + cos(pi t / T))``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["warmup_cosine_schedule"]


def warmup_cosine_schedule(
    base_lr: float,
    final_lr: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """One learning rate per optimisation step, ``epochs * steps_per_epoch`` values.

    Example:
        >>> lrs = warmup_cosine_schedule(4.8, 0.0048, epochs=100, steps_per_epoch=313, warmup_epochs=10, start_warmup=0.3)
        >>> len(lrs), round(float(lrs[0]), 4), round(float(lrs[3130]), 4)
        (31300, 0.3, 4.8)
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {epochs}, {steps_per_epoch}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    warmup = np.linspace(start_warmup, base_lr, warmup_steps)
    t = np.arange(epochs * steps_per_epoch - warmup_steps)
    cosine = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate([warmup, cosine])

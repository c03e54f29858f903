"""Top-k accuracy, the metric every evaluation protocol reports (SPEC §11: top-1 and top-5).

Legend: N samples, K classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor
from torch.nn import functional as F

__all__ = ["accuracy_over_batches", "topk_accuracy", "topk_correct"]


def topk_correct(scores_NK: Tensor, labels_N: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Count the samples whose label is among the ``k`` highest scores, for each ``k`` in ``ks``.

    Counts (not rates) so that callers can sum them over batches. ``k`` larger than the number of
    classes is clipped to it (top-5 of a 3-class problem is always correct).

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
        >>> topk_correct(scores, torch.tensor([2, 0]), ks=(1, 2))
        {1: 1, 2: 2}
    """
    if scores_NK.dim() != 2:
        raise ValueError(f"scores_NK: expected a (N, K) tensor, got shape {tuple(scores_NK.shape)}")
    if labels_N.shape != scores_NK.shape[:1]:
        raise ValueError(
            f"labels_N: expected shape ({scores_NK.shape[0]},) to match scores, got {tuple(labels_N.shape)}"
        )
    if any(k < 1 for k in ks):
        raise ValueError(f"ks: every k must be >= 1, got {list(ks)}")
    max_k = min(max(ks), scores_NK.shape[1])
    top = scores_NK.topk(max_k, dim=1)
    voted = ~(top.values.isneginf() | top.values.isnan())  # -inf marks "no vote"; +inf is the strongest score
    hit_NM = (top.indices == labels_N.to(scores_NK.device).unsqueeze(1)) & voted
    return {k: int(hit_NM[:, : min(k, max_k)].any(dim=1).sum()) for k in ks}


def topk_accuracy(scores_NK: Tensor, labels_N: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent, keyed ``"top1"``, ``"top5"``, ...

    Example:
        >>> import torch
        >>> topk_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]), ks=(1,))
        {'top1': 50.0}
    """
    counts = topk_correct(scores_NK, labels_N, ks)
    n = max(scores_NK.shape[0], 1)
    return {f"top{k}": 100.0 * counts[k] / n for k in ks}


def accuracy_over_batches(batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Mean cross-entropy (``loss``) and ``top1``/``top5`` (percent) over ``(logits, labels)`` batches.

    Streams: only one batch of logits is alive at a time, so a whole test set can be scored.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> accuracy_over_batches([(logits, torch.tensor([0, 0]))])["top1"]
        50.0
    """
    loss_sum, hits1, hits5, n = 0.0, 0, 0, 0
    for logits, labels in batches:
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        counts = topk_correct(logits, labels, ks=(1, 5))
        hits1, hits5, n = hits1 + counts[1], hits5 + counts[5], n + labels.shape[0]
    if n == 0:
        raise ValueError("batches: yielded no samples to score")
    return {"loss": loss_sum / n, "top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n}

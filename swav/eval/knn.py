"""Weighted k-nearest-neighbour classification of frozen features (SPEC §11, DINO's practice).

Every test feature votes with its ``k`` most similar training features (cosine similarity of
L2-normalised features); a neighbour with similarity ``s`` adds ``exp(s / T)`` to the score of its
class. No training, so it is the quickest read-out of a checkpoint's quality. Test rows are
processed in chunks, so 60k x 10k needs only ``batch_size x N_train`` floats at a time.
Legend: N training samples, M test samples, C feature dim, K classes, k neighbours.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch.nn import functional as F

from swav.eval.accuracy import topk_correct

__all__ = ["knn_accuracy", "knn_classify"]

logger = logging.getLogger(__name__)


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 512,
) -> Tensor:
    """Return class scores ``(M, K)`` of the weighted k-NN vote; ``argmax`` is the prediction.

    A neighbour at cosine similarity ``s`` votes ``exp(s / T)``; each test sample's votes are scaled by
    ``exp(-s_max / T)`` (its nearest neighbour votes 1), which leaves its ranking of the classes as it is and
    keeps the scores finite at any temperature.

    ``train_features`` (N, C) and ``test_features`` (M, C) need not be normalised (they are
    L2-normalised here). ``num_classes`` defaults to ``max(train_labels) + 1``. ``k`` above N is
    clipped to N. Computation happens on ``train_features``' device.

    Example:
        >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> scores = knn_classify(train, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.2]]), k=2)
        >>> scores.argmax(dim=1).tolist()
        [0]
    """
    train_NC, test_MC, labels_N, num_classes = _check_inputs(
        train_features, train_labels, test_features, k, temperature, num_classes, batch_size
    )
    if k > train_NC.shape[0]:
        logger.warning("k=%d exceeds the %d training samples; using k=%d", k, len(labels_N), len(labels_N))
        k = train_NC.shape[0]
    train_NC = F.normalize(train_NC.float(), dim=1)
    scores_MK = torch.zeros(test_MC.shape[0], num_classes, device=train_NC.device)
    for start in range(0, test_MC.shape[0], batch_size):
        chunk_bC = F.normalize(test_MC[start : start + batch_size].to(train_NC).float(), dim=1)
        sim_bk, idx_bk = (chunk_bC @ train_NC.T).topk(k, dim=1)
        # exp(s / T) scaled per test sample by exp(-s_max / T): the same vote (each row's ranking of classes),
        # but finite at any temperature (exp(s / T) overflows float32 once s / T > 88.7, e.g. T = 0.01, s > 0.89)
        weights_bk = ((sim_bk - sim_bk[:, :1]) / temperature).exp()
        scores_MK[start : start + batch_size].scatter_add_(1, labels_N[idx_bk], weights_bk)
    return scores_MK


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of :func:`knn_classify`: ``{"top1": .., "top5": ..}``.

    ``num_classes`` defaults to the largest label in either set plus one. A class that received
    no vote never counts as a top-5 hit (plain ``topk`` would count it by tie order).

    Example:
        >>> train = torch.eye(3).repeat(4, 1)
        >>> labels = torch.arange(3).repeat(4)
        >>> knn_accuracy(train, labels, torch.eye(3), torch.arange(3), k=4)["top1"]
        100.0
    """
    if test_labels.dim() != 1 or test_labels.shape[0] != test_features.shape[0]:
        raise ValueError(f"test_labels: expected shape ({test_features.shape[0]},), got {tuple(test_labels.shape)}")
    if len(test_labels) and int(test_labels.min()) < 0:
        raise ValueError(f"test_labels: hold {int((test_labels < 0).sum())} negative label(s) (-1 marks an "
                         "unlabelled image): leave those images out of the accuracy")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores_MK = knn_classify(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        batch_size=batch_size,
    )
    # a class without any vote is no prediction: keep it out of the top-5 however ties fall
    scores_MK = scores_MK.masked_fill(scores_MK == 0, float("-inf"))
    counts = topk_correct(scores_MK, test_labels.to(scores_MK.device), ks=(1, 5))
    n = max(test_labels.shape[0], 1)
    return {"top1": 100.0 * counts[1] / n, "top5": 100.0 * counts[5] / n}


def _check_inputs(
    train_NC: Tensor,
    train_labels: Tensor,
    test_MC: Tensor,
    k: int,
    temperature: float,
    num_classes: int | None,
    batch_size: int,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Validate shapes and hyper-parameters; return the inputs with labels as int64 on device."""
    if train_NC.dim() != 2 or test_MC.dim() != 2 or train_NC.shape[1] != test_MC.shape[1]:
        raise ValueError(
            f"train_features/test_features: expected (N, C) and (M, C) with the same C, got "
            f"{tuple(train_NC.shape)} and {tuple(test_MC.shape)}"
        )
    if train_NC.shape[0] == 0:
        raise ValueError("train_features: needs at least one training sample, got 0")
    if train_labels.shape != train_NC.shape[:1]:
        raise ValueError(f"train_labels: expected shape ({train_NC.shape[0]},), got {tuple(train_labels.shape)}")
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    labels_N = train_labels.to(device=train_NC.device, dtype=torch.int64)
    if labels_N.min() < 0:
        raise ValueError(f"train_labels: must be >= 0, got minimum {int(labels_N.min())}")
    needed = int(labels_N.max()) + 1
    if num_classes is None:
        num_classes = needed
    elif num_classes < needed:
        raise ValueError(f"num_classes: must be > the largest train label {needed - 1}, got {num_classes}")
    return train_NC, test_MC, labels_N, num_classes

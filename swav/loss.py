"""The swapped-prediction loss (SPEC §4, paper eq. 1-2) with an optional queue (SPEC §5).

Legend: V crops, B batch per crop, K prototypes, A assignment crops, L queue rows.
Scores arrive crop-major: rows ``v*B .. (v+1)*B`` belong to crop ``v`` (the model's output order).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from swav.sinkhorn import sinkhorn_knopp

__all__ = ["swav_loss", "compute_codes", "SwAVLoss", "validate_crops_for_assign"]


def validate_crops_for_assign(crops_for_assign: Sequence[int], num_crops: int) -> tuple[int, ...]:
    """Check that assignment crop ids are distinct, in range, and leave at least one other crop."""
    ids = tuple(int(i) for i in crops_for_assign)
    if num_crops < 2:
        raise ValueError(f"num_crops must be >= 2 for a swapped prediction, got {num_crops}")
    if not ids:
        raise ValueError("crops_for_assign must name at least one crop id")
    bad = [i for i in ids if not 0 <= i < num_crops]
    if bad:
        raise ValueError(f"crops_for_assign has ids {bad} out of range: valid ids are 0..{num_crops - 1}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"crops_for_assign has duplicate ids: {list(ids)}")
    return ids


def compute_codes(
    scores_BK: torch.Tensor,
    queue_scores_LK: torch.Tensor | None = None,
    *,
    epsilon: float = 0.05,
    iterations: int = 3,
    log_domain: bool | None = None,
) -> torch.Tensor:
    """Codes of one assignment crop: Sinkhorn on ``[queue; batch]``, keep the last B rows."""
    batch = scores_BK.shape[0]
    if queue_scores_LK is not None and queue_scores_LK.shape[0] > 0:
        scores_BK = torch.cat([queue_scores_LK.to(scores_BK.dtype), scores_BK], dim=0)
    codes = sinkhorn_knopp(scores_BK, epsilon=epsilon, iterations=iterations, log_domain=log_domain)
    return codes[-batch:]


def _single_head_loss(
    scores: torch.Tensor,
    num_crops: int,
    crops_for_assign: tuple[int, ...],
    temperature: float,
    epsilon: float,
    iterations: int,
    queue_scores: Sequence[torch.Tensor | None] | None,
    log_domain: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores has shape {shape}: expected (V*B) x K prototype scores, crop-major")
    if scores.shape[0] == 0 or scores.shape[0] % num_crops:
        raise ValueError(f"scores has {scores.shape[0]} rows, not a positive multiple of num_crops={num_crops}")
    if queue_scores is not None and len(queue_scores) != len(crops_for_assign):
        raise ValueError(
            f"queue_scores has {len(queue_scores)} entries; need one per assignment crop ({len(crops_for_assign)})"
        )
    batch = scores.shape[0] // num_crops
    scores_VBK = scores.reshape(num_crops, batch, -1)
    logits_VBK = scores_VBK.float() / temperature
    # -sum_k q log softmax(x) = logsumexp(x) - sum_k q x  (rows of q sum to 1): one logsumexp per
    # crop and one einsum for every (assignment crop, crop) pair; no per-pair Python loop
    lse_VB = torch.logsumexp(logits_VBK, dim=-1)
    codes_ABK = torch.stack([
        compute_codes(
            scores_VBK[a],
            None if queue_scores is None else queue_scores[i],
            epsilon=epsilon,
            iterations=iterations,
            log_domain=log_domain,
        )
        for i, a in enumerate(crops_for_assign)
    ]).to(logits_VBK.dtype)
    cross_AV = (lse_VB.sum(dim=1)[None, :] - torch.einsum("abk,vbk->av", codes_ABK, logits_VBK)) / batch
    # drop each assignment crop's prediction of itself; python-int indexing (no index tensor to copy
    # to the device, hence no GPU synchronisation)
    own_A = torch.stack([cross_AV[i, a] for i, a in enumerate(crops_for_assign)])
    loss = ((cross_AV.sum(dim=1) - own_A) / (num_crops - 1)).mean()
    return loss, codes_ABK


def swav_loss(
    scores: torch.Tensor | Sequence[torch.Tensor],
    num_crops: int,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    queue_scores: Sequence | None = None,
    log_domain: bool | None = None,
    return_codes: bool = False,
):
    """Swapped-prediction loss averaged over assignment crops (and prototype heads).

    For every assignment crop ``a`` the codes ``q_a`` (Sinkhorn, no gradient) are predicted by
    every other crop ``v`` from ``softmax(s_v / temperature)``; the loss is the mean over ``a``
    of the mean over ``v != a`` of the cross-entropy.

    Args:
        scores: ``(V*B) x K`` prototype scores, crop-major, or a list with one such tensor per
            prototype head (the loss is then averaged over heads).
        num_crops: V, the number of crops per image.
        crops_for_assign: crop ids whose codes are targets (official: the two large crops).
        queue_scores: optional, one ``L x K`` tensor (or None) per assignment crop, placed in
            front of the batch for Sinkhorn (SPEC §5); with several heads, one such list per head.
        return_codes: also return the codes, ``A x B x K`` (a list of those with several heads).

    Example:
        >>> import torch
        >>> scores = torch.randn(4 * 3, 10, requires_grad=True)   # V=4 crops, B=3, K=10
        >>> loss = swav_loss(scores, num_crops=4)
        >>> loss.backward()
    """
    ids = validate_crops_for_assign(crops_for_assign, num_crops)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    heads = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    if not heads:
        raise ValueError("scores is an empty list: need one tensor per prototype head")
    queues = [queue_scores] if isinstance(scores, torch.Tensor) else (queue_scores or [None] * len(heads))
    if len(queues) != len(heads):
        raise ValueError(f"queue_scores has {len(queues)} entries for {len(heads)} prototype heads: with several "
                         "heads, give one list (one entry per assignment crop) per head")
    losses, codes = [], []
    for head_scores, head_queue in zip(heads, queues):
        loss, head_codes = _single_head_loss(
            head_scores, num_crops, ids, temperature, epsilon, sinkhorn_iterations, head_queue, log_domain
        )
        losses.append(loss)
        codes.append(head_codes)
    total = torch.stack(losses).mean()
    if not return_codes:
        return total
    return total, (codes[0] if isinstance(scores, torch.Tensor) else codes)


class SwAVLoss(nn.Module):
    """Module form of :func:`swav_loss` holding the hyper-parameters.

    Example:
        >>> import torch
        >>> criterion = SwAVLoss(num_crops=8, crops_for_assign=(0, 1))
        >>> loss = criterion(torch.randn(8 * 4, 30))
        >>> abs(SwAVLoss(num_crops=2)(torch.zeros(2 * 4, 30)).item() - math.log(30)) < 1e-5
        True
    """

    def __init__(
        self,
        num_crops: int,
        crops_for_assign: Sequence[int] = (0, 1),
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        log_domain: bool | None = None,
    ) -> None:
        super().__init__()
        self.crops_for_assign = validate_crops_for_assign(crops_for_assign, num_crops)
        self.num_crops = num_crops
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.log_domain = log_domain

    def forward(self, scores, queue_scores=None, return_codes: bool = False):
        return swav_loss(
            scores,
            self.num_crops,
            self.crops_for_assign,
            self.temperature,
            self.epsilon,
            self.sinkhorn_iterations,
            queue_scores,
            self.log_domain,
            return_codes,
        )

    @staticmethod
    def collapse_value(num_prototypes: int) -> float:
        """The loss of a collapsed model, ln K (SPEC §4)."""
        return math.log(num_prototypes)

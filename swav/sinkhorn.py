"""Sinkhorn-Knopp codes with equipartition (SPEC §3, paper eq. 3).

Legend: B batch (local rows), K prototypes, Q_KB the transport plan with prototypes as rows.

The official algorithm works on ``exp(scores / eps)`` directly; we subtract the global maximum
first (identical result after the first normalisation, no overflow) and always compute in
float32 or float64, whatever the autocast dtype. A log-domain variant handles any epsilon.

Which one runs by default: ``exp(s / eps)`` after the maximum is subtracted reaches down to
``exp(-(max - min) / eps)``; cosines span at most 2, so below ``eps = 2 / 80 = 0.025`` (float32; 2 / 700
in float64) whole rows or columns can underflow to 0 and the codes come out wrong without a NaN to show
it (at eps 0.005, 255 of the 256 rows of the (256, 3000) batch with one confident sample in
``tests/test_sinkhorn.py``). ``log_domain=None`` picks the log domain there and the official exp form
elsewhere (eps 0.05 official, 0.03 for small data sets), where it is exact and cheaper. The rule looks
only at ``epsilon`` and the dtype, not at the data, so it needs no host-device synchronisation.
"""
from __future__ import annotations

import torch

from swav.distributed import all_reduce_max_, all_reduce_sum_

__all__ = ["sinkhorn_knopp", "needs_log_domain"]

# the widest exponent range (max - min of scores / eps) the exp form keeps in normal floating-point numbers,
# with margin: float32's smallest normal number is exp(-87.3), float64's exp(-708.4)
_EXP_RANGE = {torch.float32: 80.0, torch.float64: 700.0}
_COSINE_SPAN = 2.0  # scores are cosines in [-1, 1]


def needs_log_domain(epsilon: float, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the exp form of Sinkhorn can underflow for cosine scores at ``epsilon`` in ``dtype``
    (float32 below eps 0.025): what ``log_domain=None`` decides.

    Example:
        >>> needs_log_domain(0.05), needs_log_domain(0.03), needs_log_domain(0.01), needs_log_domain(0.01, torch.float64)
        (False, False, True, False)
    """
    return _COSINE_SPAN / epsilon > _EXP_RANGE[torch.float64 if dtype == torch.float64 else torch.float32]


def _check(scores: torch.Tensor, epsilon: float, iterations: int) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D (B x K) tensor, got shape {tuple(scores.shape)}")
    if scores.shape[1] < 1:
        raise ValueError("scores must have at least one prototype column (K >= 1)")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    log_domain: bool | None = None,
    distributed: bool = True,
) -> torch.Tensor:
    """Soft codes for a batch of prototype scores, spread evenly over the prototypes.

    Args:
        scores: ``B x K`` prototype scores (cosines) of this rank's rows.
        epsilon: entropy regularisation (0.05 official); smaller is harder.
        iterations: number of row/column normalisation rounds (3 official).
        log_domain: normalise with log-sum-exp, exact for any epsilon; ``None`` (default): only where the
            exp form could underflow (:func:`needs_log_domain`: eps < 0.025 in float32; the rule assumes
            cosine scores, |s| <= 1, as SwAV's are: pass ``True`` for scores of a wider range), ``False``:
            always the exp form, ``True``: always the log domain.
        distributed: when a process group exists, sum over all ranks so that B is the global
            batch and every rank gets exactly its slice of the single-process result.

    Returns:
        ``B x K`` codes in float32 (float64 if ``scores`` is float64); each row sums to 1 (with
        ``iterations >= 1``; ``iterations=0`` returns the unbalanced kernel, whose rows do not).
        No gradient flows (codes are targets).

    Example:
        >>> import torch
        >>> codes = sinkhorn_knopp(torch.randn(8, 5), epsilon=0.05, iterations=3)
        >>> torch.allclose(codes.sum(1), torch.ones(8))
        True
    """
    _check(scores, epsilon, iterations)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=scores.device.type, enabled=False):
        s_BK = scores.detach().to(dtype)
        reduce_sum = all_reduce_sum_ if distributed else (lambda t: t)
        reduce_max = all_reduce_max_ if distributed else (lambda t: t)
        num_prototypes = s_BK.shape[1]
        # torch.full, not torch.tensor: no host-to-device copy, hence no GPU synchronisation
        total_rows = reduce_sum(torch.full((1,), float(s_BK.shape[0]), dtype=dtype, device=s_BK.device))
        if log_domain is None:
            log_domain = needs_log_domain(epsilon, dtype)
        if log_domain:
            return _sinkhorn_log(s_BK, epsilon, iterations, num_prototypes, total_rows, reduce_sum, reduce_max)
        return _sinkhorn_exp(s_BK, epsilon, iterations, num_prototypes, total_rows, reduce_sum, reduce_max)


def _global_max(s_BK: torch.Tensor, reduce_max) -> torch.Tensor:
    local = s_BK.max() if s_BK.numel() else torch.tensor(float("-inf"), dtype=s_BK.dtype, device=s_BK.device)
    return reduce_max(local.reshape(1).clone())


def _sinkhorn_exp(s_BK, epsilon, iterations, K, B_total, reduce_sum, reduce_max) -> torch.Tensor:
    # one B x K buffer, normalised in place; each normalisation is a single pass (sum, then one divide by
    # sum x K or sum x B), and the last iteration's "/ B, then * B" is left out: same values, fewer passes
    Q_KB = (s_BK - _global_max(s_BK, reduce_max)).div_(epsilon).exp_().t()
    Q_KB /= reduce_sum(Q_KB.sum().reshape(1))
    tiny = torch.finfo(Q_KB.dtype).tiny
    for i in range(iterations):
        # clamp: a prototype (or sample) whose mass underflowed to 0 stays 0 instead of NaN
        row_sums_K1 = reduce_sum(Q_KB.sum(dim=1, keepdim=True))
        Q_KB /= row_sums_K1.clamp_min(tiny) * K
        col_sums_1B = Q_KB.sum(dim=0, keepdim=True).clamp_min(tiny)
        Q_KB /= col_sums_1B if i == iterations - 1 else col_sums_1B * B_total
    if iterations == 0:
        Q_KB *= B_total  # rows of the joint distribution scaled to sum to 1 on average, as with iterations
    return Q_KB.t()


def _log_reduce_sum(logx: torch.Tensor, dim: int | None, reduce_sum, reduce_max,
                    scratch: torch.Tensor | None = None) -> torch.Tensor:
    """log(sum(exp(logx))) over ``dim`` *and over all ranks*, computed stably (``scratch``: a buffer of
    ``logx``'s shape to work in, so that no temporary matrix is allocated)."""
    if dim is None:
        m = reduce_max(logx.max().reshape(1).clone())
        return torch.log(reduce_sum(torch.exp(logx - m).sum().reshape(1))) + m
    m = reduce_max(logx.max(dim=dim, keepdim=True).values.clone())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shifted = torch.sub(logx, m, out=scratch) if scratch is not None else logx - m
    return torch.log(reduce_sum(shifted.exp_().sum(dim=dim, keepdim=True))) + m


def _sinkhorn_log(s_BK, epsilon, iterations, K, B_total, reduce_sum, reduce_max) -> torch.Tensor:
    # two B x K buffers (the log-codes and a scratch for the exponentials), updated in place
    logQ_KB = (s_BK / epsilon).t()
    logQ_KB -= _log_reduce_sum(logQ_KB, None, reduce_sum, reduce_max)
    scratch = torch.empty_like(logQ_KB)
    log_K = torch.log(torch.full((), float(K), dtype=s_BK.dtype, device=s_BK.device))
    log_B = torch.log(B_total)
    no_reduce = lambda t: t  # noqa: E731  (column sums are local to each rank)
    for _ in range(iterations):
        logQ_KB -= _log_reduce_sum(logQ_KB, 1, reduce_sum, reduce_max, scratch) + log_K
        logQ_KB -= _log_reduce_sum(logQ_KB, 0, no_reduce, no_reduce, scratch) + log_B
    return logQ_KB.add_(log_B).exp_().t()

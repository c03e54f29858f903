"""LARS as used by SwAV (SPEC §9): the original LARC wrapper's semantics around SGD + momentum.

For every parameter p with gradient g (both norms non-zero), with weight decay wd:
    rate = trust * ||p|| / (||g|| + wd * ||p|| + eps)
    g    = (g + wd * p) * rate
then plain SGD with momentum runs with weight decay switched off. No clipping: the rate is not
capped at 1 and it applies to all parameters (biases and BatchNorm included), as the original.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["LARS"]


class LARS(torch.optim.SGD):
    """SGD with momentum whose gradients are rescaled layer-wise by the trust ratio.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(4, 2)
        >>> opt = LARS(layer.parameters(), lr=0.1)
        >>> layer(torch.randn(3, 4)).sum().backward(); opt.step()
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("lars_weight_decay", weight_decay)
        self.defaults["lars_weight_decay"] = weight_decay
        self.trust_coefficient = trust_coefficient
        self.eps = eps

    @torch.no_grad()
    def _rescale_gradients(self) -> None:
        for group in self.param_groups:
            wd = group["lars_weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            # all norms and rates as single stacked tensors: a handful of kernels per group instead
            # of several per parameter (this matters on GPUs, where launches dominate small tensors)
            p_norms = torch.stack(torch._foreach_norm(params))
            g_norms = torch.stack(torch._foreach_norm(grads))
            ok = (p_norms > 0) & (g_norms > 0)  # else the gradient passes through untouched
            rate = torch.where(ok, self.trust_coefficient * p_norms / (g_norms + wd * p_norms + self.eps), 1.0)
            decay = torch.where(ok, rate * wd, 0.0)
            torch._foreach_mul_(grads, list(rate.unbind()))
            torch._foreach_addcmul_(grads, params, list(decay.unbind()))  # g += decay * p, no temporaries

    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._rescale_gradients()
        super().step()
        return loss

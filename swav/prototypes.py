"""Trainable prototypes C (SPEC §2): bias-free linear maps re-normalised to unit rows.

A single head stores its K x D matrix as ``weight`` (official key ``prototypes.weight``);
several heads (DeepCluster-v2 style, SPEC §8) store ``prototypes0.weight``, ``prototypes1.weight``...
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Prototypes"]


def _as_sizes(num_prototypes: int | Sequence[int]) -> tuple[int, ...]:
    sizes = (num_prototypes,) if isinstance(num_prototypes, int) else tuple(int(k) for k in num_prototypes)
    if not sizes or any(k < 1 for k in sizes):
        raise ValueError(f"num_prototypes must be a positive int or a non-empty list of them, got {num_prototypes}")
    return sizes


class Prototypes(nn.Module):
    """One or several prototype heads; ``forward`` returns a list with one score tensor per head.

    Example:
        >>> import torch
        >>> protos = Prototypes(dim=128, num_prototypes=3000)
        >>> protos.normalize_()
        >>> [s.shape for s in protos(torch.randn(5, 128))]
        [torch.Size([5, 3000])]
    """

    def __init__(self, dim: int, num_prototypes: int | Sequence[int] = 3000) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.sizes = _as_sizes(num_prototypes)
        self.dim = dim
        if len(self.sizes) == 1:
            layer = nn.Linear(dim, self.sizes[0], bias=False)
            self.weight = layer.weight  # K x D, same init as nn.Linear
        else:
            for i, k in enumerate(self.sizes):
                self.add_module(f"prototypes{i}", nn.Linear(dim, k, bias=False))

    def weights(self) -> list[torch.Tensor]:
        """The K_h x D weight of every head."""
        if len(self.sizes) == 1:
            return [self.weight]
        return [getattr(self, f"prototypes{i}").weight for i in range(len(self.sizes))]

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project every prototype onto the unit sphere (before each training forward)."""
        for w in self.weights():
            w.copy_(F.normalize(w, dim=1, p=2))

    def forward(self, z_ND: torch.Tensor) -> list[torch.Tensor]:
        return [z_ND @ w.t() for w in self.weights()]

"""Projection head g (SPEC §2): Linear -> BatchNorm1d -> ReLU -> Linear.

Kept as an ``nn.Sequential`` with the official indices (0 Linear, 1 BatchNorm1d, 2 ReLU,
3 Linear) so that released checkpoints map key for key.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Sequential):
    """MLP projection head; ``hidden_dim=0`` gives a single linear layer.

    Example:
        >>> import torch
        >>> head = ProjectionHead(2048, hidden_dim=2048, out_dim=128)
        >>> head(torch.randn(4, 2048)).shape
        torch.Size([4, 128])
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, batch_norm: bool = True) -> None:
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if hidden_dim < 0:
            raise ValueError(f"hidden_dim must be >= 0 (0 = single linear layer), got {hidden_dim}")
        if hidden_dim == 0:
            layers = [nn.Linear(in_dim, out_dim)]
        else:
            norm = nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity()
            layers = [nn.Linear(in_dim, hidden_dim), norm, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        super().__init__(*layers)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim

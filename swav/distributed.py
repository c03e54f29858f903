"""Tiny collective helpers that are no-ops when no process group exists.

The core math (Sinkhorn, loss) calls these so that the same function runs on one process or
under ``torchrun``; it never has to know which (DESIGN.md, layer 1).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "get_world_size",
    "get_rank",
    "all_reduce_sum_",
    "all_reduce_max_",
    "all_gather_cat",
]


def is_distributed() -> bool:
    """True when a default process group is initialised (and has more than one rank)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place; returns it for chaining."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over all ranks in place; returns it for chaining."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every rank along ``dim`` (no gradient)."""
    if not (is_distributed() and get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)

"""Synchronised BatchNorm that also runs on CPU/gloo (SPEC §9: statistics over the global batch).

PyTorch's ``nn.SyncBatchNorm`` accepts only GPU tensors; the engine uses it on CUDA and this module's
:class:`CrossRankBatchNorm` elsewhere (CPU training under ``torchrun`` with gloo), so that the same
command gives the same numbers as one process with the whole batch. In training mode the mean and
the (biased) variance come from all ranks of ``process_group`` with two differentiable all-reduces
(sum and count first, then the centred sum of squares, which is more accurate than E[x^2] - E[x]^2);
the running statistics use the unbiased variance of the global batch, as ``nn.BatchNorm`` does.
Without a process group (or in eval mode) it is exactly ``nn.BatchNorm``. State-dict keys are those of
``nn.BatchNorm``.

Legend: N global elements per channel, C channels.

Example:
    >>> import torch
    >>> bn = CrossRankBatchNorm(4)
    >>> x = torch.randn(8, 4, 3, 3)
    >>> torch.allclose(bn(x), torch.nn.BatchNorm2d(4)(x), atol=1e-6)
    True
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CrossRankBatchNorm", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``; the gradient of the sum is the sum of every rank's gradient.

    (``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated and warns.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def differentiable_all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any input rank >= 2) whose training statistics cover every rank of ``process_group``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def _synchronised(self) -> bool:
        return self.training and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size(self.process_group) > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._synchronised():
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=x.dtype)
        totals = differentiable_all_reduce(torch.cat([x.sum(dims), count]), group=self.process_group)
        n = totals[-1]
        mean_C = totals[:-1] / n
        centred = x - mean_C.view(shape)
        var_C = differentiable_all_reduce((centred * centred).sum(dims), group=self.process_group) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var_C.detach() * n.detach() / (n.detach() - 1).clamp(min=1)
                self.running_mean.lerp_(mean_C.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var_C + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm*`` by :class:`CrossRankBatchNorm` sharing its parameters and buffers."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        out = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out

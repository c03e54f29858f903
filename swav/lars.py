"""LARS as used by SwAV (SPEC §9): the original LARC wrapper's semantics around SGD + momentum.

For every parameter p with gradient g (both norms non-zero), with weight decay wd:
    rate = trust * ||p|| / (||g|| + wd * ||p|| + eps)
    g    = (g + wd * p) * rate
then plain SGD with momentum runs with weight decay switched off. No clipping: the rate is not
capped at 1 and it applies to all parameters (biases and BatchNorm included), as the original.

The momentum update itself is PyTorch's fused SGD kernel where the parameters' device has one (CPU and
CUDA): one pass over parameters, gradients and momentum buffers instead of three. On CPUs the trust ratio
goes into that kernel too (as the gradient's unscale factor and the weight decay, one call per parameter,
on 1-d views of channels-last memory), so the gradients are not rewritten first: the step over ResNet-50's
parameters takes about 30 ms instead of 47 (``benchmarks/train_step.py``, "opt ms").
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["LARS"]


class LARS(torch.optim.SGD):
    """SGD with momentum whose gradients are rescaled layer-wise by the trust ratio.

    ``weight_decay`` applies to every parameter group that does not set its own (``{"params": ...,
    "weight_decay": 0.0}`` excludes a group from decay, as with LARC around SGD).

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
        fused: bool | None = None,
    ) -> None:
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        params = list(params)
        if params and all(isinstance(g, dict) for g in params):  # parameter groups: a group's weight_decay is
            params = [_lars_group(group) for group in params]     # its LARS weight decay (as in LARC)
        if fused is None:
            fused = _fused_supported(params)
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0, fused=fused,
                         foreach=False if fused else None)
        # gradients are rescaled here before the SGD step, so they must already be unscaled: a GradScaler
        # must skip or run the whole step, not hand a scale to the fused kernel
        self._step_supports_amp_scaling = False
        for group in self.param_groups:
            group.setdefault("lars_weight_decay", weight_decay)
        self.defaults["lars_weight_decay"] = weight_decay
        self.trust_coefficient = trust_coefficient
        self.eps = eps
        self._grad_norms: list[tuple[list[torch.Tensor], torch.Tensor | None]] | None = None

    def add_param_group(self, param_group: dict) -> None:
        """As SGD's; the group's own ``weight_decay``, if any, is its LARS weight decay."""
        group = _lars_group(param_group)
        if "lars_weight_decay" in self.defaults:  # after __init__ (which sets the default of its own groups)
            group.setdefault("lars_weight_decay", self.defaults["lars_weight_decay"])
        super().add_param_group(group)

    @torch.no_grad()
    def gradient_norms(self) -> list[tuple[list[torch.Tensor], torch.Tensor | None]]:
        """Per parameter group: (parameters with a gradient, their gradient norms stacked), on the device,
        no host sync. The norms are kept for the next :meth:`step`, which needs them anyway (one pass over
        the gradients, not two)."""
        self._grad_norms, found = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            norms = _norms(grads) if grads else None
            self._grad_norms.append((grads, norms))
            found.append((params, norms))
        return found

    @torch.no_grad()
    def gradients_finite(self, norms: list[tuple[list[torch.Tensor], torch.Tensor | None]] | None = None
                         ) -> torch.Tensor:
        """A 0-d bool tensor (no host sync): every gradient is finite. ``norms``: what :meth:`gradient_norms`
        returned for these gradients (computed, and kept for :meth:`step`, if not given)."""
        finite = torch.ones((), dtype=torch.bool, device=self._first_device())
        for _, norms in self.gradient_norms() if norms is None else norms:
            if norms is not None:
                finite = finite & torch.isfinite(norms.float()).all()
        return finite

    def _first_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    @torch.no_grad()
    def _trust_rates(self) -> list[tuple[dict, list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """Per parameter group with gradients: (group, parameters, gradients, rates, decays), where the LARS
        gradient is ``rate * g + decay * p`` (decay = rate * wd)."""
        cached, self._grad_norms = self._grad_norms, None
        found = []
        for index, group in enumerate(self.param_groups):
            wd = group["lars_weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            # all norms and rates as single stacked tensors: a handful of kernels per group instead
            # of several per parameter (this matters on GPUs, where launches dominate small tensors)
            p_norms = _norms(params)
            if cached is not None and len(cached[index][0]) == len(grads) and all(
                    a is b for a, b in zip(cached[index][0], grads)):
                g_norms = cached[index][1]  # from gradients_finite(), on these very gradient tensors
            else:
                g_norms = _norms(grads)
            ok = (p_norms > 0) & (g_norms > 0)  # else the gradient passes through untouched
            rate = torch.where(ok, self.trust_coefficient * p_norms / (g_norms + wd * p_norms + self.eps), 1.0)
            found.append((group, params, grads, rate, torch.where(ok, rate * wd, 0.0)))
        return found

    @torch.no_grad()
    def _rescale_gradients(self) -> None:
        for _, params, grads, rate, decay in self._trust_rates():
            torch._foreach_mul_(grads, list(rate.unbind()))
            torch._foreach_addcmul_(grads, params, list(decay.unbind()))  # g += decay * p, no temporaries

    @torch.no_grad()
    def _complete_momentum_buffers(self) -> None:
        """The fused kernel wants every momentum buffer or none: a parameter that gets its first gradient
        later than the others (prototypes after freezing) starts from a zero buffer, which gives the same
        update as SGD's first step (buffer = gradient, as dampening is 0)."""
        for group in self.param_groups:
            if not group.get("fused") or group["momentum"] == 0:
                continue
            for p in group["params"]:
                if p.grad is not None and self.state[p].get("momentum_buffer") is None:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    def _cpu_fused(self) -> bool:
        return all(g.get("fused") and g["momentum"] > 0 and g["dampening"] == 0
                   for g in self.param_groups) and self._first_device().type == "cpu"

    @torch.no_grad()
    def _cpu_fused_step(self) -> None:
        """On CPUs: the trust ratio goes into the fused SGD kernel itself, one call per parameter, as the
        gradient's "unscale" factor (1 / rate) and the weight decay (rate * wd). This saves the two passes
        over the gradients that rescaling them first takes (the rates are read on the host, which costs
        nothing on a CPU). A non-finite step is skipped the same way (``found_inf``)."""
        found_inf = getattr(self, "found_inf", None)
        self._complete_momentum_buffers()
        for group, params, grads, rate, decay in self._trust_rates():
            inverse = rate.reciprocal().float()  # the kernel's scale is float32 whatever the parameters' dtype
            for k, (p, g, wd) in enumerate(zip(params, grads, decay.tolist())):
                p, g, buf = _same_layout_flat(p, g, self.state[p]["momentum_buffer"])
                torch._fused_sgd_([p], [g], [buf], weight_decay=wd,
                                  momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                                  nesterov=group["nesterov"], maximize=group["maximize"], is_first_step=False,
                                  grad_scale=inverse[k], found_inf=found_inf)

    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._cpu_fused():
            self._cpu_fused_step()
            return loss
        self._rescale_gradients()
        self._complete_momentum_buffers()
        super().step()
        return loss


def _lars_group(group: dict) -> dict:
    """A parameter group with its ``weight_decay`` moved to ``lars_weight_decay`` (SGD's own decay stays 0)."""
    group = dict(group)
    if "weight_decay" in group:
        if group["weight_decay"] < 0:
            raise ValueError(f"weight_decay of a parameter group must be >= 0, got {group['weight_decay']}")
        group.setdefault("lars_weight_decay", group.pop("weight_decay"))
    return group


def _fused_supported(params: list) -> bool:
    """Whether PyTorch's fused SGD kernel takes every parameter (floating point, on CPU or CUDA)."""
    if params and all(isinstance(g, dict) for g in params):  # parameter groups: look inside
        params = [p for g in params for p in (g["params"] if isinstance(g["params"], (list, tuple))
                                               else [g["params"]])]
    tensors = [p for p in params if isinstance(p, torch.Tensor)]
    if len(tensors) != len(params) or not tensors:
        return False
    return all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)


def _flat_view(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor's elements as a 1-d view in memory order (contiguous or channels-last), or None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # a view: channels-last memory is contiguous NHWC
    return None


def _same_layout_flat(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """1-d views of tensors laid out alike in memory (the CPU's fused kernel is about a third slower on
    channels-last 4-d tensors than on the same memory seen as 1-d), else the tensors themselves."""
    if any(t.stride() != tensors[0].stride() for t in tensors):
        return tensors
    flats = tuple(_flat_view(t) for t in tensors)
    return tensors if any(f is None for f in flats) else flats


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of every tensor, stacked. On the CPU the BLAS dot product is 2-3x faster than
    ``torch._foreach_norm`` (``benchmarks/train_step.py``, "opt ms"); elsewhere one foreach kernel."""
    if tensors[0].device.type == "cpu":
        flats = [_flat_view(t) if t.dtype in (torch.float32, torch.float64) else None for t in tensors]
        if all(f is not None for f in flats):
            return torch.stack([torch.dot(f, f) for f in flats]).sqrt()
    return torch.stack(torch._foreach_norm(tensors))

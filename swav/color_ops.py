"""Colour operations on whole batches with one parameter per sample (SPEC §7's colour augmentations).

Pure tensor functions, device-agnostic: torchvision's brightness, contrast, saturation, hue, grayscale and
Gaussian blur, each on a float ``(B, C, H, W)`` batch in [0, 1] with a per-sample factor (values equal to
torchvision's per-image ops up to float rounding; ``tests/test_color_ops.py``), and
:func:`dense_color_stage`, the whole colour stage with no draw-dependent shapes (for ``torch.compile``).
:class:`~swav.batch_augment.BatchColorAugment` draws the parameters and applies these.
Legend: B batch, C channels, H/W height/width.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["adjust_brightness_batch", "adjust_contrast_batch", "adjust_saturation_batch", "adjust_hue_batch",
           "grayscale_batch", "gaussian_blur_batch", "blur_kernels", "flip_batch", "dense_color_stage",
           "device_constant", "JITTER_FNS"]

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def device_constant(values: Sequence[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor on ``device``, made once: ``torch.tensor(..., device=cuda)`` would copy
    from the host and synchronise with the GPU on every call."""
    key = (tuple(values), str(device), dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(list(values), dtype=dtype).to(device)
    return _CONSTANTS[key]


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)`` without a host-device synchronisation: a host tensor bound for a GPU goes through
    pinned memory with a non-blocking copy (a copy from pageable memory waits until the GPU has finished all the
    work queued before it, e.g. the previous training step)."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2])\
        .unsqueeze(1)


def _per_sample(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return factor.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def adjust_brightness_batch(x: torch.Tensor, factor: torch.Tensor, *,
                            inplace: bool = False) -> torch.Tensor:
    """Per-sample ``clamp(f * x, 0, 1)`` on float ``(B, C, H, W)`` in [0, 1] (torchvision's op).

    Like every op here: ``factor`` has one value per sample; ``inplace=True`` reuses ``x``.

    >>> adjust_brightness_batch(torch.full((2, 3, 1, 1), 0.6), torch.tensor([0.5, 2.0]))[:, 0, 0, 0]
    tensor([0.3000, 1.0000])
    """
    x = x if inplace else x.clone()
    return x.mul_(_per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast_batch(x: torch.Tensor, factor: torch.Tensor, *,
                          inplace: bool = False) -> torch.Tensor:
    """Per-sample blend with the sample's mean gray level (torchvision's adjust_contrast).

    >>> adjust_contrast_batch(torch.tensor([0.0, 1.0]).view(1, 1, 1, 2), torch.tensor([0.0]))
    tensor([[[[0.5000, 0.5000]]]])
    """
    mean = (_gray(x) if x.shape[1] == 3 else x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor, x)
    x = x if inplace else x.clone()
    return x.mul_(f).add_(mean.mul_(1.0 - f)).clamp_(0.0, 1.0)


def adjust_saturation_batch(x: torch.Tensor, factor: torch.Tensor, *,
                            inplace: bool = False) -> torch.Tensor:
    """Per-sample blend with the sample's grayscale image (identity for one channel).

    >>> adjust_saturation_batch(torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1), torch.zeros(1)).flatten()
    tensor([0.2989, 0.2989, 0.2989])
    """
    x = x if inplace else x.clone()
    if x.shape[1] == 1:
        return x
    f = _per_sample(factor, x)
    gray = _gray(x).mul_(1.0 - f)
    return x.mul_(f).add_(gray).clamp_(0.0, 1.0)


def adjust_hue_batch(x: torch.Tensor, factor: torch.Tensor, *,
                     inplace: bool = False) -> torch.Tensor:
    """Per-sample hue rotation by ``factor`` turns in HSV space (torchvision's adjust_hue).

    Closed form of HSV -> RGB: channel = min + chroma * clamp(e - 1, 0, 1), where e = |d - 3|
    and d is the distance (in sixths of a turn) from the pixel's hue to the channel's hue (R 0,
    G 2, B 4). Ties pick red, then green, as torchvision does. Only cheap element-wise ops (no
    selects, no argmax): same values up to float rounding, about 3x faster on CPU.

    >>> adjust_hue_batch(torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1), torch.tensor([1 / 3])).flatten()
    tensor([0., 1., 0.])
    """
    if x.shape[1] == 1:
        return x if inplace else x.clone()
    maxc = x.amax(dim=1, keepdim=True)
    minc = x.amin(dim=1, keepdim=True)
    chroma = maxc - minc
    r, g, b = x.unbind(1)
    m, c = maxc[:, 0], chroma[:, 0]
    r_max = (r - m).sign_().add_(1.0)  # 1.0 where red is maximal, else 0.0
    g_max = (g - m).sign_().add_(1.0).mul_(1.0 - r_max)  # red wins ties, then green
    hue6 = (r - g).add_(c, alpha=4.0)  # blue is maximal: (r - g) / C + 4
    hue6.add_(((g - b) - hue6).mul_(r_max))  # red: (g - b) / C
    hue6.add_(((b - r).add_(c, alpha=2.0) - hue6).mul_(g_max))  # green: (b - r) / C + 2
    hue6.div_(c.clamp_min(1e-30)).add_(_per_sample(factor, hue6) * 6.0)
    hue6.sub_(torch.floor(hue6 * (1.0 / 6.0)).mul_(6.0))  # now in [0, 6)
    centres = device_constant((0.0, 2.0, 4.0), x.device, x.dtype).view(1, 3, 1, 1)
    # x is no longer read: in place, the three ramps are written straight into it
    ramp = torch.sub(hue6.unsqueeze(1), centres, out=x) if inplace else hue6.unsqueeze(1) - centres
    return ramp.abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0).mul_(chroma).add_(minc)


def grayscale_batch(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Grayscale replicated over the three channels (torchvision's RandomGrayscale output).

    >>> grayscale_batch(torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)).flatten()
    tensor([0.5870, 0.5870, 0.5870])
    """
    if x.shape[1] == 1:
        return x if inplace else x.clone()
    gray = _gray(x).expand_as(x)
    return x.copy_(gray) if inplace else gray.contiguous()


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int, *,
                        inplace: bool = False) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, reflect padding (torchvision's blur).

    Each 1-D pass is a matrix product with a per-sample banded matrix that holds the kernel and
    the reflect padding: dense BLAS beats depthwise convolution on CPU by far. The whole batch
    takes two batched calls (on a CPU, one per block of 48 outputs above 96 pixels).

    >>> gaussian_blur_batch(torch.ones(2, 3, 8, 8), torch.tensor([0.5, 2.0]), 5).allclose(
    ...     torch.ones(2, 3, 8, 8))
    True
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size={kernel_size!r} is invalid: expected an odd integer >= 1")
    n, c, h, w = x.shape
    half = kernel_size // 2
    if half >= min(h, w):
        raise ValueError(f"kernel_size={kernel_size} is too large for {h}x{w} images: reflect "
                         f"padding needs kernel_size <= {2 * min(h, w) - 1}")
    offsets = torch.arange(-half, half + 1, device=x.device)
    return _separable_blur(x, blur_kernels(sigma, kernel_size, x.dtype, x.device), offsets,
                           out=x if inplace else None)


def blur_kernels(sigma: torch.Tensor, kernel_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``(n, kernel_size)`` normalised 1-D Gaussian kernels, one per ``sigma``, taps at ``-k//2 .. k//2``.

    >>> blur_kernels(torch.tensor([1.0]), 3).sum().item()
    1.0
    """
    half = kernel_size // 2
    distance = torch.arange(-half, half + 1, device=device).to(dtype)
    kernel = torch.exp(-0.5 * (distance / sigma.to(device=distance.device, dtype=dtype).view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    return kernel.masked_fill_(kernel < 1e-12, 0.0)  # denormal weights would slow BLAS 20x


# Output columns (then rows) per matrix product of the CPU blur. A band of 13 taps in a 224-wide matrix is 94%
# zeros; products of 48 outputs from their 60 inputs skip most of them (1.3-1.6x faster at 224 on the
# development CPU, benchmarks/blur_blocks.py; the same values up to float rounding, within 1 ulp, as fewer zero
# terms enter the sums). Smaller images, and GPUs, where launches cost more than arithmetic, take one product
# per pass.
_BLUR_BLOCK = 48


def _separable_blur(x: torch.Tensor, kernel: torch.Tensor, offsets: torch.Tensor, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``(n, c, h, w)`` convolved with the per-sample 1-D ``kernel`` ``(n, k)`` (taps at ``offsets``) along
    the width, then the height, with reflect padding; written to ``out`` (may be ``x``) or a new tensor."""
    n, c, h, w = x.shape
    half = offsets.numel() // 2
    cpu = x.device.type == "cpu"
    along_w = _blur_matrix(kernel, offsets, w)  # (n, w, w): row @ matrix
    source = x.reshape(n, c * h, w)
    if cpu and w > 2 * _BLUR_BLOCK:
        rows = torch.empty(source.shape, dtype=x.dtype, device=x.device)
        for start in range(0, w, _BLUR_BLOCK):
            stop = min(w, start + _BLUR_BLOCK)
            lo, hi = max(0, start - half), min(w, stop + half)
            rows[:, :, start:stop] = torch.bmm(source[:, :, lo:hi], along_w[:, lo:hi, start:stop])
    else:
        rows = torch.bmm(source, along_w)
    along_h = _blur_matrix(kernel, offsets, h).transpose(1, 2)  # (n, h, h): matrix @ column
    if c > 1:
        along_h = along_h.unsqueeze(1).expand(n, c, h, h).reshape(n * c, h, h)
    rows = rows.view(n * c, h, w)
    result = out if out is not None and out.is_contiguous() else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    target = result.view(n * c, h, w)
    if cpu and h > 2 * _BLUR_BLOCK:
        for start in range(0, h, _BLUR_BLOCK):
            stop = min(h, start + _BLUR_BLOCK)
            lo, hi = max(0, start - half), min(h, stop + half)
            target[:, start:stop] = torch.bmm(along_h[:, start:stop, lo:hi], rows[:, lo:hi])
    else:
        torch.bmm(along_h, rows, out=target)
    return result if out is None or out is result else out.copy_(result)


def _blur_matrix(kernel: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size, size) matrices M with (row @ M)[j] = sum_t kernel[t] row[reflect(j + offset_t)]."""
    n = kernel.shape[0]
    source = torch.arange(size, device=kernel.device).view(-1, 1) + offsets.view(1, -1)
    source = source.abs()
    source = torch.where(source >= size, 2 * (size - 1) - source, source)  # (size, k) reflected
    flat = source * size + torch.arange(size, device=kernel.device).view(-1, 1)
    matrix = torch.zeros(n, size * size, dtype=kernel.dtype, device=kernel.device)
    matrix.scatter_add_(1, flat.view(1, -1).expand(n, -1), kernel.repeat(1, size))
    return matrix.view(n, size, size)


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """:func:`adjust_hue_batch` as a pure function of ``x`` ``(B, 3, ...)`` and ``shift`` ``(B, 1, ...)`` turns
    (one value per sample, broadcast over the pixels), made of element-wise ops only: no reductions and no
    in-place updates, so that ``torch.compile`` turns it into one loop over the pixels. Eagerly on a CPU the
    in-place version is faster (fewer temporaries); the values are equal bit for bit (the same arithmetic on
    every element: the dense stage equals the masked one exactly, ``tests/test_batch_augment.py``)."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    c = maxc - minc
    r_max = (r - maxc).sign() + 1.0
    g_max = ((g - maxc).sign() + 1.0) * (1.0 - r_max)
    hue6 = r - g + 4.0 * c
    hue6 = hue6 + (g - b - hue6) * r_max
    hue6 = hue6 + (b - r + 2.0 * c - hue6) * g_max
    hue6 = hue6 / c.clamp_min(1e-30) + 6.0 * shift
    hue6 = hue6 - torch.floor(hue6 * (1.0 / 6.0)) * 6.0
    return torch.stack([((hue6 - centre).abs() - 3.0).abs().sub(1.0).clamp(0.0, 1.0) * c + minc
                        for centre in (0.0, 2.0, 4.0)], dim=1)


def _hue_shift_into(x: torch.Tensor, shift: torch.Tensor) -> None:
    """``x[:] = _hue_shift(x, shift)``: compiled, the result is written straight into ``x`` (no extra pass)."""
    x.copy_(_hue_shift(x, shift))


def dense_color_stage(crops: torch.Tensor, plan: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      jitter_ops: tuple[str, ...], kernel_size: int) -> torch.Tensor:
    """Every colour op on every sample, made the identity by its per-sample parameters where the sample
    does not draw it: no indexing and no shape that depends on the draws, so ``torch.compile`` turns
    the stage into a handful of fused kernels (the "dense" strategy of :class:`BatchColorAugment`).

    ``plan`` ``(B, 1 + J (J + 1) + 3)`` float, made by :meth:`BatchColorAugment.dense_plan`: flip; per
    jitter position the op's one-hot over ``jitter_ops`` (zeros without jitter) and its factor;
    grayscale, blur, sigma. ``mean``/``std`` ``(C,)``. Brightness, contrast and saturation are one
    blend ``f x + (1 - f) target`` (target 0, the mean gray level or the gray image; ``f = 1`` leaves
    the sample exactly as it is); hue and grayscale are selected with ``where``; the blur multiplies by
    identity matrices where it is not drawn, and ``where`` keeps those samples exact.
    """
    n, channels = crops.shape[:2]
    column = plan.view(n, -1, 1, 1).unbind(1)
    x = crops.float() / 255.0
    x = torch.where(column[0].unsqueeze(1) > 0.5, x.flip(-1), x)
    jitters = len(jitter_ops)
    for position in range(jitters):
        start = 1 + position * (jitters + 1)
        selected = {name: column[start + j].unsqueeze(1) for j, name in enumerate(jitter_ops)}
        factor = column[start + jitters].unsqueeze(1)  # (B, 1, 1, 1)
        linear = [selected[name] for name in ("brightness", "contrast", "saturation") if name in selected]
        if linear:
            gray = _gray(x) if channels == 3 else x
            target = torch.zeros_like(factor)
            if "contrast" in selected:
                target = target + selected["contrast"] * gray.mean(dim=(1, 2, 3), keepdim=True)
            if "saturation" in selected:
                target = target + selected["saturation"] * gray
            blend = torch.where(sum(linear) > 0.5, factor, torch.ones_like(factor))
            x = (blend * x + (1.0 - blend) * target).clamp(0.0, 1.0)
        if "hue" in selected:
            x = torch.where(selected["hue"] > 0.5, _hue_shift(x, factor[:, 0]), x)
    tail = 1 + jitters * (jitters + 1)
    grayscale, blur, sigma = column[tail:tail + 3]
    if channels == 3:
        x = torch.where(grayscale.unsqueeze(1) > 0.5, _gray(x).expand_as(x), x)
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=x.device)
    distance = offsets.to(x.dtype).view(1, -1)
    gauss = torch.exp(-0.5 * (distance / sigma.view(-1, 1)) ** 2)
    gauss = gauss / gauss.sum(dim=1, keepdim=True)
    gauss = gauss.masked_fill(gauss < 1e-12, 0.0)
    blurred = blur.view(-1, 1) > 0.5
    kernel = torch.where(blurred, gauss, (offsets == 0).to(x.dtype).view(1, -1))
    x = torch.where(blurred.view(-1, 1, 1, 1), _separable_blur(x, kernel, offsets), x)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


JITTER_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "brightness": adjust_brightness_batch, "contrast": adjust_contrast_batch,
    "saturation": adjust_saturation_batch, "hue": adjust_hue_batch}


def flip_batch(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Horizontal flip of every sample (select the samples before calling)."""
    return x.copy_(x.flip(-1)) if inplace else x.flip(-1)

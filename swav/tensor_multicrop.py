"""Batched multi-crop (SPEC §7) for a data set held in memory as one uint8 tensor.

Small data sets (Fashion-MNIST: 60,000 x 1 x 28 x 28 = 47 MB) fit in memory, so the per-image
PIL pipeline of :mod:`swav.multicrop` is pure overhead: here a whole batch is augmented with a
handful of tensor operations, on the CPU or on the GPU where the images live.

Per resolution group (size, count, min_scale, max_scale), every image gets ``count`` crops:
1. RandomResizedCrop parameters drawn as torchvision draws them (area ~ U(scale) * H * W,
   log-aspect ~ U(log 3/4, log 4/3), w/h rounded to integers, 10 attempts, then the central-crop
   fallback), plus a horizontal flip with p = 0.5;
2. crop + resize + flip as ONE affine ``grid_sample`` call for the whole group (bilinear,
   ``align_corners=False``, border padding; no antialiasing when shrinking, unlike torchvision's
   tensor resize, a negligible difference at these sizes);
3. colour jitter with probability ``jitter_prob``: brightness and contrast (factors in
   ``[1 - s, 1 + s]``) and, for 3 channels, saturation and hue, in a random order per sample.
   Hue is torchvision's HSV hue shift (:func:`~swav.color_ops.adjust_hue_batch`); random grayscale
   applies to 3 channels only;
4. Gaussian blur with probability ``blur_prob``, sigma ~ U(0.1, 2.0) per sample (separable, reflect
   padding, the kernel of :func:`~swav.multicrop.blur_kernel_size`);
5. normalisation ``(x - mean) / std``.

Randomness (SPEC §7: every crop draws its own parameters): all parameters are drawn from the
caller's CPU ``torch.Generator`` (for instance :func:`step_generator` of ``(seed, epoch, step)``)
and only then moved to the images' device, so a batch is reproducible, resumable, and the same on
any device (up to floating-point rounding of the resampling).

Legend: N images in the batch, V crops per image, C channels, S crop size, H x W image size.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from swav.color_ops import adjust_hue_batch, device_constant, to_device_async
from swav.multicrop import CropGroup, blur_kernel_size

__all__ = ["TensorMultiCrop", "step_generator", "sample_crop_boxes"]

_LOG_RATIO = (math.log(3.0 / 4.0), math.log(4.0 / 3.0))
_ATTEMPTS = 10
_MASK64 = (1 << 64) - 1
# ITU-R 601 luma (torchvision's rgb_to_grayscale)
_LUMA = (0.2989, 0.587, 0.114)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, step)`` by a SplitMix64 mix of the three.

    Resuming at (epoch, step) re-creates the exact generator, so no RNG state needs saving.

    Example:
        >>> a = torch.rand(2, generator=step_generator(31, 0, 5))
        >>> torch.equal(a, torch.rand(2, generator=step_generator(31, 0, 5)))
        True
    """
    state = 0
    for value in (seed, epoch, step):
        state = (state ^ (int(value) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        z = state
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        state = z ^ (z >> 31)
    return torch.Generator(device="cpu").manual_seed(state >> 1)  # manual_seed wants < 2**63


def sample_crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """``n`` RandomResizedCrop boxes ``(top, left, h, w)`` (int64, ``n x 4``), torchvision's rule.

    Each box takes the first of 10 candidate (area, aspect) draws that fits inside the image,
    with a uniform integer position; if none fits, the central crop with the aspect clamped to
    [3/4, 4/3]. All candidates are drawn at once, so the random stream differs from
    torchvision's, but the distribution is the same.

    Example:
        >>> boxes = sample_crop_boxes(5, 28, 28, (0.5, 1.0), torch.Generator().manual_seed(0))
        >>> boxes.shape, bool((boxes[:, 0] + boxes[:, 2] <= 28).all())
        (torch.Size([5, 4]), True)
    """
    area = height * width
    target_nt = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, _ATTEMPTS, generator=generator, dtype=torch.float64))
    log_r = _LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * torch.rand(n, _ATTEMPTS, generator=generator, dtype=torch.float64)
    aspect_nt = torch.exp(log_r)
    w_nt = torch.round(torch.sqrt(target_nt * aspect_nt)).long()
    h_nt = torch.round(torch.sqrt(target_nt / aspect_nt)).long()
    ok_nt = (w_nt > 0) & (w_nt <= width) & (h_nt > 0) & (h_nt <= height)
    first = torch.argmax(ok_nt.to(torch.uint8), dim=1)  # first fitting attempt (0 if none)
    found = ok_nt.any(dim=1)
    h = h_nt.gather(1, first[:, None])[:, 0]
    w = w_nt.gather(1, first[:, None])[:, 0]
    # central-crop fallback (torchvision): whole image, aspect clamped to [3/4, 4/3]
    in_ratio = width / height
    if in_ratio < 3.0 / 4.0:
        fb_w, fb_h = width, int(round(width / (3.0 / 4.0)))
    elif in_ratio > 4.0 / 3.0:
        fb_h, fb_w = height, int(round(height * (4.0 / 3.0)))
    else:
        fb_w, fb_h = width, height
    h = torch.where(found, h, torch.full_like(h, fb_h))
    w = torch.where(found, w, torch.full_like(w, fb_w))
    u_pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(u_pos[:, 0] * (height - h + 1)).long().clamp_max(height - h)
    left = torch.floor(u_pos[:, 1] * (width - w + 1)).long().clamp_max(width - w)
    top = torch.where(found, top, torch.full_like(top, 0) + (height - fb_h) // 2)
    left = torch.where(found, left, torch.full_like(left, 0) + (width - fb_w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _crop_thetas(boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Affine matrices (``n x 2 x 3``) mapping output coordinates in [-1, 1] onto each box.

    With ``align_corners=False``, normalised x = -1/+1 are the outer pixel edges, so the box's
    edges [left, left + w] are ``2 * left / W - 1`` and ``2 * (left + w) / W - 1``.
    """
    top, left, h, w = (boxes[:, i].double() for i in range(4))
    sign = 1.0 - 2.0 * flips.double()
    theta = torch.zeros(boxes.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2.0 * left + w) / width - 1.0
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2.0 * top + h) / height - 1.0
    return theta


def _gaussian_kernels(sigma_n: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, one row per sample (``n x size``)."""
    x = torch.arange(size, dtype=sigma_n.dtype, device=sigma_n.device) - (size - 1) / 2
    k = torch.exp(-0.5 * (x[None, :] / sigma_n[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur(x_NCSS: torch.Tensor, kernels_nk: torch.Tensor) -> torch.Tensor:
    """Separable per-sample blur with reflect padding, as a sum of shifted, weighted copies.

    Kernels are tiny (at most 13 taps), so k multiply-adds beat a grouped convolution with one
    group per image plane by a wide margin on the CPU.
    """
    n, _, s, _ = x_NCSS.shape
    size = kernels_nk.shape[1]
    pad = size // 2
    w_nk11 = kernels_nk.to(x_NCSS.dtype).view(n, size, 1, 1)
    padded = F.pad(x_NCSS, (pad, pad, 0, 0), mode="reflect")
    rows = sum(padded[..., i : i + s] * w_nk11[:, i : i + 1] for i in range(size))
    padded = F.pad(rows, (0, 0, pad, pad), mode="reflect")
    return sum(padded[..., i : i + s, :] * w_nk11[:, i : i + 1] for i in range(size))


class TensorMultiCrop:
    """Multi-crop of a uint8 ``N x C x H x W`` batch into V float crops, all in tensor operations.

    Args:
        groups: crop groups, as :class:`swav.multicrop.CropGroup` or ``(size, count, min_scale,
            max_scale)`` tuples; output crops come group by group, ``count`` crops each.
        channels: 1 (grayscale data: brightness/contrast only) or 3.
        mean, std: per-channel normalisation constants (one value per channel).
        jitter_strength: the paper's 0.8: brightness/contrast/saturation factors in
            [max(0, 1 - j), 1 + j], hue shift in [-j/4, j/4] turns (0.8 -> 0.2 as in the paper);
            0 disables jitter; at most 2.
        jitter_prob: probability that a crop is colour-jittered (0.8 in the paper).
        grayscale_prob: probability of random grayscale (3 channels only; 0.2 in the paper).
        blur_prob: probability of Gaussian blur (0.5 in the paper).
        blur_sigma: range of the blur's sigma in pixels of the crop.

    Example:
        >>> images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
        >>> mc = TensorMultiCrop([(28, 2, 0.3, 1.0), (14, 4, 0.1, 0.3)], channels=1, mean=(0.286,), std=(0.353,))
        >>> crops = mc(images, step_generator(31, epoch=0, step=0))
        >>> [tuple(c.shape) for c in crops][:3], len(crops)
        ([(4, 1, 28, 28), (4, 1, 28, 28), (4, 1, 14, 14)], 6)
    """

    def __init__(
        self,
        groups: Sequence[CropGroup | tuple[int, int, float, float]],
        channels: int = 3,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.228, 0.224, 0.225),
        jitter_strength: float = 0.8,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        if not groups:
            raise ValueError("groups=[] is invalid: give at least one (size, count, min_scale, max_scale)")
        self.groups = [g if isinstance(g, CropGroup) else CropGroup(*g) for g in groups]
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is invalid: expected 1 or 3")
        if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
            raise ValueError(f"mean={tuple(mean)} / std={tuple(std)} need {channels} value(s) each, std > 0")
        for name, p in (("jitter_prob", jitter_prob), ("grayscale_prob", grayscale_prob), ("blur_prob", blur_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p!r} is invalid: expected a probability in [0, 1]")
        if not 0.0 <= jitter_strength <= 2.0:
            raise ValueError(f"jitter_strength={jitter_strength!r} is invalid: expected a value in [0, 2]")
        if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma={tuple(blur_sigma)} is invalid: expected 0 < low <= high")
        self.channels = channels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.jitter_strength = float(jitter_strength)
        self.jitter_prob = float(jitter_prob)
        self.grayscale_prob = float(grayscale_prob) if channels == 3 else 0.0
        self.blur_prob = float(blur_prob)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))

    @property
    def num_crops(self) -> int:
        return sum(g.count for g in self.groups)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """V float32 crops, each ``N x C x S x S``, on the images' device, group by group."""
        if images.dim() != 4 or images.shape[1] != self.channels or images.dtype != torch.uint8:
            raise ValueError(
                f"images must be a uint8 N x {self.channels} x H x W tensor, got {images.dtype} {tuple(images.shape)}"
            )
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (parameters are drawn on the CPU), got {generator.device}")
        source = images.float().div_(255.0)
        crops: list[torch.Tensor] = []
        for group in self.groups:
            x_nCSS = self._resized_crops(source, group, generator)
            x_nCSS = self._color(x_nCSS, generator)
            x_nCSS = self._maybe_blur(x_nCSS, generator)
            crops.extend(self._normalize(x_nCSS).chunk(group.count))
        return crops

    def _resized_crops(self, source: torch.Tensor, group: CropGroup, generator: torch.Generator) -> torch.Tensor:
        """All ``count x N`` crops of a group (crop-major) with one affine grid_sample."""
        n, c, height, width = source.shape
        total = n * group.count
        boxes = sample_crop_boxes(total, height, width, (group.min_scale, group.max_scale), generator)
        flips = torch.rand(total, generator=generator) < 0.5
        theta = to_device_async(_crop_thetas(boxes, flips, height, width).to(source.dtype), source.device)
        grid = F.affine_grid(theta, [total, c, group.size, group.size], align_corners=False)
        repeated = source.repeat(group.count, 1, 1, 1) if group.count > 1 else source
        out = F.grid_sample(repeated, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.clamp_(0.0, 1.0)

    def _color(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Colour jitter (random op order per sample) with p = jitter_prob, then random grayscale.

        At each of the ``num_ops`` positions of the order every op runs on the whole batch, with the
        sample's factor where the op sits at that position and the neutral factor (1, or a zero hue
        shift: exactly the identity) elsewhere, so no per-sample branching is needed.
        """
        n = x.shape[0]
        s = self.jitter_strength
        num_ops = 2 if self.channels == 1 else 4
        apply = torch.rand(n, generator=generator) < self.jitter_prob
        u = torch.rand(n, 4, generator=generator)
        order = torch.argsort(torch.rand(n, num_ops, generator=generator), dim=1)
        gray = torch.rand(n, generator=generator) < self.grayscale_prob
        if s > 0 and bool(apply.any()):
            low = max(0.0, 1.0 - s)  # torchvision clamps the lower factor at 0
            factors = torch.stack([low + (1 + s - low) * u[:, i] for i in range(3)] + [(u[:, 3] - 0.5) * (s / 2.0)], dim=1)
            neutral = torch.tensor([1.0, 1.0, 1.0, 0.0])
            for position in range(num_ops):
                for op in range(num_ops):
                    chosen = apply & (order[:, position] == op)
                    if bool(chosen.any()):
                        f_n = torch.where(chosen, factors[:, op], neutral[op])
                        x = self._jitter_op(op, x, to_device_async(f_n.to(x.dtype), x.device))
        if self.channels == 3 and bool(gray.any()):
            x = torch.where(to_device_async(gray, x.device).view(n, 1, 1, 1), self._luma(x).expand_as(x), x)
        return x

    def _luma(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            return x
        weights = device_constant(_LUMA, x.device, x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)

    def _jitter_op(self, op: int, x: torch.Tensor, f_n: torch.Tensor) -> torch.Tensor:
        """One torchvision-style adjustment with per-sample factors ``f_n``."""
        f = f_n.view(-1, 1, 1, 1)
        if op == 0:  # brightness: blend with black
            return (x * f).clamp(0.0, 1.0)
        if op == 1:  # contrast: blend with the mean gray level of the image
            mean = self._luma(x).mean(dim=(1, 2, 3), keepdim=True)
            return ((x - mean) * f + mean).clamp(0.0, 1.0)
        if op == 2:  # saturation: blend with the grayscale image
            gray = self._luma(x)
            return ((x - gray) * f + gray).clamp(0.0, 1.0)
        # hue: torchvision's HSV hue shift by f turns (exact, per sample); a zero shift returns x itself
        shifted = adjust_hue_batch(x, f_n)
        return torch.where((f_n != 0).view(-1, 1, 1, 1), shifted, x)

    def _maybe_blur(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Gaussian blur of the selected samples only (sigma per sample)."""
        n, _, size, _ = x.shape
        apply = torch.rand(n, generator=generator) < self.blur_prob
        low, high = self.blur_sigma
        sigma = low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)
        if not bool(apply.any()) or size < 2:
            return x
        taps = blur_kernel_size(size, high)
        index = apply.nonzero()[:, 0]
        kernels = to_device_async(_gaussian_kernels(sigma[index], taps), x.device)
        index = to_device_async(index, x.device)
        x[index] = _blur(x[index], kernels)
        return x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = device_constant(self.mean, x.device, x.dtype).view(1, -1, 1, 1)
        std = device_constant(self.std, x.device, x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

"""Multi-crop augmentation of SwAV (SPEC §7), one image at a time.

Each image becomes V crops: for every :class:`CropGroup` (one resolution), ``count`` crops of
RandomResizedCrop(size, scale=(min_scale, max_scale), ratio 3/4..4/3) -> horizontal flip (p 0.5)
-> colour jitter (brightness/contrast/saturation 0.8 s, hue 0.2 s, ops in random order) with
p 0.8 -> random grayscale (p 0.2) -> Gaussian blur (p 0.5, sigma ~ U[0.1, 2.0], a 13-tap kernel at every crop
size: 3 sigma of the largest sigma) -> float in [0, 1] -> normalise.

Normalisation uses std (0.228, 0.224, 0.225) like the official SwAV code (torchvision's ImageNet
constant is 0.229; SPEC §7 asks to pick one: we keep the original's). One-channel data
(``channels=1``, e.g. Fashion-MNIST) gets brightness + contrast only and mean = std = 0.5 unless
given (Fashion-MNIST's own statistics are :data:`FASHION_MNIST_MEAN` / :data:`FASHION_MNIST_STD`).

Randomness (SPEC §7/§13: every crop draws its own parameters; workers must not share state):
with ``seed=None`` parameters come from torch's global RNG, which DataLoader seeds differently per
worker and per epoch. With an integer ``seed`` they come from a ``torch.Generator`` seeded from
``(seed, epoch, rank, index)`` when the caller passes the sample ``index``, else from
``(seed, epoch, rank, worker id, call count)``. Parameters are drawn in exactly the order the
torchvision v2 pipeline draws them, so ``seed=None`` reproduces torchvision bit for bit.
:class:`swav.batch_augment.FastMultiCrop` is the faster, batched equivalent (issue "Speed").
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.228, 0.224, 0.225)  # official SwAV value (torchvision: 0.229)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
BLUR_SIGMA_RANGE = (0.1, 2.0)
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class CropGroup:
    """``count`` crops of ``size`` x ``size`` pixels covering ``[min_scale, max_scale]`` of the area.

    >>> CropGroup(size=224, count=2, min_scale=0.14, max_scale=1.0).count
    2
    """

    size: int
    count: int
    min_scale: float
    max_scale: float

    def __post_init__(self) -> None:
        _check_group_values(self.size, self.count, self.min_scale, self.max_scale,
                            ("size", "count", "min_scale", "max_scale"))


def _check_group_values(size: object, count: object, min_scale: object, max_scale: object,
                        names: tuple[str, str, str, str]) -> None:
    for value, name in ((size, names[0]), (count, names[1])):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")
    for value, name in ((min_scale, names[2]), (max_scale, names[3])):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(f"{name}={value!r} is invalid: expected a fraction of the image area "
                             "in (0, 1]")
    if min_scale > max_scale:  # type: ignore[operator]
        raise ValueError(f"{names[2]}={min_scale!r} is larger than {names[3]}={max_scale!r}: "
                         "the minimum crop scale must not exceed the maximum")


def crop_groups_from_lists(nmb_crops: Sequence[int], size_crops: Sequence[int],
                           min_scale_crops: Sequence[float],
                           max_scale_crops: Sequence[float]) -> list[CropGroup]:
    """Build crop groups from the official flags (``--nmb_crops 2 6 --size_crops 224 96 ...``).

    >>> [g.size for g in crop_groups_from_lists([2, 6], [224, 96], [0.14, 0.05], [1.0, 0.14])]
    [224, 96]
    """
    lists = {"nmb_crops": nmb_crops, "size_crops": size_crops,
             "min_scale_crops": min_scale_crops, "max_scale_crops": max_scale_crops}
    if len(nmb_crops) == 0:
        raise ValueError("nmb_crops=[] is invalid: give at least one resolution")
    for name, values in lists.items():
        if len(values) != len(nmb_crops):
            raise ValueError(f"{name}={list(values)!r} has {len(values)} entries but nmb_crops="
                             f"{list(nmb_crops)!r} has {len(nmb_crops)}: give one value per "
                             "resolution")
    groups = []
    for i in range(len(nmb_crops)):
        _check_group_values(size_crops[i], nmb_crops[i], min_scale_crops[i], max_scale_crops[i],
                            (f"size_crops[{i}]", f"nmb_crops[{i}]", f"min_scale_crops[{i}]",
                             f"max_scale_crops[{i}]"))
        groups.append(CropGroup(int(size_crops[i]), int(nmb_crops[i]),
                                float(min_scale_crops[i]), float(max_scale_crops[i])))
    return groups


def blur_kernel_size(crop_size: int, sigma_max: float = BLUR_SIGMA_RANGE[1]) -> int:
    """Odd Gaussian kernel reaching 3 sigma of the largest sigma drawn (2.0 -> 13 taps), so that every sigma
    blurs as much as SPEC §7 says (the original's PIL blur has no cut-off; with the cut, sigma 2 spreads an
    impulse by 1.99, 99.4%). Never wider than the reflect padding allows (2 * size - 1), so tiny crops still
    work.

    >>> blur_kernel_size(224), blur_kernel_size(96), blur_kernel_size(16), blur_kernel_size(4), blur_kernel_size(1)
    (13, 13, 13, 7, 1)
    """
    return min(2 * math.ceil(3 * sigma_max) + 1, 2 * crop_size - 1)


@dataclass(frozen=True)
class CropBox:
    """A crop rectangle in pixels of the source image (top-left corner, height, width)."""

    top: int
    left: int
    height: int
    width: int


def sample_crop_box(height: int, width: int, scale: tuple[float, float],
                    generator: torch.Generator | None = None,
                    ratio: tuple[float, float] = ASPECT_RATIO_RANGE) -> CropBox:
    """RandomResizedCrop's box: same algorithm and same random draws as torchvision, seedable.

    Ten tries of (area fraction ~ U[scale], log aspect ~ U[log ratio]); if none fits, a central
    crop clipped to the ratio range. With ``generator=None`` it equals torchvision's draw.

    >>> b = sample_crop_box(375, 500, (0.14, 1.0), torch.Generator().manual_seed(0))
    >>> 0 < b.height <= 375 and 0 < b.width <= 500
    True
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                  generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return CropBox(top, left, h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def to_uint8_image(image: Image.Image | torch.Tensor, channels: int) -> torch.Tensor:
    """Any PIL image or uint8 tensor -> uint8 ``(channels, H, W)`` tensor.

    Transparent modes (RGBA, LA, PA, P with transparency) are composited on white, so transparent
    pixels do not turn into arbitrary colours. 16-bit modes (I;16*, I) are scaled from 0..65535;
    CMYK, YCbCr, LAB, HSV and 1-bit images go through PIL's own conversion.

    >>> to_uint8_image(Image.new("RGBA", (4, 2), (0, 0, 0, 0)), 3)[:, 0, 0].tolist()
    [255, 255, 255]
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} is invalid: expected 1 or 3")
    if isinstance(image, torch.Tensor):
        return _tensor_to_uint8(image, channels)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image of type {type(image).__name__} is invalid: expected a PIL image "
                         "or a uint8 tensor (C, H, W)")
    target = "L" if channels == 1 else "RGB"
    mode = image.mode
    if mode.startswith("I"):  # 16/32-bit integer gray: scale 0..65535 to 0..255
        array = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != target:
        image = image.convert(target)
    return TF.pil_to_tensor(image)


def _tensor_to_uint8(image: torch.Tensor, channels: int) -> torch.Tensor:
    if image.dtype != torch.uint8:
        raise ValueError(f"image tensor dtype {image.dtype} is invalid: expected torch.uint8 "
                         "(convert float images with (x * 255).round().to(torch.uint8))")
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image tensor shape {tuple(image.shape)} is invalid: expected (C, H, W) "
                         "with C 1 or 3, or (H, W)")
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return image.expand(3, -1, -1)
    return TF.rgb_to_grayscale(image, num_output_channels=1)


def mix_seed(*parts: int) -> int:
    """Hash integers into one 64-bit seed (splitmix64 chain): nearby inputs -> unrelated seeds.

    >>> mix_seed(31, 0) != mix_seed(31, 1)
    True
    """
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state


def current_rank() -> int:
    """Rank in the default process group, 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def current_worker_id() -> int:
    """DataLoader worker id, -1 in the main process."""
    info = torch.utils.data.get_worker_info()
    return -1 if info is None else info.id


def crop_generator(seed: int | None, epoch: int, index: int | None,
                   call_count: int) -> torch.Generator | None:
    """Generator for one image's crops; None (torch's global RNG) when ``seed`` is None.

    Keyed by (seed, epoch, rank, index) when the sample index is known, so crops do not depend on
    the number of workers; else by (seed, epoch, rank, worker id, call count).

    >>> crop_generator(None, 0, 5, 0) is None
    True
    """
    if seed is None:
        return None
    if index is None:
        key = mix_seed(seed, epoch, current_rank(), current_worker_id(), call_count)
    else:
        key = mix_seed(seed, epoch, current_rank(), 1 << 62, index)
    return torch.Generator().manual_seed(key)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` that gives python ``random``, numpy and torch a per-worker, per-rank seed.

    DataLoader seeds each worker's torch RNG with ``base_seed + worker_id``; ranks started with the
    same seed share those values, so the rank is mixed in too (SPEC §13: identical augmentations).

    >>> loader = torch.utils.data.DataLoader(range(4), num_workers=0, worker_init_fn=seed_worker)
    """
    seed = mix_seed(torch.initial_seed(), worker_id, current_rank())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


class MultiCropTransform:
    """Per-image multi-crop transform (SPEC §7): image -> list of V normalised float tensors.

    Crops come group by group (group 0's crops first). Built from torchvision v2 functional ops on
    uint8 tensors, drawing random numbers like torchvision's own pipeline.

    >>> t = MultiCropTransform([CropGroup(32, 2, 0.14, 1.0), CropGroup(16, 3, 0.05, 0.14)], seed=0)
    >>> [tuple(c.shape) for c in t(Image.new("RGB", (40, 30)), index=7)]
    [(3, 32, 32), (3, 32, 32), (3, 16, 16), (3, 16, 16), (3, 16, 16)]
    """

    def __init__(self, groups: Sequence[CropGroup], *, channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 color_jitter_strength: float = 1.0, grayscale_prob: float = 0.2,
                 blur_prob: float = 0.5, seed: int | None = None) -> None:
        self.groups = check_groups(groups)
        self.channels = channels
        self.mean, self.std = resolve_normalization(channels, mean, std)
        self.jitter_ranges = jitter_ranges(channels, color_jitter_strength)
        self.grayscale_prob = check_probability("grayscale_prob", grayscale_prob)
        self.blur_prob = check_probability("blur_prob", blur_prob)
        self.seed = seed
        self.epoch = 0
        self._calls = 0

    def set_epoch(self, epoch: int) -> None:
        """Make seeded crops differ between epochs (call before each epoch, like a sampler)."""
        self.epoch = int(epoch)

    def _generator(self, index: int | None) -> torch.Generator | None:
        self._calls += 1
        return crop_generator(self.seed, self.epoch, index, self._calls - 1)

    def __call__(self, image: Image.Image | torch.Tensor, index: int | None = None
                 ) -> list[torch.Tensor]:
        source = to_uint8_image(image, self.channels)
        generator = self._generator(index)
        crops = []
        for group in self.groups:
            for _ in range(group.count):
                crops.append(self._one_crop(source, group, generator))
        return crops

    def _one_crop(self, source: torch.Tensor, group: CropGroup,
                  generator: torch.Generator | None) -> torch.Tensor:
        height, width = source.shape[-2:]
        box = sample_crop_box(height, width, (group.min_scale, group.max_scale), generator)
        x = TF.resized_crop(source, box.top, box.left, box.height, box.width,
                            [group.size, group.size], InterpolationMode.BILINEAR, antialias=True)
        if torch.rand(1, generator=generator).item() < 0.5:
            x = TF.horizontal_flip(x)
        if torch.rand(1, generator=generator).item() < 0.8:
            x = self._color_jitter(x, generator)
        if self.channels == 3 and torch.rand(1, generator=generator).item() < self.grayscale_prob:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if torch.rand(1, generator=generator).item() < self.blur_prob:
            sigma = torch.empty(1).uniform_(*BLUR_SIGMA_RANGE, generator=generator).item()
            k = blur_kernel_size(group.size)
            x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
        x = TF.to_dtype(x, torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std))

    def _color_jitter(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        order = torch.randperm(4, generator=generator).tolist()
        factors = [None if r is None else torch.empty(1).uniform_(r[0], r[1], generator=generator)
                   .item() for r in self.jitter_ranges]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op_id in order:
            if factors[op_id] is not None:
                x = ops[op_id](x, factors[op_id])
        return x


def check_groups(groups: Sequence[CropGroup]) -> tuple[CropGroup, ...]:
    """Validate a non-empty sequence of :class:`CropGroup`."""
    groups = tuple(groups)
    if not groups or not all(isinstance(g, CropGroup) for g in groups):
        raise ValueError(f"groups={groups!r} is invalid: expected a non-empty list of CropGroup "
                         "(see crop_groups_from_lists)")
    return groups


def check_probability(name: str, value: float) -> float:
    """A probability in [0, 1], else ValueError naming it."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} is invalid: expected a probability in [0, 1]")
    return float(value)


def resolve_normalization(channels: int, mean: Sequence[float] | None,
                          std: Sequence[float] | None) -> tuple[tuple[float, ...], ...]:
    """Default mean/std per channel count; check lengths and that std > 0."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} is invalid: expected 1 or 3")
    mean = tuple(mean) if mean is not None else (IMAGENET_MEAN if channels == 3 else GRAY_MEAN)
    std = tuple(std) if std is not None else (IMAGENET_STD if channels == 3 else GRAY_STD)
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise ValueError(f"{name}={values!r} has {len(values)} values: expected one per "
                             f"channel ({channels})")
    if any(s <= 0 for s in std):
        raise ValueError(f"std={std!r} is invalid: every value must be > 0")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def jitter_ranges(channels: int, strength: float) -> tuple[tuple[float, float] | None, ...]:
    """Factor ranges (brightness, contrast, saturation, hue); None = op off (SPEC §7)."""
    if not 0.0 <= strength <= 2.5:
        raise ValueError(f"color_jitter_strength={strength!r} is invalid: expected a value in "
                         "[0, 2.5] (hue 0.2 s must stay within 0.5)")
    if strength == 0:
        return (None, None, None, None)
    b = (max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength)
    if channels == 1:
        return (b, b, None, None)
    return (b, b, b, (-0.2 * strength, 0.2 * strength))

"""Fast multi-crop pipeline (SPEC §7, issue "Speed"): crop per image, colour per batch.

The per-image pipeline spends most of its time in colour jitter and blur, applied crop by crop.
Here the work is split in two stages with the same augmentation distribution:

1. :class:`MultiCropCropper` (the dataset's per-item transform, in DataLoader workers): decode
   the image once (libjpeg-turbo via ``torchvision.io`` for JPEG bytes/files), draw every crop
   box (same algorithm and draws as RandomResizedCrop), crop + antialiased bilinear resize in
   uint8. :func:`multicrop_collate` stacks the crops into V uint8 batches ``(B, C, S, S)``.
2. :class:`BatchColorAugment` (after collation, in the main process or on the GPU; same code,
   the device follows the tensors): per-sample flip, colour jitter in a per-sample random op
   order (as torchvision's ColorJitter), grayscale, separable Gaussian blur (per-sample banded
   matrices, two batched matmuls), normalisation; the ops themselves are in :mod:`swav.color_ops`. On a CPU
   with OpenCV installed the same ops run crop by crop as OpenCV passes (:mod:`swav.opencv_colour`), faster.

Differences from the per-image pipeline, none of which changes the distribution: colour ops work
in float32 without rounding to uint8 between ops; flips happen after the resize (they commute).
Reduced-size JPEG decoding (PIL ``draft``) is not used: the 96-pixel crops cover 5-14% of the
area and need full resolution, so a reduced decode could only serve the large crops.
Legend: B batch, V crops, C channels, S crop size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from functools import partial
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

try:  # deprecated in torchvision 0.29 (moving to torchcodec); PIL decodes when it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = None

from swav import opencv_colour
from swav.color_ops import (JITTER_FNS, _hue_shift_into, adjust_hue_batch, blur_kernels, dense_color_stage,
                             device_constant, flip_batch, gaussian_blur_batch, grayscale_batch)
from swav.images import apply_orientation, load_image
from swav.multicrop import (BLUR_SIGMA_RANGE, CropBox, CropGroup, blur_kernel_size, check_groups,
                            check_probability, crop_generator, jitter_ranges, mix_seed,
                            resolve_normalization, sample_crop_box, to_uint8_image)

logger = logging.getLogger(__name__)

ImageSource = Image.Image | torch.Tensor | bytes | str | os.PathLike
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def decode_image_source(source: ImageSource, channels: int, bit_depth: int | None = None) -> torch.Tensor:
    """Path, bytes, PIL image or uint8 tensor -> uint8 ``(channels, H, W)``; JPEG via libjpeg-turbo (rotated by
    its EXIF orientation), other encoded files by :func:`swav.images.load_image` (with ``bit_depth`` for 16-bit
    files), so that both give what the data sets give.

    >>> decode_image_source(torch.zeros(3, 4, 5, dtype=torch.uint8), 1).shape
    torch.Size([1, 4, 5])
    """
    name = None
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        with open(source, "rb") as f:
            source = f.read()
    if isinstance(source, (bytes, bytearray)):
        if decode_jpeg is not None and source[:3] == b"\xff\xd8\xff":
            from swav.device_crops import read_header  # size checked and orientation read before decoding

            mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
            _, _, orientation = read_header(source, name or "<bytes>")
            try:
                decoded = decode_jpeg(torch.frombuffer(bytearray(source), dtype=torch.uint8), mode=mode)
            except RuntimeError:  # unusual JPEG flavours: let PIL try
                pass
            else:  # as load_image: rotated by the EXIF orientation
                return apply_orientation(decoded, orientation)
        # every other file as the data sets decode it (transparency on white, 16-bit scaled, and only the formats
        # of swav.images.IMAGE_FORMATS: TGA, ICO, JPEG 2000, ... are refused)
        return TF.pil_to_tensor(load_image(bytes(source), channels=channels, name=name, bit_depth=bit_depth))
    return to_uint8_image(source, channels)


class MultiCropCropper:
    """Dataset transform: one image -> list of V uint8 crops ``(C, S, S)``, group 0's first.

    Randomness as :class:`swav.multicrop.MultiCropTransform` (seed, epoch, rank, index/worker).

    >>> cropper = MultiCropCropper([CropGroup(32, 2, 0.14, 1.0), CropGroup(16, 4, 0.05, 0.14)])
    >>> [tuple(c.shape) for c in cropper(torch.zeros(3, 30, 40, dtype=torch.uint8))][1:3]
    [(3, 32, 32), (3, 16, 16)]
    """

    def __init__(self, groups: Sequence[CropGroup], *, channels: int = 3,
                 seed: int | None = None) -> None:
        self.groups = check_groups(groups)
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is invalid: expected 1 or 3")
        self.channels = channels
        self.bit_depth: int | None = None  # of 16-bit files given as paths or bytes (swav.images.load_image)
        self.seed = seed
        self.epoch = 0
        self._calls = 0

    def set_epoch(self, epoch: int) -> None:
        """Make seeded crops differ between epochs."""
        self.epoch = int(epoch)

    def sample_boxes(self, height: int, width: int,
                     generator: torch.Generator | None = None) -> list[CropBox]:
        """All V crop boxes for an image of this size (RandomResizedCrop's distribution)."""
        return [sample_crop_box(height, width, (g.min_scale, g.max_scale), generator)
                for g in self.groups for _ in range(g.count)]

    def __call__(self, image: ImageSource, index: int | None = None) -> list[torch.Tensor]:
        source = decode_image_source(image, self.channels, self.bit_depth)
        self._calls += 1
        generator = crop_generator(self.seed, self.epoch, index, self._calls - 1)
        boxes = self.sample_boxes(source.shape[-2], source.shape[-1], generator)
        sizes = [g.size for g in self.groups for _ in range(g.count)]
        return [TF.resized_crop(source, b.top, b.left, b.height, b.width, [s, s],
                                InterpolationMode.BILINEAR, antialias=True)
                for b, s in zip(boxes, sizes)]


def multicrop_collate(batch: Sequence[Any]) -> Any:
    """collate_fn: items ``[crop_0..crop_V-1]`` or ``([crops], *extras)`` -> V stacked batches.

    >>> crops = multicrop_collate([[torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)]] * 5)
    >>> [tuple(c.shape) for c in crops]
    [(5, 3, 8, 8), (5, 3, 4, 4)]
    """
    if len(batch) == 0:
        raise ValueError("batch=[] is invalid: expected at least one item")
    first = batch[0]
    if isinstance(first, tuple) and first and isinstance(first[0], (list, tuple)):
        crops = multicrop_collate([item[0] for item in batch])
        extras = torch.utils.data.default_collate([tuple(item[1:]) for item in batch])
        return (crops, *extras)
    num_crops = len(first)
    if any(len(item) != num_crops for item in batch):
        raise ValueError(f"items have {sorted({len(i) for i in batch})} crops: expected the same "
                         "number of crops in every item")
    return [torch.stack([item[v] for item in batch]) for v in range(num_crops)]


@dataclass
class ColorParams:
    """Per-sample decisions for one batch (CPU tensors, length B): what was applied, with what.

    ``factors[:, j]`` and ``order`` (a permutation of ``range(J)`` per sample) refer to
    ``BatchColorAugment.jitter_ops[j]``; factors of samples without jitter are drawn but unused.
    """

    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor


def _apply_subset(x: torch.Tensor, idx: list[int], fn: Callable[..., torch.Tensor],
                  *per_sample: torch.Tensor) -> None:
    """``x[idx] = fn(x[idx], *per_sample[idx])`` in place; ``idx`` is a python list (no sync)."""
    if not idx:
        return
    if len(idx) == x.shape[0]:
        fn(x, *per_sample, inplace=True)
        return
    selected = torch.tensor(idx)
    args = [a[selected] for a in per_sample]
    selected = selected.to(x.device, non_blocking=True)
    x.index_copy_(0, selected, fn(x.index_select(0, selected), *args, inplace=True))


class _PieceLists:
    """A batch's per-sample decisions as Python lists, read once per batch rather than once per piece."""

    def __init__(self, params: ColorParams) -> None:
        self.flip = params.flip.tolist()
        self.jitter = params.jitter.tolist()
        self.order = params.order.tolist()
        self.grayscale = params.grayscale.tolist()
        self.blur = params.blur.tolist()


def _warn_compile_failed(exc: BaseException) -> None:
    first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
    logger.warning("compiling the colour stage failed (%s: %s); it runs eagerly instead (same values, slower)",
                   type(exc).__name__, first_line)


class BatchColorAugment(nn.Module):
    """List of V uint8 batches ``(B, C, S, S)`` -> V normalised float32 batches (SPEC §7).

    Flip p ``flip_prob``; jitter with p ``jitter_prob`` (brightness/contrast/saturation 0.8 s,
    hue 0.2 s, a fresh random op order per sample as in torchvision's ColorJitter; one channel:
    brightness and contrast only); grayscale p ``grayscale_prob`` (3 channels only); blur p
    ``blur_prob`` with sigma ~ U[0.1, 2.0] and kernel :func:`~swav.multicrop.blur_kernel_size`;
    normalisation (defaults as :class:`~swav.multicrop.MultiCropTransform`). Parameters are drawn
    on the CPU (from a generator seeded with ``seed``, else torch's global RNG) so the result does
    not depend on the device. Ways to run the same ops (``strategy``): "opencv" (default on a CPU for
    three channels where OpenCV is installed and ``compile`` is off, :mod:`swav.opencv_colour`) works crop by
    crop, each op a vectorised OpenCV pass or two, about 2.3x faster than "grouped" on the development CPU
    (``benchmarks/colour_stage.py``), with the same values up to float rounding (about 2e-5 at the default
    jitter strength), and returns channels-last batches; "grouped" (the CPU
    default otherwise) sorts samples into groups that share the op sequence, in cache-sized pieces of at most
    ``chunk_elements`` floats (default 2**18), so every op runs on a whole piece; "masked"
    (default on other devices) runs each op once on the whole batch's subset that needs it;
    "dense" (:func:`dense_color_stage`) runs every op on every sample with identity parameters
    where it is not drawn, shapes independent of the draws. ``compile=True`` compiles what pays on
    the crops' device. With the dense strategy (strategy "dense", or "auto" elsewhere than on a CPU) it
    compiles the whole dense stage: ``torch.compile`` fuses it into a few kernels, where the eager GPU
    stage issues ~600 small kernels and spends more host time issuing them than the GPU spends running
    them. With the grouped strategy (strategy "grouped", or "auto" on a CPU) it compiles the hue
    rotation, the costliest op: about 40 passes over the pixels eagerly, one compiled. The stage runs
    1.1x faster in ``benchmarks/colour_stage.py``, after two compilations of about 10 s each on first
    use. A compiler failure falls back to the eager ops, with a warning; the values are the same.

    >>> aug = BatchColorAugment(seed=0)
    >>> out = aug([torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)])
    >>> out[0].dtype, tuple(out[0].shape)
    (torch.float32, (4, 3, 16, 16))
    """

    def __init__(self, *, channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, color_jitter_strength: float = 1.0,
                 jitter_prob: float = 0.8, grayscale_prob: float = 0.2, blur_prob: float = 0.5,
                 flip_prob: float = 0.5, seed: int | None = None,
                 strategy: str = "auto", chunk_elements: int | None = None, compile: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.mean, self.std = resolve_normalization(channels, mean, std)
        ranges = jitter_ranges(channels, color_jitter_strength)
        self.jitter_ops = tuple(n for n, r in zip(JITTER_OPS, ranges) if r is not None)
        self.jitter_ranges = tuple(r for r in ranges if r is not None)
        self.jitter_prob = check_probability("jitter_prob", jitter_prob)
        self.grayscale_prob = check_probability("grayscale_prob", grayscale_prob)
        self.blur_prob = check_probability("blur_prob", blur_prob)
        self.flip_prob = check_probability("flip_prob", flip_prob)
        if chunk_elements is not None and chunk_elements < 1:
            raise ValueError(f"chunk_elements={chunk_elements!r} is invalid: expected >= 1 or None")
        if strategy not in ("auto", "opencv", "grouped", "masked", "dense"):
            raise ValueError(f"strategy={strategy!r} is invalid: expected 'auto', 'opencv', 'grouped', 'masked' "
                             "or 'dense'")
        if compile and strategy in ("masked", "opencv"):
            reason = ("the masked strategy's subsets change shape with every draw" if strategy == "masked" else
                      "the opencv strategy is not torch code")
            raise ValueError(f"compile=True needs strategy 'auto', 'dense' or 'grouped' (got {strategy!r}): {reason}")
        if strategy == "opencv":
            if channels != 3:
                raise ValueError("strategy='opencv' works on three channels: use 'auto' or 'grouped' for "
                                 f"channels={channels}")
            if not opencv_colour.available():
                raise ValueError("strategy='opencv' needs OpenCV (pip install opencv-python-headless, or the "
                                 "swav[opencv] extra) whose float hue conversion passes swav.opencv_colour's check; "
                                 "or use strategy='auto' or 'grouped'")
        self.chunk_elements = chunk_elements
        self.strategy = strategy
        self.compile = compile
        self._dense_fn: Callable[..., torch.Tensor] | None = None
        self._hue_fn: Callable[..., None] | None = None
        self._compiled_shapes: set[tuple] = set()
        self.generator = None if seed is None else torch.Generator().manual_seed(mix_seed(seed))

    def sample_params(self, num_samples: int) -> ColorParams:
        """Draw every per-sample decision and factor for a batch of ``num_samples`` crops."""
        g, n = self.generator, num_samples
        decisions = torch.rand(n, 4, generator=g)
        factors = torch.rand(n, len(self.jitter_ops), generator=g)
        for j, (lo, hi) in enumerate(self.jitter_ranges):
            factors[:, j] = lo + (hi - lo) * factors[:, j]
        order = torch.rand(n, len(self.jitter_ops), generator=g).argsort(dim=1)
        lo, hi = BLUR_SIGMA_RANGE
        sigma = lo + (hi - lo) * torch.rand(n, generator=g)
        gray_p = self.grayscale_prob if self.channels == 3 else 0.0
        return ColorParams(flip=decisions[:, 0] < self.flip_prob,
                           jitter=decisions[:, 1] < self.jitter_prob, factors=factors,
                           order=order, grayscale=decisions[:, 2] < gray_p,
                           blur=decisions[:, 3] < self.blur_prob, sigma=sigma)

    def apply(self, crops: torch.Tensor, params: ColorParams) -> torch.Tensor:
        """Augment one uint8 batch ``(B, C, S, S)`` with given parameters -> normalised float."""
        if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[1] != self.channels:
            raise ValueError(f"crops of dtype {crops.dtype} and shape {tuple(crops.shape)} are "
                             f"invalid: expected uint8 (B, {self.channels}, S, S)")
        if crops.shape[0] == 0:
            return torch.empty(crops.shape, dtype=torch.float32, device=crops.device)
        strategy = self.resolved_strategy(crops.device)
        if strategy == "opencv":
            return self._apply_opencv(crops, params)
        if strategy == "dense":
            return self._apply_dense(crops, params)
        if strategy == "masked":
            return self._apply_masked(crops, params)
        out = torch.empty(crops.shape, dtype=torch.float32, device=crops.device)
        lists = _PieceLists(params)
        for piece in self._groups(lists, crops[0].numel()):
            self._augment_piece(crops, params, lists, piece, out)
        return out

    def resolved_strategy(self, device: torch.device | str) -> str:
        """The strategy that runs on crops on ``device``: "auto" is "opencv" on a CPU for three channels where
        OpenCV is installed (and ``compile`` is off), else "grouped" on a CPU, "dense" elsewhere with
        ``compile``, "masked" elsewhere without."""
        if self.strategy != "auto":
            return self.strategy
        if torch.device(device).type == "cpu":
            if self.channels == 3 and not self.compile and opencv_colour.available():
                return "opencv"
            return "grouped"
        return "dense" if self.compile else "masked"

    def _apply_opencv(self, crops: torch.Tensor, params: ColorParams) -> torch.Tensor:
        """:func:`swav.opencv_colour.opencv_color_stage` with this batch's decisions (same draws as the
        other strategies; channels-last output)."""
        lists = _PieceLists(params)
        kernels = None
        if any(lists.blur):
            kernels = blur_kernels(params.sigma, blur_kernel_size(min(crops.shape[-2:])))
        return opencv_colour.opencv_color_stage(
            crops, flip=lists.flip, jitter=lists.jitter, order=lists.order, factors=params.factors,
            grayscale=lists.grayscale, blur=lists.blur, kernels=kernels, jitter_ops=self.jitter_ops,
            mean=self.mean, std=self.std)

    def dense_plan(self, params: ColorParams) -> torch.Tensor:
        """The per-sample parameters of :func:`dense_color_stage`, one float row per sample (CPU)."""
        jitters = len(self.jitter_ops)
        columns = [params.flip.float().view(-1, 1)]
        for position in range(jitters):
            op = params.order[:, position]
            one_hot = torch.nn.functional.one_hot(op, jitters).float() * params.jitter.float().view(-1, 1)
            columns += [one_hot, params.factors.float().gather(1, op.view(-1, 1))]
        columns += [params.grayscale.float().view(-1, 1), params.blur.float().view(-1, 1),
                    params.sigma.float().view(-1, 1)]
        return torch.cat(columns, dim=1)

    def _apply_dense(self, crops: torch.Tensor, params: ColorParams) -> torch.Tensor:
        """:func:`dense_color_stage` (compiled on first use with ``compile=True``); its parameters reach
        the device in one copy from pinned memory (no host-device synchronisation)."""
        device = crops.device
        plan = self.dense_plan(params)
        if device.type == "cuda":
            plan = plan.pin_memory()
        plan = plan.to(device, non_blocking=True)
        args = (crops, plan, device_constant(self.mean, device, torch.float32),
                device_constant(self.std, device, torch.float32), self.jitter_ops,
                blur_kernel_size(min(crops.shape[-2:])))
        if not self.compile:
            return dense_color_stage(*args)
        key = (tuple(crops.shape), crops.device.type)
        if key in self._compiled_shapes:
            return self._dense_fn(*args)
        try:  # compiles for this shape; an optimisation, so a compiler failure falls back to the same values
            if self._dense_fn is None:  # torch.compile itself raises where dynamo is unsupported
                self._dense_fn = torch.compile(dense_color_stage, dynamic=False)
            out = self._dense_fn(*args)
        except Exception as exc:  # noqa: BLE001  (inductor/triton raise many types)
            _warn_compile_failed(exc)
            self.compile = False
            self.strategy = "masked" if self.strategy == "dense" else self.strategy
            return self._apply_masked(crops, params)
        self._compiled_shapes.add(key)
        return out

    def _apply_masked(self, crops: torch.Tensor, params: ColorParams) -> torch.Tensor:
        """Every op once, on the subset of the whole batch that needs it, in SPEC §7 order.

        The plan (which samples, which factors) is made on the CPU from ``params``; all its
        indices and factors reach the device in two copies from pinned memory, so the stage
        never waits for the GPU (no host-device synchronisation) and queues ahead of the step.
        """
        n, device = crops.shape[0], crops.device
        steps: list[tuple[Callable[..., torch.Tensor], list[int], torch.Tensor | None]] = []

        def add(fn: Callable[..., torch.Tensor], mask: torch.Tensor, values: torch.Tensor | None = None) -> None:
            idx = mask.nonzero()[:, 0]
            if len(idx):
                steps.append((fn, idx.tolist(), None if values is None else values[idx]))

        add(flip_batch, params.flip)
        for position in range(len(self.jitter_ops)):
            for j, name in enumerate(self.jitter_ops):
                add(JITTER_FNS[name], params.jitter & (params.order[:, position] == j), params.factors[:, j])
        add(grayscale_batch, params.grayscale)
        add(partial(gaussian_blur_batch, kernel_size=blur_kernel_size(min(crops.shape[-2:]))),
            params.blur, params.sigma)
        indices = torch.tensor([i for _, idx, _ in steps for i in idx], dtype=torch.long)
        values = torch.cat([torch.zeros(0)] + [v.float() for _, _, v in steps if v is not None])
        if device.type == "cuda":
            indices = indices.pin_memory().to(device, non_blocking=True)
            values = values.pin_memory().to(device, non_blocking=True)
        x = crops.to(torch.float32).div_(255.0)
        start = value_start = 0
        for fn, idx, v in steps:
            count = len(idx)
            args = [] if v is None else [values[value_start:value_start + count]]
            value_start += 0 if v is None else count
            if count == n:
                fn(x, *args, inplace=True)
            else:
                selected = indices[start:start + count]
                x.index_copy_(0, selected, fn(x.index_select(0, selected), *args, inplace=True))
            start += count
        mean = device_constant(self.mean, device, torch.float32).view(1, -1, 1, 1)
        std = device_constant(self.std, device, torch.float32).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def _groups(self, lists: _PieceLists, sample_elements: int) -> list[list[int]]:
        """Samples with identical op sequences (all but the flip), in pieces of at most ``chunk_elements``."""
        keys = zip(lists.blur, lists.grayscale, lists.jitter, lists.order)
        by_key: dict[tuple, list[int]] = {}
        for i, (blur, gray, jitter, order) in enumerate(keys):
            by_key.setdefault((blur, gray, tuple(order) if jitter else ()), []).append(i)
        size = max(1, (self.chunk_elements or 1 << 18) // max(1, sample_elements))
        return [members[i:i + size] for members in by_key.values()
                for i in range(0, len(members), size)]

    def _augment_piece(self, crops: torch.Tensor, params: ColorParams, lists: _PieceLists, piece: list[int],
                       out: torch.Tensor) -> None:
        """SPEC §7 order on samples ``piece``: flip, jitter (own order), grayscale, blur, norm.

        The samples of a piece share their op sequence (:meth:`_groups`) and differ only in the flip, which is
        done on the uint8 crops (a quarter of the bytes) before the conversion: flips commute with it."""
        cpu_indices = torch.tensor(piece)
        contiguous = piece == list(range(piece[0], piece[0] + len(piece)))
        indices = cpu_indices if contiguous else cpu_indices.to(crops.device, non_blocking=True)
        source = crops[piece[0]:piece[0] + len(piece)] if contiguous else crops.index_select(0, indices)
        flipped = [i for i, sample in enumerate(piece) if lists.flip[sample]]
        if len(flipped) == len(piece):
            source = source.flip(-1)
        elif flipped:
            source = source.clone() if contiguous else source
            _apply_subset(source, flipped, flip_batch)
        if contiguous:
            x = out[piece[0]:piece[0] + len(piece)].copy_(source)
        else:
            x = source.to(torch.float32)
        x.div_(255.0)
        first = piece[0]
        if lists.jitter[first]:
            factors = params.factors.index_select(0, cpu_indices)
            for j in lists.order[first]:
                name = self.jitter_ops[j]
                fn = self._hue if name == "hue" else JITTER_FNS[name]
                fn(x, factors[:, j], inplace=True)
        if lists.grayscale[first]:
            grayscale_batch(x, inplace=True)
        if lists.blur[first]:
            gaussian_blur_batch(x, params.sigma.index_select(0, cpu_indices), blur_kernel_size(min(x.shape[-2:])),
                                inplace=True)
        x.sub_(device_constant(self.mean, x.device, x.dtype).view(1, -1, 1, 1))
        x.div_(device_constant(self.std, x.device, x.dtype).view(1, -1, 1, 1))
        if not contiguous:
            out.index_copy_(0, indices, x)

    def _hue(self, x: torch.Tensor, factor: torch.Tensor, *, inplace: bool = True) -> torch.Tensor:
        """:func:`~swav.color_ops.adjust_hue_batch` in place; with ``compile=True``, compiled (one loop
        over the pixels instead of ~40 passes; the same values up to float rounding, ``tests/test_batch_augment.py``)."""
        if not self.compile or x.shape[1] != 3:
            return adjust_hue_batch(x, factor, inplace=True)
        try:
            if self._hue_fn is None:  # torch.compile itself raises where dynamo is unsupported
                logger.info("compiling the colour stage's hue rotation (torch.compile, once per process: about "
                            "10-30 s)")
                self._hue_fn = torch.compile(_hue_shift_into, dynamic=True)
            self._hue_fn(x, factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1))
        except Exception as exc:  # noqa: BLE001  (inductor raises many types; an optimisation only)
            _warn_compile_failed(exc)
            self.compile = False
            self.strategy = "grouped" if self.strategy == "auto" else self.strategy  # the values compiling gives
            return adjust_hue_batch(x, factor, inplace=True)
        return x

    def forward(self, batches: Sequence[torch.Tensor], return_params: bool = False
                ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[ColorParams]]:
        """Augment each of the V batches, every crop with its own parameters.

        Consecutive batches of equal shape (one resolution) are processed as one batch (fewer,
        larger groups); the outputs are views into that batch's result. The opencv strategy works crop by
        crop, so it gains nothing from merging and takes each batch on its own.
        """
        params = [self.sample_params(b.shape[0]) for b in batches]
        if batches and self.resolved_strategy(batches[0].device) == "opencv":
            outputs = [self.apply(b, p) for b, p in zip(batches, params)]
            return (outputs, params) if return_params else outputs
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(batches):
            stop = start + 1
            while stop < len(batches) and batches[stop].shape == batches[start].shape:
                stop += 1
            merged = ColorParams(**{f.name: torch.cat([getattr(p, f.name) for p in params[start:stop]])
                                    for f in fields(ColorParams)})
            crops = batches[start] if stop == start + 1 else torch.cat(batches[start:stop])
            outputs += list(self.apply(crops, merged).split(batches[start].shape[0]))
            start = stop
        return (outputs, params) if return_params else outputs


class FastMultiCrop:
    """Both stages wired together: list of images -> V normalised float batches.

    In a DataLoader use ``dataset transform = fast.cropper``, ``collate_fn = multicrop_collate``
    and ``fast.augment`` on the collated (optionally device-resident) uint8 batches.

    >>> fast = FastMultiCrop([CropGroup(32, 2, 0.14, 1.0), CropGroup(16, 6, 0.05, 0.14)], seed=0)
    >>> views = fast([torch.zeros(3, 40, 50, dtype=torch.uint8)] * 4)
    >>> len(views), tuple(views[2].shape)
    (8, (4, 3, 16, 16))
    """

    def __init__(self, groups: Sequence[CropGroup], *, channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 color_jitter_strength: float = 1.0, grayscale_prob: float = 0.2,
                 blur_prob: float = 0.5, seed: int | None = None) -> None:
        self.cropper = MultiCropCropper(groups, channels=channels, seed=seed)
        self.augment = BatchColorAugment(
            channels=channels, mean=mean, std=std, color_jitter_strength=color_jitter_strength,
            grayscale_prob=grayscale_prob, blur_prob=blur_prob,
            seed=None if seed is None else mix_seed(seed, 1))

    def __call__(self, images: Sequence[ImageSource],
                 device: torch.device | str | None = None) -> list[torch.Tensor]:
        batches = multicrop_collate([self.cropper(image) for image in images])
        if device is not None:
            batches = [b.to(device, non_blocking=True) for b in batches]
        return self.augment(batches)

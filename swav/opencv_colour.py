"""The colour stage on a CPU with OpenCV: one crop at a time, each op a vectorised pass or two (SPEC §7).

The batched torch ops of :mod:`swav.color_ops` suit a GPU; on a CPU the same work, crop by crop with
OpenCV's SIMD kernels on ``(H, W, 3)`` float32 arrays, is several times faster (``benchmarks/colour_stage.py``):

* contrast, saturation, grayscale and the final normalisation are 3x3 (or 3x4, with an offset) colour matrices,
  one ``cv2.transform`` pass each (written to a second buffer: OpenCV copies the input first when asked to work in
  place), brightness a multiplication; the clamps to [0, 1] are ``cv2.threshold`` passes (contrast also takes
  the crop's mean, one ``cv2.mean`` pass);
* hue goes through OpenCV's float HSV conversion (hue in degrees), the shift added in between;
* the blur is ``cv2.sepFilter2D`` with the same per-sample kernel as :func:`~swav.color_ops.gaussian_blur_batch`
  and the same reflect padding (OpenCV's ``BORDER_REFLECT_101``).

The decisions and factors are those :class:`~swav.batch_augment.BatchColorAugment` draws, so this gives the
other strategies' values up to float rounding (within about 2e-5 at the default jitter strength; stronger jitter
amplifies the rounding: ``tests/test_opencv_colour.py``). Three channels only. OpenCV
(``opencv-python-headless``, the ``opencv`` extra) is optional: without it the grouped torch strategy runs.
OpenCV's own thread pool is set to one thread while the stage runs (and restored after): the stage runs beside
the training step (or in a data-loader worker) and must not compete with it for cores.
Legend: B batch, H/W height/width.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

try:
    import cv2
except ImportError:  # the grouped torch strategy runs instead
    cv2 = None

__all__ = ["available", "opencv_color_stage"]

logger = logging.getLogger(__name__)

_GRAY = np.array([0.2989, 0.587, 0.114], dtype=np.float32)  # torchvision's rgb_to_grayscale, as swav.color_ops
_usable: bool | None = None  # available()'s answer, worked out once per process


def available() -> bool:
    """Whether OpenCV is installed (``pip install opencv-python-headless``, or ``swav[opencv]``) and its float HSV
    conversion wraps hues of 360-720 degrees as this stage needs (checked once per process on a few pixels: the
    conversion's vectorised code has changed between OpenCV versions; where the check fails, the grouped torch
    strategy runs instead, with a warning)."""
    global _usable
    if _usable is None:
        _usable = cv2 is not None and _hue_wraps()
    return _usable


def _hue_wraps() -> bool:
    rgb = np.random.default_rng(0).random((4, 37, 3), dtype=np.float32)  # vectorised rows and a scalar tail
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    for shift in (0.0, 123.0, 359.0):
        shifted, reference = hsv.copy(), hsv.copy()
        shifted[..., 0] += np.float32(shift)
        reference[..., 0] = np.mod(reference[..., 0] + np.float32(shift), np.float32(360.0))
        difference = np.abs(cv2.cvtColor(shifted, cv2.COLOR_HSV2RGB) - cv2.cvtColor(reference, cv2.COLOR_HSV2RGB))
        if not difference.max() < 1e-5:
            logger.warning("OpenCV %s converts hues above 360 degrees differently from what the opencv colour "
                           "strategy needs; the grouped torch strategy runs instead (same values, slower)",
                           cv2.__version__)
            return False
    return True


def _clamp(x: np.ndarray) -> None:
    cv2.threshold(x, 1.0, 1.0, cv2.THRESH_TRUNC, dst=x)  # > 1 -> 1
    cv2.threshold(x, 0.0, 0.0, cv2.THRESH_TOZERO, dst=x)  # <= 0 -> 0


def _blend_matrix(factor: float, target: np.ndarray) -> np.ndarray:
    """``f * I + (1 - f) * target`` as a 3x3 float32 colour matrix."""
    return (factor * np.eye(3, dtype=np.float64) + (1.0 - factor) * target).astype(np.float32)


_TO_GRAY = np.tile(_GRAY.astype(np.float64), (3, 1))  # every channel <- the gray level
_ZERO = np.zeros((3, 3))


def _jitter(x: np.ndarray, spare: np.ndarray, op: str, factor: float) -> np.ndarray:
    """One jitter op (torchvision's) on ``x`` ``(H, W, 3)`` float32 in [0, 1]; returns the array holding the result:
    ``x`` itself, or ``spare`` (a buffer of the same shape) where writing in place would cost OpenCV a copy."""
    if op == "brightness":  # f x, >= 0
        np.multiply(x, np.float32(factor), out=x)
        cv2.threshold(x, 1.0, 1.0, cv2.THRESH_TRUNC, dst=x)
        return x
    if op == "hue":
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # hue in degrees [0, 360)
        # the back conversion wraps hues up to 720 degrees but not all negative ones: shift by [0, 360)
        hsv[..., 0] += np.float32((factor * 360.0) % 360.0)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=x)
    if op == "contrast":  # f x + (1 - f) * the mean gray level (the mean of gray = gray of the means)
        means = cv2.mean(x)[:3]
        level = float(_GRAY[0]) * means[0] + float(_GRAY[1]) * means[1] + float(_GRAY[2]) * means[2]
        matrix = np.hstack([_blend_matrix(factor, _ZERO), np.full((3, 1), (1.0 - factor) * level, np.float32)])
    elif op == "saturation":  # f x + (1 - f) gray
        matrix = _blend_matrix(factor, _TO_GRAY)
    else:  # pragma: no cover  (BatchColorAugment only passes these four)
        raise ValueError(f"jitter op {op!r} is invalid: expected brightness, contrast, saturation or hue")
    cv2.transform(x, matrix, dst=spare)  # cv2.transform copies its input first when asked to work in place
    _clamp(spare)
    return spare


def opencv_color_stage(crops: torch.Tensor, *, flip: Sequence[bool], jitter: Sequence[bool],
                       order: Sequence[Sequence[int]], factors: torch.Tensor, grayscale: Sequence[bool],
                       blur: Sequence[bool], kernels: torch.Tensor | None, jitter_ops: Sequence[str],
                       mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` CPU crops -> normalised float32 ``(B, 3, H, W)`` in channels-last memory.

    Per sample, in SPEC §7's order: flip, the jitter ops ``order[i]`` (indices into ``jitter_ops``, factors
    ``factors[i]``) when ``jitter[i]``, grayscale, blur with the 1-D kernel ``kernels[i]`` (odd length; None when
    no sample blurs), normalisation by ``mean``/``std``.
    """
    if not available():
        raise RuntimeError("the opencv colour strategy needs OpenCV (pip install opencv-python-headless) with a "
                           "hue conversion that wraps (see the warning); use strategy='grouped'")
    if crops.device.type != "cpu" or crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops of dtype {crops.dtype}, shape {tuple(crops.shape)} on {crops.device} are invalid "
                         "for the opencv colour strategy: expected uint8 (B, 3, H, W) on the CPU")
    n, _, height, width = crops.shape
    planes = crops.contiguous().numpy()  # (B, 3, H, W) uint8; cv2.merge interleaves a crop 10x faster than torch
    out = torch.empty((n, height, width, 3), dtype=torch.float32)
    target = out.numpy()
    factor_rows = factors.tolist()
    kernel_rows = None if kernels is None else kernels.to(torch.float32).numpy()
    std64 = np.asarray(std, dtype=np.float64)
    normalise = np.hstack([np.diag(1.0 / std64), (-np.asarray(mean, dtype=np.float64) / std64).reshape(3, 1)])
    normalise = normalise.astype(np.float32)
    buffers = (np.empty((height, width, 3), dtype=np.float32), np.empty((height, width, 3), dtype=np.float32))
    to_gray = _TO_GRAY.astype(np.float32)

    def other(x: np.ndarray) -> np.ndarray:  # the buffer not holding x: ops that cannot work in place write there
        return buffers[1] if x is buffers[0] else buffers[0]
    previous_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # crop by crop beside the step's threads: no pool of its own (restored below)
    try:
        for i in range(n):
            image = cv2.merge((planes[i, 0], planes[i, 1], planes[i, 2]))  # (H, W, 3)
            if flip[i]:
                image = cv2.flip(image, 1)
            x = np.divide(image, np.float32(255.0), out=buffers[0], dtype=np.float32)
            if jitter[i]:
                for j in order[i]:
                    x = _jitter(x, other(x), jitter_ops[j], factor_rows[i][j])
            if grayscale[i]:
                x = cv2.transform(x, to_gray, dst=other(x))
            if blur[i]:
                kernel = kernel_rows[i]
                x = cv2.sepFilter2D(x, cv2.CV_32F, kernel, kernel, dst=other(x), borderType=cv2.BORDER_REFLECT_101)
            cv2.transform(x, normalise, dst=target[i])
    finally:
        cv2.setNumThreads(previous_threads)
    return out.permute(0, 3, 1, 2)

"""Tests for swav.opencv_colour: the OpenCV colour stage against torchvision's ops and the torch strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from swav import opencv_colour

# OpenCV is optional (the opencv extra; the test extra installs it, so CI runs these)
pytestmark = pytest.mark.skipif(not opencv_colour.available(), reason="OpenCV (the opencv extra) is not installed")
from swav.batch_augment import BatchColorAugment, ColorParams, FastMultiCrop
from swav.multicrop import CropGroup

N = 8


def params(n: int = N, **changes) -> ColorParams:
    """No op drawn, unless ``changes`` says so."""
    base = dict(flip=torch.zeros(n, dtype=torch.bool), jitter=torch.zeros(n, dtype=torch.bool),
                factors=torch.ones(n, 4), order=torch.arange(4).repeat(n, 1),
                grayscale=torch.zeros(n, dtype=torch.bool), blur=torch.zeros(n, dtype=torch.bool),
                sigma=torch.ones(n))
    base.update(changes)
    return ColorParams(**base)


def crops(n: int = N, size: tuple[int, int] = (24, 30), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=g)


def unnormalise(aug: BatchColorAugment, x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(aug.std).view(1, 3, 1, 1) + torch.tensor(aug.mean).view(1, 3, 1, 1)


@pytest.mark.parametrize("op, values", [
    ("brightness", [0.2, 0.7, 1.0, 1.8]), ("contrast", [0.2, 0.9, 1.3, 1.8]),
    ("saturation", [0.2, 0.6, 1.4, 1.8]),
    # negative shifts too: OpenCV's conversion does not wrap every negative hue (the stage shifts by [0, 360))
    ("hue", [-0.2, -0.11, -0.01, 0.0, 0.07, 0.2])])
def test_each_jitter_op_is_torchvisions(op: str, values: list[float]) -> None:
    aug = BatchColorAugment(strategy="opencv")
    j = aug.jitter_ops.index(op)
    x = crops(len(values))
    factors = torch.ones(len(values), 4)
    factors[:, 3] = 0.0
    factors[:, j] = torch.tensor(values)
    order = torch.tensor([[j] + [k for k in range(4) if k != j]] * len(values))
    out = unnormalise(aug, aug.apply(x, params(len(values), jitter=torch.ones(len(values), dtype=torch.bool),
                                                factors=factors, order=order)))
    fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation,
          "hue": TF.adjust_hue}[op]
    expected = torch.stack([fn(x[i].float() / 255, v) for i, v in enumerate(values)])
    assert (out - expected).abs().max() < 2e-5


def test_grayscale_blur_and_flip_are_torchvisions() -> None:
    aug = BatchColorAugment(strategy="opencv")
    x = crops()
    every = torch.ones(N, dtype=torch.bool)
    sigma = torch.linspace(0.1, 2.0, N)
    out = unnormalise(aug, aug.apply(x, params(flip=every, grayscale=every, blur=every, sigma=sigma)))
    expected = torch.stack([TF.gaussian_blur(TF.rgb_to_grayscale(x[i].flip(-1).float() / 255, 3), [13, 13],
                                             [float(s)] * 2) for i, s in enumerate(sigma)])
    assert (out - expected).abs().max() < 2e-5


def test_real_photo_crops_match_the_grouped_strategy_with_the_same_draws() -> None:
    from pathlib import Path
    folders = (Path(__file__).resolve().parents[2] / "shared" / "data" / "photos-500x375",
               Path("/work/shared/data/photos-500x375"))
    photos = next((sorted(f.glob("*.jpg")) for f in folders if f.is_dir()), [])
    if not photos:  # a checkout without the shared photos: synthetic images of the same size
        photos = [torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
                  for i in range(6)]
    fast = FastMultiCrop([CropGroup(224, 2, 0.14, 1.0), CropGroup(96, 2, 0.05, 0.14)], seed=0)
    batches = [torch.stack(c) for c in zip(*[fast.cropper(p) for p in photos[:6]])]
    opencv, grouped = BatchColorAugment(seed=4, strategy="opencv"), BatchColorAugment(seed=4, strategy="grouped")
    out, drawn = opencv(batches, return_params=True)
    reference, reference_drawn = grouped(batches, return_params=True)
    for a, b, p, q in zip(out, reference, drawn, reference_drawn):
        assert torch.equal(p.factors, q.factors) and torch.equal(p.order, q.order)  # the same draws
        assert a.is_contiguous(memory_format=torch.channels_last)  # what the channels-last model takes
        assert (a - b).abs().max() < 1e-4  # normalised units; values in [0, 1] agree to about 2e-5


def test_auto_picks_opencv_on_a_cpu_for_three_channels_only() -> None:
    assert opencv_colour.available()  # the test extra installs it
    assert BatchColorAugment().resolved_strategy("cpu") == "opencv"
    assert BatchColorAugment(channels=1).resolved_strategy("cpu") == "grouped"
    assert BatchColorAugment(compile=True).resolved_strategy("cpu") == "grouped"  # compiled hue asked for
    assert BatchColorAugment().resolved_strategy("cuda") == "masked"
    with pytest.raises(ValueError, match="compile=True"):
        BatchColorAugment(strategy="opencv", compile=True)


def test_the_stage_refuses_tensors_it_cannot_take_and_keeps_the_callers_threads() -> None:
    aug = BatchColorAugment(strategy="opencv")
    with pytest.raises(ValueError, match="uint8"):
        opencv_colour.opencv_color_stage(torch.zeros(2, 3, 8, 8), flip=[0, 0], jitter=[0, 0], order=[[], []],
                                         factors=torch.zeros(2, 4), grayscale=[0, 0], blur=[0, 0], kernels=None,
                                         jitter_ops=aug.jitter_ops, mean=aug.mean, std=aug.std)
    threads, cv_threads = torch.get_num_threads(), opencv_colour.cv2.getNumThreads()
    aug([crops()])
    assert torch.get_num_threads() == threads
    assert opencv_colour.cv2.getNumThreads() == cv_threads  # one thread only while the stage runs (test below)


def test_the_hue_check_detects_a_conversion_that_does_not_wrap(monkeypatch) -> None:
    """The once-per-process check that guards against OpenCV versions whose conversion does not wrap: fed a
    conversion that clips hues above 360 degrees, as a wrong vectorised path would, it says no."""
    cv2 = opencv_colour.cv2
    real = cv2.cvtColor

    def clipping(image, code, *args, **kwargs):
        if code == cv2.COLOR_HSV2RGB:
            image = image.copy()
            image[..., 0] = np.minimum(image[..., 0], 359.9)
        return real(image, code, *args, **kwargs)
    monkeypatch.setattr(cv2, "cvtColor", clipping)
    assert not opencv_colour._hue_wraps()
    monkeypatch.setattr(cv2, "cvtColor", real)
    assert opencv_colour._hue_wraps()


def test_opencv_runs_on_one_thread_during_the_stage_and_leaves_its_setting_as_it_was(monkeypatch) -> None:
    import cv2

    seen = []
    real = cv2.transform
    monkeypatch.setattr(opencv_colour.cv2, "transform", lambda *a, **k: seen.append(cv2.getNumThreads()) or real(*a, **k))
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        aug = BatchColorAugment(strategy="opencv", seed=0)
        aug([torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)])
        assert seen and set(seen) == {1}  # every crop's normalisation ran with one OpenCV thread
        assert cv2.getNumThreads() == 2  # the process's own setting is back
    finally:
        cv2.setNumThreads(before)

"""Tests for the batched in-memory multi-crop (swav/tensor_multicrop.py, SPEC §7)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from swav.multicrop import CropGroup, blur_kernel_size
from swav.tensor_multicrop import (
    TensorMultiCrop,
    _blur,
    _crop_thetas,
    _gaussian_kernels,
    sample_crop_boxes,
    step_generator,
)

PLAIN = dict(jitter_prob=0.0, blur_prob=0.0, grayscale_prob=0.0)


def _images(n: int = 4, c: int = 1, h: int = 28, w: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _crop_via_grid(images: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool = False) -> torch.Tensor:
    theta = _crop_thetas(torch.tensor([box]), torch.tensor([flip]), images.shape[2], images.shape[3]).float()
    grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_shapes_order_and_normalisation():
    mc = TensorMultiCrop([(28, 2, 0.3, 1.0), CropGroup(16, 3, 0.1, 0.4)], channels=1, mean=(0.5,), std=(0.25,), **PLAIN)
    crops = mc(_images(5), step_generator(0, 0, 0))
    assert mc.num_crops == 5
    assert [tuple(c.shape) for c in crops] == [(5, 1, 28, 28)] * 2 + [(5, 1, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    # pixel values in [0, 1] normalised with mean 0.5, std 0.25 lie in [-2, 2]
    assert all(float(c.min()) >= -2.0 - 1e-5 and float(c.max()) <= 2.0 + 1e-5 for c in crops)
    # each crop of an image comes from that image: a constant image gives constant crops
    const = torch.full((3, 1, 20, 20), 200, dtype=torch.uint8)
    const[1] = 40
    out = mc(const, step_generator(0, 0, 1))
    for c in out:
        assert torch.allclose(c[0], torch.full_like(c[0], (200 / 255 - 0.5) / 0.25), atol=1e-5)
        assert torch.allclose(c[1], torch.full_like(c[1], (40 / 255 - 0.5) / 0.25), atol=1e-5)


def test_box_scale_and_aspect_statistics():
    gen = torch.Generator().manual_seed(1)
    boxes = sample_crop_boxes(20000, 96, 96, (0.2, 0.6), gen)
    top, left, h, w = boxes.T
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 96) & (left + w <= 96)).all())
    area = (h * w).double() / (96 * 96)
    # integer rounding of w and h moves the area by at most about a pixel row / column
    assert float(area.min()) > 0.2 - 0.03 and float(area.max()) < 0.6 + 0.03
    assert abs(float(area.mean()) - 0.4) < 0.01  # area ~ U(0.2, 0.6) (all candidates fit here)
    log_ratio = torch.log(w.double() / h.double())
    assert float(log_ratio.abs().max()) < math.log(4 / 3) + 0.05
    assert abs(float(log_ratio.mean())) < 0.01  # log-aspect uniform, symmetric around 0
    # positions uniform: the crop centre's mean is the image centre
    assert abs(float((left + w / 2).double().mean()) - 48) < 0.5


def test_fallback_to_central_crop_when_nothing_fits():
    # a 100 x 10 image cannot hold a crop of 90% area with aspect in [3/4, 4/3]: central crop
    boxes = sample_crop_boxes(50, 100, 10, (0.9, 1.0), torch.Generator().manual_seed(0))
    expected_h = round(10 / (3 / 4))  # width 10, aspect clamped to 3/4
    assert bool((boxes == torch.tensor([(100 - expected_h) // 2, 0, expected_h, 10])).all())


def test_flip_rate_and_flip_is_mirror():
    mc = TensorMultiCrop([(16, 1, 1.0, 1.0)], channels=1, mean=(0.0,), std=(1.0,), **PLAIN)
    # an asymmetric image: full-image crops are either the image or its mirror, each half the time
    image = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).div(256 / 255).round().to(torch.uint8)
    images = image.repeat(4000, 1, 1, 1)
    (out,) = mc(images, step_generator(3, 0, 0))
    ref = image.float() / 255
    same = (out - ref).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - ref.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same ^ mirrored).all())
    assert abs(float(mirrored.float().mean()) - 0.5) < 0.03


def test_determinism_from_generator():
    mc = TensorMultiCrop([(28, 2, 0.3, 1.0), (12, 2, 0.1, 0.3)], channels=3, blur_prob=0.5)
    images = _images(6, c=3, h=32, w=32)
    a = mc(images, step_generator(7, 1, 2))
    b = mc(images, step_generator(7, 1, 2))
    c = mc(images, step_generator(7, 1, 3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # every crop draws its own parameters: the two large crops of an image differ
    assert not torch.equal(a[0], a[1])


def test_full_crop_without_flip_reproduces_the_image():
    images = _images(3, c=1, h=28, w=28)
    out = _crop_via_grid(images, (0, 0, 28, 28), 28)
    assert torch.allclose(out, images.float(), atol=1e-3)
    # and through the class (scale 1, aspect drawn in [3/4, 4/3] only fits as 28 x 28): image or mirror
    mc = TensorMultiCrop([(28, 1, 1.0, 1.0)], channels=1, mean=(0.0,), std=(1.0,), **PLAIN)
    (crop,) = mc(images, step_generator(0, 0, 0))
    ref = images.float() / 255
    err = torch.minimum((crop - ref).abs().amax(dim=(1, 2, 3)), (crop - ref.flip(-1)).abs().amax(dim=(1, 2, 3)))
    assert float(err.max()) < 1e-5


def test_sub_rectangle_crop_equals_slice_then_resize():
    images = _images(2, c=3, h=32, w=40)
    top, left, h, w = 5, 7, 20, 24
    sliced = images[:, :, top : top + h, left : left + w].float()
    # shrinking by an integer factor never samples outside the box: exact match
    down = _crop_via_grid(images, (top, left, h, w), 10)  # 20 x 24 -> 10 x 10 (anisotropic)
    ref = F.interpolate(sliced, size=(10, 10), mode="bilinear", align_corners=False, antialias=False)
    assert torch.allclose(down, ref, atol=1e-3)
    # an upscaled crop matches everywhere except the outer half-pixel ring, where the grid reads
    # the true neighbouring pixels and interpolate() clamps to the slice
    up = _crop_via_grid(images, (top, left, h, w), 48)
    ref_up = F.interpolate(sliced, size=(48, 48), mode="bilinear", align_corners=False, antialias=False)
    assert torch.allclose(up[..., 2:-2, 2:-2], ref_up[..., 2:-2, 2:-2], atol=1e-3)
    # the flipped crop is the mirror of the unflipped one
    assert torch.allclose(_crop_via_grid(images, (top, left, h, w), 10, flip=True), down.flip(-1), atol=1e-3)


def test_brightness_jitter_statistics_on_one_channel():
    # constant mid-grey images: contrast is a no-op, brightness multiplies by U(1 - j, 1 + j)
    mc = TensorMultiCrop([(8, 1, 1.0, 1.0)], channels=1, mean=(0.0,), std=(1.0,), jitter_strength=0.5,
                         jitter_prob=0.8, blur_prob=0.0)
    images = torch.full((8000, 1, 8, 8), 100, dtype=torch.uint8)
    (out,) = mc(images, step_generator(0, 0, 0))
    factor = out[:, 0, 0, 0] / (100 / 255)
    changed = (factor - 1).abs() > 1e-4
    assert abs(float(changed.float().mean()) - 0.8) < 0.02
    assert float(factor.min()) >= 0.5 - 1e-4 and float(factor.max()) <= 1.5 + 1e-4
    assert abs(float(factor[changed].mean()) - 1.0) < 0.02  # symmetric around 1
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))  # stays constant per image


def test_contrast_keeps_mean_and_scales_deviation():
    mc = TensorMultiCrop([(16, 1, 1.0, 1.0)], channels=1, mean=(0.0,), std=(1.0,))
    x = torch.rand(5, 1, 16, 16) * 0.5 + 0.25
    f = torch.tensor([0.5, 1.0, 1.5, 0.2, 1.8])
    y = mc._jitter_op(1, x, f)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(y, (x - mean) * f.view(-1, 1, 1, 1) + mean, atol=1e-6)


def test_rgb_ops_neutral_factors_are_identity_and_grayscale():
    mc = TensorMultiCrop([(8, 1, 1.0, 1.0)], channels=3)
    x = torch.rand(4, 3, 8, 8)
    for op, neutral in ((0, 1.0), (1, 1.0), (2, 1.0), (3, 0.0)):
        assert torch.allclose(mc._jitter_op(op, x, torch.full((4,), neutral)), x, atol=1e-5), op
    # saturation 0 gives the luma image (torchvision's weights); a hue turn of 1/3 permutes pure primaries (approximately)
    gray = mc._jitter_op(2, x, torch.zeros(4))
    luma = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(gray, luma[:, None].expand_as(x), atol=1e-6)
    grayscale = TensorMultiCrop([(8, 1, 1.0, 1.0)], channels=3, mean=(0, 0, 0), std=(1, 1, 1), jitter_prob=0.0,
                                blur_prob=0.0, grayscale_prob=1.0)
    (out,) = grayscale(_images(3, c=3, h=8, w=8), step_generator(0, 0, 0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_blur_matches_naive_convolution():
    x = torch.rand(3, 2, 9, 9)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    kernels = _gaussian_kernels(sigma, 5)
    assert torch.allclose(kernels.sum(1), torch.ones(3, dtype=torch.float64))
    got = _blur(x, kernels)
    for i in range(3):
        k2d = (kernels[i][:, None] * kernels[i][None, :]).float()
        padded = F.pad(x[i : i + 1], (2, 2, 2, 2), mode="reflect")
        ref = F.conv2d(padded.reshape(2, 1, 13, 13), k2d[None, None]).reshape(1, 2, 9, 9)
        assert torch.allclose(got[i : i + 1], ref, atol=1e-5)


def test_blur_probability_and_invalid_arguments():
    mc = TensorMultiCrop([(28, 1, 1.0, 1.0)], channels=1, mean=(0.0,), std=(1.0,), jitter_prob=0.0, blur_prob=0.5)
    plain = TensorMultiCrop([(28, 1, 1.0, 1.0)], channels=1, mean=(0.0,), std=(1.0,), **PLAIN)
    images = _images(400)
    (blurred,) = mc(images, step_generator(0, 0, 0))
    (sharp,) = plain(images, step_generator(0, 0, 0))  # same crop/flip draws come first
    changed = (blurred - sharp).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert 0.4 < float(changed.float().mean()) < 0.6
    for kwargs in ({"channels": 2}, {"blur_prob": 1.5}, {"jitter_strength": -1.0}, {"std": (0.0,)}):
        args = {"channels": 1, "mean": (0.5,), "std": (0.5,), **kwargs}
        if args["channels"] != 1:
            args.update(mean=(0.5, 0.5), std=(0.5, 0.5))
        with pytest.raises(ValueError):
            TensorMultiCrop([(28, 1, 0.5, 1.0)], **args)
    with pytest.raises(ValueError, match="uint8"):
        plain(images.float(), step_generator(0, 0, 0))


def test_step_generator_depends_on_every_key():
    draws = {tuple(torch.rand(3, generator=step_generator(*key)).tolist()) for key in
             [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]}
    assert len(draws) == 5


def test_hue_jitter_is_torchvisions_hsv_shift_per_sample() -> None:
    import torchvision.transforms.v2.functional as TF
    x = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    shift = torch.tensor([0.2, -0.2, 0.0, 0.05, 1 / 3])
    multicrop = TensorMultiCrop([CropGroup(12, 1, 0.5, 1.0)], channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = multicrop._jitter_op(3, x.clone(), shift)
    for i in range(5):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], float(shift[i])), atol=2e-6, rtol=0)
    assert torch.equal(out[2], x[2])  # no shift: the image itself
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(multicrop._jitter_op(3, red, torch.tensor([1 / 3])).flatten(),
                               torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


def _rate_ok(mask: torch.Tensor, p: float) -> bool:
    """Within 4.5 standard errors of the rate ``p``."""
    return abs(mask.float().mean().item() - p) < 4.5 * math.sqrt(p * (1 - p) / mask.numel())


def test_jitter_draws_every_op_at_every_position_with_torchvisions_ranges(monkeypatch) -> None:
    """The colour jitter of the in-memory pipeline (chosen for IDX/CIFAR data): each of the four ops is equally likely
    at each position of the order, and the factors are uniform over torchvision's ranges at strength 0.8
    (brightness/contrast/saturation [0.2, 1.8], hue [-0.2, 0.2])."""
    multicrop = TensorMultiCrop([(8, 1, 1.0, 1.0)], channels=3, jitter_prob=1.0, blur_prob=0.0, grayscale_prob=0.0)
    calls, original = [], multicrop._jitter_op
    monkeypatch.setattr(multicrop, "_jitter_op",
                        lambda op, x, f: (calls.append((op, f.clone())), original(op, x, f))[1])
    n = 4000
    multicrop(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8), step_generator(0, 0, 0))
    assert [op for op, _ in calls] == list(range(4)) * 4  # position by position, every op at every position
    neutral = [1.0, 1.0, 1.0, 0.0]
    factors = torch.zeros(n, 4)
    for i, (op, f) in enumerate(calls):
        chosen = f != neutral[op]
        assert _rate_ok(chosen, 0.25), (i // 4, op)
        factors[chosen, op] = f[chosen]
    for op, (low, high) in enumerate([(0.2, 1.8)] * 3 + [(-0.2, 0.2)]):
        f = factors[:, op]
        assert low - 1e-6 <= f.min() < low + 0.01 and high - 0.01 < f.max() <= high + 1e-6, op
        assert abs(f.mean() - (low + high) / 2) < 4.5 * (high - low) / math.sqrt(12 * n)


def test_grayscale_rate_is_a_fifth() -> None:
    multicrop = TensorMultiCrop([(8, 1, 1.0, 1.0)], channels=3, jitter_prob=0.0, blur_prob=0.0)
    (out,) = multicrop(torch.randint(0, 256, (4000, 3, 8, 8), dtype=torch.uint8), step_generator(1, 0, 0))
    x = out * torch.tensor(multicrop.std).view(1, 3, 1, 1) + torch.tensor(multicrop.mean).view(1, 3, 1, 1)
    gray = ((x[:, 0] - x[:, 1]).abs().amax(dim=(1, 2)) < 1e-5) & ((x[:, 1] - x[:, 2]).abs().amax(dim=(1, 2)) < 1e-5)
    assert _rate_ok(gray, 0.2)


def test_contrast_of_colour_crops_is_torchvisions() -> None:
    """Contrast blends with the mean of the luma (not of all channels), as torchvision's adjust_contrast."""
    import torchvision.transforms.v2.functional as TF

    multicrop = TensorMultiCrop([(8, 1, 1.0, 1.0)], channels=3)
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    f = torch.tensor([0.2, 0.6, 1.0, 1.4, 1.8])
    expected = torch.stack([TF.adjust_contrast(x[i], float(f[i])) for i in range(5)])
    torch.testing.assert_close(multicrop._jitter_op(1, x, f), expected, atol=1e-5, rtol=0)


def test_blur_kernel_width_and_a_sigma_per_crop(monkeypatch) -> None:
    import swav.tensor_multicrop as tm

    seen, original = [], tm._gaussian_kernels
    monkeypatch.setattr(tm, "_gaussian_kernels",
                        lambda sigma, size: (seen.append((sigma.clone(), size)), original(sigma, size))[1])
    multicrop = TensorMultiCrop([(16, 1, 1.0, 1.0)], channels=3, jitter_prob=0.0, blur_prob=1.0, grayscale_prob=0.0)
    multicrop(torch.randint(0, 256, (3000, 3, 16, 16), dtype=torch.uint8), step_generator(2, 0, 0))
    (sigma, size), = seen
    assert size == blur_kernel_size(16)
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and len(sigma.unique()) == len(sigma)
    assert abs(float(sigma.mean()) - 1.05) < 4.5 * 1.9 / math.sqrt(12 * len(sigma))


def test_crop_boxes_are_centred_on_average_vertically_too() -> None:
    boxes = sample_crop_boxes(20000, 96, 96, (0.2, 0.6), torch.Generator().manual_seed(1))
    top, left, h, w = boxes.T
    assert abs(float((top + h / 2).double().mean()) - 48) < 0.5

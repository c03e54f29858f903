"""Tests for swav.color_ops: each batched colour op against torchvision's per-image op."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from swav.color_ops import (adjust_brightness_batch, adjust_contrast_batch, adjust_hue_batch,
                            adjust_saturation_batch, gaussian_blur_batch, grayscale_batch)


def float_images(n: int = 6, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Random images with gray pixels, channel ties and quantised values (hue edge cases)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, 18, 22, generator=g)
    if channels == 3:
        x[:, :, :3] = x[:, :1, :3]                     # gray pixels (zero chroma)
        x[:, 0, 3:5] = x[:, 1, 3:5]                    # red == green
        x[:, 2, 5:7] = x[:, 0, 5:7]                    # blue == red
        x[:, :, 7:9] = (x[:, :, 7:9] * 4).round() / 4  # many exact ties
    return x


def per_sample(op, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return torch.stack([op(x[i], float(factors[i])) for i in range(len(x))])


# --- individual ops against torchvision's functional ops -----------------------------------------

@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("ours, theirs, low, high", [
    (adjust_brightness_batch, TF.adjust_brightness, 0.2, 1.8),
    (adjust_contrast_batch, TF.adjust_contrast, 0.2, 1.8),
    (adjust_saturation_batch, TF.adjust_saturation, 0.0, 1.8),
    (adjust_hue_batch, TF.adjust_hue, -0.5, 0.5),
])
def test_jitter_ops_match_torchvision(ours, theirs, low: float, high: float, channels: int) -> None:
    x = float_images(channels=channels)
    factors = torch.linspace(low, high, len(x))
    expected = per_sample(theirs, x, factors)
    assert torch.allclose(ours(x, factors), expected, atol=2e-6)


def test_grayscale_matches_torchvision() -> None:
    x = float_images()
    assert torch.allclose(grayscale_batch(x), TF.rgb_to_grayscale(x, num_output_channels=3))


@pytest.mark.parametrize("kernel_size", [1, 3, 9, 23])
def test_blur_matches_torchvision(kernel_size: int) -> None:
    x = float_images()
    sigma = torch.tensor([0.1, 0.3, 0.7, 1.2, 1.7, 2.0])
    expected = torch.stack([TF.gaussian_blur(x[i], [kernel_size] * 2, [float(sigma[i])] * 2)
                            for i in range(len(x))])
    assert torch.allclose(gaussian_blur_batch(x, sigma, kernel_size), expected, atol=2e-6)


def test_blur_rejects_bad_kernel() -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_blur_batch(torch.zeros(1, 3, 8, 8), torch.ones(1), 4)
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_blur_batch(torch.zeros(1, 3, 4, 4), torch.ones(1), 9)


@pytest.mark.parametrize("height, width", [(224, 224), (100, 230), (224, 97), (1, 3)])
def test_blocked_cpu_blur_matches_torchvision_and_works_in_place(height: int, width: int) -> None:
    """Above 96 pixels the CPU blur multiplies blocks of 48 outputs by their inputs only (the band of the
    13-tap kernel); rectangular crops exercise a blocked and an unblocked pass together, the last block short."""
    torch.manual_seed(0)
    kernel_size = min(13, 2 * min(height, width) - 1)
    x = torch.rand(3, 3, height, width)
    x[1] = x[1, :1]  # a gray image among colour ones
    sigma = torch.tensor([0.1, 1.3, 2.0])
    expected = torch.stack([TF.gaussian_blur(x[i], [kernel_size] * 2, [float(sigma[i])] * 2)
                            for i in range(len(x))])
    assert torch.allclose(gaussian_blur_batch(x, sigma, kernel_size), expected, atol=2e-6)
    in_place = x.clone()
    assert gaussian_blur_batch(in_place, sigma, kernel_size, inplace=True) is in_place
    assert torch.equal(in_place, gaussian_blur_batch(x, sigma, kernel_size))
    strided = x.clone().transpose(-1, -2)  # not contiguous: written back through a temporary
    gaussian_blur_batch(strided, sigma, kernel_size, inplace=True)
    assert torch.allclose(strided, gaussian_blur_batch(x.transpose(-1, -2).contiguous(), sigma, kernel_size))

"""Tests for swav.eval.transforms (SPEC §11 evaluation crops)."""

import numpy as np
import pytest
import torch
from PIL import Image

from swav.eval.transforms import PadRandomCrop, eval_transforms, transforms_for_spec
from swav.model import ModelSpec


def test_imagenet_preset_sizes_and_normalisation():
    train, test = eval_transforms()
    image = Image.new("RGB", (500, 375), (124, 116, 104))  # about the ImageNet mean colour
    assert train(image).shape == (3, 224, 224)
    out = test(image)
    assert out.shape == (3, 224, 224)
    # (124/255 - 0.485) / 0.228 etc.: the official mean/std (std 0.228 for red)
    expected = [(124 / 255 - 0.485) / 0.228, (116 / 255 - 0.456) / 0.224, (104 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4, rtol=0)


def test_small_grayscale_preset_keeps_image_and_shifts_in_training():
    spec = ModelSpec("resnet18", small_images=True, in_channels=1)
    train, test = transforms_for_spec(spec)
    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    image = Image.fromarray(pixels)
    out = test(image)
    torch.testing.assert_close(out[0], (torch.from_numpy(pixels).float() / 255 - 0.5) / 0.5)  # identity + grey 0.5/0.5
    assert test(image.convert("RGB")).shape == (1, 28, 28)  # converted to the model's channels
    torch.manual_seed(0)
    shapes = {tuple(train(image).shape) for _ in range(5)}
    assert shapes == {(1, 28, 28)}


def test_pad_random_crop_is_a_shift_within_padding():
    pixels = torch.arange(1, 37, dtype=torch.uint8).reshape(1, 6, 6)
    crop = PadRandomCrop(2)
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        out = crop(pixels)
        assert out.shape == (1, 6, 6)
        nz = out[0].nonzero()
        top, left = int(nz[:, 0].min()), int(nz[:, 1].min())
        value = int(out[0, top, left])
        dy, dx = (value - 1) // 6 - top, (value - 1) % 6 - left  # source offset of the visible corner
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        seen.add((dy, dx))
    assert len(seen) > 3  # really random


def test_bad_preset_and_sizes():
    with pytest.raises(ValueError, match="preset"):
        eval_transforms(preset="huge")
    with pytest.raises(ValueError, match="crop_size"):
        eval_transforms(crop_size=300, resize_size=256)

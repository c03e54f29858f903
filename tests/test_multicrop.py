"""Tests for swav.multicrop (SPEC §7): validation, torchvision equivalence, image modes, seeding."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2 as T
from PIL import Image

from swav.multicrop import (FASHION_MNIST_MEAN, IMAGENET_MEAN, IMAGENET_STD, CropGroup,
                            MultiCropTransform, blur_kernel_size, crop_groups_from_lists,
                            mix_seed, sample_crop_box, seed_worker, to_uint8_image)

GROUPS = [CropGroup(32, 2, 0.14, 1.0), CropGroup(16, 3, 0.05, 0.14)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: thread start-up costs more than it saves on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_image(channels: int = 3, height: int = 30, width: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=g)


# --- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(size=0, count=1, min_scale=0.1, max_scale=1.0), "size"),
    (dict(size=True, count=1, min_scale=0.1, max_scale=1.0), "size"),
    (dict(size=8, count=0, min_scale=0.1, max_scale=1.0), "count"),
    (dict(size=8, count=1, min_scale=0.0, max_scale=1.0), "min_scale"),
    (dict(size=8, count=1, min_scale=0.1, max_scale=1.5), "max_scale"),
    (dict(size=8, count=1, min_scale=0.5, max_scale=0.2), "min_scale=0.5"),
])
def test_crop_group_rejects_invalid_values(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        CropGroup(**kwargs)


def test_crop_groups_from_lists_builds_official_groups() -> None:
    groups = crop_groups_from_lists([2, 6], [224, 96], [0.14, 0.05], [1, 0.14])
    assert groups == [CropGroup(224, 2, 0.14, 1.0), CropGroup(96, 6, 0.05, 0.14)]


@pytest.mark.parametrize("args, name", [
    (([2, 6], [224], [0.14, 0.05], [1, 0.14]), "size_crops"),
    (([2, 6], [224, 96], [0.14], [1, 0.14]), "min_scale_crops"),
    (([2, 6], [224, 96], [0.14, 0.05], [1]), "max_scale_crops"),
    (([2, 6], [224, 96], [0.14, 0.2], [1, 0.14]), r"min_scale_crops\[1\]"),
    (([2, 6], [224, 96], [0.14, 0.05], [1, 1.2]), r"max_scale_crops\[1\]"),
    (([2, 0], [224, 96], [0.14, 0.05], [1, 0.14]), r"nmb_crops\[1\]"),
    (([2, 6], [224, 0], [0.14, 0.05], [1, 0.14]), r"size_crops\[1\]"),
    (([], [], [], []), "nmb_crops"),
])
def test_crop_groups_from_lists_names_the_bad_argument(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        crop_groups_from_lists(*args)


@pytest.mark.parametrize("kwargs, name", [
    (dict(channels=2), "channels"), (dict(mean=(0.5,)), "mean"), (dict(std=(1.0, 0.0, 1.0)), "std"),
    (dict(grayscale_prob=1.5), "grayscale_prob"), (dict(blur_prob=-0.1), "blur_prob"),
    (dict(color_jitter_strength=-1.0), "color_jitter_strength"),
])
def test_transform_rejects_invalid_options(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MultiCropTransform(GROUPS, **kwargs)


def test_blur_kernel_keeps_the_drawn_sigma() -> None:
    assert [blur_kernel_size(s) for s in (224, 96, 160, 28, 16, 4, 2, 1)] == [13, 13, 13, 13, 13, 7, 3, 1]
    # an impulse blurred by the batched pipeline's blur spreads with the drawn sigma (the original's PIL
    # blur has no cut-off), at every crop size of the recipes, for the largest sigma of SPEC §7
    from swav.color_ops import gaussian_blur_batch
    for size in (224, 96, 32, 16):
        sigma = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)  # (below 1, sampling at integers shrinks any kernel)
        impulse = torch.zeros(3, 1, size, size, dtype=torch.float64)
        impulse[:, :, size // 2, size // 2] = 1.0
        out = gaussian_blur_batch(impulse, sigma, blur_kernel_size(size))[:, 0, size // 2]  # centre row
        x = torch.arange(size, dtype=torch.float64) - size // 2
        spread = ((out * x ** 2).sum(1) / out.sum(1)).sqrt()
        assert torch.all(spread / sigma > 0.98), (size, spread.tolist())


# --- equivalence with torchvision ----------------------------------------------------------------

@pytest.mark.parametrize("height, width", [(375, 500), (20, 20), (10, 1000), (1000, 10)])
def test_crop_box_draws_exactly_like_torchvision(height: int, width: int) -> None:
    image = torch.zeros(1, height, width)
    for seed in range(40):
        torch.manual_seed(seed)
        expected = T1.RandomResizedCrop.get_params(image, [0.14, 1.0], [3 / 4, 4 / 3])
        box = sample_crop_box(height, width, (0.14, 1.0), torch.Generator().manual_seed(seed))
        assert (box.top, box.left, box.height, box.width) == tuple(expected)


def torchvision_pipeline(group: CropGroup, channels: int) -> T.Compose:
    """The SPEC §7 chain written with torchvision v2 transforms (the reference)."""
    ops = [T.RandomResizedCrop(group.size, scale=(group.min_scale, group.max_scale),
                               antialias=True), T.RandomHorizontalFlip(0.5)]
    if channels == 3:
        ops += [T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(0.2)]
    else:
        ops += [T.RandomApply([T.ColorJitter(0.8, 0.8)], p=0.8)]
    ops += [T.RandomApply([T.GaussianBlur(blur_kernel_size(group.size), (0.1, 2.0))], p=0.5),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN if channels == 3 else (0.5,),
                        IMAGENET_STD if channels == 3 else (0.5,))]
    return T.Compose(ops)


@pytest.mark.parametrize("channels", [3, 1])
def test_transform_equals_torchvision_v2_pipeline_bit_for_bit(channels: int) -> None:
    transform = MultiCropTransform(GROUPS, channels=channels)
    references = [torchvision_pipeline(g, channels) for g in GROUPS for _ in range(g.count)]
    image = random_image(channels)
    for seed in range(8):
        torch.manual_seed(seed)
        ours = transform(image)
        torch.manual_seed(seed)
        expected = [ref(image) for ref in references]
        for a, b in zip(ours, expected, strict=True):
            assert torch.equal(a, b)


# --- shapes, image modes ---------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [3, 1])
def test_output_shapes_order_and_dtype(channels: int) -> None:
    crops = MultiCropTransform(GROUPS, channels=channels, seed=0)(random_image(3), index=0)
    assert [tuple(c.shape) for c in crops] == [(channels, 32, 32)] * 2 + [(channels, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)


def test_image_smaller_than_crop_is_upsampled() -> None:
    crops = MultiCropTransform([CropGroup(64, 2, 0.5, 1.0)], seed=1)(random_image(3, 7, 9))
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2


def test_to_uint8_image_converts_every_pil_mode() -> None:
    transparent = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    assert to_uint8_image(transparent, 3)[:, 0, 0].tolist() == [255, 255, 255]  # on white
    half_red = Image.new("RGBA", (4, 3), (255, 0, 0, 128))
    assert to_uint8_image(half_red, 3)[:, 0, 0].tolist() == [255, 127, 127]
    assert to_uint8_image(Image.new("LA", (4, 3), (0, 0)), 1)[0, 0, 0].item() == 255
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert sixteen.mode.startswith("I")
    assert to_uint8_image(sixteen, 1)[0, 0].tolist() == [0, 128, 255]
    assert to_uint8_image(sixteen.convert("I"), 1)[0, 0].tolist() == [0, 128, 255]
    assert to_uint8_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0)), 3)[:, 0, 0].tolist() == [255] * 3
    gray = to_uint8_image(Image.new("L", (2, 2), 77), 3)
    assert gray.shape == (3, 2, 2) and gray.unique().tolist() == [77]
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([200, 100, 50] + [0] * 765)
    assert to_uint8_image(palette, 3)[:, 0, 0].tolist() == [200, 100, 50]
    palette.info["transparency"] = 0
    assert to_uint8_image(palette, 3)[:, 0, 0].tolist() == [255, 255, 255]
    assert to_uint8_image(Image.new("1", (2, 2), 1), 3).unique().tolist() == [255]
    rgb = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    assert to_uint8_image(rgb, 1).item() == 76  # 0.2989 * 255, floored like torchvision
    for mode in ("RGBA", "LA", "P", "CMYK", "YCbCr", "I;16", "1", "F"):
        crops = MultiCropTransform(GROUPS, seed=0)(Image.new(mode, (20, 15)))
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3


def test_to_uint8_image_rejects_other_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_uint8_image(torch.rand(3, 4, 4), 3)
    with pytest.raises(ValueError, match="shape"):
        to_uint8_image(torch.zeros(4, 4, 4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="PIL"):
        to_uint8_image(np.zeros((4, 4, 3), np.uint8), 3)  # type: ignore[arg-type]


def test_gray_defaults_and_given_statistics() -> None:
    image = torch.full((1, 8, 8), 255, dtype=torch.uint8)
    no_aug = dict(color_jitter_strength=0.0, blur_prob=0.0, seed=0)
    crops = MultiCropTransform([CropGroup(4, 1, 0.5, 1.0)], channels=1, **no_aug)(image)
    assert torch.allclose(crops[0], torch.ones(1, 4, 4))  # (1 - 0.5) / 0.5
    crops = MultiCropTransform([CropGroup(4, 1, 0.5, 1.0)], channels=1, mean=FASHION_MNIST_MEAN,
                               std=(0.353,), **no_aug)(image)
    assert torch.allclose(crops[0], torch.full((1, 4, 4), (1 - 0.286) / 0.353))


# --- randomness -------------------------------------------------------------------------------------

def test_seeded_crops_repeat_per_index_and_differ_otherwise() -> None:
    image = random_image()
    first = MultiCropTransform(GROUPS, seed=3)
    again = MultiCropTransform(GROUPS, seed=3)
    same = [torch.equal(a, b) for a, b in zip(first(image, index=5), again(image, index=5))]
    assert all(same)
    crops = first(image, index=6)
    assert not torch.equal(crops[0], again(image, index=5)[0])
    assert not torch.equal(crops[2], crops[3]) and not torch.equal(crops[0], crops[1])
    assert not torch.equal(MultiCropTransform(GROUPS, seed=4)(image, index=5)[0], crops[0])
    first.set_epoch(1)
    assert not torch.equal(first(image, index=6)[0], crops[0])
    unindexed = MultiCropTransform(GROUPS, seed=3)
    assert not torch.equal(unindexed(image)[0], unindexed(image)[0])  # call count moves on


class _SameImage(torch.utils.data.Dataset):
    """Every item is the same image, transformed without an index (the risky case)."""

    def __init__(self, transform: MultiCropTransform) -> None:
        self.transform, self.image = transform, random_image(3, 12, 12)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float]:
        return self.transform(self.image)[0], float(np.random.rand())


@pytest.mark.parametrize("seed", [None, 7])
def test_workers_do_not_share_random_state(seed: int | None) -> None:
    transform = MultiCropTransform([CropGroup(8, 1, 0.1, 0.5)], seed=seed)
    loader = torch.utils.data.DataLoader(_SameImage(transform), batch_size=1, num_workers=2,
                                         worker_init_fn=seed_worker)
    crops, numbers = zip(*loader)  # items 0, 2 from worker 0; items 1, 3 from worker 1
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[2], crops[3])
    assert len(set(float(n) for n in numbers)) == 4


def test_seed_worker_reseeds_everything_per_worker() -> None:
    def draws(worker_id: int) -> tuple[float, float, float]:
        torch.manual_seed(123)
        seed_worker(worker_id)
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    assert draws(0) == draws(0)
    assert all(a != b for a, b in zip(draws(0), draws(1)))


def test_mix_seed_spreads_nearby_inputs() -> None:
    seeds = {mix_seed(31, epoch, 0, index) for epoch in range(3) for index in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**64 for s in seeds)


def test_jitter_factor_range_follows_strength() -> None:
    transform = MultiCropTransform(GROUPS, color_jitter_strength=0.5)
    assert transform.jitter_ranges == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert MultiCropTransform(GROUPS, channels=1).jitter_ranges[2:] == (None, None)
    assert math.isclose(MultiCropTransform(GROUPS).jitter_ranges[0][0], 0.2)

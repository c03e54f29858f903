"""Tests for swav.batch_augment: the batched stage vs a per-sample loop, SPEC §7 statistics, shapes, crops."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from swav import opencv_colour
from swav.batch_augment import (BatchColorAugment, ColorParams, FastMultiCrop, MultiCropCropper,
                                decode_image_source, multicrop_collate)
from swav.multicrop import (IMAGENET_MEAN, IMAGENET_STD, CropGroup, MultiCropTransform,
                            blur_kernel_size)
from tests.train_helpers import DEVICES

GROUPS = [CropGroup(32, 2, 0.14, 1.0), CropGroup(16, 3, 0.05, 0.14)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: thread start-up costs more than it saves on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the whole batched stage against a naive per-sample torchvision loop ----------------------------

def naive_apply(aug: BatchColorAugment, crops: torch.Tensor, p: ColorParams) -> torch.Tensor:
    """The slow obvious version: one sample at a time with torchvision functional ops."""
    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    out = []
    for i in range(len(crops)):
        x = crops[i].float() / 255
        if p.flip[i]:
            x = TF.horizontal_flip(x)
        if p.jitter[i]:
            for j in p.order[i].tolist():
                x = ops[aug.jitter_ops[j]](x, float(p.factors[i, j]))
        if p.grayscale[i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if p.blur[i]:
            k = blur_kernel_size(x.shape[-1])
            x = TF.gaussian_blur(x, [k, k], [float(p.sigma[i])] * 2)
        out.append(TF.normalize(x, list(aug.mean), list(aug.std)))
    return torch.stack(out)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("strategy, chunk_elements", [
    ("masked", None), ("grouped", None), ("grouped", 1), ("grouped", 3000), ("dense", None), ("opencv", None)])
def test_apply_matches_naive_per_sample_loop(channels: int, strategy: str,
                                             chunk_elements: int | None) -> None:
    if strategy == "opencv" and not opencv_colour.available():
        pytest.skip("OpenCV (the opencv extra) is not installed")
    if strategy == "opencv" and channels == 1:
        with pytest.raises(ValueError, match="three channels"):
            BatchColorAugment(channels=1, strategy="opencv")
        return
    aug = BatchColorAugment(channels=channels, seed=1, strategy=strategy,
                            chunk_elements=chunk_elements)
    g = torch.Generator().manual_seed(2)
    crops = torch.randint(0, 256, (40, channels, 20, 20), dtype=torch.uint8, generator=g)
    params = aug.sample_params(len(crops))
    assert params.jitter.any() and not params.jitter.all() and params.blur.any()
    assert torch.allclose(aug.apply(crops, params), naive_apply(aug, crops, params), atol=1e-5)


@pytest.mark.parametrize("channels, strength", [(3, 1.0), (1, 1.0), (3, 0.0)])
def test_dense_strategy_equals_masked_exactly(channels: int, strength: float) -> None:
    """Identity parameters where an op is not drawn leave those samples bit for bit as they are. The blurred
    samples go through the blur's matrix product in batches of another composition (all samples vs the drawn
    ones), which some CPUs' BLAS round differently (by 1-3 ulp on a Zen 4; bit for bit on the AMX machine)."""
    kwargs = {"channels": channels, "color_jitter_strength": strength, "seed": 5}
    masked, dense = BatchColorAugment(strategy="masked", **kwargs), BatchColorAugment(strategy="dense", **kwargs)
    g = torch.Generator().manual_seed(6)
    for size in (20, 9, 100):  # 100: the CPU blur by blocks in both
        crops = torch.randint(0, 256, (48 if size < 100 else 12, channels, size, size), dtype=torch.uint8,
                              generator=g)
        params = masked.sample_params(len(crops))
        got, want = dense.apply(crops, params), masked.apply(crops, params)
        assert params.blur.any() and not params.blur.all()
        assert torch.equal(got[~params.blur], want[~params.blur])
        torch.testing.assert_close(got[params.blur], want[params.blur], rtol=0, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_dense_stage_in_a_background_thread_matches_eager(device: str) -> None:
    """``compile=True`` (what ``run.compile`` uses on a GPU), compiled in the prefetch thread as the engine does."""
    from swav.train_data import prefetched

    batches = [torch.randint(0, 256, (6, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(s))
               .to(device) for s in (16, 16, 8, 8, 8)]

    def made(aug: BatchColorAugment):
        for b in range(3):
            aug.generator = torch.Generator().manual_seed(b)
            yield aug(batches)

    compiler = BatchColorAugment(strategy="dense", compile=True)
    compiled = list(prefetched(made(compiler), depth=1, device=torch.device(device)))
    eager = list(made(BatchColorAugment(strategy="masked")))
    assert len(compiled) == 3
    # compiled for both crop sizes (a compiler failure falls back to the same values, with a warning)
    assert compiler.compile and len(compiler._compiled_shapes) == 2
    for ours, reference in zip(compiled, eager, strict=True):
        for a, b in zip(ours, reference, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="compile=True needs strategy 'auto', 'dense' or 'grouped'"):
        BatchColorAugment(strategy="masked", compile=True)


def test_compiled_hue_on_a_cpu_gives_the_grouped_strategys_values() -> None:
    """``compile=True`` on a CPU: the grouped strategy with its hue rotation compiled (pieces of one sample and
    of several, both crop sizes); the same values as eager, where three passes of the compiled loop and ~40
    eager passes do the same float arithmetic on every element."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 256, (12, 3, s, s), dtype=torch.uint8, generator=g) for s in (24, 24, 12, 12)]
    compiled, eager = BatchColorAugment(compile=True, seed=3), BatchColorAugment(seed=3, strategy="grouped")
    for _ in range(2):
        ours, (reference, params) = compiled(batches), eager(batches, return_params=True)
        assert compiled.compile and compiled._hue_fn is not None  # it compiled, and it ran compiled
        assert any(p.jitter.any() for p in params)
        for a, b in zip(ours, reference, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("when", ["first call", "torch.compile"])
def test_a_colour_stage_that_fails_to_compile_runs_eagerly_with_the_same_values(monkeypatch, caplog, when) -> None:
    """The compiler fails on the first call (inductor), or torch.compile itself refuses (dynamo unsupported)."""
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("backend compiler failed\ndetails")
        if when == "torch.compile":
            raise RuntimeError("backend compiler failed: dynamo is not supported here")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    crops = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for strategy, reference in (("dense", "masked"), ("auto", "grouped")):  # the GPU's and the CPU's compiled stages
        compiled, eager = BatchColorAugment(compile=True, seed=3, strategy=strategy), BatchColorAugment(
            strategy=reference, seed=3)
        params = eager.sample_params(8)
        assert params.jitter.any()
        caplog.clear()
        with caplog.at_level("WARNING", logger="swav.batch_augment"):
            out = compiled.apply(crops, params)
        assert "compiling the colour stage failed (RuntimeError: backend compiler failed" in caplog.text
        assert torch.equal(out, eager.apply(crops, params)) and not compiled.compile


def test_forward_merges_equal_shapes_but_keeps_each_crops_parameters() -> None:
    aug = BatchColorAugment(seed=3)
    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 256, (5, 3, s, s), dtype=torch.uint8, generator=g)
               for s in (20, 20, 12, 12, 12, 20)]
    outputs, params = aug(batches, return_params=True)
    assert [tuple(o.shape) for o in outputs] == [tuple(b.shape) for b in batches]
    for crops, out, p in zip(batches, outputs, params, strict=True):
        assert torch.allclose(out, naive_apply(aug, crops, p), atol=1e-5)
    assert not torch.equal(params[0].sigma, params[1].sigma)


def test_without_colour_ops_output_is_normalised_crop_or_its_mirror() -> None:
    aug = BatchColorAugment(color_jitter_strength=0.0, grayscale_prob=0.0, blur_prob=0.0, seed=0)
    crops = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8)
    (out,), (params,) = aug([crops], return_params=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i in range(len(crops)):
        x = crops[i].float() / 255
        expected = (x.flip(-1) if params.flip[i] else x).sub(mean).div(std)
        assert torch.allclose(out[i], expected, atol=1e-6)
    assert 0 < int(params.flip.sum()) < len(crops)


# --- SPEC §7 statistics ---------------------------------------------------------------------------

def rate_ok(mask: torch.Tensor, p: float) -> bool:
    """Observed rate within 4.5 standard errors of p."""
    n = mask.numel()
    return abs(mask.float().mean().item() - p) < 4.5 * math.sqrt(p * (1 - p) / n)


def test_decision_rates_and_factor_ranges_follow_spec() -> None:
    n = 6000
    p = BatchColorAugment(seed=5).sample_params(n)
    assert rate_ok(p.flip, 0.5) and rate_ok(p.jitter, 0.8)
    assert rate_ok(p.grayscale, 0.2) and rate_ok(p.blur, 0.5)
    for j, (low, high) in enumerate([(0.2, 1.8)] * 3 + [(-0.2, 0.2)]):
        f = p.factors[:, j]
        assert low <= f.min() and f.max() <= high
        assert abs(f.mean() - (low + high) / 2) < 4.5 * (high - low) / math.sqrt(12 * n)
    assert 0.1 <= p.sigma.min() and p.sigma.max() <= 2.0
    assert abs(p.sigma.mean() - 1.05) < 4.5 * 1.9 / math.sqrt(12 * n)
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    for position in range(4):  # every op equally likely at every position
        for op in range(4):
            assert rate_ok(p.order[:, position] == op, 0.25)
    decisions = torch.stack([p.flip, p.jitter, p.grayscale, p.blur], dim=1).float()
    assert (decisions.T.corrcoef() - torch.eye(4)).abs().max() < 0.06  # independent draws


def test_one_channel_has_brightness_and_contrast_only() -> None:
    aug = BatchColorAugment(channels=1, seed=0)
    p = aug.sample_params(3000)
    assert aug.jitter_ops == ("brightness", "contrast") and p.factors.shape == (3000, 2)
    assert not p.grayscale.any() and rate_ok(p.blur, 0.5)


def box_stats(boxes: list, area: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([b.height * b.width / area for b in boxes])
    log_ratio = torch.tensor([math.log(b.width / b.height) for b in boxes])
    return scale, log_ratio


def test_crop_scale_and_aspect_statistics_follow_spec() -> None:
    height, width = 375, 500
    cropper = MultiCropCropper([CropGroup(224, 2, 0.14, 1.0), CropGroup(96, 6, 0.05, 0.14)])
    g = torch.Generator().manual_seed(0)
    boxes = [cropper.sample_boxes(height, width, g) for _ in range(400)]
    big = [b for draw in boxes for b in draw[:2]]
    small = [b for draw in boxes for b in draw[2:]]
    scale, log_ratio = box_stats(small, height * width)  # small crops always fit: U[0.05, 0.14]
    assert 0.049 < scale.min() and scale.max() < 0.141 and abs(scale.mean() - 0.095) < 0.003
    assert log_ratio.abs().max() < math.log(4 / 3) + 0.02 and abs(log_ratio.mean()) < 0.012
    assert scale.min() < 0.055 and scale.max() > 0.135
    scale, log_ratio = box_stats(big, height * width)  # rejection sampling: compare torchvision
    torch.manual_seed(1)
    reference = [T1.RandomResizedCrop.get_params(torch.zeros(1, height, width), [0.14, 1.0],
                                                 [3 / 4, 4 / 3]) for _ in range(800)]
    ref_scale = torch.tensor([h * w / (height * width) for _, _, h, w in reference])
    assert 0.139 < scale.min() and scale.max() <= 1.0
    assert abs(scale.mean() - ref_scale.mean()) < 4.5 * scale.std() * math.sqrt(2 / 800)
    assert log_ratio.abs().max() < math.log(4 / 3) + 0.01


def test_fast_pipeline_matches_reference_transform_in_distribution() -> None:
    """Mean and spread of augmented pixels agree with the per-image torchvision-based transform."""
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    groups = [CropGroup(12, 1, 0.14, 1.0)]
    fast = FastMultiCrop(groups, seed=0)(list(image.expand(600, -1, -1, -1)))[0]
    reference = MultiCropTransform(groups, seed=0)
    slow = torch.stack([reference(image, index=i)[0] for i in range(600)])
    for stat in (lambda t: t.mean(dim=(2, 3)), lambda t: t.std(dim=(2, 3))):
        a, b = stat(fast), stat(slow)  # (600, 3) per-crop statistics
        tolerance = 4.5 * torch.sqrt((a.var(0) + b.var(0)) / 600)
        assert ((a.mean(0) - b.mean(0)).abs() < tolerance).all()


# --- cropper, collate, wiring ------------------------------------------------------------------------

def test_cropper_draws_exactly_like_torchvision_random_resized_crop() -> None:
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    cropper = MultiCropCropper(GROUPS)
    refs = [T.RandomResizedCrop(g.size, scale=(g.min_scale, g.max_scale), antialias=True)
            for g in GROUPS for _ in range(g.count)]
    for seed in range(5):
        torch.manual_seed(seed)
        ours = cropper(image)
        torch.manual_seed(seed)
        assert all(torch.equal(a, ref(image)) for a, ref in zip(ours, refs, strict=True))


def test_cropper_accepts_paths_bytes_and_pil(tmp_path) -> None:
    pil = Image.fromarray(torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8).numpy())
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG")
    (tmp_path / "a.jpg").write_bytes(buffer.getvalue())
    png = io.BytesIO()
    pil.save(png, format="PNG")
    assert torch.equal(decode_image_source(png.getvalue(), 3), TF.pil_to_tensor(pil))
    jpeg = decode_image_source(buffer.getvalue(), 3)
    assert jpeg.shape == (3, 30, 40)
    assert torch.equal(decode_image_source(tmp_path / "a.jpg", 3), jpeg)
    assert decode_image_source(str(tmp_path / "a.jpg"), 1).shape == (1, 30, 40)
    cropper = MultiCropCropper(GROUPS, channels=1, seed=4)
    for source in (tmp_path / "a.jpg", buffer.getvalue(), pil.convert("RGBA"), jpeg):
        crops = cropper(source, index=0)
        assert [tuple(c.shape) for c in crops] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 3
        assert all(c.dtype == torch.uint8 for c in crops)
    again = MultiCropCropper(GROUPS, channels=1, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(cropper(jpeg, index=9), again(jpeg, index=9)))


def test_collate_with_and_without_extras() -> None:
    items = [[torch.full((1, 4, 4), i, dtype=torch.uint8), torch.zeros(1, 2, 2, dtype=torch.uint8)]
             for i in range(3)]
    crops = multicrop_collate(items)
    assert [tuple(c.shape) for c in crops] == [(3, 1, 4, 4), (3, 1, 2, 2)]
    assert crops[0][:, 0, 0, 0].tolist() == [0, 1, 2]
    crops, labels, indices = multicrop_collate([(item, 7, i) for i, item in enumerate(items)])
    assert labels.tolist() == [7, 7, 7] and indices.tolist() == [0, 1, 2] and len(crops) == 2
    with pytest.raises(ValueError, match="crops"):
        multicrop_collate([items[0], items[1][:1]])


@pytest.mark.parametrize("channels, groups", [
    (3, GROUPS),
    (1, [CropGroup(28, 2, 0.3, 1.0), CropGroup(12, 4, 0.1, 0.3)]),
    (3, [CropGroup(24, 1, 0.08, 1.0)]),
])
def test_fast_multicrop_shapes_order_dtype(channels: int, groups: list[CropGroup]) -> None:
    images = [torch.randint(0, 256, (3, 20 + i, 25), dtype=torch.uint8) for i in range(5)]
    views = FastMultiCrop(groups, channels=channels, seed=0)(images)
    expected = [(5, channels, g.size, g.size) for g in groups for _ in range(g.count)]
    assert [tuple(v.shape) for v in views] == expected
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_engine_wiring_through_a_data_loader() -> None:
    fast = FastMultiCrop(GROUPS, seed=0)
    images = [torch.randint(0, 256, (3, 24, 30), dtype=torch.uint8) for _ in range(6)]

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, index: int):
            return fast.cropper(images[index], index=index), index

    loader = torch.utils.data.DataLoader(Images(), batch_size=3, collate_fn=multicrop_collate)
    for crops, indices in loader:
        views = fast.augment(crops)
        assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 3
        assert indices.shape == (3,)


def test_augment_rejects_wrong_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        BatchColorAugment()([torch.rand(2, 3, 8, 8)])
    with pytest.raises(ValueError, match="chunk_elements"):
        BatchColorAugment(chunk_elements=0)
    with pytest.raises(ValueError, match="jitter_prob"):
        BatchColorAugment(jitter_prob=2.0)
    with pytest.raises(ValueError, match="strategy"):
        BatchColorAugment(strategy="fast")


def test_engine_compiles_the_colour_stage_with_run_compile_on_a_gpu_or_with_data_compile_colour() -> None:
    from swav.config import Config, with_values
    from swav.train_data import colour_stage

    compiled = with_values(Config(), {"run.compile": True})
    assert colour_stage(compiled, torch.device("cuda")).compile
    assert not colour_stage(compiled, torch.device("cpu")).compile  # compiling the model does not pay on a CPU
    assert not colour_stage(Config(), torch.device("cuda")).compile
    # data.compile_colour decides when it is set: on a CPU the grouped strategy with a compiled hue
    assert colour_stage(with_values(Config(), {"data.compile_colour": True}), torch.device("cpu")).compile
    assert not colour_stage(with_values(compiled, {"data.compile_colour": False}), torch.device("cuda")).compile


def test_encoded_sources_decode_as_the_data_sets_decode_them(tmp_path):
    import numpy as np
    from swav.images import load_image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # shown rotated: 20 wide, 30 high
    image.save(tmp_path / "r.jpg", quality=95, exif=exif)
    decoded = decode_image_source(tmp_path / "r.jpg", 3)
    expected = TF.pil_to_tensor(load_image(tmp_path / "r.jpg"))
    assert decoded.shape == expected.shape == (3, 30, 20)
    assert (decoded.float() - expected.float()).abs().mean() < 1.0
    keyed = io.BytesIO()
    image.save(keyed, "PNG", transparency=(0, 0, 0))
    assert torch.equal(decode_image_source(keyed.getvalue(), 3), TF.pil_to_tensor(load_image(keyed.getvalue())))


def test_an_undecodable_path_is_named(tmp_path):
    from swav.images import ImageDecodeError
    (tmp_path / "icon.png").write_bytes(b"\0\0\1\0" + bytes(60))  # an ICO header named .png
    with pytest.raises(ImageDecodeError, match="icon.png"):
        decode_image_source(tmp_path / "icon.png", 3)


def test_grouped_strategy_above_the_blur_block_threshold_and_empty_batches() -> None:
    g = torch.Generator().manual_seed(9)
    crops = torch.randint(0, 256, (6, 3, 100, 130), dtype=torch.uint8, generator=g)  # one side blocked, one not
    grouped, masked = BatchColorAugment(seed=2, strategy="grouped", blur_prob=1.0), BatchColorAugment(
        seed=2, strategy="masked", blur_prob=1.0)
    params = grouped.sample_params(len(crops))
    assert torch.allclose(grouped.apply(crops, params), masked.apply(crops, params), atol=1e-5, rtol=0)
    strategies = ("grouped", "masked", "dense") + (("opencv",) if opencv_colour.available() else ())
    if opencv_colour.available():  # non-square crops, crop by crop
        opencv = BatchColorAugment(seed=2, strategy="opencv", blur_prob=1.0)
        assert torch.allclose(opencv.apply(crops, params), masked.apply(crops, params), atol=1e-4, rtol=0)
    for strategy in strategies:
        empty = BatchColorAugment(strategy=strategy).apply(torch.zeros(0, 3, 8, 8, dtype=torch.uint8),
                                                           BatchColorAugment().sample_params(0))
        assert empty.shape == (0, 3, 8, 8) and empty.dtype == torch.float32

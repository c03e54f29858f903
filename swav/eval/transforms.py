"""Train and test transforms of the evaluation protocols (SPEC §11).

Official (ImageNet-sized images): train RandomResizedCrop(224) + horizontal flip, test Resize(256)
+ CenterCrop(224). For small images (a model built with ``small_images=True``, e.g. 28 px
Fashion-MNIST or 32 px CIFAR) resizing would only blur, so the ``"small"`` preset trains on a
random crop of the zero-padded image (the image shifted by up to ``padding`` pixels) + flip and
tests on the image as it is. Normalisation defaults to what pretraining uses
(:func:`swav.multicrop.resolve_normalization`: ImageNet statistics for RGB, 0.5 / 0.5 for grey).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from swav.multicrop import resolve_normalization

__all__ = ["PRESETS", "PadRandomCrop", "eval_sizes", "eval_transforms", "pretraining_bit_depth", "pretraining_config",
           "pretraining_normalization", "transforms_for_checkpoint", "transforms_for_spec"]

logger = logging.getLogger(__name__)

PRESETS = ("imagenet", "small")

Transform = Callable[[Any], torch.Tensor]


class PadRandomCrop(torch.nn.Module):
    """Zero-pad by ``padding`` pixels, then crop back to the input's size at a random position.

    Like ``RandomCrop(size, padding)`` without having to know the image size in advance.

    Example:
        >>> from PIL import Image
        >>> PadRandomCrop(4)(Image.new("L", (28, 28))).size
        (28, 28)
    """

    def __init__(self, padding: int = 4):
        super().__init__()
        if padding < 0:
            raise ValueError(f"padding: must be >= 0, got {padding}")
        self.padding = padding

    def forward(self, image: Any) -> Any:
        height, width = v2.functional.get_size(image)
        return v2.RandomCrop((height, width), padding=self.padding)(image)


class _ToChannels(torch.nn.Module):
    """Convert a PIL image to ``L`` (1 channel) or ``RGB`` (3) so that it matches the model."""

    def __init__(self, channels: int):
        super().__init__()
        self.mode = "L" if channels == 1 else "RGB"

    def forward(self, image: Any) -> Any:
        if hasattr(image, "convert") and image.mode != self.mode:
            return image.convert(self.mode)
        return image


def eval_transforms(
    *,
    preset: str = "imagenet",
    channels: int = 3,
    crop_size: int = 224,
    resize_size: int = 256,
    padding: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    small_size: int | None = None,
) -> tuple[Transform, Transform]:
    """``(train_transform, test_transform)`` mapping a PIL image to a normalised float tensor.

    ``preset="imagenet"``: RandomResizedCrop(``crop_size``) + flip / Resize(``resize_size``) +
    CenterCrop(``crop_size``); scale both sizes for other resolutions (e.g. 96 / 110 for STL-10).
    ``preset="small"``: :class:`PadRandomCrop` (``padding``) + flip / identity; with ``small_size``, images are
    first resized and centre-cropped to it (a folder of mixed sizes; images of that size are unchanged).

    Example:
        >>> from PIL import Image
        >>> train, test = eval_transforms(preset="small", channels=1)
        >>> train(Image.new("L", (28, 28))).shape, test(Image.new("RGB", (28, 28))).shape
        (torch.Size([1, 28, 28]), torch.Size([1, 28, 28]))
    """
    mean, std = resolve_normalization(channels, mean, std)
    if preset == "imagenet":
        if not 0 < crop_size <= resize_size:
            raise ValueError(f"crop_size/resize_size: need 0 < crop_size <= resize_size, got {crop_size}/{resize_size}")
        train_geometry = [v2.RandomResizedCrop(crop_size, antialias=True), v2.RandomHorizontalFlip()]
        test_geometry = [v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)]
    elif preset == "small":
        fit = [] if small_size is None else [v2.Resize(small_size, antialias=True), v2.CenterCrop(small_size)]
        train_geometry = fit + [PadRandomCrop(padding), v2.RandomHorizontalFlip()]
        test_geometry = fit
    else:
        raise ValueError(f"preset: must be one of {PRESETS}, got {preset!r}")
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    head = [_ToChannels(channels)]
    return v2.Compose(head + train_geometry + tail), v2.Compose(head + test_geometry + tail)


def transforms_for_spec(
    spec: Any,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_size: int = 224,
    resize_size: int = 256,
    padding: int = 4,
    small_size: int | None = None,
) -> tuple[Transform, Transform]:
    """Pick :func:`eval_transforms` for a :class:`swav.model.ModelSpec` (or anything with
    ``small_images`` and ``in_channels``): ``small_images`` -> ``"small"`` preset (no resizing, or to
    ``small_size``), ``in_channels`` -> grey or RGB conversion and normalisation.

    Example:
        >>> from swav.model import ModelSpec
        >>> train, test = transforms_for_spec(ModelSpec("resnet18", small_images=True, in_channels=1))
        >>> [type(t).__name__ for t in test.transforms][:2]
        ['_ToChannels', 'ToImage']
    """
    preset = "small" if spec.small_images else "imagenet"
    return eval_transforms(
        preset=preset,
        channels=spec.in_channels,
        crop_size=crop_size,
        resize_size=resize_size,
        padding=padding,
        mean=mean,
        std=std,
        small_size=small_size,
    )


def pretraining_bit_depth(checkpoint: str | os.PathLike, given: int | None = None) -> int | None:
    """``given`` if not None (a ``--bit-depth``), else the pretraining's ``data.bit_depth`` stored in the checkpoint
    (16-bit image files are read as the model was trained on them), else None (full 16-bit)."""
    if given is not None:
        return given
    value = ((pretraining_config(checkpoint) or {}).get("data") or {}).get("bit_depth")
    return value if isinstance(value, int) and not isinstance(value, bool) and 8 <= value <= 16 else None


def pretraining_max_bad_fraction(checkpoint: str | os.PathLike, given: float | None = None) -> float:
    """``given`` if not None (a ``--max-bad-fraction``), else the pretraining's ``data.max_bad_fraction`` stored in
    the checkpoint, else 0.01: the share of unreadable image files above which reading a folder stops."""
    if given is not None:
        return given
    value = ((pretraining_config(checkpoint) or {}).get("data") or {}).get("max_bad_fraction")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1 \
        else 0.01


def pretraining_config(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The training config stored in our checkpoints (a nested dict), else None (official and safetensors
    files carry none). Memory-mapped: only the small config is actually read."""
    import pickle

    from swav.pretrained import resolve_pretrained
    from swav.safe_load import is_safetensors_file

    path = resolve_pretrained(checkpoint)
    if is_safetensors_file(path):  # our exports carry it in the metadata
        import json

        from swav.pretrained import CONFIG_METADATA_KEY
        from swav.safe_load import read_safetensors_metadata

        try:
            config = json.loads(read_safetensors_metadata(path).get(CONFIG_METADATA_KEY) or "null")
        except (ValueError, OSError):
            return None
        return config if isinstance(config, dict) else None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as error:
        logger.debug("no training config readable from %s (%s)", path, error)
        return None
    config = obj.get("config") if isinstance(obj, dict) else None
    return config if isinstance(config, dict) else None


def pretraining_normalization(checkpoint: str | os.PathLike) -> tuple[list[float] | None, list[float] | None]:
    """``data.mean`` / ``data.std`` of the training config stored in our checkpoints, else None.

    Evaluation must normalise like pretraining did; official and safetensors files carry no
    config, and then the defaults apply (ImageNet statistics for RGB, 0.5 / 0.5 for grey).

    Example:
        >>> import tempfile, torch
        >>> f = tempfile.mkdtemp() + "/model.pt"
        >>> torch.save({"model": {}, "config": {"data": {"mean": [0.3], "std": [0.4]}}}, f)
        >>> pretraining_normalization(f)
        ([0.3], [0.4])
    """
    return _normalization_of(pretraining_config(checkpoint))


def _normalization_of(config: dict[str, Any] | None) -> tuple[list[float] | None, list[float] | None]:
    data = config.get("data") if isinstance(config, dict) else None
    data = data if isinstance(data, dict) else {}
    mean, std = data.get("mean"), data.get("std")
    if mean is not None or std is not None:
        logger.info("normalising with the pretraining config's mean %s std %s", mean, std)
    return mean, std


def eval_sizes(large_crop: int | None) -> tuple[int, int]:
    """``(crop_size, resize_size)`` of the test transform for a model pretrained with large crops of
    ``large_crop`` pixels: crops of 224 px and more follow the ImageNet protocol (resize to 8/7 of the crop,
    then centre-crop); smaller crops (28 px Fashion-MNIST, 32 px CIFAR, 96 px STL-10) mean small images, which
    are evaluated whole at that size, as pretraining saw them (blowing 28 px images up to 224 px is slower and
    less accurate). Unknown (official and safetensors files): 224 / 256.

    Example:
        >>> eval_sizes(224), eval_sizes(28), eval_sizes(None)
        ((224, 256), (28, 28), (224, 256))
    """
    crop = int(large_crop) if large_crop else 224
    return crop, (round(crop * 8 / 7) if crop >= 224 else crop)


def transforms_for_checkpoint(
    checkpoint: str | os.PathLike,
    spec: Any,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_size: int | None = None,
    resize_size: int | None = None,
) -> tuple[Transform, Transform]:
    """:func:`transforms_for_spec` with what the checkpoint's training config says: its normalisation
    (unless ``mean``/``std`` are given) and its large-crop size (:func:`eval_sizes`, unless ``crop_size`` /
    ``resize_size`` are given). The choice is logged."""
    config = pretraining_config(checkpoint)
    if mean is None or std is None:  # each one not given comes from the checkpoint's config
        stored_mean, stored_std = _normalization_of(config)
        mean = stored_mean if mean is None else mean
        std = stored_std if std is None else std
    crops = config.get("crops") if isinstance(config, dict) else None
    sizes = crops.get("sizes") if isinstance(crops, dict) else None
    default_crop, _ = eval_sizes(max(sizes) if isinstance(sizes, list) and sizes else None)
    crop = crop_size or default_crop
    resize = resize_size or eval_sizes(crop)[1]
    if not spec.small_images:
        logger.info("evaluation images: resize to %d, centre crop %d%s", resize, crop,
                    " (the pretraining's large-crop size)" if crop_size is None and sizes else "")
        return transforms_for_spec(spec, mean=mean, std=std, crop_size=crop, resize_size=resize)
    # small images (Fashion-MNIST, CIFAR): taken whole at the pretraining's crop size; images of another size
    # (a folder of photos) are resized and centre-cropped to it, so that they can be batched
    small = crop_size or (crop if sizes else None)
    return transforms_for_spec(spec, mean=mean, std=std, small_size=small)

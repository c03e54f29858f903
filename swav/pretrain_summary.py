"""What pretraining learned, in one table: k-NN accuracy of the features vs two baselines (issue 3).

After the default job (Fashion-MNIST on a CPU), the trained backbone's pooled features are compared
on the test split with weighted k-NN (k = 20, T = 0.07, SPEC §11) against the raw pixels and an
untrained network of the same architecture. A pretrained network that does not beat both learned
nothing useful. Works for data sets held in memory (IDX, CIFAR); images are normalised as in training
and resized to the large-crop size when that differs from the native size.

Example::

    summary = knn_summary(model, config, test_limit=1000)
    print(format_summary(summary))
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from swav.config import Config
from swav.model import SwAVModel, build_model
from swav.multicrop import resolve_normalization
from swav.train_data import in_memory_images

__all__ = ["knn_summary", "format_summary", "KnnMonitor", "check_summary_data"]

logger = logging.getLogger(__name__)


def _split_images(config: Config, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    from swav.datasets import build_dataset

    dataset = build_dataset(config.data.path, split=split, channels=config.data.channels,  # type: ignore[arg-type]
                            download=config.data.download)
    images = in_memory_images(dataset, config.data.channels)
    targets = getattr(dataset, "targets", None)
    if images is None or targets is None:
        raise ValueError(f"the k-NN accuracy of `swav pretrain` (its summary, and run.knn_every_epochs) needs a labelled "
                         f"data set held in memory (Fashion-MNIST, MNIST, CIFAR); {config.data.path!r} is not one: "
                         "pass --no-summary and leave run.knn_every_epochs at 0, and evaluate with "
                         "`swav eval-knn --checkpoint MODEL --train-data DIR --val-data DIR`")
    labels = torch.as_tensor(targets, dtype=torch.long)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def check_summary_data(config: Config) -> None:
    """Raise the error :func:`knn_summary` would raise at the end of a run if ``config``'s data has no labelled
    train and test splits held in memory (one image of each is read)."""
    for split in ("train", "test"):
        _split_images(config, split, 1)


def _normalised(images: torch.Tensor, config: Config) -> torch.Tensor:
    mean, std = resolve_normalization(config.data.channels, config.data.mean, config.data.std)
    x = images.float().div_(255.0)
    size = config.crops.sizes[0]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _features(model: SwAVModel, x: torch.Tensor, labels: torch.Tensor, device: torch.device,
              amp_dtype: torch.dtype | None, batch_size: int) -> torch.Tensor:
    from swav.features import extract_features

    loader = DataLoader(TensorDataset(x, labels), batch_size=batch_size)
    feats, _ = extract_features(model.backbone.to(device), loader, device=device, amp_dtype=amp_dtype,
                                progress=False)
    return feats


def knn_summary(model: SwAVModel, config: Config, *, device: str | torch.device = "cpu",
                amp_dtype: torch.dtype | None = None, k: int = 20, temperature: float = 0.07,
                train_limit: int | None = None, test_limit: int = 0, batch_size: int = 512) -> dict[str, Any]:
    """k-NN top-1 (%) on the test split for the trained features, raw pixels and an untrained network.

    The training bank is the train split (its first ``train_limit`` images; default ``data.limit``
    or all); ``test_limit`` caps the test split (0 = all).
    """
    from swav.eval.knn import knn_accuracy

    device = torch.device(device)
    train_limit = config.data.limit if train_limit is None else train_limit
    train_x, train_y = _split_images(config, "train", train_limit)
    test_x, test_y = _split_images(config, "test", test_limit)
    train_x, test_x = _normalised(train_x, config), _normalised(test_x, config)
    results: dict[str, float] = {}
    results["raw_pixels"] = knn_accuracy(train_x.flatten(1), train_y, test_x.flatten(1), test_y, k=k,
                                         temperature=temperature)["top1"]
    untrained = None
    if model.spec is not None:
        with torch.random.fork_rng():
            torch.manual_seed(config.run.seed)  # the very initialisation this run started from
            untrained = build_model(model.spec)
    for name, net in (("swav", model), ("untrained", untrained)):
        if net is None:
            continue
        feats = [_features(net, x, y, device, amp_dtype, batch_size) for x, y in ((train_x, train_y), (test_x, test_y))]
        results[name] = knn_accuracy(feats[0], train_y, feats[1], test_y, k=k, temperature=temperature)["top1"]
        logger.info("k-NN top-1 of %s features: %.2f%%", name, results[name])
    return {"metric": f"k-NN top-1 accuracy (%), k={k}, T={temperature}, cosine", "k": k,
            "temperature": temperature, "train_samples": int(train_x.shape[0]), "test_samples": int(test_x.shape[0]),
            "data": config.data.path, "knn_top1": results}


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable table of :func:`knn_summary`'s result."""
    r = summary["knn_top1"]
    rows = [("SwAV features (this run)", r.get("swav")), ("untrained network, same architecture", r.get("untrained")),
            ("raw pixels", r.get("raw_pixels"))]
    lines = [f"What was learned ({summary['metric']}; {summary['train_samples']} train / "
             f"{summary['test_samples']} test images of {summary['data']}):"]
    lines += [f"  {name:<38} {value:6.2f}%" for name, value in rows if value is not None]
    if r.get("swav") is not None and r.get("untrained") is not None:
        lines.append(f"  gain over the untrained network: {r['swav'] - r['untrained']:+.2f} points, "
                     f"over raw pixels: {r['swav'] - r['raw_pixels']:+.2f} points")
    return "\n".join(lines)


class KnnMonitor:
    """Online k-NN accuracy during pretraining (``run.knn_every_epochs``), on rank 0 only.

    The labelled images (first ``run.knn_train_samples`` training and ``run.knn_test_samples`` test
    images of an in-memory data set) are loaded and normalised once; each call extracts the current
    backbone's features in eval mode (the train mode is restored) and returns the k-NN top-1 (%).
    """

    def __init__(self, config: Config, *, device: torch.device, amp_dtype: torch.dtype | None = None,
                 k: int = 20, temperature: float = 0.07) -> None:
        run = config.run
        self.train_x, self.train_y = _split_images(config, "train", run.knn_train_samples)
        self.test_x, self.test_y = _split_images(config, "test", run.knn_test_samples)
        self.train_x, self.test_x = _normalised(self.train_x, config), _normalised(self.test_x, config)
        self.device, self.amp_dtype, self.k, self.temperature = device, amp_dtype, k, temperature

    def __call__(self, model: SwAVModel, batch_size: int = 512) -> float:
        from swav.eval.knn import knn_accuracy

        train = _features(model, self.train_x, self.train_y, self.device, self.amp_dtype, batch_size)
        test = _features(model, self.test_x, self.test_y, self.device, self.amp_dtype, batch_size)
        return knn_accuracy(train, self.train_y, test, self.test_y, k=self.k, temperature=self.temperature)["top1"]


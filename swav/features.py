"""Batched feature extraction for the evaluation protocols (SPEC §11).

k-NN and the fast linear probe work on a frozen backbone's pooled features, computed once for a
whole data set. This module runs a model (or any callable) over a data loader in eval mode, without
gradients, optionally under autocast, and collects float32 features and int64 labels on the CPU.
Legend: N samples, C feature dim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

__all__ = ["extract_features", "split_batch"]

logger = logging.getLogger(__name__)


def split_batch(batch: object) -> tuple[Tensor, Tensor]:
    """Return ``(images, labels)`` from a loader batch ``(images, labels, *extra)``.

    Data sets in this library yield ``(image, label)`` pairs; extra items (paths, indices) are
    ignored so that loaders returning more still work.

    Example:
        >>> x, y = split_batch((torch.zeros(2, 3), torch.tensor([0, 1]), ["a", "b"]))
        >>> x.shape, y.tolist()
        (torch.Size([2, 3]), [0, 1])
    """
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        raise TypeError(
            f"batch: expected a (images, labels, ...) list or tuple from the loader, got "
            f"{type(batch).__name__}; wrap unlabelled data so that it yields labels too"
        )
    if not isinstance(images, Tensor):
        raise TypeError(f"batch[0]: expected an image tensor, got {type(images).__name__}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"batch[1]: expected one label per image, shape ({images.shape[0]},), got {tuple(labels.shape)}"
        )
    return images, labels


def extract_features(
    model_or_fn: nn.Module | Callable[[Tensor], Tensor],
    loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    normalize: bool = False,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run ``model_or_fn`` over ``loader`` and return ``(features (N, C) float32, labels (N,) int64)``.

    A module is put in eval mode (BatchNorm uses its running statistics, SPEC §11) and restored
    to its previous mode afterwards; gradients are off. ``amp_dtype`` (e.g. ``torch.bfloat16``)
    enables autocast on ``device``; features are returned in float32 on the CPU either way.
    ``normalize`` L2-normalises every feature row (what k-NN uses). The progress bar counts
    images, so its rate is images per second.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(10, 3, 8, 8), torch.arange(10) % 2)
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
        >>> feats, labels = extract_features(net, DataLoader(data, batch_size=4), progress=False)
        >>> feats.shape, labels.dtype
        (torch.Size([10, 4]), torch.int64)
    """
    device = torch.device(device)
    was_training = model_or_fn.training if isinstance(model_or_fn, nn.Module) else None
    if isinstance(model_or_fn, nn.Module):
        model_or_fn.eval()
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    total = _dataset_length(loader)
    features: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        from swav.metrics import progress_bar

        bar = progress_bar(total=total, unit="img", desc="features", enabled=progress)
        with bar, torch.no_grad(), autocast:
            for batch in loader:
                images, batch_labels = split_batch(batch)
                out = model_or_fn(images.to(device, non_blocking=True))
                if not isinstance(out, Tensor) or out.dim() != 2:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(f"model_or_fn: expected (B, C) pooled features, got {shape}")
                out = out.float()
                if normalize:
                    out = nn.functional.normalize(out, dim=1)
                features.append(out.cpu())
                labels.append(batch_labels.to(torch.int64).cpu())
                bar.update(images.shape[0])
    finally:
        if was_training:
            model_or_fn.train()
    if not features:
        raise ValueError("loader: yielded no batches; the data set is empty")
    feats = torch.cat(features)
    logger.info("extracted %d features of dim %d", feats.shape[0], feats.shape[1])
    return feats, torch.cat(labels)


def _dataset_length(loader: Iterable) -> int | None:
    """Number of samples behind ``loader`` when it is known (for the progress bar's total)."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None

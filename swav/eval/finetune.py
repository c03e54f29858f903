"""Semi-supervised fine-tuning of the whole network on a labelled subset (SPEC §11).

The official protocol trains backbone and a new linear head together on 1% or 10% of the ImageNet
labels: SGD (momentum 0.9) without weight decay, batch 256, 20 epochs, learning rate decayed x0.2
at epochs 12 and 16, with a small trunk rate and a large head rate (0.02 / 5 for 1%, 0.01 / 0.2
for 10%). The backbone trains in train mode (its BatchNorm statistics update). When the number of
epochs differs from 20, the milestones are scaled proportionally (see :func:`scaled_milestones`).
Legend: B batch, C feature dim, K classes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from swav.eval.accuracy import accuracy_over_batches
from swav.eval.epochs import ClassifierResult, multistep_epoch_factor, run_epochs
from swav.eval.linear import LinearClassifier
from swav.features import split_batch

__all__ = ["FinetuneClassifier", "default_learning_rates", "finetune", "scaled_milestones"]

logger = logging.getLogger(__name__)

OFFICIAL_EPOCHS = 20
OFFICIAL_MILESTONES = (12, 16)


class FinetuneClassifier(nn.Module):
    """Backbone (images -> (B, C)) followed by a new ``Linear(C, K)`` head (init N(0, 0.01)).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
        >>> FinetuneClassifier(net, 8, 3)(torch.randn(2, 3, 2, 2)).shape
        torch.Size([2, 3])
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head = LinearClassifier(feature_dim, num_classes, torch.Generator().manual_seed(seed))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))


def default_learning_rates(label_fraction: float) -> tuple[float, float]:
    """Official ``(trunk_lr, head_lr)``: 0.02 / 5 for 1% labels, 0.01 / 0.2 for 10%.

    Other fractions take the recipe of the nearer one on a log scale (at most ~3.2%: the 1%
    recipe; above: the 10% recipe).

    Example:
        >>> default_learning_rates(0.01), default_learning_rates(0.1), default_learning_rates(0.5)
        ((0.02, 5.0), (0.01, 0.2), (0.01, 0.2))
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction: must be in (0, 1], got {label_fraction}")
    return (0.02, 5.0) if label_fraction <= 0.01 * 10**0.5 else (0.01, 0.2)


def scaled_milestones(epochs: int, milestones: Sequence[int] = OFFICIAL_MILESTONES) -> tuple[int, ...]:
    """Decay epochs for a run of ``epochs``: the official (12, 16) of 20 scaled and rounded.

    Only decays that happen are kept: each milestone lies between epoch 1 and the last epoch, and two that
    round to the same epoch count once (a 3-epoch run decays once, at epoch 2, not twice there; a 1-epoch
    run keeps its learning rate).

    Example:
        >>> scaled_milestones(20), scaled_milestones(10), scaled_milestones(40)
        ((12, 16), (6, 8), (24, 32))
        >>> scaled_milestones(1), scaled_milestones(2), scaled_milestones(3), scaled_milestones(4)
        ((), (1,), (2,), (2, 3))
    """
    if epochs < 1:
        raise ValueError(f"epochs: must be >= 1, got {epochs}")
    scaled = (min(epochs - 1, max(1, round(m * epochs / OFFICIAL_EPOCHS))) for m in milestones)
    return tuple(sorted({m for m in scaled if 1 <= m < epochs}))


def finetune(
    classifier: FinetuneClassifier,
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    epochs: int = OFFICIAL_EPOCHS,
    trunk_lr: float = 0.02,
    head_lr: float = 5.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.2,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> ClassifierResult:
    """Fine-tune ``classifier`` (backbone and head, in place) and report test top-1/top-5.

    ``train_loader`` yields the labelled subset with training augmentation (official:
    RandomResizedCrop(224) + flip, batch 256), ``test_loader`` the test set. ``milestones``
    default to :func:`scaled_milestones` of ``epochs``. The classifier is moved to ``device``
    and left in eval mode. ``amp_dtype`` enables autocast (float16 uses a gradient scaler).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
        >>> data = DataLoader(TensorDataset(torch.randn(16, 3, 2, 2), torch.arange(16) % 2), batch_size=8)
        >>> r = finetune(FinetuneClassifier(net, 8, 2), data, data, epochs=2, progress=False)
        >>> [h["epoch"] for h in r.history]
        [1, 2]
    """
    device = torch.device(device)
    milestones = tuple(milestones) if milestones is not None else scaled_milestones(epochs)
    late = [m for m in milestones if not 1 <= m < epochs]
    if late:
        raise ValueError(f"milestones {late}: must lie in 1..{epochs - 1} for epochs={epochs} (epochs count from 0, "
                         "and a decay at or after the last one never happens)")
    classifier.to(device)
    head_params = list(classifier.head.parameters())
    head_ids = {id(p) for p in head_params}
    trunk_params = [p for p in classifier.parameters() if id(p) not in head_ids]
    for p in classifier.parameters():
        p.requires_grad_(True)
    # head first: the logged "lr" of an epoch is the head's
    optimizer = torch.optim.SGD(
        [{"params": head_params, "lr": head_lr}, {"params": trunk_params, "lr": trunk_lr}],
        lr=head_lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    logger.info(
        "fine-tuning %d epochs: trunk lr %g, head lr %g, x%g at epochs %s", epochs, trunk_lr, head_lr, gamma, milestones
    )

    def train_epoch(epoch: int) -> float:
        classifier.train()
        total, count = torch.zeros((), device=device), 0
        for batch in train_loader:
            images, labels = split_batch(batch)
            labels = labels.to(device, torch.int64, non_blocking=True)
            with autocast():
                logits = classifier(images.to(device, non_blocking=True))
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach() * labels.shape[0]
            count += labels.shape[0]
        return float(total) / max(count, 1)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        classifier.eval()
        with autocast():
            batches = (
                (classifier(x.to(device, non_blocking=True)), y.to(device, torch.int64))
                for x, y in map(split_batch, test_loader)
            )
            return accuracy_over_batches(batches)

    result = run_epochs(
        optimizer,
        epochs=epochs,
        lr_factor=lambda e: multistep_epoch_factor(e, milestones, gamma),
        train_epoch=train_epoch,
        evaluate=evaluate,
        progress=progress,
        desc="fine-tune",
    )
    classifier.eval()
    return result

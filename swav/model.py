"""The SwAV network: backbone f, projection head g, prototypes C (SPEC §2).

Legend: V crops, B images, C backbone feature dim, D embedding dim, K prototypes.
Crops of equal resolution are concatenated and sent through the backbone in one pass (one pass
per run of equal-size crops), then the head runs once on all crops, as in the original.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from swav.head import ProjectionHead
from swav.prototypes import Prototypes

__all__ = ["ModelSpec", "SwAVModel", "SwAVOutput", "build_model"]


class SwAVOutput(NamedTuple):
    embeddings: torch.Tensor  # (V*B) x D, unit norm, crop-major
    scores: list[torch.Tensor]  # one (V*B) x K_h tensor per prototype head


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    backbone: str = "resnet50"
    small_images: bool = False
    in_channels: int = 3
    hidden_dim: int = 2048
    output_dim: int = 128
    num_prototypes: tuple[int, ...] = field(default=(3000,))
    head_batch_norm: bool = True

    def __post_init__(self) -> None:
        sizes = self.num_prototypes
        sizes = (sizes,) if isinstance(sizes, int) else tuple(int(k) for k in sizes)
        object.__setattr__(self, "num_prototypes", sizes)
        if not sizes or any(k < 1 for k in sizes):
            raise ValueError(f"num_prototypes must be >= 1 (a list for several heads), got {self.num_prototypes}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.output_dim < 1 or self.hidden_dim < 0:
            raise ValueError(f"output_dim must be >= 1 and hidden_dim >= 0, got {self.output_dim}, {self.hidden_dim}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_prototypes"] = list(self.num_prototypes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model spec keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


def _resolution_runs(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) index runs of consecutive crops with the same spatial size."""
    runs, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            runs.append((start, i))
            start = i
    return runs


class SwAVModel(nn.Module):
    """Backbone + projection head + prototypes.

    Example:
        >>> import torch, torch.nn as nn
        >>> backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> model = SwAVModel(backbone, feature_dim=8, hidden_dim=16, output_dim=4, num_prototypes=10)
        >>> out = model([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)])
        >>> out.embeddings.shape, out.scores[0].shape
        (torch.Size([6, 4]), torch.Size([6, 10]))
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        num_prototypes: int | Sequence[int] = 3000,
        head_batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projection_head = ProjectionHead(feature_dim, hidden_dim, output_dim, head_batch_norm)
        self.prototypes = Prototypes(output_dim, num_prototypes)
        self.spec: ModelSpec | None = None

    @property
    def num_prototypes(self) -> tuple[int, ...]:
        return self.prototypes.sizes

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, ``B x C`` (what evaluation uses)."""
        return self.backbone(images)

    def forward_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projections, ``B x D``."""
        return F.normalize(self.projection_head(self.backbone(images)), dim=1, p=2)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.normalize_()

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> SwAVOutput:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = [
            self.backbone(torch.cat(list(crops[start:end])) if end - start > 1 else crops[start])
            for start, end in _resolution_runs(crops)
        ]
        features_NC = torch.cat(features) if len(features) > 1 else features[0]
        projected = self.projection_head(features_NC)
        # the embeddings and their prototype scores in float32 even under autocast: Sinkhorn's exp(score / eps)
        # turns bf16's rounding of a score near 1 (2^-8) into an 8% change of a code at eps 0.05
        with torch.autocast(projected.device.type, enabled=False):
            z_ND = F.normalize(projected.float(), dim=1, p=2)
            return SwAVOutput(z_ND, self.prototypes(z_ND))


def build_model(spec: ModelSpec) -> SwAVModel:
    """Build a freshly initialised model from its spec (the backbone from the registry)."""
    from swav.backbones import build_backbone

    backbone, feature_dim = build_backbone(spec.backbone, small_images=spec.small_images, in_channels=spec.in_channels)
    model = SwAVModel(backbone, feature_dim, spec.hidden_dim, spec.output_dim, spec.num_prototypes, spec.head_batch_norm)
    model.spec = spec
    return model

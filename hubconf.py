"""torch.hub entry points: ``torch.hub.load("/path/to/swav", "swav_resnet50", source="local", ...)``.

Nothing is downloaded: ``pretrained_path`` is a file path or a name found under ``$SWAV_HOME`` /
``~/.cache/swav`` (see :func:`swav.pretrained.resolve_pretrained`). Unlike the original release's
hub loader, which leaves a random ``fc`` and drops head and prototypes silently (SPEC §10), the
backbone entry points return ``fc = Identity`` (pooled features) and load strictly.

Example::

    backbone = torch.hub.load(".", "swav_resnet50", source="local", pretrained_path="swav_800ep")
    model = torch.hub.load(".", "swav_model", source="local", pretrained_path="run/checkpoint.pt")
"""
from __future__ import annotations

dependencies = ["torch", "torchvision"]

import torch.nn as _nn

from swav.export import to_torchvision_resnet as _to_torchvision_resnet
from swav.model import ModelSpec as _ModelSpec
from swav.model import SwAVModel as _SwAVModel
from swav.model import build_model as _build_model
from swav.pretrained import load_pretrained as _load_pretrained

# the original hub names and the released file each one stood for
_RELEASE_FOR = {
    "resnet50": "swav_800ep",
    "resnet50w2": "swav_RN50w2_400ep",
    "resnet50w4": "swav_RN50w4_400ep",
    "resnet50w5": "swav_RN50w5_400ep",
}


def swav_model(pretrained_path: str | None = None, *, strict: bool = True, map_location: str = "cpu", **spec_kwargs) -> _SwAVModel:
    """The whole SwAV model (backbone, head, prototypes); fresh from ``ModelSpec(**spec_kwargs)`` without a path."""
    spec = _ModelSpec(**spec_kwargs) if spec_kwargs else None
    if pretrained_path is None:
        return _build_model(spec or _ModelSpec())
    return _load_pretrained(pretrained_path, strict=strict, spec=spec, map_location=map_location)


def _backbone(arch: str, pretrained_path: str | None, full_model: bool, strict: bool, map_location: str,
              spec_kwargs: dict) -> _nn.Module:
    if pretrained_path is None:
        model = _build_model(_ModelSpec(backbone=arch, **spec_kwargs))
    else:
        spec = _ModelSpec(backbone=arch, **spec_kwargs) if spec_kwargs else None
        model = _load_pretrained(pretrained_path, strict=strict, spec=spec, map_location=map_location)
    if model.spec.backbone != arch:
        entry = f"swav_{model.spec.backbone}"
        hint = f"the {entry} entry point or swav_model" if entry in globals() else "the swav_model entry point"
        raise ValueError(f"{pretrained_path!r} holds a {model.spec.backbone} model, not {arch}; use {hint}")
    if full_model:
        return model
    return _to_torchvision_resnet(model).eval() if arch == "resnet50" else model.backbone


def swav_resnet50(pretrained_path: str | None = None, *, full_model: bool = False, strict: bool = True,
                  map_location: str = "cpu", **spec_kwargs) -> _nn.Module:
    """ResNet-50 trunk as a torchvision ``ResNet`` with ``fc = Identity`` ((B, 2048) features), or the full model."""
    return _backbone("resnet50", pretrained_path, full_model, strict, map_location, spec_kwargs)


def swav_resnet50w2(pretrained_path: str | None = None, *, full_model: bool = False, strict: bool = True,
                    map_location: str = "cpu", **spec_kwargs) -> _nn.Module:
    """Wide RN50-w2 trunk ((B, 4096) features; no torchvision equivalent), or the full model."""
    return _backbone("resnet50w2", pretrained_path, full_model, strict, map_location, spec_kwargs)


def swav_resnet50w4(pretrained_path: str | None = None, *, full_model: bool = False, strict: bool = True,
                    map_location: str = "cpu", **spec_kwargs) -> _nn.Module:
    """Wide RN50-w4 trunk ((B, 8192) features), or the full model."""
    return _backbone("resnet50w4", pretrained_path, full_model, strict, map_location, spec_kwargs)


def swav_resnet50w5(pretrained_path: str | None = None, *, full_model: bool = False, strict: bool = True,
                    map_location: str = "cpu", **spec_kwargs) -> _nn.Module:
    """Wide RN50-w5 trunk ((B, 10240) features), or the full model."""
    return _backbone("resnet50w5", pretrained_path, full_model, strict, map_location, spec_kwargs)


def _official_alias(arch: str, pretrained: bool, kwargs: dict) -> _nn.Module:
    path = kwargs.pop("pretrained_path", None) or (_RELEASE_FOR[arch] if pretrained else None)
    return _backbone(arch, path, kwargs.pop("full_model", False), kwargs.pop("strict", True),
                     kwargs.pop("map_location", "cpu"), kwargs)


def resnet50(pretrained: bool = True, **kwargs) -> _nn.Module:
    """Original hub name: the released ``swav_800ep`` weights, read from a local file (never downloaded)."""
    return _official_alias("resnet50", pretrained, kwargs)


def resnet50w2(pretrained: bool = True, **kwargs) -> _nn.Module:
    """Original hub name: the released ``swav_RN50w2_400ep`` weights, read from a local file."""
    return _official_alias("resnet50w2", pretrained, kwargs)


def resnet50w4(pretrained: bool = True, **kwargs) -> _nn.Module:
    """Original hub name: the released ``swav_RN50w4_400ep`` weights, read from a local file."""
    return _official_alias("resnet50w4", pretrained, kwargs)


def resnet50w5(pretrained: bool = True, **kwargs) -> _nn.Module:
    """Original hub name: the released ``swav_RN50w5_400ep`` weights, read from a local file."""
    return _official_alias("resnet50w5", pretrained, kwargs)

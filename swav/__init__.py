"""SwAV: self-supervised visual pretraining by swapping cluster assignments between views.

The building blocks import with torch as the only requirement::

    from swav import sinkhorn_knopp, swav_loss, SwAVModel, MultiCropTransform
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module; imported lazily so that ``import swav`` stays light
_EXPORTS = {
    "sinkhorn_knopp": "swav.sinkhorn",
    "swav_loss": "swav.loss",
    "compute_codes": "swav.loss",
    "SwAVLoss": "swav.loss",
    "ProjectionHead": "swav.head",
    "Prototypes": "swav.prototypes",
    "EmbeddingQueue": "swav.queue",
    "SwAVModel": "swav.model",
    "SwAVOutput": "swav.model",
    "ModelSpec": "swav.model",
    "build_model": "swav.model",
    "build_backbone": "swav.backbones",
    "available_backbones": "swav.backbones",
    "CropGroup": "swav.multicrop",
    "MultiCropTransform": "swav.multicrop",
    "LARS": "swav.lars",
    "warmup_cosine_schedule": "swav.schedule",
    "load_pretrained": "swav.pretrained",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'swav' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__

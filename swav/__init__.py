"""SwAV: self-supervised visual pretraining by swapping cluster assignments between views.

The building blocks need torch (and torchvision for the backbones and the multi-crop transforms)::

    from swav import sinkhorn_knopp, swav_loss, SwAVModel, MultiCropTransform

Pretraining from Python, with a recipe or a config of your own, a data set object or a network of your own
(``model_builder``; load the result back with the same builder)::

    import swav
    config = swav.with_values(swav.load_recipe("fashion_mnist_cpu"), {"run.output_dir": "runs/py"})
    result = swav.pretrain(config)  # what `swav pretrain` runs; result.status, result.step, ...
    model = swav.load_pretrained("runs/py/model.pt")
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
    "pretrain": "swav.train:train",
    "TrainResult": "swav.train",
    "Config": "swav.config",
    "with_values": "swav.config",
    "load_config_file": "swav.config",
    "load_recipe": "swav.recipes",
    "available_recipes": "swav.recipes",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'swav' has no attribute {name!r}")
    module, _, attribute = where.partition(":")
    return getattr(importlib.import_module(module), attribute or name)


def __dir__() -> list[str]:
    return __all__

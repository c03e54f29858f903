"""Writing a trained model for use elsewhere (issue 7): torchvision, safetensors, full, official layout.

* :func:`export_backbone_torchvision`: the trunk's state dict under torchvision's names, so that
  ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` reports exactly ``fc.weight``
  and ``fc.bias`` missing and nothing unexpected (our trunk has torchvision's layer names, SPEC §8).
* :func:`export_safetensors`: no pickle at all; the :class:`~swav.model.ModelSpec` is stored in the
  metadata so that :func:`swav.load_pretrained` rebuilds the model without being told its sizes.
* :func:`export_full`: model + spec as a ``weights_only``-loadable torch file, for continued
  training or :func:`swav.load_pretrained` (same ``model``/``model_spec`` keys as our checkpoints).
* :func:`export_official`: the original release's ``module.``-prefixed flat layout (SPEC §10), for
  people running the original code.
* :func:`to_torchvision_resnet`: an in-memory torchvision ResNet with our trunk weights and
  ``fc = Identity`` (what ``hubconf.py`` returns).

Files are written to a temporary name and renamed, so a crash never leaves a half-written export.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from swav import __version__
from swav.checkpoint import CHECKPOINT_VERSION, MODEL_FORMAT
from swav.interop import load_state_checked, ours_to_official
from swav.model import ModelSpec, SwAVModel
from swav.pretrained import CONFIG_METADATA_KEY, CONTENT_METADATA_KEY, SPEC_METADATA_KEY

__all__ = [
    "export_backbone_torchvision",
    "export_full",
    "export_official",
    "export_safetensors",
    "to_torchvision_resnet",
]

logger = logging.getLogger(__name__)

_TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _unwrap(model: nn.Module) -> SwAVModel:
    """Accept a (Distributed)DataParallel-wrapped model too; the export never has ``module.``."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if not isinstance(model, SwAVModel):
        raise TypeError(f"model must be a SwAVModel, got {type(model).__name__}")
    return model


def _spec(model: SwAVModel, spec: ModelSpec | None) -> ModelSpec:
    chosen = spec or model.spec
    if chosen is None:
        raise ValueError("the model has no .spec (it was not built by build_model); pass spec=ModelSpec(...)")
    return chosen


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies that share no storage (safetensors refuses shared tensors)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


class ExportWriteError(OSError):
    """The export file could not be written (disk full, no permission); nothing was left behind."""


def _atomic(path: str | os.PathLike, write: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            write(tmp)
        except Exception as error:  # torch's "enforce fail", safetensors' errors, OSError: one clear message
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportWriteError(f"could not write {str(path)!r} ({reason}); check the free space and the "
                                   "permissions there, or choose another --output") from error
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # like any file the user writes (a temp file may start as 0600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s (%.1f MB)", path, path.stat().st_size / 2**20)
    return path


def export_backbone_torchvision(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the trunk as a plain torchvision-named state dict (no ``fc``); returns the path.

    Example:
        >>> import tempfile, torch, torchvision
        >>> from swav.model import ModelSpec, build_model
        >>> model = build_model(ModelSpec("resnet18", hidden_dim=0, output_dim=8, num_prototypes=5))
        >>> f = export_backbone_torchvision(model, tempfile.mkdtemp() + "/resnet18.pt")
        >>> result = torchvision.models.resnet18().load_state_dict(torch.load(f, weights_only=True), strict=False)
        >>> result.missing_keys, result.unexpected_keys
        (['fc.weight', 'fc.bias'], [])
    """
    swav_model = _unwrap(model)
    spec = swav_model.spec
    if spec is not None and spec.backbone.startswith("resnet-compact"):
        raise ValueError(f"--format torchvision: {spec.backbone} has no torchvision counterpart, so the file would "
                         "fit no torchvision model; use --format full or safetensors")
    if spec is not None and (spec.small_images or spec.in_channels != 3):
        logger.warning("backbone %s has a non-ImageNet stem (small_images=%s, in_channels=%d): replace torchvision's "
                       "conv1 (and maxpool) before loading it", spec.backbone, spec.small_images, spec.in_channels)
    state = _cpu_state(swav_model.backbone)
    return _atomic(path, lambda tmp: torch.save(state, tmp))


def export_safetensors(
    model: nn.Module, path: str | os.PathLike, *, backbone_only: bool = False, spec: ModelSpec | None = None,
    config: dict | None = None,
) -> Path:
    """Save as ``.safetensors`` with the spec in the metadata; ``backbone_only`` uses torchvision key names.
    ``config`` (the training config as a nested dict) goes into the metadata too, so that evaluation
    normalises and sizes images as pretraining did (:func:`swav.eval.transforms.pretraining_config`).

    Example:
        >>> import tempfile
        >>> from swav.model import ModelSpec, build_model
        >>> from swav.safe_load import read_safetensors_metadata
        >>> model = build_model(ModelSpec("resnet18", hidden_dim=0, output_dim=8, num_prototypes=5))
        >>> f = export_safetensors(model, tempfile.mkdtemp() + "/m.safetensors")
        >>> read_safetensors_metadata(f)["swav_content"]
        'full'
    """
    from safetensors.torch import save_file

    swav_model = _unwrap(model)
    chosen = _spec(swav_model, spec)
    state = _cpu_state(swav_model.backbone if backbone_only else swav_model)
    metadata = {
        SPEC_METADATA_KEY: json.dumps(chosen.to_dict()),
        CONTENT_METADATA_KEY: "backbone" if backbone_only else "full",
        "format": "pt",
        "swav_version": __version__,
    }
    if config:
        metadata[CONFIG_METADATA_KEY] = json.dumps(config)
    return _atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def export_full(model: nn.Module, path: str | os.PathLike, *, spec: ModelSpec | None = None,
                config: dict | None = None) -> Path:
    """Save ``{"model": state, "model_spec": spec, ...}`` (readable with ``weights_only=True``), with the
    training ``config`` (nested dict) when given, as the run's ``model.pt`` has it.

    Same layout as the run folder's ``model.pt`` (:func:`swav.checkpoint.save_model_file`), so
    :func:`swav.checkpoint.load_model` and :func:`swav.load_pretrained` both read it.

    Example:
        >>> import tempfile, torch
        >>> from swav.model import ModelSpec, build_model
        >>> model = build_model(ModelSpec("resnet18", hidden_dim=0, output_dim=8, num_prototypes=5))
        >>> f = export_full(model, tempfile.mkdtemp() + "/m.pt")
        >>> sorted(torch.load(f, weights_only=True))
        ['format', 'model', 'model_spec', 'swav_version', 'version']
    """
    swav_model = _unwrap(model)
    payload = {
        "model": _cpu_state(swav_model),
        "model_spec": _spec(swav_model, spec).to_dict(),
        "format": MODEL_FORMAT,
        "version": CHECKPOINT_VERSION,
        "swav_version": __version__,
    }
    if config:
        payload["config"] = config
    return _atomic(path, lambda tmp: torch.save(payload, tmp))


def export_official(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the original release's flat ``module.``-prefixed layout (``*_pretrain.pth.tar``, SPEC §10).

    Example:
        >>> import tempfile, torch
        >>> from swav.model import ModelSpec, build_model
        >>> model = build_model(ModelSpec("resnet18", hidden_dim=0, output_dim=8, num_prototypes=5))
        >>> f = export_official(model, tempfile.mkdtemp() + "/m_pretrain.pth.tar")
        >>> [k for k in torch.load(f, weights_only=True) if not k.startswith("module.layer")][:3]
        ['module.conv1.weight', 'module.bn1.weight', 'module.bn1.bias']
    """
    swav_model = _unwrap(model)
    spec = swav_model.spec
    from swav.interop import _RESNET_LAYOUTS

    if spec is not None and spec.backbone not in set(_RESNET_LAYOUTS.values()):
        raise ValueError(f"--format official: the original release's layout holds its ResNets only "
                         f"({', '.join(sorted(set(_RESNET_LAYOUTS.values())))}); a {spec.backbone} export could not be "
                         "read back from it. Use --format full or safetensors")
    if spec is not None and (not spec.head_batch_norm and spec.hidden_dim > 0):
        logger.warning("the original code always has BatchNorm in the head; this export (head_batch_norm=False) "
                       "will not load into it strictly")
    state = ours_to_official(_cpu_state(swav_model))
    return _atomic(path, lambda tmp: torch.save(state, tmp))


def to_torchvision_resnet(model: nn.Module) -> torchvision.models.ResNet:
    """A torchvision ResNet carrying our trunk's weights, ``fc = nn.Identity()`` (outputs pooled features).

    Only for the torchvision depths (resnet18/34/50/101/152); the wide RN50-wN have no torchvision
    counterpart (use ``model.backbone``). A ``small_images`` / grey stem is rebuilt the same way.

    Example:
        >>> import torch
        >>> from swav.model import ModelSpec, build_model
        >>> model = build_model(ModelSpec("resnet18", hidden_dim=0, output_dim=8, num_prototypes=5)).eval()
        >>> net = to_torchvision_resnet(model).eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> torch.allclose(net(x), model.forward_features(x), atol=1e-5)
        True
    """
    swav_model = _unwrap(model)
    spec = _spec(swav_model, None)
    if spec.backbone not in _TORCHVISION_RESNETS:
        raise ValueError(f"backbone {spec.backbone!r} has no torchvision model; valid: {list(_TORCHVISION_RESNETS)} "
                         "(use model.backbone for the wide ResNets)")
    with torch.device("meta"):  # no random init: every tensor is replaced by ours below
        net = torchvision.models.get_model(spec.backbone, weights=None)
        if spec.small_images or spec.in_channels != 3:
            kernel, stride, padding = (3, 1, 1) if spec.small_images else (7, 2, 3)
            net.conv1 = nn.Conv2d(spec.in_channels, net.conv1.out_channels, kernel, stride, padding, bias=False)
            if spec.small_images:
                net.maxpool = nn.Identity()
        net.fc = nn.Identity()
    device = next(swav_model.parameters()).device
    state = {k: v.detach().clone() for k, v in swav_model.backbone.state_dict().items()}
    load_state_checked(net, state, strict=True, source=f"{spec.backbone} trunk", assign=True)
    return net.to(device)

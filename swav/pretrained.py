"""``load_pretrained``: one entry point for every kind of trained SwAV file (issue 7).

Accepted, recognised from the file's content (not its name):

* our training checkpoints and :func:`swav.export.export_full` files (``model`` + ``model_spec``);
* our safetensors exports (spec in the metadata; full model or backbone only);
* the original release's ``*_pretrain.pth.tar`` (flat, ``module.``-prefixed) and its training
  checkpoints (``state_dict`` + ``epoch``/``optimizer``/``amp``), sizes read from shapes (SPEC §10);
* a torchvision-style backbone state dict (``conv1.weight``, ``layer1.0...``; a classifier ``fc.*``
  is dropped), where head and prototypes start fresh.

Every file is read with ``weights_only=True`` (:mod:`swav.safe_load`) and loaded strictly unless
``strict=False`` (:mod:`swav.interop`). Nothing is downloaded: a name such as ``swav_800ep``
resolves to a file under ``$SWAV_HOME`` or ``~/.cache/swav``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from swav.interop import (
    BACKBONE_PREFIX,
    describe_spec,
    diff_state_dict,
    infer_backbone,
    infer_spec,
    is_official_state_dict,
    load_state_checked,
    official_to_ours,
    strip_module_prefix,
    unwrap_official,
)
from swav.model import ModelSpec, SwAVModel, build_model
from swav.safe_load import (
    is_safetensors_file,
    load_state_file,
    read_safetensors_metadata,
)

__all__ = ["OFFICIAL_RELEASES", "LoadedCheckpoint", "NotAStateDictError", "load_pretrained", "model_dirs",
           "read_checkpoint", "resolve_pretrained"]

logger = logging.getLogger(__name__)

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/deepcluster/{}"
# name -> file name of the original release (SPEC §9 table; DeepCluster-v2 from the same code base)
OFFICIAL_RELEASES: dict[str, str] = {
    name: f"{name}_pretrain.pth.tar"
    for name in (
        "swav_800ep", "swav_400ep", "swav_200ep", "swav_100ep", "swav_400ep_2x224",
        "swav_200ep_bs256", "swav_400ep_bs256", "swav_RN50w2_400ep", "swav_RN50w4_400ep",
        "swav_RN50w5_400ep", "deepclusterv2_800ep", "deepclusterv2_400ep",
    )
}
_SUFFIXES = ("", ".safetensors", ".pt", ".pth", ".pth.tar", "_pretrain.pth.tar")
SPEC_METADATA_KEY = "swav_model_spec"
CONTENT_METADATA_KEY = "swav_content"  # "full" or "backbone"
CONFIG_METADATA_KEY = "swav_config"  # the training config as JSON (exports of our checkpoints)


class NotAStateDictError(TypeError):
    """A readable torch file that holds something other than a dict (a bare tensor, a list, ...)."""


@dataclass
class LoadedCheckpoint:
    """A file's tensors in our naming, what they cover, and the spec stored in or inferred from it."""

    state: dict[str, torch.Tensor]
    content: str  # "full": whole SwAVModel keys; "backbone": trunk keys without the backbone. prefix
    kind: str  # "swav", "swav-safetensors", "official", "official-training", "torchvision-backbone"
    spec: ModelSpec | None


def model_dirs() -> list[Path]:
    """Where names are looked up, in order: ``$SWAV_HOME`` (if set), then ``~/.cache/swav``."""
    dirs = [Path(os.environ["SWAV_HOME"]).expanduser()] if os.environ.get("SWAV_HOME") else []
    return dirs + [Path("~/.cache/swav").expanduser()]


def resolve_pretrained(path_or_name: str | os.PathLike) -> Path:
    """An existing file path, or a name found as ``<dir>/<name><suffix>`` in :func:`model_dirs`.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "m.pt"; f.write_bytes(b"x")
        1
        >>> resolve_pretrained(f) == f
        True
    """
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    name = str(path_or_name)
    looks_like_path = os.sep in name or "/" in name or path.suffix in (".pt", ".pth", ".tar", ".safetensors", ".bin")
    if looks_like_path:
        if path.is_dir():
            raise _folder_error(name, path)
        raise FileNotFoundError(f"pretrained model file {name!r} does not exist")
    for directory in model_dirs():
        for suffix in _SUFFIXES:
            candidate = directory / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    if path.is_dir():
        raise _folder_error(name, path)
    dirs = " or ".join(str(d) for d in model_dirs())
    if name in OFFICIAL_RELEASES:
        file_name = OFFICIAL_RELEASES[name]
        how = (f"Nothing is downloaded automatically. Get the original release's file from "
               f"{OFFICIAL_URL.format(file_name)} and save it as {model_dirs()[0] / file_name}")
    else:
        how = f"Known official names: {', '.join(OFFICIAL_RELEASES)}. Put your own file as <dir>/{name}.pt or .safetensors"
    raise FileNotFoundError(
        f"{name!r} is neither an existing file nor found in {dirs} (tried suffixes {list(_SUFFIXES)}). "
        f"{how} (or set SWAV_HOME to the folder that holds it)."
    )


def _folder_error(name: str, path: Path) -> IsADirectoryError:
    """A folder was given where a file is needed: point at the run's model.pt or newest checkpoint."""
    model = path / "model.pt"
    if model.is_file():
        return IsADirectoryError(f"{name!r} is a run folder: pass {os.path.join(name, 'model.pt')}")
    folder = path / "checkpoints"
    found = [p for p in folder.glob("*.pt") if p.is_file() and not p.name.startswith(".")] if folder.is_dir() else []
    checkpoints = sorted(found, key=lambda p: (p.stat().st_mtime, p.name))
    if checkpoints:
        newest = os.path.join(name, "checkpoints", checkpoints[-1].name)
        return IsADirectoryError(f"{name!r} is a run folder without model.pt (unfinished run?): pass one of its "
                                 f"checkpoints, e.g. the newest, {newest}")
    return IsADirectoryError(f"{name!r} is a folder, not a checkpoint file: pass a model file such as a "
                             "run's model.pt, an export, an official *_pretrain.pth.tar or a .safetensors file")


def _ours_flat(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    state = strip_module_prefix(state)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state dict entries {bad[:5]} are not tensors")
    return dict(state)


def _from_safetensors(path: Path, map_location: Any) -> LoadedCheckpoint:
    metadata = read_safetensors_metadata(path)
    state = load_state_file(path, map_location=map_location)
    spec = ModelSpec.from_dict(json.loads(metadata[SPEC_METADATA_KEY])) if SPEC_METADATA_KEY in metadata else None
    content = metadata.get(CONTENT_METADATA_KEY)
    if content not in ("full", "backbone"):  # a safetensors file written by someone else
        return _from_plain_state(path, state)
    return LoadedCheckpoint(dict(state), content, "swav-safetensors", spec)


def _from_plain_state(path: Path, state: Mapping[str, Any]) -> LoadedCheckpoint:
    keys = strip_module_prefix(state)
    if any(k.startswith(BACKBONE_PREFIX) for k in keys):
        return LoadedCheckpoint(_ours_flat(state), "full", "swav", None)
    if is_official_state_dict(state):
        ours = official_to_ours(state)
        return LoadedCheckpoint(ours, "full", "official", infer_spec(ours))
    if "conv1.weight" in keys:
        classifier = sorted(k for k in keys if k.startswith("fc."))
        if classifier:
            logger.warning("%s: ignoring the classifier %s of a torchvision-style state dict (not part of the backbone)",
                           path, classifier)
        trunk = {k: v for k, v in keys.items() if not k.startswith("fc.")}
        return LoadedCheckpoint(_ours_flat(trunk), "backbone", "torchvision-backbone", None)
    raise ValueError(
        f"{str(path)!r} is not a recognised SwAV file: expected our checkpoint (keys 'model', 'model_spec'), "
        "an official *_pretrain.pth.tar (keys 'module.conv1.weight', ..., 'module.prototypes.weight'), an "
        f"official training checkpoint (key 'state_dict') or a torchvision-style ResNet state dict; "
        f"found keys {list(state)[:8]}"
    )


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> LoadedCheckpoint:
    """Read any supported file safely and bring its tensors to our naming (see the module docstring).

    Example:
        >>> import tempfile, torch
        >>> f = tempfile.mkdtemp() + "/official.pth.tar"
        >>> torch.save({"module.conv1.weight": torch.zeros(64, 3, 7, 7), "module.prototypes.weight": torch.zeros(30, 8),
        ...             **{f"module.layer{i}.{j}.conv1.weight": torch.zeros(1) for i in (1, 2, 3, 4) for j in (0, 1)}}, f)
        >>> ckpt = read_checkpoint(f)
        >>> ckpt.kind, ckpt.spec.backbone, ckpt.spec.num_prototypes, "backbone.conv1.weight" in ckpt.state
        ('official', 'resnet18', (30,), True)
    """
    path = Path(path)
    if is_safetensors_file(path):
        return _from_safetensors(path, map_location)
    if path.is_file():  # torch.load ignores the records' CRC-32: a flipped bit would load (and export) silently
        from swav.checkpoint import verify_record_checksums
        verify_record_checksums(path)
    obj = load_state_file(path, map_location=map_location)
    if not isinstance(obj, Mapping):
        raise NotAStateDictError(
            f"{str(path)!r} holds a {type(obj).__name__}, expected a dict (state dict or checkpoint)")
    if isinstance(obj.get("model"), Mapping) and "model_spec" in obj:
        spec = ModelSpec.from_dict(dict(obj["model_spec"]))
        return LoadedCheckpoint(_ours_flat(obj["model"]), "full", "swav", spec)
    if isinstance(obj.get("state_dict"), Mapping):
        loaded = _from_plain_state(path, unwrap_official(obj))
        if loaded.kind == "official":
            loaded.kind = "official-training"
            logger.info("%s: official training checkpoint (epoch %s); optimizer/amp state ignored", path, obj.get("epoch"))
        return loaded
    return _from_plain_state(path, obj)


def _spec_for_backbone_only(path: Path, ckpt: LoadedCheckpoint, spec: ModelSpec | None) -> ModelSpec:
    if spec is not None:
        return spec
    if ckpt.spec is not None:
        return ckpt.spec
    name, small_images, in_channels = infer_backbone(ckpt.state)
    inferred = replace(ModelSpec(), backbone=name, small_images=small_images, in_channels=in_channels)
    logger.warning("%s holds only a backbone (%s); head and prototypes use default sizes (hidden %d, output %d, "
                   "prototypes %s); pass spec=ModelSpec(...) to choose them", path, name, inferred.hidden_dim,
                   inferred.output_dim, list(inferred.num_prototypes))
    return inferred


def _try_infer(state: Mapping[str, torch.Tensor]) -> ModelSpec | None:
    try:
        return infer_spec(state)
    except ValueError:
        return None


def _adopt_exact(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> SwAVModel | None:
    """Build on the meta device and adopt the file's tensors, when they fit exactly (same keys, shapes, dtypes).

    Skips the random initialisation that loading would overwrite anyway (about a minute on CPU for
    RN50-w5). Returns None when the fast path does not apply.
    """
    try:
        with torch.device("meta"):
            skeleton = build_model(spec)
    except (RuntimeError, NotImplementedError, TypeError) as error:
        logger.debug("cannot build %s on the meta device (%s); building normally", spec.backbone, error)
        return None
    expected = skeleton.state_dict()
    if diff_state_dict(expected, state) or any(expected[k].dtype != state[k].dtype for k in expected):
        return None
    skeleton.load_state_dict(dict(state), strict=True, assign=True)
    tensors = [*skeleton.parameters(), *skeleton.buffers()]
    return None if any(t.is_meta for t in tensors) else skeleton


def load_pretrained(
    path_or_name: str | os.PathLike,
    *,
    strict: bool = True,
    spec: ModelSpec | None = None,
    map_location: str | torch.device | None = "cpu",
    model_builder: Callable[[ModelSpec], SwAVModel] | None = None,
) -> SwAVModel:
    """Build a :class:`SwAVModel` from any supported file (or local name) and load its weights.

    ``spec`` overrides the stored/inferred architecture (a mismatch is then reported key by key).
    ``strict=False`` loads only matching tensors and logs a WARNING listing the rest. A backbone-only
    file leaves head and prototypes freshly initialised, with a WARNING. The model is returned in
    eval mode (call ``.train()`` to continue training), with ``model.spec`` set. ``model_builder``: the
    function that built the network of a run trained with one of your own (``swav.pretrain(..., model_builder=)``),
    called with the stored spec; the default builds the named backbone.

    Example:
        >>> import tempfile, torch
        >>> from swav.export import export_full
        >>> from swav.model import ModelSpec, build_model
        >>> model = build_model(ModelSpec("resnet18", small_images=True, hidden_dim=32, output_dim=8, num_prototypes=10))
        >>> f = export_full(model, tempfile.mkdtemp() + "/model.pt")
        >>> again = load_pretrained(f)
        >>> torch.equal(again.prototypes.weight, model.prototypes.weight)
        True
    """
    path = resolve_pretrained(path_or_name)
    ckpt = read_checkpoint(path, map_location=map_location)
    source = f"{ckpt.kind} file {str(path)!r}"
    if ckpt.content == "backbone":
        chosen = _spec_for_backbone_only(path, ckpt, spec)
        model = (model_builder or build_model)(chosen)
        diff = load_state_checked(model.backbone, ckpt.state, strict=strict, source=source)
        fresh = [f"backbone.{key}" for key in diff.skipped()] + [key for key in model.state_dict()
                                                                  if not key.startswith("backbone.")]
        logger.warning("%s holds only the backbone: projection head and prototypes are freshly initialised", path)
    else:
        stored = ckpt.spec or _try_infer(ckpt.state)
        if spec is not None and stored is not None and stored != spec:
            source += f" (its shapes/metadata say: {describe_spec(stored)})"
        chosen = spec or stored or infer_spec(ckpt.state)
        model = _adopt_exact(chosen, ckpt.state) if model_builder is None else None
        fresh = []
        if model is None:  # the file does not fit exactly: build for real, then load strictly or partially
            model = (model_builder or build_model)(chosen)
            fresh = load_state_checked(model, ckpt.state, strict=strict, source=source).skipped()
    logger.info("loaded %s as %s", source, describe_spec(chosen))
    model.spec = chosen
    model.freshly_initialised = fresh  # model tensors that did not come from the file (partial or backbone-only)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()

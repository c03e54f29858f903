"""The original release's checkpoint layout, and strict, explained state-dict loading (SPEC §10, §13).

Released ``*_pretrain.pth.tar`` files are flat state dicts saved from a DistributedDataParallel
model: ``module.conv1.weight``, ``module.layer1.0.bn1.running_mean``, ``module.projection_head.0.weight``
(Linear), ``.1.*`` (BatchNorm1d), ``.3.*`` (Linear), ``module.prototypes.weight`` (K x 128), or
``module.prototypes.prototypes0.weight``... for several heads. With ``--hidden_mlp 0`` the head is a
single Linear saved as ``module.projection_head.weight``. Training checkpoints put the same dict under
``state_dict`` next to ``epoch``, ``optimizer`` and ``amp``.

Our model names the trunk ``backbone.*`` (torchvision names below it) and keeps the head and
prototype names, so conversion is a renaming; the architecture (ResNet depth, width multiplier,
stem), head sizes and prototype counts are read from the tensor shapes, never assumed.

SPEC §13 lists silent partial loads as a known failure: :func:`load_state_checked` is strict by
default and names every missing, unexpected and mis-shaped key; a partial load is opt-in and
always logs what it skipped.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from swav.model import ModelSpec

__all__ = [
    "IncompatibleCheckpointError",
    "StateDictDiff",
    "describe_spec",
    "diff_state_dict",
    "infer_backbone",
    "infer_spec",
    "is_official_state_dict",
    "load_state_checked",
    "official_to_ours",
    "ours_to_official",
    "strip_module_prefix",
    "unwrap_official",
]

logger = logging.getLogger(__name__)

OFFICIAL_PREFIX = "module."
BACKBONE_PREFIX = "backbone."
_HEAD_KEYS = ("projection_head.", "prototypes.")

# (bottleneck blocks?, blocks per stage, width multiplier) -> backbone name (SPEC §8)
_RESNET_LAYOUTS: dict[tuple[bool, tuple[int, ...], int], str] = {
    (False, (2, 2, 2, 2), 1): "resnet18",
    (False, (3, 4, 6, 3), 1): "resnet34",
    (True, (3, 4, 6, 3), 1): "resnet50",
    (True, (3, 4, 23, 3), 1): "resnet101",
    (True, (3, 8, 36, 3), 1): "resnet152",
    (True, (3, 4, 6, 3), 2): "resnet50w2",
    (True, (3, 4, 6, 3), 4): "resnet50w4",
    (True, (3, 4, 6, 3), 5): "resnet50w5",
}
#: torchvision's bottleneck variants whose stem is 64 wide but whose inner 3x3 convolutions are not: (depths,
#: inner width of layer1, groups of its 3x3 convolution) -> name
_WIDE_OR_GROUPED: dict[tuple[tuple[int, ...], int, int], str] = {
    ((3, 4, 6, 3), 128, 1): "wide_resnet50_2",
    ((3, 4, 23, 3), 128, 1): "wide_resnet101_2",
    ((3, 4, 6, 3), 128, 32): "resnext50_32x4d",
    ((3, 4, 23, 3), 256, 32): "resnext101_32x8d",
    ((3, 4, 23, 3), 256, 64): "resnext101_64x4d",
}
_LIST_LIMIT = 12  # keys shown per category in error messages


# ----------------------------------------------------------------------------- comparing
@dataclass
class StateDictDiff:
    """How a state dict differs from a module's: key names, and (key, file shape, model shape)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = _LIST_LIMIT) -> str:
        """Multi-line report, grouped by module and truncated to ``limit`` keys per category."""
        lines = []
        for title, keys in (
            ("missing from the file (in the model only)", self.missing),
            ("unexpected (in the file only)", self.unexpected),
        ):
            if keys:
                lines.append(f"  {len(keys)} {title}; by group: {_group_counts(keys)}")
                lines.append("    " + _truncated(keys, limit))
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} with a different shape (file vs model); by group: "
                         f"{_group_counts([k for k, _, _ in self.mismatched])}")
            for key, file_shape, model_shape in self.mismatched[:limit]:
                lines.append(f"    {key}: {list(file_shape)} vs {list(model_shape)}")
            if len(self.mismatched) > limit:
                lines.append(f"    ... and {len(self.mismatched) - limit} more")
        return "\n".join(lines)

    def skipped(self) -> list[str]:
        """Model keys a partial load leaves at their fresh values (missing or mis-shaped)."""
        return self.missing + [key for key, _, _ in self.mismatched]


def _group(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "backbone" and len(parts) > 2 else parts[0]


def _group_counts(keys: list[str]) -> str:
    return ", ".join(f"{group} x{n}" for group, n in Counter(_group(k) for k in keys).items())


def _truncated(keys: list[str], limit: int) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


class IncompatibleCheckpointError(ValueError):
    """A checkpoint does not fit the model; ``diff`` holds every differing key."""

    def __init__(self, source: str, diff: StateDictDiff, target: str = "the model") -> None:
        self.source, self.diff = source, diff
        super().__init__(
            f"{source} does not fit {target}:\n{diff.describe()}\n"
            "Nothing was loaded. If this is expected (e.g. a different head), load partially with "
            "strict=False (CLI: --partial): matching tensors are loaded, the rest keeps its fresh "
            "initialisation and a warning lists it."
        )


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in value.shape)


def diff_state_dict(expected: Mapping[str, Any], given: Mapping[str, Any]) -> StateDictDiff:
    """Compare key sets and shapes (values may be tensors, meta tensors, or anything with ``.shape``).

    Example:
        >>> import torch
        >>> d = diff_state_dict({"a": torch.zeros(2), "b": torch.zeros(1)}, {"a": torch.zeros(3), "c": torch.zeros(1)})
        >>> d.missing, d.unexpected, d.mismatched
        (['b'], ['c'], [('a', (3,), (2,))])
    """
    diff = StateDictDiff()
    for key, value in expected.items():
        if key not in given:
            diff.missing.append(key)
        elif _shape(given[key]) != _shape(value):
            diff.mismatched.append((key, _shape(given[key]), _shape(value)))
    diff.unexpected = [key for key in given if key not in expected]
    return diff


def load_state_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    source: str = "checkpoint",
    assign: bool = False,
) -> StateDictDiff:
    """Load ``state`` into ``module``; strict: all or nothing, partial: matching keys plus a WARNING.

    Raises :class:`IncompatibleCheckpointError` (strict) naming every missing, unexpected and
    mis-shaped key; nothing is modified in that case. With ``strict=False`` the tensors whose key
    and shape match are loaded and a WARNING lists everything skipped (SPEC §13: never silent).
    ``assign=True`` (for a module built on the meta device) adopts the given tensors instead of
    copying; it needs a complete, exactly matching state dict.

    Example:
        >>> import torch.nn as nn
        >>> diff = load_state_checked(nn.Linear(2, 3), nn.Linear(2, 3).state_dict())
        >>> bool(diff)
        False
    """
    expected = module.state_dict()
    diff = diff_state_dict(expected, state)
    if diff and strict:
        spec = getattr(module, "spec", None)
        target = f"the model ({type(module).__name__}{', ' + describe_spec(spec) if isinstance(spec, ModelSpec) else ''})"
        raise IncompatibleCheckpointError(source, diff, target)
    if diff and assign:
        raise ValueError(f"assign=True needs a state dict that fits exactly, but {source} differs:\n{diff.describe()}")
    if diff:
        bad = {key for key, _, _ in diff.mismatched}
        loadable = {k: v for k, v in state.items() if k in expected and k not in bad}
        logger.warning(
            "PARTIAL load of %s: %d of %d model tensors loaded; %d left freshly initialised, %d file "
            "tensors ignored:\n%s", source, len(loadable), len(expected), len(diff.skipped()),
            len(diff.unexpected), diff.describe(),
        )
        module.load_state_dict(loadable, strict=False)
    else:
        module.load_state_dict(dict(state), strict=True, assign=assign)
    return diff


def describe_spec(spec: ModelSpec) -> str:
    """One line: backbone, head sizes, prototype counts (for messages).

    Example:
        >>> describe_spec(ModelSpec("resnet50w2", hidden_dim=8192))
        'resnet50w2, head 8192 -> 128 (batch norm), prototypes [3000]'
    """
    stem = ", small-image stem" if spec.small_images else ""
    channels = f", {spec.in_channels} input channel(s)" if spec.in_channels != 3 else ""
    head = f"{spec.hidden_dim} -> {spec.output_dim}" if spec.hidden_dim else f"single linear -> {spec.output_dim}"
    norm = " (batch norm)" if spec.hidden_dim and spec.head_batch_norm else ""
    return f"{spec.backbone}{stem}{channels}, head {head}{norm}, prototypes {list(spec.num_prototypes)}"


# ----------------------------------------------------------------------------- renaming
def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove leading ``module.`` (DDP/DataParallel wrappers, possibly nested) from every key.

    Example:
        >>> strip_module_prefix({"module.conv1.weight": 1, "bn1.bias": 2})
        {'conv1.weight': 1, 'bn1.bias': 2}
    """
    out = {}
    for key, value in state.items():
        while key.startswith(OFFICIAL_PREFIX):
            key = key[len(OFFICIAL_PREFIX):]
        out[key] = value
    return out


def unwrap_official(obj: Any) -> Mapping[str, Any]:
    """The flat state dict of an official file: itself, or its ``state_dict`` entry (training file)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    return obj


def is_official_state_dict(state: Any) -> bool:
    """True for the release's layout: flat tensors, ResNet stem, head/prototype keys, no ``backbone.``.

    Example:
        >>> import torch
        >>> is_official_state_dict({"module.conv1.weight": torch.zeros(1), "module.prototypes.weight": torch.zeros(1)})
        True
    """
    if not isinstance(state, Mapping) or not state:
        return False
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return False
    keys = strip_module_prefix(state)
    has_head = any(k.startswith(_HEAD_KEYS) for k in keys)
    return "conv1.weight" in keys and has_head and not any(k.startswith(BACKBONE_PREFIX) for k in keys)


def official_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official keys to ours: trunk -> ``backbone.*``; a single-Linear head -> ``projection_head.0.*``.

    Example:
        >>> import torch
        >>> sorted(official_to_ours({"module.conv1.weight": torch.zeros(1), "module.projection_head.weight": torch.zeros(1)}))
        ['backbone.conv1.weight', 'projection_head.0.weight']
    """
    out = {}
    for key, value in strip_module_prefix(state).items():
        if re.fullmatch(r"projection_head\.(weight|bias)", key):  # official --hidden_mlp 0
            key = "projection_head.0." + key.rsplit(".", 1)[1]
        elif not key.startswith(_HEAD_KEYS):
            key = BACKBONE_PREFIX + key
        out[key] = value
    return out


def ours_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_ours`: the ``module.``-prefixed layout the original code loads.

    Example:
        >>> import torch
        >>> sorted(ours_to_official({"backbone.conv1.weight": torch.zeros(1), "prototypes.weight": torch.zeros(1)}))
        ['module.conv1.weight', 'module.prototypes.weight']
    """
    single_linear = "projection_head.0.weight" in state and "projection_head.3.weight" not in state
    out = {}
    for key, value in state.items():
        if key.startswith(BACKBONE_PREFIX):
            key = key[len(BACKBONE_PREFIX):]
        elif single_linear and key.startswith("projection_head.0."):
            key = "projection_head." + key.rsplit(".", 1)[1]
        out[OFFICIAL_PREFIX + key] = value
    return out


# ----------------------------------------------------------------------------- spec inference
def infer_backbone(backbone_state: Mapping[str, Any]) -> tuple[str, bool, int]:
    """``(name, small_images, in_channels)`` of a ResNet trunk from torchvision-named shapes (SPEC §8).

    Depth comes from the block indices of ``layer1..4``, block type from ``conv3`` (bottleneck),
    the width multiplier from the stem (64w channels), the stem type from the kernel (7 or 3).

    Example:
        >>> import torch
        >>> state = {"conv1.weight": torch.empty(128, 3, 7, 7, device="meta"), "layer1.0.conv3.weight": None}
        >>> state.update({f"layer{s}.{b}.conv1.weight": None for s, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)})
        >>> infer_backbone(state)
        ('resnet50w2', False, 3)
    """
    stem = backbone_state.get("conv1.weight")
    if stem is None or len(_shape(stem)) != 4:
        raise ValueError(
            "cannot infer the backbone: no 4-d 'conv1.weight' (only the ResNet family is recognised from "
            f"shapes; first keys: {list(backbone_state)[:5]}); pass spec=ModelSpec(backbone=...) instead"
        )
    out_channels, in_channels, kernel, _ = _shape(stem)
    bottleneck = "layer1.0.conv3.weight" in backbone_state
    depths = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in backbone_state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        depths.append(len(blocks))
    width, remainder = divmod(out_channels, 64)
    name = _RESNET_LAYOUTS.get((bottleneck, tuple(depths), width)) if remainder == 0 else None
    inner, grouped = _inner_width(backbone_state) if bottleneck else (None, None)
    if name is not None and inner is not None and (inner, grouped) != (out_channels, 1):
        # the stem alone does not tell torchvision's wide and grouped (ResNeXt) bottlenecks from plain ones
        name = _WIDE_OR_GROUPED.get((tuple(depths), inner, grouped)) if width == 1 else None
        if name is None:
            raise ValueError(
                f"unrecognised ResNet layout: bottleneck blocks {depths}, stem width {out_channels}, but layer1's "
                f"inner convolutions are {inner} wide in {grouped} group(s); known wide and grouped layouts: "
                + ", ".join(sorted(_WIDE_OR_GROUPED.values())) + ". Pass spec=ModelSpec(backbone=...) (Python), "
                "or load a --format full / safetensors export, which carries its architecture")
    if name is None:
        known = ", ".join(f"{n} ({'bottleneck' if b else 'basic'} {list(d)}, stem {64 * w})"
                          for (b, d, w), n in _RESNET_LAYOUTS.items())
        raise ValueError(
            f"unrecognised ResNet layout: {'bottleneck' if bottleneck else 'basic'} blocks {depths}, stem width "
            f"{out_channels}; known layouts: {known}. A backbone-only file of another trunk (e.g. a compact ResNet "
            "exported with --format torchvision) carries no architecture: load the training checkpoint or a "
            "--format full / safetensors export instead, or pass spec=ModelSpec(backbone=...) (Python)"
        )
    return name, kernel == 3, in_channels


def _inner_width(state: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(output channels, groups) of layer1's first 3x3 convolution, or (None, None) when not in ``state``."""
    conv2 = state.get("layer1.0.conv2.weight")
    if conv2 is None or len(_shape(conv2)) != 4:
        return None, None
    out, per_group = _shape(conv2)[:2]
    return out, max(out // per_group, 1) if per_group else 1


def infer_spec(state: Mapping[str, Any], defaults: ModelSpec | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a state dict in our naming, read from shapes (sizes never assumed).

    Head: two Linears (``projection_head.0`` and ``.3``) give hidden and output sizes, ``.1`` present
    means batch norm; one Linear means ``hidden_dim=0``. Prototypes: ``prototypes.weight`` (one head)
    or ``prototypes.prototypesI.weight`` (several). Parts absent from the file come from ``defaults``.

    Example:
        >>> import torch
        >>> m = lambda *s: torch.empty(*s, device="meta")
        >>> state = {"backbone.conv1.weight": m(64, 3, 3, 3), **{f"backbone.layer{i}.{j}.conv1.weight": m(1) for i in (1, 2, 3, 4) for j in (0, 1)}}
        >>> state.update({"projection_head.0.weight": m(16, 512), "prototypes.prototypes0.weight": m(10, 16), "prototypes.prototypes1.weight": m(20, 16)})
        >>> spec = infer_spec(state)
        >>> spec.backbone, spec.small_images, spec.hidden_dim, spec.output_dim, spec.num_prototypes
        ('resnet18', True, 0, 16, (10, 20))
    """
    defaults = defaults or ModelSpec()
    trunk = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    backbone, small_images, in_channels = infer_backbone(trunk)
    hidden, output, batch_norm = defaults.hidden_dim, defaults.output_dim, defaults.head_batch_norm
    if "projection_head.3.weight" in state and "projection_head.0.weight" in state:
        hidden = _shape(state["projection_head.0.weight"])[0]
        output = _shape(state["projection_head.3.weight"])[0]
        batch_norm = "projection_head.1.weight" in state or "projection_head.1.running_mean" in state
        if not batch_norm:  # legitimate for our head_batch_norm=False; the original release always has one
            logger.warning("the file's projection head has no BatchNorm tensors (projection_head.1.*): it is read as "
                           "a head without BatchNorm (ModelSpec head_batch_norm=False). The original release "
                           "always has one; if this file should, it lacks those tensors")
    elif "projection_head.0.weight" in state:
        hidden, output = 0, _shape(state["projection_head.0.weight"])[0]
    heads = sorted(
        (int(m.group(1)), _shape(v)) for k, v in state.items() if (m := re.fullmatch(r"prototypes\.prototypes(\d+)\.weight", k))
    )
    if "prototypes.weight" in state:
        prototype_shapes = [_shape(state["prototypes.weight"])]
    else:
        prototype_shapes = [shape for _, shape in heads]
    num_prototypes = tuple(s[0] for s in prototype_shapes) or defaults.num_prototypes
    if prototype_shapes and not any(k.startswith("projection_head.") for k in state):
        output = prototype_shapes[0][1]
    return ModelSpec(
        backbone=backbone, small_images=small_images, in_channels=in_channels, hidden_dim=hidden,
        output_dim=output, num_prototypes=num_prototypes, head_batch_norm=batch_norm,
    )

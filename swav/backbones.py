"""Backbone registry: build a trunk by name that maps images to pooled features (SPEC §8).

SwAV only needs a trunk ``f(x) -> (B, C)``; the projection head and prototypes sit on top
(``swav/model.py``). The ResNet family keeps torchvision's exact layer and parameter names so
that official checkpoints (``module.conv1.weight``, ``module.layer1.0.bn1.*``, ...; SPEC §10)
and torchvision state dicts load without renaming. The wide ResNet-50 variants widen the *whole*
network (stem, every stage, pooled output 2048w), as in the official release; this is not
torchvision's ``wide_resnet50_2``, which only widens the bottleneck's inner 3x3 convolution.

Any torchvision classification model and, when installed, any timm model can serve as trunk.
Weights are always randomly initialised; nothing is downloaded.

Legend: B batch, C backbone feature dim.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Sequence

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from swav.cpu_features import cpu_has_amx

logger = logging.getLogger(__name__)

# name -> (block, blocks per stage, width multiplier w). Depths follow torchvision / He et al.
_RESNETS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int], int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1),
    "resnet50w2": (Bottleneck, (3, 4, 6, 3), 2),
    "resnet50w4": (Bottleneck, (3, 4, 6, 3), 4),
    "resnet50w5": (Bottleneck, (3, 4, 6, 3), 5),
}

# Builder arguments that make a torchvision model a plain feed-forward trunk: no auxiliary
# classifier outputs in train mode, no dropout in front of the removed classifier, and the
# explicit value of an init flag that otherwise only triggers a FutureWarning.
_TORCHVISION_EXTRA_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": True, "dropout": 0.0},
    "inception_v3": {"aux_logits": False, "init_weights": True, "dropout": 0.0},
}

# Built with this many classes so that the classifier is the one layer with this output size.
_PROBE_CLASSES = 4099


# read once at import: under torch.compile a call that asks the CPU would break the graph, a bool does not
_CPU_HAS_AMX = cpu_has_amx()


class SmallMapConv2d(nn.Conv2d):
    """A convolution (any kernel, stride and zero padding; no dilation or groups) that, on a CPU with bf16
    autocast and a channels-last input whose output maps have at most ``MATMUL_MAX_PIXELS`` pixels, runs as
    one matrix product over the output pixels (for k x k kernels, k > 1, input maps of at most that many
    pixels too, and on CPUs without AMX only strided ones): the k x k shifted (strided) views of the padded
    channels-last input side by side along the channels, then ``F.linear`` with the weight in the matching
    (kh, kw, C) order; the same arithmetic as the convolution. oneDNN's bf16 convolution kernels are slow on
    such small maps (``benchmarks/small_map_conv.py``, forward + backward): on ResNet-50's last stage (7x7 at
    224 px, 3x3 at 96 px) and its downsampling, the 1x1 convolutions take 1.2-3.9x longer than the matrix
    product on a CPU with AMX and 1.1-1.8x on one with AVX512-BF16 only (an AMD EPYC, Zen 4). The 3x3 ones
    differ by CPU: with AMX 1.1-1.4x longer on 7x7 maps and 1.9-2.8x on 3x3 maps; without AMX the matrix
    product loses on stride-1 3x3 convolutions (0.6-0.9x on 6x6 and 7x7 maps) and wins only on the strided
    one (1.2-1.5x), hence ``KXK_STRIDE1_MATMUL`` (None: decided by :func:`swav.cpu_features.cpu_has_amx`, read at import).
    Anywhere else it is an ordinary ``nn.Conv2d`` with the same parameters and state-dict keys."""

    MATMUL_MAX_PIXELS = 49
    KXK_STRIDE1_MATMUL: bool | None = None  # stride-1 k x k kernels (k > 1) as matrix products; None: on AMX CPUs
    force: bool | None = None  # True / False: the matrix path / oneDNN whatever the map (benchmarks and tests)

    def _fast(self, x: torch.Tensor) -> bool:
        if self.force is not None:
            return self.force
        if not (x.device.type == "cpu" and x.dim() == 4
                and (x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                                   and torch.get_autocast_dtype("cpu") == torch.bfloat16))
                and x.is_contiguous(memory_format=torch.channels_last)):
            return False
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_h, out_w = (x.shape[-2] + 2 * ph - kh) // sh + 1, (x.shape[-1] + 2 * pw - kw) // sw + 1
        # k x k kernels: the input map too (the backward of k^2 shifted views writes k^2 input-sized gradients;
        # on 14x14 -> 7x7 stride 2 that is slower than oneDNN)
        return out_h * out_w <= self.MATMUL_MAX_PIXELS and (
            (kh, kw) == (1, 1) or (x.shape[-2] * x.shape[-1] <= self.MATMUL_MAX_PIXELS and self._kxk_ok(sh, sw)))

    def _kxk_ok(self, sh: int, sw: int) -> bool:
        stride1 = self.KXK_STRIDE1_MATMUL
        return sh > 1 or sw > 1 or (_CPU_HAS_AMX if stride1 is None else stride1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TorchScript (torch.jit.script) compiles the plain convolution only: the matrix path is a speed-up of
        # eager CPU training whose Python it cannot compile
        if torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x):  # no annotations: TorchScript's stub of it takes and returns a Tensor
        return self._as_matmul(x) if self._fast(x) else self._conv_forward(x, self.weight, self.bias)

    def _as_matmul(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if ph or pw:
            x = nn.functional.pad(x, (pw, pw, ph, ph))
        b, c, h, w = x.shape
        out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
        pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view of channels-last memory
        views = [pixels[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw] for i in range(kh)
                 for j in range(kw)]
        columns = views[0] if len(views) == 1 else torch.cat(views, dim=-1)  # (B, out_h, out_w, kh kw C)
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, kh * kw * c)
        y = nn.functional.linear(columns.reshape(-1, kh * kw * c), weight, self.bias)
        return y.view(b, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)  # channels-last, like the input


def _small_map_convolutions(module: nn.Module) -> None:
    """Make every plain convolution (zero padding, no dilation or groups) a :class:`SmallMapConv2d` (same
    parameters and state-dict keys; the class is swapped in place, so initialisation and random streams are
    untouched). The stem's 7x7 convolution never meets a map small enough to take the matrix path."""
    for child in module.modules():
        if (type(child) is nn.Conv2d and child.dilation == (1, 1) and child.groups == 1
                and child.padding_mode == "zeros" and isinstance(child.padding, tuple)):
            child.__class__ = SmallMapConv2d


class ResNetTrunk(nn.Module):
    """ResNet without ``fc``: stem, four stages, global average pooling, flatten (SPEC §8).

    Layer names equal torchvision's (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1..4``,
    ``avgpool``), so ``state_dict()`` keys equal torchvision's ``resnetXX`` keys minus ``fc.*``.
    ``width_multiplier`` w widens every layer: stem 64w channels, stage widths 64w..512w, pooled
    feature ``512 * expansion * w`` (the official RN50-w2/w4/w5). Initialisation is torchvision's
    (He normal, fan-out, for convolutions; BN gamma 1, beta 0), as in the original code.

    ``small_images`` swaps the ImageNet stem (7x7 stride-2 conv + max-pool) for a 3x3 stride-1
    conv and no pooling, the usual choice for 28-96 px inputs (CIFAR, Fashion-MNIST, STL-10).

    Example:
        >>> trunk = ResNetTrunk(BasicBlock, (2, 2, 2, 2), small_images=True, in_channels=1)
        >>> trunk(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 512])
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        width_multiplier: int = 1,
        small_images: bool = False,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
        if width_multiplier < 1:
            raise ValueError(f"width_multiplier must be >= 1, got {width_multiplier}")
        _check_in_channels(in_channels)
        stem_width = 64 * width_multiplier
        self.conv1 = _stem_conv(in_channels, stem_width, small_images)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if small_images else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        self._inplanes = stem_width
        self.layer1 = self._make_stage(block, stem_width, layers[0], stride=1)
        self.layer2 = self._make_stage(block, 2 * stem_width, layers[1], stride=2)
        self.layer3 = self._make_stage(block, 4 * stem_width, layers[2], stride=2)
        self.layer4 = self._make_stage(block, 8 * stem_width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = 8 * stem_width * block.expansion
        self._init_weights(zero_init_residual)
        _small_map_convolutions(self)

    def _make_stage(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        """One stage; the first block changes resolution/width through ``downsample.0/.1``."""
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self._inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage = [block(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * block.expansion
        stage += [block(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's ResNet initialisation; optional zero gamma on each block's last BN."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_channels, H, W) -> pooled features (B, C)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def available_backbones() -> list[str]:
    """Sorted plain names accepted by :func:`build_backbone`.

    ``"torchvision:<name>"`` and ``"timm:<name>"`` (needs ``pip install timm``) are accepted too.

    Example:
        >>> "resnet50w2" in available_backbones() and "vit_b_16" in available_backbones()
        True
    """
    from swav.compact_backbones import available_compact_backbones

    return sorted(set(_RESNETS) | set(_torchvision_names()) | set(available_compact_backbones()))


def build_backbone(
    name: str,
    *,
    small_images: bool = False,
    in_channels: int = 3,
    zero_init_residual: bool = False,
) -> tuple[nn.Module, int]:
    """Build a randomly initialised trunk and return ``(module, feature_dim)`` (SPEC §8).

    ``module(x)`` returns pooled features of shape (B, feature_dim). Names:
    ``resnet18/34/50/101/152`` and the official wide ``resnet50w2/w4/w5`` (our ResNet trunk with
    torchvision's parameter names); any other torchvision classification model (or the explicit
    ``"torchvision:<name>"``), whose classifier becomes ``nn.Identity``; ``"timm:<name>"``, built
    with ``num_classes=0``. ``small_images`` (3x3 stride-1 stem, no max-pool) is available for
    ResNet-type models; ``in_channels`` changes the first convolution (e.g. 1 for grey images).
    ``zero_init_residual`` (ResNet family only, off by default like the original) zeroes the last
    BN gamma of every residual block.

    Example:
        >>> trunk, dim = build_backbone("resnet18", small_images=True)
        >>> dim, tuple(trunk(torch.randn(2, 3, 32, 32)).shape)
        (512, (2, 512))
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    _check_in_channels(in_channels)
    source, _, model_name = name.strip().partition(":")
    if not model_name:  # plain name
        model_name, source = source.lower(), ""
    source = source.lower()
    if source == "timm":
        module, dim = _build_timm(model_name, small_images, in_channels, zero_init_residual)
    elif source == "torchvision":
        module, dim = _build_torchvision(
            model_name.lower(), small_images, in_channels, zero_init_residual
        )
    elif source:
        raise ValueError(
            f"name {name!r} has unknown prefix {source!r}; valid prefixes: 'torchvision:', 'timm:'"
        )
    elif model_name in _RESNETS:
        block, layers, width = _RESNETS[model_name]
        module = ResNetTrunk(
            block,
            layers,
            width_multiplier=width,
            small_images=small_images,
            in_channels=in_channels,
            zero_init_residual=zero_init_residual,
        )
        dim = module.feature_dim
    elif model_name.startswith("resnet-compact"):
        # compact trunks are built for small images already (3x3 stem, no max-pool)
        from swav.compact_backbones import build_compact_backbone

        module, dim = build_compact_backbone(model_name, in_channels=in_channels)
    elif model_name in _torchvision_names():
        module, dim = _build_torchvision(model_name, small_images, in_channels, zero_init_residual)
    else:
        raise ValueError(_unknown_name_message(name, available_backbones()))
    logger.debug(
        "built backbone %s: feature_dim=%d, %d parameters",
        name,
        dim,
        sum(p.numel() for p in module.parameters()),
    )
    return module, dim


def _check_in_channels(in_channels: int) -> None:
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")


def _stem_conv(in_channels: int, out_channels: int, small_images: bool) -> nn.Conv2d:
    """ImageNet stem 7x7/2 (padding 3 = official zero-pad 1 + conv padding 2), or 3x3/1."""
    if small_images:
        return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False)


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _unknown_name_message(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name.strip().lower(), valid, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"unknown backbone name {name!r}.{hint} Available: {', '.join(valid)}. "
        "Also accepted: 'torchvision:<name>' and 'timm:<name>' (requires `pip install timm`)."
    )


def _build_torchvision(
    model_name: str, small_images: bool, in_channels: int, zero_init_residual: bool
) -> tuple[nn.Module, int]:
    """A torchvision classification model minus its classifier (and the dropout feeding it)."""
    names = _torchvision_names()
    if model_name not in names:
        raise ValueError(_unknown_name_message(model_name, names))
    kwargs: dict[str, object] = dict(_TORCHVISION_EXTRA_KWARGS.get(model_name, {}))
    is_resnet_builder = model_name.startswith(("resnet", "resnext", "wide_resnet"))
    if zero_init_residual:
        if not is_resnet_builder:
            raise ValueError(
                "zero_init_residual=True is only supported for ResNet-type models, "
                f"got {model_name!r}"
            )
        kwargs["zero_init_residual"] = True
    model = torchvision.models.get_model(
        model_name, weights=None, num_classes=_PROBE_CLASSES, **kwargs
    )
    if small_images:
        if not isinstance(model, torchvision.models.ResNet):
            raise ValueError(
                f"small_images=True is only supported for ResNet-type models (resnet*, resnext*, "
                f"wide_resnet*, resnet50w*), got {model_name!r}"
            )
        model.conv1 = _stem_conv(in_channels, model.conv1.out_channels, small_images=True)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        _replace_input_channels(model, in_channels, model_name)
    dim = _remove_classifier(model, model_name)
    return model, _check_feature_dim(model, dim, in_channels, model_name)


def _remove_classifier(model: nn.Module, model_name: str) -> int:
    """Replace the last layer with ``_PROBE_CLASSES`` outputs by Identity; return its input size.

    Dropout directly in front of it in the same ``nn.Sequential`` regularises only the supervised
    classifier; it is removed too so that train-mode features are not randomly zeroed.
    """
    path, in_size = "", 0
    for module_path, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == _PROBE_CLASSES:
            path, in_size = module_path, module.in_features
        elif isinstance(module, nn.Conv2d) and module.out_channels == _PROBE_CLASSES:
            path, in_size = module_path, module.in_channels
    if not path:
        raise RuntimeError(f"found no classifier layer in torchvision model {model_name!r}")
    model.set_submodule(path, nn.Identity())
    parent_path, _, last = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, nn.Sequential) and last.isdigit():
        index = int(last) - 1
        while index >= 0 and isinstance(parent[index], nn.Dropout):
            parent[index] = nn.Identity()
            index -= 1
    return in_size


def _replace_input_channels(model: nn.Module, in_channels: int, model_name: str) -> None:
    """Give the first 3-channel convolution ``in_channels`` inputs.

    Its random weights are reused channel-cyclically, so each weight keeps the model's own
    initial distribution.
    """
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            ).to(device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(module.weight[:, torch.arange(in_channels) % 3])
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            model.set_submodule(path, new)
            return
    raise ValueError(
        f"in_channels={in_channels} is not supported for {model_name!r}: no 3-channel input "
        "convolution found"
    )


def _check_feature_dim(model: nn.Module, dim: int, in_channels: int, model_name: str) -> int:
    """Confirm the introspected feature size with a free forward pass on the meta device."""
    size = getattr(model, "image_size", 224)
    size = size if isinstance(size, int) else 224
    probe = torch.empty(2, in_channels, size, size, device="meta")
    fake_state = {
        key: torch.empty_like(value, device="meta")
        for key, value in (*model.named_parameters(), *model.named_buffers())
    }
    try:
        out = torch.func.functional_call(model, fake_state, (probe,))
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
        logger.debug("meta forward of %s failed (%s); using introspected dim", model_name, error)
        return dim
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise RuntimeError(
            f"torchvision model {model_name!r} without classifier does not return (B, C) features"
        )
    if out.shape[1] != dim:
        logger.warning("%s: classifier input %d != feature size %d", model_name, dim, out.shape[1])
    return int(out.shape[1])


def _build_timm(
    model_name: str, small_images: bool, in_channels: int, zero_init_residual: bool
) -> tuple[nn.Module, int]:
    """``timm.create_model(name, num_classes=0)``: timm's own pooled-feature trunk."""
    try:
        timm = importlib.import_module("timm")
    except ImportError as error:
        raise ImportError(
            f"backbone 'timm:{model_name}' needs the optional package timm: `pip install timm`"
        ) from error
    if small_images or zero_init_residual:
        raise ValueError(
            f"small_images / zero_init_residual are not supported for timm models "
            f"(got 'timm:{model_name}'); use timm's own model arguments instead"
        )
    if not timm.is_model(model_name.split(".")[0]):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
        raise ValueError(
            f"unknown timm model {model_name!r}"
            + (f"; did you mean: {', '.join(close)}?" if close else "")
            + " (see timm.list_models())"
        )
    model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_channels)
    return model, int(model.num_features)

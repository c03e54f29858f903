"""Compact ResNets for tiny images on small CPUs (the Fashion-MNIST CPU recipe, issue 3).

A torchvision ResNet-18 with the small-image stem costs about 0.5 GMAC per 28 px crop: far too slow
for a 2-core CPU budget of minutes. These trunks keep the ResNet recipe (3x3 convolutions,
BatchNorm, ReLU, BasicBlock residual units with 1x1 projection shortcuts, global average pooling)
but with few, narrow stages, sized for 28-32 px inputs. Names:

``resnet-compact[-s2]-<w>[-<d>][-x<n>][-g<g>]``
    3x3 stem conv with w channels, then n stages (3 by default, or 4) of ``d`` BasicBlocks
    (default 1) with w, 2w, 4w (, 8w) channels at strides 1, 2, 2 (, 2); pooled feature
    ``w * 2**(n-1)``. ``-s2`` gives the stem stride 2: the first stage then runs at 14 x 14 for
    28 px inputs (about half the cost). Examples: ``resnet-compact-16`` (16-32-64 at 28/14/7 px,
    64-d), ``resnet-compact-s2-16-x4`` (16-32-64-128 at 14/7/4/2 px, 128-d). ``-g<g>`` (1-8) pools the
    last map to a g x g grid instead of one cell (feature ``C * g * g``); ``-g7`` on a 7 x 7 map keeps it whole.

The modules return pooled ``(B, C)`` features, like :func:`swav.backbones.build_backbone`, and use
torchvision's initialisation (He normal, fan-out; BN gamma 1, beta 0).

Legend: B batch, C feature dim.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

__all__ = ["CompactResNet", "build_compact_backbone", "available_compact_backbones"]

_NAME = re.compile(r"^resnet-compact-(?P<s2>s2-)?(?P<width>\d+)(?:-(?P<depth>\d+))?(?:-x(?P<stages>[34]))?(?:-g(?P<grid>\d))?$")
_EXAMPLES = ("resnet-compact-16", "resnet-compact-32", "resnet-compact-16-2", "resnet-compact-s2-32",
             "resnet-compact-s2-16-x4")


def _window_means(size: int, grid: int, device: torch.device) -> torch.Tensor:
    """``(grid, size)``: row i averages adaptive average pooling's window i along one axis (positions
    ``floor(i*size/grid)`` to ``ceil((i+1)*size/grid)``). Tensor ops only, so torch.compile traces it."""
    cells = torch.arange(grid, device=device).unsqueeze(1)
    positions = torch.arange(size, device=device).unsqueeze(0)
    inside = (positions >= (cells * size) // grid) & (positions < ((cells + 1) * size + grid - 1) // grid)
    return inside.double() / inside.sum(1, keepdim=True)


def _pooling_matrix(height: int, width: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """``(grid*grid, height*width)`` float32: row ``i*grid + j`` averages the cell (i, j) (the outer product of
    the two axes' window means)."""
    device = device or torch.device("cpu")
    rows, cols = _window_means(height, grid, device), _window_means(width, grid, device)
    return (rows[:, None, :, None] * cols[None, :, None, :]).reshape(grid * grid, height * width).float()


def grid_pool_flat(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``flatten(adaptive_avg_pool2d(x, grid), 1)`` as one matrix product over the channels-last pixels:
    ``(B, C, H, W) -> (B, C * grid * grid)``, the same values up to float rounding. On a CPU, PyTorch's
    adaptive pooling backward on channels-last maps is slow (7x7 -> 4x4 on 512 crops of 64 channels in bf16:
    about 7 ms forward + backward against 1.5 ms this way), and the product's backward writes the
    gradient straight into the channels-last layout the convolutions want."""
    b, c, h, w = x.shape
    pooling = _pooling_matrix(h, w, grid, x.device)  # float32: the cells' exact weights (1/6, 1/9 are not in bf16)
    with torch.autocast(x.device.type, enabled=False):  # summed in float32 and rounded once, as adaptive pooling
        cells = torch.matmul(pooling, x.permute(0, 2, 3, 1).reshape(b, h * w, c).float())  # (B, grid*grid, C)
    return cells.transpose(1, 2).reshape(b, c * grid * grid).to(x.dtype)


class CompactResNet(nn.Module):
    """Stem + three or four BasicBlock stages (w, 2w, 4w[, 8w] channels) + global average pooling.

    Example:
        >>> trunk = CompactResNet(width=16, depth=1, in_channels=1)
        >>> trunk(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 64])
    """

    # on CPUs, pool channels-last maps with grid_pool_flat (a 2% faster step) instead of adaptive_avg_pool2d. Off by
    # default: with its weights in bf16 the default job ended 0.5-0.7 k-NN points lower in two seeds; with them in
    # float32 (now) it matched adaptive pooling on average (benchmarks/RESULTS.md, thirteenth session)
    MATMUL_POOL = False

    def __init__(self, width: int, depth: int = 1, in_channels: int = 3, stem_stride: int = 1, stages: int = 3,
                 grid: int = 1) -> None:
        super().__init__()
        for name, value in (("width", width), ("depth", depth), ("in_channels", in_channels)):
            if value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")
        if stages not in (3, 4):
            raise ValueError(f"stages={stages!r} is invalid: expected 3 or 4")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride={stem_stride!r} is invalid: expected 1 or 2")
        if not 1 <= grid <= 8:
            raise ValueError(f"grid={grid!r} is invalid: expected 1 (global average pooling) to 8")
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = width
        plan = [(width, 1)] + [(width * 2**i, 2) for i in range(1, stages)]
        self.num_stages = stages
        for index, (out_channels, stride) in enumerate(plan, start=1):
            blocks = []
            for block in range(depth):
                downsample = None
                if block == 0 and (stride != 1 or channels != out_channels):
                    downsample = nn.Sequential(conv1x1(channels, out_channels, stride), nn.BatchNorm2d(out_channels))
                blocks.append(BasicBlock(channels, out_channels, stride if block == 0 else 1, downsample))
                channels = out_channels
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        # grid > 1 average-pools the last map to grid x grid cells and flattens them: for tiny, centred
        # images (Fashion-MNIST) the layout carries much of the class, and global pooling discards it
        self.avgpool = nn.AdaptiveAvgPool2d((grid, grid))
        self.feature_dim = channels * grid * grid
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        if hasattr(self, "layer4"):  # (not num_stages: TorchScript resolves hasattr before compiling the branch)
            x = self.layer4(x)
        if torch.jit.is_scripting():  # torch.jit.script: the plain pooling (the one below is eager CPU speed-up)
            return torch.flatten(self.avgpool(x), 1)
        return self._pool(x)

    @torch.jit.unused
    def _pool(self, x):  # no annotations: TorchScript's stub of it takes and returns a Tensor
        if x.shape[-2:] == self.avgpool.output_size:  # pooling a map to its own size is the identity: skip it
            return torch.flatten(x, 1)
        if self.MATMUL_POOL and x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last):
            return grid_pool_flat(x, self.avgpool.output_size[0])
        return torch.flatten(self.avgpool(x), 1)


def available_compact_backbones() -> list[str]:
    """Example names (any width/depth following the patterns in the module docstring is valid)."""
    return list(_EXAMPLES)


def build_compact_backbone(name: str, in_channels: int = 3) -> tuple[nn.Module, int]:
    """Build a compact trunk by name; returns ``(module, feature_dim)``.

    Example:
        >>> trunk, dim = build_compact_backbone("resnet-compact-32", in_channels=1)
        >>> dim, trunk(torch.randn(2, 1, 28, 28)).shape
        (128, torch.Size([2, 128]))
    """
    match = _NAME.match(name)
    if match is None:
        raise ValueError(
            f"backbone name {name!r} is not a compact backbone: expected resnet-compact[-s2]-<width>[-<depth>][-x3|-x4], "
            f"e.g. {', '.join(_EXAMPLES)}"
        )
    width = int(match["width"])
    depth = int(match["depth"]) if match["depth"] else 1
    stages = int(match["stages"]) if match["stages"] else 3
    grid = int(match["grid"]) if match["grid"] else 1
    module = CompactResNet(width, depth, in_channels, stem_stride=2 if match["s2"] else 1, stages=stages, grid=grid)
    return module, module.feature_dim

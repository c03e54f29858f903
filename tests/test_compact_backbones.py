"""Tests for the compact ResNets of the CPU recipe (swav/compact_backbones.py)."""
from __future__ import annotations

import pytest
import torch

from swav.compact_backbones import CompactResNet, available_compact_backbones, build_compact_backbone
from swav.model import SwAVModel


@pytest.mark.parametrize(
    "name, feature_dim, stem_stride, stages, depth",
    [("resnet-compact-16", 64, 1, 3, 1), ("resnet-compact-s2-16-x4", 128, 2, 4, 1), ("resnet-compact-8-2", 32, 1, 3, 2),
     ("resnet-compact-s2-8-2-x3", 32, 2, 3, 2)],
)
def test_names_build_the_described_network(name, feature_dim, stem_stride, stages, depth):
    trunk, dim = build_compact_backbone(name, in_channels=1)
    assert dim == feature_dim == trunk.feature_dim
    assert trunk.conv1.stride == (stem_stride, stem_stride) and trunk.conv1.in_channels == 1
    assert [hasattr(trunk, f"layer{i}") for i in range(1, 5)] == [True] * stages + [False] * (4 - stages)
    assert all(len(getattr(trunk, f"layer{i}")) == depth for i in range(1, stages + 1))
    out = trunk(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, feature_dim)


def test_forward_is_global_average_of_the_last_stage():
    trunk, _ = build_compact_backbone("resnet-compact-s2-8-x4", in_channels=3)
    trunk.eval()
    x = torch.randn(2, 3, 32, 32)
    h = trunk.relu(trunk.bn1(trunk.conv1(x)))
    for i in range(1, 5):
        h = getattr(trunk, f"layer{i}")(h)
    assert h.shape[-2:] == (2, 2)  # 32 -> 16 (stem) -> 16 -> 8 -> 4 -> 2
    assert torch.allclose(trunk(x), h.mean(dim=(2, 3)), atol=1e-6)
    # features of a ReLU network are non-negative
    assert bool((trunk(x) >= 0).all())


def test_trains_inside_swav_model_and_works_with_any_input_size():
    trunk, dim = build_compact_backbone("resnet-compact-8", in_channels=1)
    model = SwAVModel(trunk, dim, hidden_dim=16, output_dim=8, num_prototypes=10)
    out = model([torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.randn(4, 1, 12, 12)])
    out.scores[0].sum().backward()
    assert out.embeddings.shape == (12, 8)
    assert all(p.grad is not None for p in trunk.parameters())


def test_init_and_examples():
    trunk = CompactResNet(width=4, depth=1, in_channels=1)
    bns = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns)
    for name in available_compact_backbones():
        assert build_compact_backbone(name, in_channels=3)[1] > 0


@pytest.mark.parametrize("name", ["resnet18", "resnet-compact-", "resnet-compact-16-x5"])
def test_invalid_names_are_rejected(name):
    with pytest.raises(ValueError, match="resnet-compact"):
        build_compact_backbone(name)


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError, match="depth"):
        build_compact_backbone("resnet-compact-16-0")
    with pytest.raises(ValueError, match="stages"):
        CompactResNet(width=4, stages=5)


def test_grid_pooled_readout_keeps_the_layout():
    trunk, dim = build_compact_backbone("resnet-compact-8-g3", in_channels=1)
    assert dim == 32 * 9 == trunk.feature_dim
    trunk.eval()
    x = torch.randn(2, 1, 28, 28)
    h = trunk.layer3(trunk.layer2(trunk.layer1(trunk.relu(trunk.bn1(trunk.conv1(x))))))  # 7 x 7 map
    assert torch.allclose(trunk(x), torch.nn.functional.adaptive_avg_pool2d(h, 3).flatten(1), atol=1e-6)
    # the grid cells average back to the global pooled feature when they tile the map evenly
    even, _ = build_compact_backbone("resnet-compact-8-g2", in_channels=1)
    even.eval()
    x8 = torch.randn(2, 1, 32, 32)  # 32 -> 8 x 8 map, 2 x 2 cells of 4 x 4
    cells = even(x8).reshape(2, 32, 4).mean(dim=2)
    g = even.layer3(even.layer2(even.layer1(even.relu(even.bn1(even.conv1(x8))))))
    assert torch.allclose(cells, g.mean(dim=(2, 3)), atol=1e-6)
    # on 28-pixel inputs the last map is 7 x 7: grid 7 is the whole map, unpooled
    full, dim7 = build_compact_backbone("resnet-compact-8-g7", in_channels=1)
    full.load_state_dict(trunk.state_dict())
    full.eval()
    assert dim7 == 32 * 49 and torch.allclose(full(x), h.flatten(1), atol=1e-6)
    for bad in ("resnet-compact-8-g9", "resnet-compact-8-g0"):
        with pytest.raises(ValueError, match="grid"):
            build_compact_backbone(bad)


@pytest.mark.parametrize("height,width,grid", [(7, 7, 4), (7, 7, 3), (5, 6, 2), (8, 8, 4), (7, 7, 1), (3, 3, 2)])
def test_grid_pool_as_a_matrix_product_equals_adaptive_pooling(height: int, width: int, grid: int) -> None:
    from swav.compact_backbones import grid_pool_flat

    torch.manual_seed(0)
    x = torch.randn(6, 5, height, width).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    got = grid_pool_flat(x, grid)
    want = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(ref_x, grid), 1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grad = torch.randn(want.shape)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)


def test_grid_pool_in_bf16_autocast_sums_with_the_exact_cell_weights() -> None:
    """Under bf16 autocast the cells are summed in float32 with the weights 1/area and rounded once, as adaptive
    pooling does: weights rounded to bf16 (1/6, 1/9 off by 0.2%) made the pooled features 0.14% too large on
    average, and the default job ended 0.5-0.7 k-NN points lower in two seeds."""
    from swav.compact_backbones import grid_pool_flat

    torch.manual_seed(0)
    x = torch.rand(256, 64, 7, 7).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grid_pool_flat(x, 4)
    want = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x.float(), 4), 1)
    assert got.dtype == torch.bfloat16
    assert abs(float(got.float().sum() / want.sum()) - 1) < 3e-4  # no bias beyond bf16's unbiased rounding
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=0)  # one rounding to bf16


def test_compact_trunk_pools_channels_last_maps_by_matrix_product_with_the_same_values(monkeypatch) -> None:
    """The Fashion-MNIST recipe's trunk (7x7 -> 4x4 grid) in CPU bf16 autocast, channels-last: the matrix
    product path is taken and gives adaptive pooling's features and gradients up to bf16 rounding."""
    from swav import compact_backbones

    trunk, _ = build_compact_backbone("resnet-compact-16-g4", in_channels=1)
    trunk = trunk.to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    calls = []
    real = compact_backbones.grid_pool_flat
    monkeypatch.setattr(compact_backbones, "grid_pool_flat", lambda *a: calls.append(1) or real(*a))
    results = []
    for matmul in (True, False):
        monkeypatch.setattr(compact_backbones.CompactResNet, "MATMUL_POOL", matmul)
        trunk.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = trunk(x)
        features.float().square().mean().backward()
        results.append((features.float().detach(), trunk.conv1.weight.grad.clone()))
    assert len(calls) == 1  # the matrix path with MATMUL_POOL on, adaptive pooling with it off
    (f1, g1), (f2, g2) = results
    assert f1.shape == (8, 64 * 16)
    torch.testing.assert_close(f1, f2, rtol=0.02, atol=0.02 * float(f2.abs().max()))
    torch.testing.assert_close(g1, g2, rtol=0.05, atol=0.05 * float(g2.abs().max()))

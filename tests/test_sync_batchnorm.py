"""CrossRankBatchNorm on 2 gloo processes equals one BatchNorm on the concatenated batch (SPEC §9)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from swav.sync_batchnorm import CrossRankBatchNorm, convert_sync_batchnorm
from tests.distributed_helpers import run_distributed


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, 3, 3, generator=g) * 3 + 1, torch.randn(8, 4, 3, 3, generator=g)


def _rank_fn(rank: int, world_size: int):
    x, w = _data()
    part = slice(rank * 4, (rank + 1) * 4)
    x = x[part].clone().requires_grad_(True)
    bn = CrossRankBatchNorm(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    y = bn(x)
    (y * w[part]).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


@pytest.mark.distributed
def test_two_ranks_equal_one_batchnorm_on_the_whole_batch():
    results = run_distributed(_rank_fn, 2)
    x, w = _data()
    x = x.clone().requires_grad_(True)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    y = bn(x)
    (y * w).sum().backward()
    torch.testing.assert_close(torch.cat([r[0] for r in results]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][2] + results[1][2], bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][3] + results[1][3], bn.bias.grad, rtol=1e-5, atol=1e-5)
    for r in results:
        torch.testing.assert_close(r[4], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r[5], bn.running_var, rtol=1e-5, atol=1e-6)


def test_single_process_and_conversion_keep_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64)))
    weight = model[1].weight
    converted = convert_sync_batchnorm(model)
    assert isinstance(converted[1], CrossRankBatchNorm) and isinstance(converted[2][1], CrossRankBatchNorm)
    assert converted[1].weight is weight and set(converted.state_dict()) == set(model.state_dict())
    x = torch.randn(5, 3, 6, 6)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64)))
    reference.load_state_dict(converted.state_dict())
    torch.testing.assert_close(converted(x), reference(x))
    converted.eval(), reference.eval()
    torch.testing.assert_close(converted(x), reference(x))

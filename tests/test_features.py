"""Tests for swav.features.extract_features (feature extraction for SPEC §11)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from swav.features import extract_features, split_batch


class _BNNet(nn.Module):
    """Flatten + Linear + BatchNorm1d: the output depends on train/eval mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)
        self.bn = nn.BatchNorm1d(5)
        self.grad_enabled = []

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.bn(self.fc(x.flatten(1)))


def _loader(n=11, batch_size=4, extra=False):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, 3, 2, 2, generator=g), torch.arange(n) % 3]
    if extra:
        tensors.append(torch.arange(n))  # e.g. indices
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def test_features_match_eval_mode_forward_and_mode_is_restored():
    net = _BNNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    stats_before = net.bn.running_mean.clone()
    loader = _loader()
    feats, labels = extract_features(net, loader, progress=False)
    assert net.training  # restored
    assert not any(net.grad_enabled)
    torch.testing.assert_close(net.bn.running_mean, stats_before)  # eval mode: no update
    images = torch.cat([x for x, _ in loader])
    net.eval()
    with torch.no_grad():
        expected = net(images)
    torch.testing.assert_close(feats, expected)
    assert feats.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.tolist() == [i % 3 for i in range(11)]


def test_normalize_and_plain_callable_and_extra_batch_items():
    weight = torch.randn(12, 4)

    def fn(x):
        return x.flatten(1) @ weight

    feats, labels = extract_features(fn, _loader(extra=True), normalize=True, progress=True)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(11))
    assert labels.shape == (11,)


def test_bfloat16_autocast_returns_float32():
    net = _BNNet().eval()
    feats, _ = extract_features(net, _loader(), amp_dtype=torch.bfloat16, progress=False)
    assert feats.dtype == torch.float32
    with torch.no_grad():
        exact = net(torch.cat([x for x, _ in _loader()]))
    torch.testing.assert_close(feats, exact, rtol=0.05, atol=0.05)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no batches"):
        extract_features(nn.Identity(), [], progress=False)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        extract_features(nn.Identity(), _loader(), progress=False)  # 4-D output
    with pytest.raises(TypeError, match="labels"):
        split_batch(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one label per image"):
        split_batch((torch.zeros(2, 3), torch.zeros(3)))

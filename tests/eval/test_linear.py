"""Tests for swav.eval.linear and swav.eval.epochs (SPEC §11 linear evaluation)."""

import hashlib
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from swav.eval.accuracy import accuracy_over_batches
from swav.eval.epochs import (
    ClassifierResult,
    cosine_epoch_factor,
    multistep_epoch_factor,
)
from swav.eval.linear import (
    LinearClassifier,
    _FusedLinearSGD,
    frozen,
    linear_probe,
    linear_probe_features,
)


def _separable(n, dim=16, num_classes=5, seed=0, sample_seed=None):
    """Gaussian clusters around class centres (drawn from ``seed``), samples from ``sample_seed``."""
    centres = 4.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return centres[labels] + 0.3 * torch.randn(n, dim, generator=g), labels


def _state_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_fast_mode_separable_features_near_perfect():
    x, y = _separable(600)
    xt, yt = _separable(300, sample_seed=99)  # same classes, unseen samples
    result = linear_probe_features(x, y, xt, yt, epochs=10)
    assert result.top1_last >= 99.0
    assert result.top5_last == 100.0
    assert len(result.history) == 10
    assert result.top1_best >= result.top1_last


def test_fast_mode_is_deterministic_per_seed():
    x, y = _separable(300, seed=1)
    a = linear_probe_features(x, y, x, y, epochs=2, seed=5).history
    b = linear_probe_features(x, y, x, y, epochs=2, seed=5).history
    c = linear_probe_features(x, y, x, y, epochs=2, seed=6).history
    assert a == b
    assert a[-1]["train_loss"] != c[-1]["train_loss"]


def test_fused_step_equals_autograd_and_torch_sgd():
    torch.manual_seed(0)
    x = torch.randn(50, 7)
    y = torch.randint(0, 4, (50,))
    ref = LinearClassifier(7, 4, torch.Generator().manual_seed(1))
    fused_head = LinearClassifier(7, 4, torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9, weight_decay=0.01)
    fused = _FusedLinearSGD(fused_head, lr=0.3, momentum=0.9, weight_decay=0.01)
    for step, lr in enumerate([0.3, 0.3, 0.1, 0.05]):
        for group in opt.param_groups + fused.param_groups:
            group["lr"] = lr
        xb, yb = x[step * 12 : step * 12 + 12], y[step * 12 : step * 12 + 12]
        loss = F.cross_entropy(ref(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum = fused.step(xb, yb)
        assert float(loss_sum) == pytest.approx(loss.item() * 12, rel=1e-5)
    torch.testing.assert_close(fused_head.weight, ref.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_head.bias, ref.bias, rtol=1e-5, atol=1e-6)


def test_standardize_makes_probe_invariant_to_per_dimension_affine_maps():
    x, y = _separable(200, dim=6, seed=2)
    scale = torch.tensor([1.0, 10.0, 0.1, 3.0, 50.0, 0.5])
    shift = torch.tensor([5.0, -3.0, 0.0, 100.0, 1.0, -7.0])
    a = linear_probe_features(x, y, x, y, epochs=3, standardize=True)
    b = linear_probe_features(x * scale + shift, y, x * scale + shift, y, epochs=3, standardize=True)
    for ha, hb in zip(a.history, b.history):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-3)
        assert ha["top1"] == hb["top1"]


def test_linear_classifier_official_init():
    head = LinearClassifier(1000, 100, torch.Generator().manual_seed(0))
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(head.weight.mean().item()) < 1e-3
    assert torch.count_nonzero(head.bias) == 0


def test_accuracy_over_batches_top5_against_naive_loop():
    torch.manual_seed(3)
    head = nn.Linear(5, 9)
    x, y = torch.randn(40, 5), torch.randint(0, 9, (40,))
    with torch.no_grad():
        got = accuracy_over_batches([(head(x[:17]), y[:17]), (head(x[17:]), y[17:])])
        logits = head(x)
    top1 = top5 = 0
    for i in range(40):
        ranked = sorted(range(9), key=lambda k: -float(logits[i, k]))
        top1 += ranked[0] == int(y[i])
        top5 += int(y[i]) in ranked[:5]
    assert got["top1"] == pytest.approx(100 * top1 / 40)
    assert got["top5"] == pytest.approx(100 * top5 / 40)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


class _RecordingBackbone(nn.Module):
    """Conv + BatchNorm + pooling; records the BatchNorm's mode at every forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.bn.training)
        return F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def _image_loader(n=64, seed=0, batch_size=16, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 1, 6, 6, generator=g) + labels.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle)


def test_full_mode_leaves_backbone_and_bn_statistics_untouched():
    backbone = _RecordingBackbone()
    backbone.train()  # the caller's mode must be restored, and ignored during evaluation
    with torch.no_grad():  # non-trivial running statistics
        backbone.bn.running_mean.uniform_(-1, 1)
        backbone.bn.running_var.uniform_(0.5, 2)
    before = _state_hash(backbone)
    result = linear_probe(
        backbone,
        _image_loader(shuffle=True),
        _image_loader(seed=1),
        feature_dim=6,
        num_classes=3,
        epochs=3,
        progress=False,
    )
    assert _state_hash(backbone) == before
    assert backbone.modes and not any(backbone.modes)  # always eval mode inside
    assert backbone.training and backbone.bn.training
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(p.grad is None for p in backbone.parameters())
    assert len(result.history) == 3


def test_full_mode_matches_reference_loop_with_official_cosine_schedule():
    torch.manual_seed(0)
    backbone = _RecordingBackbone().eval()
    train, test = _image_loader(), _image_loader(seed=1)
    epochs = 4
    result = linear_probe(backbone, train, test, feature_dim=6, num_classes=3, epochs=epochs, seed=7, progress=False)
    # reference: the textbook loop with torch.optim.SGD and CosineAnnealingLR stepped per epoch
    head = LinearClassifier(6, 3, torch.Generator().manual_seed(7))
    opt = torch.optim.SGD(head.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0.0)
    for epoch in range(epochs):
        assert result.history[epoch]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
        for x, y in train:
            with torch.no_grad():
                feats = backbone(x)
            loss = F.cross_entropy(head(feats), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            logits = torch.cat([head(backbone(x)) for x, _ in test])
        labels = torch.cat([y for _, y in test])
        top1 = 100 * float((logits.argmax(1) == labels).float().mean())
        assert result.history[epoch]["top1"] == pytest.approx(top1)


def test_frozen_restores_mixed_flags():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    net[0].weight.requires_grad_(False)
    net[1].eval()
    with frozen(net):
        assert not any(m.training for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters())
    assert net.training and net[0].training and not net[1].training
    assert [p.requires_grad for p in net.parameters()] == [False, True, True, True]


def test_epoch_schedules():
    assert [cosine_epoch_factor(e, 2) for e in range(2)] == [1.0, pytest.approx(0.5)]
    assert cosine_epoch_factor(0, 10, 0.1) == 1.0
    assert cosine_epoch_factor(10, 10, 0.1) == pytest.approx(0.1)
    factors = [multistep_epoch_factor(e, (12, 16), 0.2) for e in range(20)]
    assert factors[:12] == [1.0] * 12
    assert factors[12:16] == [pytest.approx(0.2)] * 4
    assert factors[16:] == [pytest.approx(0.04)] * 4
    assert math.isclose(factors[-1], 0.04)


def test_result_best_and_last():
    hist = [
        {"epoch": 1, "top1": 10.0, "top5": 50.0},
        {"epoch": 2, "top1": 30.0, "top5": 70.0},
        {"epoch": 3, "top1": 20.0, "top5": 80.0},
    ]
    r = ClassifierResult.from_history(hist)
    assert (r.top1_last, r.top5_last, r.top1_best, r.top5_best, r.best_epoch) == (20.0, 80.0, 30.0, 70.0, 2)
    assert r.to_dict()["history"] == hist


@pytest.mark.parametrize(
    "kwargs, match",
    [({"batch_size": 0}, "batch_size"), ({"num_classes": 2}, "num_classes"), ({"epochs": 0}, "epochs")],
)
def test_fast_mode_bad_arguments(kwargs, match):
    x, y = _separable(20, num_classes=4)
    with pytest.raises(ValueError, match=match):
        linear_probe_features(x, y, x, y, **kwargs)


def test_fast_mode_thread_setting_is_restored():
    x, y = _separable(50, seed=4)
    before = torch.get_num_threads()
    linear_probe_features(x, y, x, y, epochs=1, num_threads=1)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        linear_probe_features(x, y, x, y, epochs=1, num_threads=0)

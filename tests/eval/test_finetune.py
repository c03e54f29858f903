"""Tests for swav.eval.finetune and swav.eval.subsets (SPEC §11 semi-supervised)."""

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from swav.eval.finetune import (
    FinetuneClassifier,
    default_learning_rates,
    finetune,
    scaled_milestones,
)
from swav.eval.subsets import class_quota, read_subset_file, stratified_fraction

# ---------------------------------------------------------------- subsets


def _imbalanced_labels():
    # class sizes 1300, 732, 250, 49, 3 (shuffled order)
    labels = np.repeat(np.arange(5), [1300, 732, 250, 49, 3])
    return np.random.default_rng(0).permutation(labels)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.37])
def test_stratified_fraction_counts_per_class(fraction):
    labels = _imbalanced_labels()
    idx = stratified_fraction(labels, fraction, seed=0)
    counts = Counter(labels[idx].tolist())
    for cls, size in Counter(labels.tolist()).items():
        expected = max(1, int(np.floor(fraction * size + 0.5)))
        assert counts[cls] == expected, (cls, size)
    assert len(set(idx.tolist())) == len(idx)  # no duplicates
    assert (np.diff(idx) > 0).all()  # sorted


def test_one_percent_split_hand_computed():
    labels = _imbalanced_labels()
    idx = stratified_fraction(labels, 0.01, seed=0)
    # 1300 -> 13, 732 -> 7, 250 -> 3 (2.5 rounds half up), 49 -> 1 (0.49 rounds to 0, at least 1), 3 -> 1
    assert sorted(Counter(labels[idx].tolist()).values()) == [1, 1, 3, 7, 13]


def test_stratified_fraction_is_seeded():
    labels = _imbalanced_labels()
    a = stratified_fraction(labels, 0.1, seed=1)
    b = stratified_fraction(labels, 0.1, seed=1)
    c = stratified_fraction(labels, 0.1, seed=2)
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(c) and not np.array_equal(a, c)


def test_full_fraction_keeps_everything_and_quota_edges():
    labels = _imbalanced_labels()
    np.testing.assert_array_equal(stratified_fraction(labels, 1.0), np.arange(len(labels)))
    assert class_quota(1, 0.001) == 1
    assert class_quota(10, 1.0) == 10
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            stratified_fraction(labels, bad)


def _imagenet_like_paths():
    return [
        f"/data/train/{wnid}/{wnid}_{i}.JPEG" for wnid in ("n01440764", "n01443537", "n01484850") for i in range(10)
    ]


def test_subset_file_selects_exactly_the_listed_images(tmp_path):
    paths = _imagenet_like_paths()
    listed = ["n01443537_3.JPEG", "n01440764_0.JPEG", "n01484850_9.JPEG", "n01443537_7.JPEG"]
    subset = tmp_path / "1percent.txt"
    subset.write_text("\n".join(listed) + "\n\n")
    idx = read_subset_file(subset, paths)
    assert sorted(paths[i].rsplit("/", 1)[1] for i in idx) == sorted(listed)
    assert (np.diff(idx) > 0).all()


def test_subset_file_unmatched_names_are_listed(tmp_path):
    subset = tmp_path / "s.txt"
    subset.write_text("n01440764_0.JPEG\nmissing_1.JPEG\nmissing_2.JPEG\n")
    with pytest.raises(ValueError, match=r"2 of 3 names.*missing_1\.JPEG.*missing_2\.JPEG"):
        read_subset_file(subset, _imagenet_like_paths())


def test_subset_file_ambiguous_basename_needs_folder(tmp_path):
    paths = ["root/cat/001.jpg", "root/dog/001.jpg", "root/dog/002.jpg"]
    subset = tmp_path / "s.txt"
    subset.write_text("001.jpg\n")
    with pytest.raises(ValueError, match="several"):
        read_subset_file(subset, paths)
    subset.write_text("dog/001.jpg\n# a comment\n002.jpg\n")
    assert read_subset_file(subset, paths).tolist() == [1, 2]


def test_subset_file_missing_or_empty(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_subset_file(tmp_path / "nope.txt", ["a.jpg"])
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no image names"):
        read_subset_file(tmp_path / "empty.txt", ["a.jpg"])


# ---------------------------------------------------------------- fine-tuning


class _TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def _loader(n=48, seed=0, batch_size=12):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 1, 5, 5, generator=g) + 2.0 * labels.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def test_finetune_trains_whole_network_with_separate_rates_and_step_decay():
    torch.manual_seed(0)
    backbone = _TinyBackbone()
    classifier = FinetuneClassifier(backbone, 4, 3, seed=3)
    reference = copy.deepcopy(classifier)
    train, test = _loader(), _loader(seed=1)
    epochs, milestones = 4, (2, 3)
    result = finetune(
        classifier,
        train,
        test,
        epochs=epochs,
        trunk_lr=0.05,
        head_lr=0.5,
        milestones=milestones,
        progress=False,
    )
    # reference: torch.optim.SGD with two parameter groups and MultiStepLR stepped per epoch
    opt = torch.optim.SGD(
        [
            {"params": reference.backbone.parameters(), "lr": 0.05},
            {"params": reference.head.parameters(), "lr": 0.5},
        ],
        momentum=0.9,
        weight_decay=0.0,
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.2)
    for epoch in range(epochs):
        assert result.history[epoch]["lr"] == pytest.approx(opt.param_groups[1]["lr"])  # head lr
        reference.train()
        for x, y in train:
            loss = F.cross_entropy(reference(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        reference.eval()
        with torch.no_grad():
            logits = torch.cat([reference(x) for x, _ in test])
        top1 = 100 * float((logits.argmax(1) == torch.cat([y for _, y in test])).float().mean())
        assert result.history[epoch]["top1"] == pytest.approx(top1)
    # every tensor of the network (trunk weights, BatchNorm statistics, head) matches the reference
    for (name, got), want in zip(classifier.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(classifier.backbone.bn.running_mean, torch.zeros(4))  # BN trained


def test_finetune_learns_easy_task():
    classifier = FinetuneClassifier(_TinyBackbone(), 4, 3)
    result = finetune(classifier, _loader(), _loader(seed=1), epochs=6, trunk_lr=0.05, head_lr=0.5, progress=False)
    assert result.top1_best >= 90.0
    assert result.top5_last == 100.0  # 3 classes: top-5 always contains the label


def test_default_learning_rates_and_milestones():
    assert default_learning_rates(0.01) == (0.02, 5.0)
    assert default_learning_rates(0.1) == (0.01, 0.2)
    assert default_learning_rates(0.02) == (0.02, 5.0)
    assert default_learning_rates(0.05) == (0.01, 0.2)
    assert scaled_milestones(20) == (12, 16)
    assert scaled_milestones(5) == (3, 4)
    assert scaled_milestones(1) == () and scaled_milestones(2) == (1,) and scaled_milestones(3) == (2,)  # decays that happen, once each
    with pytest.raises(ValueError, match="label_fraction"):
        default_learning_rates(0.0)
    # the semi-supervised protocol: SGD with momentum 0.9, no weight decay, x0.2 at the milestones
    import inspect
    from swav.eval.finetune import finetune
    defaults = {k: p.default for k, p in inspect.signature(finetune).parameters.items()}
    assert (defaults["momentum"], defaults["weight_decay"], defaults["gamma"]) == (0.9, 0.0, 0.2)

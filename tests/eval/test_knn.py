"""Tests for swav.eval.knn (SPEC §11 k-NN) and swav.eval.accuracy."""

import math

import pytest
import torch

from swav.eval.accuracy import topk_accuracy, topk_correct
from swav.eval.knn import knn_accuracy, knn_classify


def _slow_knn_scores(train, train_labels, test, k, temperature, num_classes):
    """The obvious reference: one test sample at a time, python loops over neighbours."""
    out = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    train = train.double()
    for i in range(test.shape[0]):
        x = test[i].double()
        sims = []
        for j in range(train.shape[0]):
            sims.append((float(x @ train[j]) / (x.norm() * train[j].norm()).item(), j))
        sims.sort(key=lambda t: -t[0])
        for sim, j in sims[:k]:  # votes exp(s / T), scaled by exp(-s_max / T) as documented
            out[i, int(train_labels[j])] += math.exp((sim - sims[0][0]) / temperature)
    return out


def test_matches_slow_reference_on_random_data():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(60, 8, generator=g)
    labels = torch.randint(0, 5, (60,), generator=g)
    test = torch.randn(13, 8, generator=g)
    ref = _slow_knn_scores(train, labels, test, k=7, temperature=0.1, num_classes=5)
    # batch_size 4 forces several chunks, including a ragged last one
    got = knn_classify(train, labels, test, k=7, temperature=0.1, num_classes=5, batch_size=4)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_scale_invariant_cosine():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(30, 4, generator=g), torch.randn(5, 4, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    a = knn_classify(train, labels, test, k=5)
    b = knn_classify(train * 7.0, labels, test * 0.01, k=5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0.0)


def test_label_encoding_features_give_100_percent():
    g = torch.Generator().manual_seed(2)
    num_classes = 10
    train_labels = torch.randint(0, num_classes, (500,), generator=g)
    test_labels = torch.randint(0, num_classes, (200,), generator=g)
    train = torch.nn.functional.one_hot(train_labels, num_classes).float() + 0.05 * torch.randn(
        500, num_classes, generator=g
    )
    test = torch.nn.functional.one_hot(test_labels, num_classes).float()
    acc = knn_accuracy(train, train_labels, test, test_labels, k=20, batch_size=64)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_random_features_are_near_chance():
    g = torch.Generator().manual_seed(3)
    num_classes = 10
    train = torch.randn(2000, 32, generator=g)
    test = torch.randn(2000, 32, generator=g)
    acc = knn_accuracy(
        train,
        torch.randint(0, num_classes, (2000,), generator=g),
        test,
        torch.randint(0, num_classes, (2000,), generator=g),
    )
    # chance is 10% / 50%; 2000 samples give a standard error of about 0.7 / 1.1 points
    assert 6.0 < acc["top1"] < 14.0
    assert 44.0 < acc["top5"] < 56.0


def test_top5_counts_label_among_five_best_scores():
    # label ranks: sample 0 -> 1st, sample 1 -> 5th, sample 2 -> 6th (miss for top-5)
    scores = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6],
            [6.0, 5, 4, 3, 2, 1, 0],
            [6.0, 5, 4, 3, 2, 1, 0],
        ]
    )
    labels = torch.tensor([0, 4, 5])
    assert topk_correct(scores, labels, ks=(1, 5)) == {1: 1, 5: 2}
    acc = topk_accuracy(scores, labels)
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top5"] == pytest.approx(200 / 3)


def test_knn_top5_matches_reference_ranking():
    g = torch.Generator().manual_seed(4)
    train = torch.randn(80, 6, generator=g)
    labels = torch.randint(0, 8, (80,), generator=g)
    test = torch.randn(40, 6, generator=g)
    test_labels = torch.randint(0, 8, (40,), generator=g)
    ref = _slow_knn_scores(train, labels, test, k=10, temperature=0.07, num_classes=8)
    # a hit needs at least one vote for the label: zero-score classes tie and must not count
    expected5 = sum(ref[i, test_labels[i]] > 0 and int((ref[i] > ref[i, test_labels[i]]).sum()) < 5 for i in range(40))
    expected1 = sum(int(test_labels[i]) == int(ref[i].argmax()) for i in range(40))
    acc = knn_accuracy(train, labels, test, test_labels, k=10, num_classes=8)
    assert acc["top1"] == pytest.approx(100 * expected1 / 40)
    assert acc["top5"] == pytest.approx(100 * expected5 / 40)


def test_k_larger_than_train_set_is_clipped():
    train = torch.eye(3)
    scores = knn_classify(train, torch.tensor([0, 1, 2]), torch.eye(3), k=50, temperature=1.0)
    expected = torch.tensor([[math.e, 1, 1], [1, math.e, 1], [1, 1, math.e]]) / math.e  # scaled by exp(-1 / T)
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"k": 0}, "k"), ({"temperature": 0.0}, "temperature"), ({"num_classes": 2}, "num_classes")],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        knn_classify(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), torch.randn(2, 2), **kwargs)


def test_mismatched_dims_raise():
    with pytest.raises(ValueError, match="same C"):
        knn_classify(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.randn(2, 3))


def test_small_temperatures_keep_the_vote():
    """exp(s / T) overflows float32 at T = 0.01 for s > 0.89: the best matches then scored as misses (0%)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100, 8, generator=g)
    y = torch.arange(100) % 3
    for temperature in (0.07, 0.01, 0.001):
        result = knn_accuracy(x, y, x, y, k=5, temperature=temperature)
        assert result["top1"] == 100.0 and result["top5"] == 100.0, temperature
    assert torch.isfinite(knn_classify(x, y, x, k=5, temperature=1e-4)).all()


def test_an_infinite_score_is_a_hit_and_minus_infinity_no_vote():
    scores = torch.tensor([[float("inf"), 0.0, 1.0], [float("-inf"), float("-inf"), float("-inf")]])
    assert topk_correct(scores, torch.tensor([0, 0]), ks=(1,)) == {1: 1}

"""The evaluation protocols' defaults (SPEC: k-NN k = 20 and T = 0.07; the linear probe's SGD, cosine schedule and
per-epoch shuffle; the eval transforms' sizes, crop scales, mirroring and normalisation), pinned against textbook
references."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
from PIL import Image


def test_knn_defaults_are_the_protocols() -> None:
    from swav.cli import build_parser
    from swav.eval.knn import knn_accuracy, knn_classify

    for fn in (knn_accuracy, knn_classify):
        parameters = inspect.signature(fn).parameters
        assert (parameters["k"].default, parameters["temperature"].default) == (20, 0.07)
    args = build_parser().parse_args(["eval-knn", "--checkpoint", "x.pt", "--data", "d"])
    assert (args.k, args.temperature) == ([20], 0.07)


def test_fast_linear_probe_equals_a_textbook_loop_with_the_protocols_defaults() -> None:
    """Sorted labels: a loop that did not shuffle every epoch would train on one class at a time; momentum 0.9,
    weight decay 1e-6, lr 0.3 with a cosine schedule, batches of 256."""
    from swav.eval.linear import LinearClassifier, linear_probe_features

    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) // 200
    x = torch.randn(600, 6, generator=g) + 2.0 * F.one_hot(y, 6).float()
    result = linear_probe_features(x, y, x, y, epochs=3, seed=4)
    generator = torch.Generator().manual_seed(4)
    head = LinearClassifier(6, 3, generator)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3)
    for epoch in range(3):
        order = torch.randperm(600, generator=generator)
        for start in range(0, 600, 256):
            idx = order[start:start + 256]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        with torch.no_grad():
            test_loss = float(F.cross_entropy(head(x), y))
        assert result.history[epoch]["test_loss"] == pytest.approx(test_loss, rel=1e-4)


def test_eval_transforms_follow_the_protocol() -> None:
    from swav.eval.transforms import eval_sizes, eval_transforms

    train, test = eval_transforms()
    red = Image.new("RGB", (500, 375), (255, 0, 0))  # far from the mean: the std matters
    expected = torch.tensor([(1 - 0.485) / 0.228, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225])
    torch.testing.assert_close(test(red).mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    crops = [t for t in train.transforms if isinstance(t, v2.RandomResizedCrop)]
    assert len(crops) == 1 and tuple(crops[0].scale) == (0.08, 1.0)
    gradient = Image.fromarray(np.tile(np.arange(500, dtype=np.uint8)[None, :, None] // 2, (375, 1, 3)))
    reference = v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.228, 0.224, 0.225])])
    torch.testing.assert_close(test(gradient), reference(gradient))
    assert eval_sizes(224) == (224, 256) and eval_sizes(448) == (448, 512)
    # both training presets mirror about half the time (a left-to-right ramp turns into a decreasing one)
    for preset, image in (("imagenet", Image.fromarray(np.tile(np.arange(224, dtype=np.uint8)[None, :], (224, 1)))),
                          ("small", Image.fromarray(np.tile(np.arange(28, dtype=np.uint8)[None, :] * 9, (28, 1))))):
        train, _ = eval_transforms(preset=preset, channels=1, padding=0)
        torch.manual_seed(0)
        slopes = [float((lambda row: row[-1] - row[0])(train(image)[0, image.height // 2])) for _ in range(200)]
        decreasing = sum(s < 0 for s in slopes)
        assert 60 < decreasing < 140, (preset, decreasing)

"""The optional online k-NN monitor of `swav pretrain` (run.knn_every_epochs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swav.cli import main
from swav.config import Config, with_values
from swav.model import ModelSpec, build_model
from swav.pretrain_summary import KnnMonitor

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST IDX files not installed")


def test_monitor_matches_direct_knn():
    from swav.eval.knn import knn_accuracy

    config = with_values(Config(), {"data.path": "fashion-mnist", "data.channels": 1, "crops.sizes": [28],
                                    "run.knn_train_samples": 300, "run.knn_test_samples": 100})
    monitor = KnnMonitor(config, device=torch.device("cpu"))
    assert monitor.train_x.shape == (300, 1, 28, 28) and monitor.test_x.shape == (100, 1, 28, 28)
    model = build_model(ModelSpec(backbone="resnet-compact-4", in_channels=1, hidden_dim=0, output_dim=8,
                                  num_prototypes=10))
    model.train()
    top1 = monitor(model)
    assert model.training  # train mode restored
    model.eval()
    with torch.no_grad():
        direct = knn_accuracy(model.backbone(monitor.train_x), monitor.train_y, model.backbone(monitor.test_x),
                              monitor.test_y, k=20, temperature=0.07)["top1"]
    assert abs(top1 - direct) < 1e-6 and 10.0 < top1 <= 100.0


def test_pretrain_logs_knn_every_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["pretrain", "--data", "fashion-mnist", "--output-dir", str(out), "--epochs", "2",
                 "--batch-size", "32", "--no-summary", "--set", "data.limit=64", "--set", "run.precision=fp32",
                 "--set", "model.backbone=resnet-compact-4", "--set", "run.knn_every_epochs=1",
                 "--set", "run.knn_train_samples=200", "--set", "run.knn_test_samples=50"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if r.get("kind") == "knn"]
    assert [r["epoch"] for r in knn] == [1, 2]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in knn)

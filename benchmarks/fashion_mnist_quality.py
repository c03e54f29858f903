"""What SwAV pretraining learns on Fashion-MNIST within a CPU budget, against the obvious baselines.

    PYTHONPATH=. python benchmarks/fashion_mnist_quality.py --minutes 15 [--output-dir runs/fmq] [--json out.json]

1. Pretrains with the shipped ``fashion_mnist_cpu`` recipe for at most ``--minutes`` of wall-clock
   time (the engine's ``run.time_budget_minutes``; the recipe's own length if that comes first).
2. Evaluates on the 10,000 test images (train features = the 60,000 training images):
   raw-pixel k-NN; an untrained network's k-NN and linear accuracy; the SwAV backbone's k-NN and
   linear accuracy; and supervised training of the same backbone for the same wall-clock budget.
   k-NN: k = 20, cosine, weights exp(sim / 0.07). Linear: the official protocol on pre-extracted
   features (fast mode: N(0, 0.01) init, SGD lr 0.3, momentum 0.9, wd 1e-6, cosine, batch 256,
   100 epochs), last-epoch accuracy.
Prints one table and writes the same figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch
from machine import describe as describe_machine, header as machine_header  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from swav.checkpoint import load_model
from swav.config import apply_overrides
from swav.datasets import build_dataset
from swav.eval.knn import knn_accuracy
from swav.eval.linear import linear_probe_features
from swav.features import extract_features
from swav.model import build_model
from swav.multicrop import resolve_normalization
from swav.recipes import load_recipe
from swav.train import model_spec_from_config, train
from swav.train_data import in_memory_images
from swav.train_step import autocast_dtype, resolve_precision


def load_split(config, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = build_dataset(config.data.path, split=split, channels=config.data.channels)
    images = in_memory_images(dataset, config.data.channels)
    mean, std = resolve_normalization(config.data.channels, config.data.mean, config.data.std)
    x = (images.float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x, torch.as_tensor(dataset.targets, dtype=torch.long)


def features(backbone: nn.Module, x: torch.Tensor, amp_dtype) -> torch.Tensor:
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=1000)
    return extract_features(backbone, loader, device="cpu", amp_dtype=amp_dtype, progress=False)[0]


def evaluate(backbone: nn.Module, data, amp_dtype) -> dict[str, float]:
    (xtr, ytr), (xte, yte) = data
    ftr, fte = features(backbone, xtr, amp_dtype), features(backbone, xte, amp_dtype)
    knn = knn_accuracy(ftr, ytr, fte, yte, k=20, temperature=0.07)["top1"]
    linear = linear_probe_features(ftr, ytr, fte, yte, epochs=100, lr=0.3, seed=0)
    return {"knn_top1": knn, "linear_top1": linear.top1_last, "linear_top1_best": linear.top1_best}


def supervised(config, data, minutes: float, amp_dtype, seed: int) -> dict[str, float]:
    """The same backbone + a linear layer trained with labels for the same wall-clock budget."""
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    backbone = build_model(model_spec_from_config(config)).backbone
    net = nn.Sequential(backbone, nn.Linear(backbone(xtr[:2]).shape[1], 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    batch, start, step = 256, time.monotonic(), 0
    budget = 60 * minutes
    g = torch.Generator().manual_seed(seed)
    net.train()
    while (elapsed := time.monotonic() - start) < budget:
        for group in opt.param_groups:  # cosine over the wall-clock budget
            group["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        x = xtr[idx]
        # augmentation: random shifts of up to 3 px (reflect padding) and horizontal flips
        x = F.pad(x, (3, 3, 3, 3), mode="reflect")
        i, j = torch.randint(0, 7, (2,), generator=g).tolist()
        x = x[:, :, i:i + 28, j:j + 28]
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = F.cross_entropy(net(x).float(), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    net.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        pred = torch.cat([net(xte[i:i + 1000]).float().argmax(1) for i in range(0, len(xte), 1000)])
    return {"test_top1": 100.0 * (pred == yte).float().mean().item(), "steps": step,
            "epochs": step * batch / len(xtr)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="pretraining (and supervised) wall-clock budget")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/fashion_mnist_quality"))
    parser.add_argument("--recipe", default="fashion_mnist_cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--skip-supervised", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(machine_header())
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_recipe(args.recipe)
    values = dict(item.split("=", 1) for item in args.overrides)
    values.update({"run.output_dir": str(args.output_dir), "run.time_budget_minutes": args.minutes})
    config = apply_overrides(config, [f"{k}={v}" for k, v in values.items()])
    precision = resolve_precision(config.run.precision, torch.device("cpu"))
    amp_dtype = autocast_dtype(precision)

    start = time.monotonic()
    result = train(config, overwrite=True)
    pretrain_s = time.monotonic() - start
    model = load_model(args.output_dir / "model.pt") if (args.output_dir / "model.pt").exists() else None
    if model is None:  # stopped by the budget: the newest checkpoint holds the model
        model = load_model(result.checkpoint)
    data = (load_split(config, "train"), load_split(config, "test"))
    (xtr, ytr), (xte, yte) = data
    rows = {"raw pixels": {"knn_top1": knn_accuracy(xtr.flatten(1), ytr, xte.flatten(1), yte, k=20,
                                                    temperature=0.07)["top1"]}}
    torch.manual_seed(config.run.seed)
    rows["untrained network"] = evaluate(build_model(model_spec_from_config(config)).backbone, data, amp_dtype)
    rows["SwAV (this run)"] = evaluate(model.backbone, data, amp_dtype)
    if not args.skip_supervised:
        rows["supervised, same budget"] = supervised(config, data, pretrain_s / 60, amp_dtype, config.run.seed)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nFashion-MNIST test set (10,000 images); pretraining {pretrain_s / 60:.1f} min, {result.step} steps "
          f"({result.epoch} full epochs), status {result.status}, backbone {config.model.backbone}, "
          f"{precision}, {torch.get_num_threads()} threads, peak RSS {peak_gb:.2f} GB")
    print(f"{'features':<28}{'k-NN top-1':>12}{'linear top-1':>14}{'supervised top-1':>18}")
    for name, r in rows.items():
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{name:<28}{fmt(r.get('knn_top1')):>12}{fmt(r.get('linear_top1')):>14}{fmt(r.get('test_top1')):>18}")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "pretrain_minutes": pretrain_s / 60, "steps": result.step,
                                         "status": result.status, "precision": precision,
                                         "backbone": config.model.backbone, "peak_rss_gb": peak_gb,
                                         "results": rows}, indent=2))


if __name__ == "__main__":
    main()

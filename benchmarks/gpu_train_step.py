"""GPU training-step benchmark: ResNet-50, 2x224 + 6x96 crops, the engine's SwAV step.

One command on a GPU machine with only PyTorch, torchvision and this project:

    PYTHONPATH=. python benchmarks/gpu_train_step.py --data ../shared/data/photos-500x375

Prints one table: images/s, peak GPU memory, and the ratio of the full SwAV step to a
backbone-only forward+backward on the same crops, for per-GPU batch 64 and 128, fp32 vs
bf16 + channels-last, synthetic crops and real JPEGs (decode + crop in DataLoader workers,
colour augmentation batched on the GPU). Writes the same figures as JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from swav.config import Config, with_values
from swav.lars import LARS
from swav.model import ModelSpec, build_model
from swav.schedule import warmup_cosine_schedule
from swav.train_step import SwAVStep

CROPS = [(224, 2), (96, 6)]


def make_config(batch: int, channels_last: bool) -> Config:
    return with_values(Config(), {
        "crops.counts": [2, 6], "crops.sizes": [224, 96], "crops.min_scales": [0.14, 0.05],
        "crops.max_scales": [1.0, 0.14], "optim.batch_size_per_device": batch,
        "run.channels_last": channels_last, "run.nan_check": False, "run.log_every_steps": 10**9,
    })


def synthetic_crops(batch: int, device) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, size, size, device=device) for size, count in CROPS for _ in range(count)]


def build_step(config: Config, precision: str, device) -> tuple[SwAVStep, torch.nn.Module]:
    model = build_model(ModelSpec(backbone="resnet50")).to(device)
    if config.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
    schedule = warmup_cosine_schedule(4.8, 0.0048, 100, 1000, 10, 0.3)
    step = SwAVStep(model, model, optimizer, config=config, lr_schedule=schedule, queue_length_per_rank=0,
                    precision=precision, device=device, rank=0)
    return step, model


def timed(fn, steps: int, warmup: int, device) -> float:
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def backbone_only(model, crops, dtype, channels_last):
    """Forward + backward of the backbone alone on the same crops (one pass per resolution)."""
    if channels_last:
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    big, small = torch.cat(crops[:2]), torch.cat(crops[2:])
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model.backbone(big).float().mean() + model.backbone(small).float().mean()
    loss.backward()


def run_synthetic(batch, precision, channels_last, steps, warmup, device):
    torch.cuda.reset_peak_memory_stats(device)
    config = make_config(batch, channels_last)
    step, model = build_step(config, precision, device)
    crops = synthetic_crops(batch, device)
    full = timed(lambda i: step(crops, 5000 + i), steps, warmup, device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    model.zero_grad(set_to_none=True)
    bb = timed(lambda i: backbone_only(model, crops, dtype, channels_last), steps, warmup, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    del step, model, crops
    torch.cuda.empty_cache()
    return {"input": "synthetic", "batch": batch, "precision": precision, "channels_last": channels_last,
            "images_per_s": batch / full, "backbone_only_images_per_s": batch / bb, "step_over_backbone": full / bb,
            "peak_gib": peak}


def run_jpeg(batch, steps, warmup, device, data: Path, workers: int):
    from swav.batch_augment import BatchColorAugment, MultiCropCropper, multicrop_collate
    from swav.multicrop import CropGroup

    files = sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    groups = [CropGroup(224, 2, 0.14, 1.0), CropGroup(96, 6, 0.05, 0.14)]
    cropper = MultiCropCropper(groups, channels=3, seed=0)

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            return cropper(str(files[i % len(files)]), index=i), 0

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=workers, collate_fn=multicrop_collate,
                                         pin_memory=True, drop_last=True, persistent_workers=True, prefetch_factor=4)
    augment = BatchColorAugment(channels=3, seed=0).to(device)
    config = make_config(batch, True)
    torch.cuda.reset_peak_memory_stats(device)
    step, _ = build_step(config, "bf16", device)
    it = iter(loader)
    data_wait = 0.0

    def one(i):
        nonlocal data_wait
        t = time.perf_counter()
        crops_u8, _ = next(it)
        crops_u8 = [c.to(device, non_blocking=True) for c in crops_u8]
        data_wait += time.perf_counter() - t
        step(augment(crops_u8), 5000 + i)

    for i in range(warmup):
        one(i)
    data_wait = 0.0
    per = timed(one, steps, 0, device)
    return {"input": f"jpeg ({workers} workers)", "batch": batch, "precision": "bf16", "channels_last": True,
            "images_per_s": batch / per, "backbone_only_images_per_s": float("nan"), "step_over_backbone": float("nan"),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30, "data_wait_fraction": data_wait / (per * steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "photos-500x375")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--skip-fp32", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    for batch in args.batch_sizes:
        if not args.skip_fp32:
            rows.append(run_synthetic(batch, "fp32", False, args.steps, args.warmup, device))
            print(rows[-1], flush=True)
        rows.append(run_synthetic(batch, "bf16", True, args.steps, args.warmup, device))
        print(rows[-1], flush=True)
    if args.data.is_dir():
        for batch in args.batch_sizes:
            rows.append(run_jpeg(batch, args.steps * 2, args.warmup, device, args.data, args.workers))
            print(rows[-1], flush=True)
    name = torch.cuda.get_device_name(device)
    print(f"\nResNet-50, 2x224 + 6x96, {name}, torch {torch.__version__} (fp32 rows use TF32 matmul/conv)")
    print(f"{'input':<20}{'batch':>6}{'precision':>10}{'ch-last':>8}{'img/s':>9}{'bb-only img/s':>15}{'step/bb':>9}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['input']:<20}{r['batch']:>6}{r['precision']:>10}{str(r['channels_last']):>8}{r['images_per_s']:>9.1f}"
              f"{r['backbone_only_images_per_s']:>15.1f}{r['step_over_backbone']:>9.3f}{r['peak_gib']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""GPU training-step benchmark: ResNet-50, 2x224 + 6x96 crops, the engine's SwAV step.

One command on a GPU machine with only PyTorch, torchvision and this project:

    PYTHONPATH=. python benchmarks/gpu_train_step.py --data ../shared/data/photos-500x375

Prints one table: images/s, peak GPU memory, and the ratio of the full SwAV step to a
backbone-only forward+backward on the same crops, for per-GPU batch 64 and 128, fp32 vs
bf16 + channels-last, synthetic crops and real JPEGs (decoded and cropped either in DataLoader
workers or on the GPU with nvJPEG + roi_align; colour augmentation batched on the GPU), the
fraction of time the step waited for data, how many host-device synchronisations each stage
makes (torch.cuda.set_sync_debug_mode), optionally torch.compile and a short run of the engine
itself (``--engine-steps``). Writes the same figures as JSON with --json, row by row.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import traceback
from pathlib import Path

import torch
from machine import describe as describe_machine, header as machine_header  # noqa: E402

from swav.config import Config, with_values
from swav.lars import LARS
from swav.model import ModelSpec, build_model
from swav.schedule import warmup_cosine_schedule
from swav.train_step import SwAVStep

CROPS = [(224, 2), (96, 6)]


def make_config(batch: int, channels_last: bool) -> Config:
    # run.nan_check off: the step timed here has no per-step finiteness check (the engine's default has one;
    # with check_sync=deferred it adds no synchronisation, and the engine rows below time it)
    return with_values(Config(), {
        "crops.counts": [2, 6], "crops.sizes": [224, 96], "crops.min_scales": [0.14, 0.05],
        "crops.max_scales": [1.0, 0.14], "optim.batch_size_per_device": batch,
        "run.channels_last": channels_last, "run.nan_check": False, "run.log_every_steps": 10**9,
    })


def synthetic_crops(batch: int, device) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, size, size, device=device) for size, count in CROPS for _ in range(count)]


def build_step(config: Config, precision: str, device, compile_model: bool = False) -> tuple[SwAVStep, torch.nn.Module]:
    model = build_model(ModelSpec(backbone="resnet50")).to(device)
    if config.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
    schedule = warmup_cosine_schedule(4.8, 0.0048, 100, 1000, 10, 0.3)
    step = SwAVStep(torch.compile(model) if compile_model else model, model, optimizer, config=config, lr_schedule=schedule, queue_length_per_rank=0,
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
    """Forward + backward of the backbone alone on the same crops (one pass per resolution); gradients are
    reset first, as the SwAV step does, so that neither side pays for accumulating into old ones."""
    model.zero_grad(set_to_none=True)
    if channels_last:
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    big, small = torch.cat(crops[:2]), torch.cat(crops[2:])
    with torch.autocast(big.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
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
    step = model = crops = None  # freed before the next configuration (lambdas above held them)
    torch.cuda.empty_cache()
    return {"input": "synthetic", "batch": batch, "precision": precision, "channels_last": channels_last,
            "images_per_s": batch / full, "backbone_only_images_per_s": batch / bb, "step_over_backbone": full / bb,
            "peak_gib": peak}


def jpeg_files(data: Path) -> list[Path]:
    return sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))


_STEPS: dict[tuple[int, bool], SwAVStep] = {}


def jpeg_step(batch: int, device, compile_model: bool) -> SwAVStep:
    """One bf16 channels-last step per (batch, compile), shared by the JPEG rows (compiling once)."""
    key = (batch, compile_model)
    if key not in _STEPS:
        _STEPS.clear()
        torch.cuda.empty_cache()
        _STEPS[key] = build_step(make_config(batch, True), "bf16", device, compile_model)[0]
    return _STEPS[key]


def run_jpeg(batch, steps, warmup, device, data: Path, workers: int, decode: str, compile_model: bool = False,
             colour: str = "masked", prefetch: int = 0):
    """Real JPEGs, decoded on the CPU in workers (``decode='cpu'``: the ``batched`` pipeline) or read as bytes
    in workers and decoded + cropped on the GPU (``decode='gpu'``: the ``device`` pipeline); colour work on
    the GPU in both cases, eager and masked (``colour='masked'``) or dense under torch.compile
    (``'compiled'``, what ``run.compile`` uses); ``prefetch`` > 0: decode, crop and colour of the next
    batches in a background thread (``data.prefetch_batches``) while the step runs."""
    from swav.batch_augment import BatchColorAugment, MultiCropCropper, multicrop_collate
    from swav.device_crops import DeviceMultiCrop, draw_boxes, encoded_collate, read_header, split_encoded
    from swav.multicrop import CropGroup
    from swav.train_data import prefetched

    files = jpeg_files(data)
    groups = [CropGroup(224, 2, 0.14, 1.0), CropGroup(96, 6, 0.05, 0.14)]
    cropper = MultiCropCropper(groups, channels=3, seed=0)
    device_crops = DeviceMultiCrop(groups, channels=3, seed=0, device=device)

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            path = files[i % len(files)]
            if decode == "gpu":  # as EncodedImageDataset: the bytes, and the crop boxes drawn from the header
                raw = path.read_bytes()
                height, width, orientation = read_header(raw)
                return (torch.frombuffer(bytearray(raw), dtype=torch.uint8), i, 0,
                        draw_boxes(cropper, 0, height, width, i, 0), torch.tensor([height, width, orientation]))
            return cropper(str(path), index=i), 0

    collate = encoded_collate if decode == "gpu" else multicrop_collate
    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=workers, collate_fn=collate,
                                         pin_memory=decode == "cpu", drop_last=True, persistent_workers=True,
                                         prefetch_factor=4)
    augment = BatchColorAugment(channels=3, seed=0, compile=colour == "compiled")
    torch.cuda.reset_peak_memory_stats(device)
    step = jpeg_step(batch, device, compile_model)
    waits = {"loader": 0.0, "queue": 0.0}  # for the workers' batches / for made batches (prefetch)

    def made():
        items = iter(loader)
        while True:
            t = time.perf_counter()
            item = next(items)
            waits["loader"] += time.perf_counter() - t
            if decode == "gpu":
                buffer, ends, indices, epoch, boxes, sizes = item
                crops_u8 = device_crops(split_encoded(buffer, ends), indices, epoch, boxes=boxes, sizes=sizes)
            else:
                crops_u8 = [c.to(device, non_blocking=True) for c in item[0]]
            yield augment(crops_u8)

    batches = prefetched(made(), prefetch, device) if prefetch else made()

    def one(i):
        t = time.perf_counter()
        crops = next(batches)
        waits["queue"] += time.perf_counter() - t
        step(crops, 5000 + i)

    start = time.perf_counter()
    for i in range(warmup):
        one(i)
    torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - start
    waits.update(loader=0.0, queue=0.0)
    per = timed(one, steps, 0, device)
    batches.close()
    data_wait = waits["queue"] if prefetch else waits["loader"]  # what the step waited for
    label = (", torch.compile" if compile_model else "") + (", colour compiled" if colour == "compiled" else "") \
        + (f", prefetch {prefetch}" if prefetch else "")
    return {"input": f"jpeg, {decode} decode{label}", "workers": workers, "batch": batch, "precision": "bf16",
            "channels_last": True, "images_per_s": batch / per, "backbone_only_images_per_s": float("nan"),
            "step_over_backbone": float("nan"), "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "data_wait_fraction": data_wait / (per * steps), "warmup_s": warmup_s,
            "colour_compiled": bool(getattr(augment, "compile", False))}  # False: the compiler failed, eager ran


def sync_audit(device, data: Path) -> dict[str, int]:
    """Host-device synchronisations per call (``torch.cuda.set_sync_debug_mode``), after a warm-up call."""
    import warnings

    from swav.batch_augment import BatchColorAugment
    from swav.device_crops import DeviceMultiCrop
    from swav.multicrop import CropGroup

    batch = 16
    groups = [CropGroup(224, 2, 0.14, 1.0), CropGroup(96, 6, 0.05, 0.14)]
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in jpeg_files(data)[:batch]]
    crops_u8 = [torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=device)
                for s, c in CROPS for _ in range(c)]
    augment = BatchColorAugment(channels=3, seed=0)
    compiled = BatchColorAugment(channels=3, seed=0, compile=True)
    cropper = DeviceMultiCrop(groups, seed=0, device=device)
    calls = {"colour augmentation (masked)": lambda i: augment(crops_u8),
             "colour augmentation (dense, compiled)": lambda i: compiled(crops_u8)}
    if encoded:
        calls["GPU decode + crop"] = lambda i: cropper(encoded, list(range(len(encoded))), 0)
    for nan_check, check_sync in ((False, "step"), (True, "step"), (True, "deferred")):
        config = with_values(make_config(batch, True), {"run.nan_check": nan_check, "run.check_sync": check_sync})
        step, _ = build_step(config, "bf16", device)
        crops = [c.float() for c in crops_u8]
        calls[f"SwAV step, run.nan_check={nan_check}, run.check_sync={check_sync}"] = \
            lambda i, step=step, crops=crops: step(crops, 5000 + i)
    counts = {}
    torch.cuda.set_sync_debug_mode("warn")  # the first switch to "warn" itself reports one synchronisation
    torch.cuda.set_sync_debug_mode(0)
    for name, fn in calls.items():
        fn(0)
        torch.cuda.synchronize(device)
        found: list[str] = []

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message).lower():  # where: the innermost frame of this project's code
                ours = [f for f in traceback.extract_stack()[:-1] if "/swav/" in f.filename or "benchmarks" in f.filename]
                frame = ours[-1] if ours else None
                found.append(f"{Path(filename).name}:{lineno}" + (f" from {Path(frame.filename).name}:{frame.lineno} "
                                                                  f"({frame.line})" if frame else ""))

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn(1)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts[name] = len(found)
        print(f"sync audit: {name}: {len(found)} synchronisation(s) {'; '.join(found)}", flush=True)
    return counts


def augment_breakdown(device, batch: int, steps: int, data: Path | None = None) -> dict:
    """Per batch, in milliseconds: the colour stage alone (eager masked, and dense under torch.compile as
    ``run.compile`` uses it on a GPU), the host time to issue it, the step alone and both together, on
    GPU-resident uint8 crops; the GPU decode + crop of real JPEGs likewise; the profiler's top operators."""
    from torch.profiler import ProfilerActivity, profile

    from swav.batch_augment import BatchColorAugment
    from swav.device_crops import DeviceMultiCrop, draw_boxes, read_header
    from swav.multicrop import CropGroup

    def host_ms(fn) -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            fn(i)
        host = 1000 * (time.perf_counter() - start) / steps
        torch.cuda.synchronize(device)
        return host

    crops_u8 = [torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=device)
                for s, c in CROPS for _ in range(c)]
    step, _ = build_step(make_config(batch, True), "bf16", device)
    crops = [c.float() for c in crops_u8]
    result: dict = {"step_ms": 1000 * timed(lambda i: step(crops, 5000 + i), steps, 2, device)}
    for name, augment in (("masked", BatchColorAugment(channels=3, seed=0)),
                          ("compiled", BatchColorAugment(channels=3, seed=0, compile=True))):
        start = time.perf_counter()
        augment(crops_u8)
        torch.cuda.synchronize(device)
        result[f"{name}_first_call_s"] = time.perf_counter() - start  # includes compiling
        result[f"{name}_ms"] = 1000 * timed(lambda i: augment(crops_u8), steps, 2, device)
        result[f"{name}_host_ms"] = host_ms(lambda i: augment(crops_u8))
        result[f"{name}_then_step_ms"] = 1000 * timed(lambda i: step(augment(crops_u8), 5000 + i), steps, 2, device)
        if device.type == "cuda":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                augment(crops_u8)
                torch.cuda.synchronize(device)
            print(f"colour stage ({name}), top operators by GPU time:", flush=True)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
    files = jpeg_files(data) if data is not None and data.is_dir() else []
    if files:
        encoded = [torch.frombuffer(bytearray(files[i % len(files)].read_bytes()), dtype=torch.uint8)
                   for i in range(batch)]
        cropper = DeviceMultiCrop([CropGroup(224, 2, 0.14, 1.0), CropGroup(96, 6, 0.05, 0.14)], seed=0, device=device)
        sizes = torch.tensor([read_header(bytes(e.numpy())) for e in encoded])  # height, width, EXIF orientation
        boxes = torch.stack([draw_boxes(cropper.cropper, 0, h, w, i, 0) for i, (h, w, _) in enumerate(sizes.tolist())])
        # as in the engine: the boxes come from the workers
        decode_crop = lambda i: cropper(encoded, list(range(batch)), 0, boxes=boxes, sizes=sizes)  # noqa: E731
        result["decode_crop_ms"] = 1000 * timed(decode_crop, steps, 2, device)
        result["decode_crop_host_ms"] = host_ms(decode_crop)
        result["decode_only_ms"] = 1000 * timed(lambda i: cropper.decode(encoded), steps, 2, device)
    print(f"colour stage breakdown, batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)
    result["per_op_ms"] = per_op_times(device, batch)
    return result


def per_op_times(device, batch: int) -> dict[str, float]:
    """Milliseconds of each colour op on a whole resolution batch (V x B crops), synchronised."""
    import swav.color_ops as co
    from swav.multicrop import blur_kernel_size

    ops = {"flip": lambda x, f: co.flip_batch(x, inplace=True),
           "brightness": lambda x, f: co.adjust_brightness_batch(x, f, inplace=True),
           "contrast": lambda x, f: co.adjust_contrast_batch(x, f, inplace=True),
           "saturation": lambda x, f: co.adjust_saturation_batch(x, f, inplace=True),
           "hue": lambda x, f: co.adjust_hue_batch(x, f - 1.0, inplace=True),
           "grayscale": lambda x, f: co.grayscale_batch(x, inplace=True),
           "index select+copy (half)": lambda x, f: x.index_copy_(0, f.argsort()[: len(f) // 2],
                                                                   x.index_select(0, f.argsort()[: len(f) // 2]))}
    times = {}
    for size, count in CROPS:
        n = batch * count
        x = torch.rand(n, 3, size, size, device=device)
        f = torch.rand(n, device=device) + 0.5
        table = dict(ops)
        table["blur"] = lambda x, f, k=blur_kernel_size(size): co.gaussian_blur_batch(x, f, k, inplace=True)
        for name, fn in table.items():
            times[f"{name} {count}x{size}"] = 1000 * timed(lambda i: fn(x, f), 3, 1, device)
    print("colour ops, ms per whole batch: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()), flush=True)
    return times


def run_engine(device, data: Path, batch: int, steps: int, workers: int, out_dir: Path,
               compile_model: bool = False, check_sync: str = "auto", prefetch: int = 0) -> dict:
    """``swav pretrain`` itself (the engine's loop: logging, NaN check, metrics) on the photos with the
    ``device`` pipeline, ResNet-50 2x224 + 6x96, for ``steps`` steps; images/s from its metrics."""
    from swav.train import train

    folder = out_dir / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    files = jpeg_files(data)
    for i in range(batch * (steps + 1)):  # one epoch holds every step (links: no copies)
        link = folder / f"{i:06d}.jpg"
        if link.is_symlink() and not link.exists():  # dangling: the photos moved since a previous call
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(files[i % len(files)].resolve())
    config = with_values(Config(), {
        "data.path": str(folder), "data.pipeline": "device", "data.workers": workers,
        "crops.counts": [2, 6], "crops.sizes": [224, 96], "crops.min_scales": [0.14, 0.05],
        "crops.max_scales": [1.0, 0.14], "optim.batch_size_per_device": batch, "optim.epochs": 1,
        "optim.warmup_epochs": 0.0, "run.channels_last": True, "run.output_dir": str(out_dir / "run"),
        "run.max_steps": steps, "run.log_every_steps": 10, "run.device": device.type, "run.compile": compile_model,
        "run.check_sync": check_sync, "data.prefetch_batches": prefetch})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = train(config, overwrite=True)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]  # the first interval includes start-up
    label = (", run.compile" if compile_model else "") + ("" if check_sync == "auto" else f", check_sync={check_sync}") \
        + (f", prefetch {prefetch}" if prefetch else "")
    return {"input": f"swav pretrain, device pipeline{label}", "batch": batch, "steps": result.step, "wall_s": wall,
            "status": result.status, "peak_gib": peak,
            # equal intervals (10 steps): their harmonic mean = all their images / all their time
            "images_per_s": len(rates) / sum(1 / r for r in rates) if rates else float("nan")}


def decode_stream_check(batch, steps, warmup, device, data: Path, workers: int, repeats: int = 2) -> list[dict]:
    """The eager JPEG loop (``device`` pipeline) with the decode on its own stream (the library) against
    torchvision's decoder called with the training stream current (which can overwrite memory that queued
    kernels still read), alternated: what the protection costs. The second variant may fail or corrupt data."""
    import swav.device_crops as dc

    own = dc.DeviceMultiCrop._device_decode
    shared = lambda self, data, mode: dc.decode_jpeg(data, mode=mode, device=self.device)  # noqa: E731
    rows = []
    try:
        for _ in range(repeats):
            for label, fn in (("own stream", own), ("training stream", shared)):
                dc.DeviceMultiCrop._device_decode = fn
                try:
                    row = run_jpeg(batch, steps, warmup, device, data, workers, "gpu")
                except Exception as exc:  # a corrupted step may stop the run (NaN check)
                    row = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                row = {**row, "input": f"jpeg, gpu decode on the {label}", "batch": batch}
                print(row, flush=True)
                rows.append(row)
    finally:
        dc.DeviceMultiCrop._device_decode = own
    return rows


def run_compiled(batch, steps, warmup, device):
    """Synthetic crops, bf16 + channels-last, the model wrapped in ``torch.compile`` (run.compile=true)."""
    torch.cuda.reset_peak_memory_stats(device)
    config = make_config(batch, True)
    model = build_model(ModelSpec(backbone="resnet50")).to(device).to(memory_format=torch.channels_last)
    optimizer = LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
    schedule = warmup_cosine_schedule(4.8, 0.0048, 100, 1000, 10, 0.3)
    step = SwAVStep(torch.compile(model), model, optimizer, config=config, lr_schedule=schedule,
                    queue_length_per_rank=0, precision="bf16", device=device, rank=0)
    crops = synthetic_crops(batch, device)
    start = time.perf_counter()
    step(crops, 5000)
    torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - start
    full = timed(lambda i: step(crops, 5001 + i), steps, warmup, device)
    return {"input": "synthetic, torch.compile", "batch": batch, "precision": "bf16", "channels_last": True,
            "images_per_s": batch / full, "backbone_only_images_per_s": float("nan"),
            "step_over_backbone": float("nan"), "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "photos-500x375")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--skip-fp32", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile at the largest batch")
    parser.add_argument("--engine-steps", type=int, default=0, help="also run swav pretrain for this many steps")
    parser.add_argument("--engine-check-sync", nargs="+", default=["auto"], choices=["auto", "step", "deferred"],
                        help="run.check_sync of the engine runs (one run each; auto = deferred on CUDA)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/swav_gpu_bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-diagnostics", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--decodes", nargs="*", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    parser.add_argument("--compile-jpeg", action="store_true",
                        help="torch.compile the model in the JPEG rows and the engine runs (run.compile)")
    parser.add_argument("--jpeg-colour", nargs="+", default=["masked"], choices=["masked", "compiled"],
                        help="colour stage of the JPEG rows: eager masked, or dense under torch.compile")
    parser.add_argument("--jpeg-prefetch", type=int, nargs="+", default=[0],
                        help="JPEG rows: batches made ahead in a background thread (one row per value)")
    parser.add_argument("--engine-prefetch", type=int, nargs="+", default=[0],
                        help="data.prefetch_batches of the engine runs (one run per value and check mode)")
    parser.add_argument("--only-diagnostics", action="store_true", help="sync audit and colour-stage breakdown only")
    parser.add_argument("--decode-stream-check", action="store_true",
                        help="also time the eager JPEG loop with the decode on its own stream vs the training stream")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="run every code path once on the CPU (CUDA calls become no-ops) to check the script")
    args = parser.parse_args()
    print(machine_header())
    if args.smoke_cpu:
        for fn in ("synchronize", "reset_peak_memory_stats", "empty_cache", "set_sync_debug_mode"):
            setattr(torch.cuda, fn, lambda *a, **k: None)
        torch.cuda.max_memory_allocated = lambda *a, **k: 0
        torch.cuda.get_device_name = lambda *a, **k: "CPU (smoke test)"
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    else:
        device = torch.device("cuda", torch.cuda.current_device())  # with its index, as the engine's
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device)
    report: dict = {"machine": describe_machine(), "device": name, "torch": torch.__version__, "rows": [], "sync_audit": {}}

    def guarded(label: str, fn, *fn_args):
        """One row; a failure is recorded in its place and the next rows still run (a lent GPU's time is scarce)."""
        try:
            return fn(*fn_args)
        except Exception as error:  # noqa: BLE001 - recorded, reported in the table
            print(f"{label} failed: {type(error).__name__}: {error}", flush=True)
            return {"input": f"{label} (FAILED: {type(error).__name__}: {str(error)[:200]})", "batch": 0,
                    "images_per_s": float("nan"), "error": f"{type(error).__name__}: {error}"}

    started = time.perf_counter()

    def save(row=None):
        if row is not None:
            report["rows"].append(row)
            print(row, flush=True)
        report["wall_s"] = time.perf_counter() - started  # the whole script so far (the budget is 8 minutes)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))

    have_data = args.data.is_dir() and bool(jpeg_files(args.data))
    if args.data != parser.get_default("data") and not have_data:  # given explicitly: a wasted call otherwise
        raise SystemExit(f"--data {args.data}: no JPEG files there (on a lent machine: is it in `carry`?)")
    if not args.skip_diagnostics:
        report["sync_audit"] = sync_audit(device, args.data if have_data else Path("/nonexistent"))
        save()
        report["colour_stage"] = augment_breakdown(device, max(args.batch_sizes), args.steps,
                                                   args.data if have_data else None)
        save()
    if args.decode_stream_check and have_data:
        report["decode_stream"] = decode_stream_check(max(args.batch_sizes), args.steps * 2, args.warmup, device,
                                                      args.data, args.workers)
        save()
    if args.only_diagnostics:
        return
    for batch in [] if args.skip_synthetic else args.batch_sizes:
        if not args.skip_fp32:
            save(run_synthetic(batch, "fp32", False, args.steps, args.warmup, device))
        save(run_synthetic(batch, "bf16", True, args.steps, args.warmup, device))
    if have_data:
        for decode in args.decodes:
            for batch in args.batch_sizes:
                for colour in args.jpeg_colour:
                    for prefetch in args.jpeg_prefetch:
                        save(guarded(f"jpeg {decode} colour {colour} prefetch {prefetch}", run_jpeg, batch,
                                     args.steps * 2, args.warmup, device, args.data, args.workers, decode,
                                     args.compile_jpeg, colour, prefetch))
        _STEPS.clear()
        stopped = False
        for check_sync in args.engine_check_sync if args.engine_steps else []:
            for prefetch in args.engine_prefetch:
                if stopped:
                    break
                row = guarded(f"engine check_sync {check_sync} prefetch {prefetch}", run_engine, device, args.data,
                              max(args.batch_sizes), args.engine_steps, args.workers, args.work_dir,
                              args.compile_jpeg, check_sync, prefetch)
                save(row)
                if args.json:  # the engine's own logs come back with the JSON
                    for log_name in ("metrics.jsonl", "train.log"):
                        if (args.work_dir / "run" / log_name).is_file():
                            shutil.copy(args.work_dir / "run" / log_name, args.json.parent /
                                        f"engine_{check_sync}_prefetch{prefetch}_{log_name}")
                # a SIGTERM (the caller's time limit) makes the engine save and return "preempted": stop here
                stopped = row.get("status") == "preempted"
    if args.compile:
        save(run_compiled(max(args.batch_sizes), args.steps, args.warmup, device))
    save()
    print(f"\nResNet-50, 2x224 + 6x96, {name}, torch {torch.__version__} (fp32 rows use TF32 matmul/conv); "
          f"{report['wall_s']:.0f} s in all")
    if report["sync_audit"]:
        print("host-device synchronisations per call: " + ", ".join(f"{k}: {v}" for k, v in report["sync_audit"].items()))
    print(f"{'input':<52}{'batch':>6}{'precision':>10}{'img/s':>9}{'bb-only img/s':>15}{'step/bb':>9}{'peak GiB':>10}"
          f"{'data wait':>11}")
    for r in report["rows"]:
        wait = r.get("data_wait_fraction")
        print(f"{r['input']:<52}{r['batch']:>6}{r.get('precision', 'bf16'):>10}{r['images_per_s']:>9.1f}"
              f"{r.get('backbone_only_images_per_s', float('nan')):>15.1f}{r.get('step_over_backbone', float('nan')):>9.3f}"
              f"{r.get('peak_gib', float('nan')):>10.2f}{'' if wait is None else f'{100 * wait:.1f}%':>11}")


if __name__ == "__main__":
    main()

"""What an exact resume inside a streamed-shard epoch costs: the time until the first batch after
``set_epoch(epoch, start_batch)``, resuming at several points of the epoch, side by side with starting the
epoch from its beginning, and with the straightforward way to the same batches (reading and decoding the
epoch from its start and dropping what was trained on).

    PYTHONPATH=. python benchmarks/shard_resume.py --data .bench_photos [--copies 8] [--workers 2] [--json out.json]

The photos are packed ``--copies`` times (each copy under other names) into ``--shards`` shards; the loader is
the engine's (:func:`swav.train_data.build_train_loader`, batched pipeline, 2x224 + 6x96 crops, batch
``--batch``) on one rank. Every case is timed ``--repeats`` times, alternating, and the median is given.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe as describe_machine, header as machine_header  # noqa: E402

from swav.config import Config, with_values
from swav.datasets import list_image_files
from swav.shards import ShardDataset, write_shards
from swav.train_data import build_train_loader


def _config(workers: int, batch: int) -> Config:
    return with_values(Config(), {"data.workers": workers, "data.pipeline": "batched", "data.channels": 3,
                                  "crops.counts": [2, 6], "crops.sizes": [224, 96], "crops.min_scales": [0.14, 0.05],
                                  "crops.max_scales": [1.0, 0.14], "optim.batch_size_per_device": batch,
                                  "run.device": "cpu"})


def time_to_first_batch(shards: Path, config: Config, start_batch: int, skip_by_reading: bool,
                        shuffle_buffer: int) -> float:
    """Seconds from ``set_epoch`` to the first batch of the rest of the epoch. ``skip_by_reading``: start the
    epoch at its beginning and drop ``start_batch`` batches (what an exact resume costs without skipping)."""
    ds = ShardDataset(shards, rank=0, world_size=1, seed=config.run.seed, return_key=True,
                      shuffle_buffer=shuffle_buffer)
    loader = build_train_loader(config, ds, pipeline="batched", rank=0, world_size=1, device=torch.device("cpu"))
    start = time.perf_counter()
    loader.set_epoch(1, 0 if skip_by_reading else start_batch)
    batches = iter(loader)
    for _ in range(start_batch if skip_by_reading else 0):
        next(batches)
    next(batches)
    seconds = time.perf_counter() - start
    del batches
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder of photos")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shuffle-buffer", type=int, default=1000,
                        help="samples per worker's shuffle buffer (training's default: 1000); a resume reads the "
                             "shards that still hold samples of the buffer, so take streams several times longer")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    print(machine_header())
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="swav-shard-resume-"))
    try:
        files = list_image_files(args.data)
        for k in range(args.copies):  # the files' own bytes, under other names: pack-shards keeps the encoding
            for rel in files:
                target = work / "photos" / f"copy{k}" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(args.data) / rel, target)
        write_shards(work / "photos", work / "shards", num_shards=args.shards)
        images = len(files) * args.copies
        config = _config(args.workers, args.batch)
        steps = images // args.batch
        points = sorted({steps // 2, steps - 1})
        cases = [("start of the epoch", 0, False)]
        cases += [(f"resume at batch {b} of {steps} (exact, skipping)", b, False) for b in points]
        cases += [(f"resume at batch {b} of {steps} by reading and dropping", b, True) for b in points]
        times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        time_to_first_batch(work / "shards", config, 0, False, args.shuffle_buffer)  # warm the cache, imports
        for _ in range(args.repeats):
            for name, start_batch, by_reading in cases:
                times[name].append(time_to_first_batch(work / "shards", config, start_batch, by_reading,
                                                       args.shuffle_buffer))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(times["start of the epoch"])
    print(f"{images} images in {args.shards} shards, batch {args.batch}, {args.workers} workers, shuffle buffer "
          f"{args.shuffle_buffer}, 2x224 + 6x96 crops, median of {args.repeats}")
    print(f"| {'case':<55} | {'s to first batch':>16} | {'vs start':>8} |")
    print(f"|{'-' * 57}|{'-' * 18}|{'-' * 10}|")
    rows = []
    for name, start_batch, by_reading in cases:
        median = statistics.median(times[name])
        rows.append({"case": name, "start_batch": start_batch, "by_reading": by_reading, "seconds": times[name],
                     "median_s": median, "vs_start": median / base})
        print(f"| {name:<55} | {median:16.2f} | {median / base:7.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe_machine(), "images": images, "shards": args.shards, "batch": args.batch,
                                               "shuffle_buffer": args.shuffle_buffer,
                                               "workers": args.workers, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Main-process host time of the ``device`` pipeline that does not need a GPU to measure.

On a GPU node the main process issues the step, the decode, the crops and the colour stage; every
millisecond of Python it spends per batch is a millisecond the GPU may wait. This prints, per batch of
``--batch`` photos (2x224 + 6x96 crops), the time to draw the crop boxes (RandomResizedCrop's draws, one
seeded generator per image) and to read the image sizes from the file headers: the work the DataLoader
workers now do for the main process (``EncodedImageDataset`` with crop groups), and what it costs them.

    PYTHONPATH=. python benchmarks/device_host_time.py --data ../shared/data/photos-500x375
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from machine import describe as describe_machine, header as machine_header  # noqa: E402

from swav.batch_augment import MultiCropCropper
from swav.device_crops import draw_boxes, header_size
from swav.multicrop import CropGroup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "photos-500x375")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(machine_header())
    torch.set_num_threads(1)
    files = sorted(p for p in args.data.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no JPEG files in {args.data}")
    raw = [files[i % len(files)].read_bytes() for i in range(args.batch)]
    cropper = MultiCropCropper([CropGroup(224, 2, 0.14, 1.0), CropGroup(96, 6, 0.05, 0.14)], seed=0)
    sizes = [header_size(data) for data in raw]

    def boxes(epoch: int) -> None:
        for i, (h, w) in enumerate(sizes):
            draw_boxes(cropper, 0, h, w, i, epoch)

    def headers(epoch: int) -> None:
        for data in raw:
            header_size(data)

    rows = {}
    for name, fn in (("crop boxes (8 per image)", boxes), ("image size from the header", headers)):
        times = []
        for r in range(args.repeats):
            start = time.perf_counter()
            fn(r)
            times.append(time.perf_counter() - start)
        rows[name] = 1000 * statistics.median(times)
    print(f"per batch of {args.batch} photos, one thread, median of {args.repeats}")
    print(f"{'work':<30}{'ms per batch':>14}{'ms per image':>14}")
    for name, ms in rows.items():
        print(f"{name:<30}{ms:>14.2f}{ms / args.batch:>14.3f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "batch": args.batch, "ms_per_batch": rows}, indent=2))


if __name__ == "__main__":
    main()

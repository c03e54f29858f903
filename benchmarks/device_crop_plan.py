"""Host cost of cutting a batch's crops in the ``device`` pipeline when the batch holds many source sizes.

Photo collections such as ImageNet mix image sizes, and ``DeviceMultiCrop`` cuts every crop of one
resolution with one ``roi_align`` call per source size. Issuing work per source size costs host time on the
thread that also feeds the GPU. This compares, side by side in one process, two ways of issuing the same
crops (bit-identical outputs, checked here):

* ``per size``: for each resolution and source size, build that size's rois and output rows with small
  tensor ops, copy both to the device, roi_align, round, clamp, convert, and scatter into the output
  (how ``DeviceMultiCrop`` worked until the seventh session);
* ``planned``: ``DeviceMultiCrop.crop``: all rois and output rows planned at once in NumPy and copied
  once, then per resolution one roi_align per source size, one concatenation, one round/clamp/convert and
  one scatter.

It reports, per batch of ``--batch`` images with 2x224 + 6x96 crops and N distinct source sizes (24-40 px
images; the counts do not depend on pixel sizes): the PyTorch operators dispatched, a device-independent
count of what the host issues (on a GPU each is a kernel launch or a copy); and the time per batch with
the same boxes cut at 2x16 + 6x8 px, where the arithmetic is negligible and the time is the host's
(Python, dispatch), a lower bound of what the GPU's launch path costs.

    PYTHONPATH=. python benchmarks/device_crop_plan.py --json benchmarks/results_cpu2_device_crop_plan.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from machine import describe as describe_machine, header as machine_header  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import roi_align

from swav.device_crops import DeviceMultiCrop, draw_boxes
from swav.multicrop import CropGroup

GROUPS = [CropGroup(224, 2, 0.14, 1.0), CropGroup(96, 6, 0.05, 0.14)]
TINY = [CropGroup(16, 2, 0.14, 1.0), CropGroup(8, 6, 0.05, 0.14)]  # same boxes, negligible arithmetic


def per_size(cropper: DeviceMultiCrop, images: list[torch.Tensor], boxes: torch.Tensor) -> list[torch.Tensor]:
    """The baseline: rois, rows and copies issued per resolution and source size."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for b, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape[-2:]), []).append(b)
    stacks = {shape: torch.stack([images[b] for b in members]).float() for shape, members in by_shape.items()}
    batch, out, start = len(images), [], 0
    for g in cropper.groups:
        crops = torch.empty(g.count * batch, cropper.channels, g.size, g.size, dtype=torch.uint8,
                            device=cropper.device)
        for shape, members in by_shape.items():
            member = torch.tensor(members)
            picked = boxes[member, start:start + g.count].transpose(0, 1).reshape(-1, 4)
            position = torch.arange(len(members), dtype=torch.float32).repeat(g.count)
            rois = torch.cat([position.view(-1, 1), picked], dim=1)
            targets = (torch.arange(g.count).view(-1, 1) * batch + member.view(1, -1)).reshape(-1)
            if cropper.device.type == "cuda":
                rois = rois.pin_memory().to(cropper.device, non_blocking=True)
                targets = targets.pin_memory().to(cropper.device, non_blocking=True)
            cut = roi_align(stacks[shape], rois, output_size=g.size, spatial_scale=1.0, sampling_ratio=-1,
                            aligned=True)
            crops.index_copy_(0, targets, cut.round_().clamp_(0, 255).to(torch.uint8))
        out += list(crops.split(batch))
        start += g.count
    return out


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def batch_of(n_sizes: int, batch: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """``batch`` tiny uint8 images with ``n_sizes`` distinct (H, W), each size used about equally often."""
    g = torch.Generator().manual_seed(seed)
    shapes, seen = [], set()
    while len(shapes) < n_sizes:
        shape = tuple(int(v) for v in torch.randint(24, 41, (2,), generator=g))
        if shape not in seen:
            seen.add(shape)
            shapes.append(shape)
    return [torch.randint(0, 256, (3, *shapes[i % n_sizes]), dtype=torch.uint8, generator=g).to(device)
            for i in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(machine_header())
    torch.set_num_threads(1)
    device = torch.device(args.device)
    cropper = DeviceMultiCrop(GROUPS, seed=0, device=device)
    tiny = DeviceMultiCrop(TINY, seed=0, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    print(f"batch {args.batch}, 2x224 + 6x96 crops, {device.type}, one thread, median of {args.repeats} "
          "alternated rounds")
    print(f"{'source sizes':>12} {'ops per size':>13} {'ops planned':>12} {'ms per size':>12} {'ms planned':>11} "
          f"{'time ratio':>11}")
    for n in args.sizes:
        images = batch_of(n, args.batch, device)
        boxes = torch.stack([draw_boxes(cropper.cropper, 0, im.shape[1], im.shape[2], i, 0)
                             for i, im in enumerate(images)])
        sizes = torch.tensor([list(im.shape[-2:]) for im in images])
        def ways(c: DeviceMultiCrop) -> dict:
            return {"per size": lambda: per_size(c, images, boxes),
                    "planned": lambda: c.crop(images, list(range(len(images))), 0, boxes=boxes, sizes=sizes)}
        counts = []
        for c in (cropper, tiny):
            outputs, ops = {}, {}
            for name, fn in ways(c).items():
                with OpCounter() as counter:
                    outputs[name] = fn()
                ops[name] = counter.count
            assert all(torch.equal(a, b) for a, b in zip(outputs["per size"], outputs["planned"])), "outputs differ"
            counts.append(ops)
        ops = counts[0]
        assert counts[1] == ops, "operator counts depend on the crop size"
        ways = ways(tiny)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, fn in ways.items():
                sync()
                begin = time.perf_counter()
                fn()
                sync()
                times[name].append(1000 * (time.perf_counter() - begin))
        ms = {name: statistics.median(t) for name, t in times.items()}
        row = {"source_sizes": n, "ops": ops, "ms": ms, "time_ratio": ms["per size"] / ms["planned"]}
        rows.append(row)
        print(f"{n:>12} {ops['per size']:>13} {ops['planned']:>12} {ms['per size']:>12.2f} {ms['planned']:>11.2f} "
              f"{row['time_ratio']:>10.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "batch": args.batch, "device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Multi-crop data pipeline throughput per CPU core (issue "Speed", SPEC §7).

Runs, side by side in one process with one thread, 2x224 + 6x96 crops of real 500x375 JPEGs,
decode included, cycling the photos:
  torchvision-pil      the straightforward per-image pipeline (torchvision transforms on PIL,
                       torchvision GaussianBlur): the baseline
  torchvision-pil+PILblur  same, blur by PIL's ImageFilter.GaussianBlur (the original SwAV's choice)
  MultiCropTransform   swav.multicrop, per image, torchvision v2 ops on uint8 tensors
  FastMultiCrop        swav.batch_augment: per-image decode + uint8 crop, batched colour/blur

images/s/core uses the process CPU time (robust on a shared machine); wall time is shown too.

    python benchmarks/data_pipeline.py --images 256 --json out.json
    python benchmarks/data_pipeline.py --device cuda   # batched colour stage on the GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
from machine import describe as describe_machine, header as machine_header, peak_rss_gib, peak_windows_supported, reset_peak_rss  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from swav.batch_augment import BatchColorAugment, FastMultiCrop  # noqa: E402
from swav.multicrop import (IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform,  # noqa: E402
                            blur_kernel_size, crop_groups_from_lists)

DEFAULT_DATA = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "photos-500x375"
GROUPS = crop_groups_from_lists([2, 6], [224, 96], [0.14, 0.05], [1.0, 0.14])


class PILGaussianBlur:
    """PIL's Gaussian blur with sigma ~ U[0.1, 2.0] (what the original SwAV used)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(0.1, 2.0).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def baseline_transforms(pil_blur: bool) -> list[Callable[[Image.Image], torch.Tensor]]:
    """One torchvision Compose per crop, applied crop by crop on the PIL image."""
    per_crop = []
    for group in GROUPS:
        blur = PILGaussianBlur() if pil_blur else T.GaussianBlur(blur_kernel_size(group.size),
                                                                  (0.1, 2.0))
        chain = T.Compose([
            T.RandomResizedCrop(group.size, scale=(group.min_scale, group.max_scale)),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([blur], p=0.5),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        per_crop += [chain] * group.count
    return per_crop


def run_per_image(files: list[Path], num_images: int, fn: Callable[[Path], object]) -> None:
    for i in range(num_images):
        fn(files[i % len(files)])


def measure(name: str, work: Callable[[int], None], num_images: int) -> dict:
    reset_peak_rss()  # the process's peak while this pipeline ran (photos and libraries included)
    work(min(8, num_images))  # warm-up (allocators, lazy imports)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    work(num_images)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"pipeline": name, "images": num_images, "cpu_s": cpu, "wall_s": wall,
            "images_per_s_per_core": num_images / cpu, "peak_rss_gib": peak_rss_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=256, help="images per pipeline")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="device of the batched stage")
    parser.add_argument("--skip", nargs="*", default=[], help="pipelines to skip (by name)")
    parser.add_argument("--colour-strategies", nargs="+", default=["auto"],
                        choices=["auto", "opencv", "grouped", "masked", "dense", "dense-compiled", "compiled"],
                        help="one FastMultiCrop row per colour-stage strategy (dense-compiled: the dense stage under "
                             "torch.compile; compiled: compile=True, on a CPU the grouped strategy with a compiled hue)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every pipeline this many times, in turn; report medians")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    print(machine_header())
    windows = peak_windows_supported()
    torch.set_num_threads(1)
    if not args.data.is_dir():
        raise SystemExit(f"--data {str(args.data)!r} is not a folder: pass a folder of JPEG photos (ImageNet-size, "
                         "e.g. 500 x 375), as --data DIR")
    files = sorted(p for p in args.data.resolve().iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no JPEG files in {args.data}")
    device = torch.device(args.device)

    def pil_pipeline(pil_blur: bool) -> Callable[[int], None]:
        chains = baseline_transforms(pil_blur)

        def one(path: Path) -> list[torch.Tensor]:
            with Image.open(path) as image:
                image = image.convert("RGB")
            return [chain(image) for chain in chains]
        return lambda n: run_per_image(files, n, one)

    reference = MultiCropTransform(GROUPS)

    def reference_one(path: Path) -> list[torch.Tensor]:
        with Image.open(path) as image:
            return reference(image.convert("RGB"))

    def fast_pipeline(strategy: str) -> Callable[[int], None]:
        fast = FastMultiCrop(GROUPS)
        if strategy == "dense-compiled":
            fast.augment = BatchColorAugment(strategy="dense", compile=True)
        elif strategy == "compiled":
            fast.augment = BatchColorAugment(compile=True)
        elif strategy != "auto":  # built anew so that the constructor checks the strategy (opencv needs OpenCV)
            fast.augment = BatchColorAugment(strategy=strategy)

        def fast_work(n: int) -> None:
            for start in range(0, n, args.batch_size):
                paths = [files[i % len(files)] for i in range(start, min(n, start + args.batch_size))]
                fast(paths, device=device if device.type != "cpu" else None)
            if device.type == "cuda":
                torch.cuda.synchronize()
        if strategy in ("dense-compiled", "compiled"):  # compile outside the timed part
            fast_work(args.batch_size)
        return fast_work

    pipelines = [("torchvision-pil", pil_pipeline(False)),
                 ("torchvision-pil+PILblur", pil_pipeline(True)),
                 ("MultiCropTransform", lambda n: run_per_image(files, n, reference_one))]
    def label(strategy: str) -> str:
        if strategy == "auto":  # name what auto resolves to here (opencv needs OpenCV installed)
            return f"{device.type}, auto = {BatchColorAugment().resolved_strategy(device)}"
        return f"{device.type}, {strategy}"
    pipelines += [(f"FastMultiCrop ({label(s)})", fast_pipeline(s)) for s in args.colour_strategies]
    chosen = [(name, work) for name, work in pipelines if name.split(" ")[0] not in args.skip]
    # rounds: every pipeline once per round, in turn, so that drifts of a shared machine hit all of them alike
    if not chosen:
        parser.error("--skip leaves no pipeline to time")
    rounds = []
    for round_index in range(args.rounds):  # a different pipeline first in each round, results kept in table order
        first = round_index % len(chosen)
        order = list(range(first, len(chosen))) + list(range(first))
        times = {i: measure(chosen[i][0], chosen[i][1], args.images) for i in order}
        rounds.append([times[i] for i in range(len(chosen))])
    results = []
    for i, (name, _) in enumerate(chosen):
        runs = [r[i] for r in rounds]
        rates = [run["images_per_s_per_core"] for run in runs]
        results.append({"pipeline": name, "images": args.images, "rounds": args.rounds,
                        "images_per_s_per_core": statistics.median(rates), "per_round": rates,
                        "cpu_s": statistics.median(run["cpu_s"] for run in runs),
                        "peak_rss_gib": max(run["peak_rss_gib"] for run in runs),
                        "wall_s": statistics.median(run["wall_s"] for run in runs)})
    base_index = next((i for i, r in enumerate(results) if r["pipeline"] == "torchvision-pil"), 0)
    base = results[base_index]
    print(f"{len(files)} photos from {args.data.resolve()}, crops 2x224 + 6x96, "
          f"{args.images} images each, torch threads 1, {args.rounds} round(s) (medians)")
    # ratios are medians of per-round ratios; the second one is against the fastest per-image chain
    pil_index = next((i for i, r in enumerate(results) if r["pipeline"] == "torchvision-pil+PILblur"), None)
    print(f"{'pipeline':<36} {'images/s/core':>14} {'ratio vs baseline':>18} {'ratio range':>14} "
          f"{'vs PIL-blur chain':>18} {'ratio range':>14} {'wall s':>8} {'peak GiB':>9}")
    for i, r in enumerate(results):
        ratios = [round_[i]["images_per_s_per_core"] / round_[base_index]["images_per_s_per_core"]
                  for round_ in rounds]
        r["ratio_vs_baseline"] = statistics.median(ratios)  # median of the per-round ratios
        r["ratio_per_round"] = ratios
        pil = "-"
        if pil_index is not None:
            vs_pil = [round_[i]["images_per_s_per_core"] / round_[pil_index]["images_per_s_per_core"]
                      for round_ in rounds]
            r["ratio_vs_pil_blur_chain"], r["ratio_vs_pil_blur_chain_per_round"] = statistics.median(vs_pil), vs_pil
            pil = f"{statistics.median(vs_pil):>18.2f} {min(vs_pil):>6.2f}-{max(vs_pil):<7.2f}"
        print(f"{r['pipeline']:<36} {r['images_per_s_per_core']:>14.1f} {r['ratio_vs_baseline']:>18.2f} "
              f"{min(ratios):>6.2f}-{max(ratios):<7.2f} {pil:>33} {r['wall_s']:>8.1f} {r['peak_rss_gib']:>9.2f}")
    print("peak GiB: the process's peak resident memory while the row ran, over all rounds (photos, libraries "
          "and earlier rows' leftovers included)")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "peak_window_reset": windows, "baseline": base["pipeline"], "rounds": args.rounds,
                                         "photos": len(files), "data": str(args.data.resolve()),
                                         "batch_size": args.batch_size, "device": str(device), "results": results},
                                        indent=2))

if __name__ == "__main__":
    main()

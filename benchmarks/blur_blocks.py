"""The batched Gaussian blur on a CPU: one banded-matrix product per pass against products by blocks.

``swav.color_ops.gaussian_blur_batch`` blurs a batch with two matrix products per sample (rows, then columns)
whose matrices hold each sample's kernel and the reflect padding. With SPEC §7's 13-tap kernel a 224-wide
matrix is 94% zeros. On a CPU, crops wider or taller than ``2 * _BLUR_BLOCK`` pixels are multiplied by blocks
of ``_BLUR_BLOCK`` outputs, each from its ``_BLUR_BLOCK + 12`` inputs only. This times, side by side in one
process with one thread, the same calls with the block size set to each value of ``--blocks`` (0 = one
product per pass) and checks that every variant gives the same values as the single product (bit for bit
on the development CPU at 224 px, within 1 ulp elsewhere: fewer zero terms enter the sums; the script stops
if they differ by more than 1e-6).

Rounds alternate the variants, and the table gives medians over the rounds and the median of the per-round
ratios to the single product, with their range.

    PYTHONPATH=. python benchmarks/blur_blocks.py --json benchmarks/results_cpu2_blur_blocks.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from machine import describe as describe_machine, header as machine_header  # noqa: E402

from swav import color_ops
from swav.multicrop import blur_kernel_size

# (samples, height, width): a blurred piece of the grouped CPU colour stage holds 1-2 crops of 224 px or up to
# ~9 crops of 96 px (its pieces are 2**18 floats); 64 and 20 are whole-batch subsets (the masked strategy);
# 97 x 160 has one blocked and one unblocked side, the last block short
CASES = [(1, 224, 224), (2, 224, 224), (20, 224, 224), (3, 96, 96), (9, 96, 96), (64, 96, 96), (4, 97, 160)]


def blur(x: torch.Tensor, sigma: torch.Tensor, block: int) -> torch.Tensor:
    saved = color_ops._BLUR_BLOCK
    color_ops._BLUR_BLOCK = block if block > 0 else 1 << 30
    try:
        return color_ops.gaussian_blur_batch(x, sigma, blur_kernel_size(min(x.shape[-2:])))
    finally:
        color_ops._BLUR_BLOCK = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 32, 48, 64],
                        help="block sizes to compare (0 = one product per pass)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(machine_header())
    if 0 not in args.blocks:
        args.blocks = [0, *args.blocks]
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} alternated rounds, kernel "
          f"{blur_kernel_size(224)} taps; microseconds per call (median) and ratio to one product per pass")
    header = " ".join(f"{('single' if b == 0 else f'block {b}'):>22}" for b in args.blocks)
    print(f"{'n x h x w':>15} {header}")
    for samples, height, width in CASES:
        x = torch.rand(samples, 3, height, width, generator=generator)
        sigma = 0.1 + 1.9 * torch.rand(samples, generator=generator)
        reference = blur(x, sigma, 0)
        for block in args.blocks:
            difference = (blur(x, sigma, block) - reference).abs().max().item()
            if difference > 1e-6:
                raise SystemExit(f"block {block} differs from the single product by {difference} at "
                                 f"{samples}x{height}x{width}")
        times: dict[int, list[float]] = {b: [] for b in args.blocks}
        for _ in range(args.rounds):
            for block in args.blocks:
                start = time.perf_counter()
                blur(x, sigma, block)
                times[block].append(time.perf_counter() - start)
        ratios = {b: [one / other for one, other in zip(times[0], times[b])] for b in args.blocks}
        cells = []
        for block in args.blocks:
            r = ratios[block]
            cells.append(f"{statistics.median(times[block]) * 1e6:8.0f} {statistics.median(r):4.2f}x "
                         f"({min(r):.2f}-{max(r):.2f})")
        print(f"{f'{samples} x {height} x {width}':>15} " + " ".join(f"{c:>22}" for c in cells))
        rows.append({"samples": samples, "height": height, "width": width,
                     "median_us": {str(b): statistics.median(times[b]) * 1e6 for b in args.blocks},
                     "speedup_vs_single": {str(b): statistics.median(ratios[b]) for b in args.blocks},
                     "speedup_range": {str(b): [min(ratios[b]), max(ratios[b])] for b in args.blocks}})
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "torch": torch.__version__, "rounds": args.rounds,
                                         "default_block": color_ops._BLUR_BLOCK, "cases": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Convolutions on small maps: oneDNN's bf16 convolution vs one matrix product (``SmallMapConv2d``), on a CPU.

For every convolution shape of ResNet-50's last stage and its downsampling at 2x224 + 6x96 crops, batch 4
(8 crops of 224 px, 24 of 96 px), times forward + backward in bf16 autocast with channels-last input, the
same module once with the matrix path and once forced through ``F.conv2d``; interleaved rounds, medians,
and the largest difference of output and gradients (relative to their largest value).

    PYTHONPATH=. python benchmarks/small_map_conv.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from swav.backbones import SmallMapConv2d

# (crops, in channels, out channels, kernel, input map, stride): where ResNet-50 meets maps of <= 49 output pixels
# (the last stage at 224 and 96 px, the third stage at 96 px)
SHAPES = [(24, 512, 512, 3, 3, 1), (24, 512, 512, 3, 6, 2), (8, 512, 512, 3, 7, 1), (8, 512, 512, 3, 14, 2),
          (24, 2048, 512, 1, 3, 1), (24, 512, 2048, 1, 3, 1), (24, 1024, 2048, 1, 6, 2), (8, 2048, 512, 1, 7, 1),
          (8, 1024, 2048, 1, 14, 2), (24, 256, 256, 3, 6, 1), (24, 1024, 256, 1, 6, 1), (24, 256, 1024, 1, 6, 1),
          (24, 512, 1024, 1, 12, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for crops, cin, cout, kernel, size, stride in SHAPES:
        conv = SmallMapConv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        conv = conv.to(memory_format=torch.channels_last)
        x0 = torch.randn(crops, cin, size, size).contiguous(memory_format=torch.channels_last)

        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_model = conv._fast(x0)  # whether ResNet-50 takes the matrix path here (default threshold)

        def run(matmul: bool):
            conv.MATMUL_MAX_PIXELS = 10**9 if matmul else 0
            x = x0.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = conv(x)
            y.backward(torch.ones_like(y))
            out = (y.detach().float(), x.grad, conv.weight.grad.clone())
            conv.weight.grad = None
            return out

        fast, slow = run(True), run(False)
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(fast, slow))
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.repeats):
            for matmul in (r % 2 == 0, r % 2 == 1):
                start = time.perf_counter()
                run(matmul)
                times[matmul].append(time.perf_counter() - start)
        conv_ms, matmul_ms = (1000 * statistics.median(times[m]) for m in (False, True))
        out = (size + 2 * (kernel // 2) - kernel) // stride + 1
        rows.append({"crops": crops, "in": cin, "out": cout, "kernel": kernel, "map": size, "stride": stride,
                     "out_map": out, "conv_ms": conv_ms, "matmul_ms": matmul_ms, "speedup": conv_ms / matmul_ms,
                     "max_rel_diff": diff, "matmul_in_the_model": in_model})
        print(f"{crops:>3} x {cin:>4}->{cout:<4} {kernel}x{kernel} on {size:>2}x{size:<2} stride {stride} -> {out}x{out}: "
              f"oneDNN {conv_ms:7.1f} ms  matmul {matmul_ms:7.1f} ms  {conv_ms / matmul_ms:5.2f}x  "
              f"(max rel. diff {diff:.4f}){'' if in_model else '  [the model keeps oneDNN here]'}", flush=True)
    used = [r for r in rows if r["matmul_in_the_model"]]
    total_conv, total_matmul = sum(r["conv_ms"] for r in used), sum(r["matmul_ms"] for r in used)
    print(f"\nforward + backward, bf16 autocast, channels-last, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}; the shapes that take the matrix path, each once (ResNet-50 has several of some): oneDNN {total_conv:.1f} ms, "
          f"matmul {total_matmul:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

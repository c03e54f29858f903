"""BatchNorm in bf16 on a CPU: channels-last vs contiguous memory, against a plain elementwise pass.

For activations of ResNet-50 at 2x224 + 6x96 crops, batch 4, times PyTorch's training-mode BatchNorm forward
and backward (``native_batch_norm`` / ``native_batch_norm_backward``) on bf16 tensors in channels-last and in
contiguous (NCHW) memory, and one elementwise pass (``x + 1`` into a preallocated tensor: reading and writing
the same bytes once) as the memory-bandwidth yardstick; optionally BatchNorm + ReLU under ``torch.compile``.
Medians of interleaved rounds, milliseconds.

    PYTHONPATH=. python benchmarks/batchnorm_layouts.py [--compile] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from machine import describe as describe_machine, header as machine_header  # noqa: E402
import torch.nn.functional as F

# (crops, channels, map): the largest BatchNorm inputs of each ResNet-50 stage at 224 px (8 crops) and 96 px (24)
SHAPES = [(8, 64, 112), (8, 256, 56), (8, 512, 28), (8, 1024, 14), (24, 256, 24), (24, 512, 12)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also BatchNorm + ReLU under torch.compile")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(machine_header())
    torch.manual_seed(0)
    rows = []
    for crops, channels, size in SHAPES:
        weight, bias = torch.ones(channels), torch.zeros(channels)
        mean, var = torch.zeros(channels), torch.ones(channels)
        base = torch.randn(crops, channels, size, size).bfloat16()
        grad = torch.randn(crops, channels, size, size).bfloat16()
        layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
        tensors = {name: (base.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt))
                   for name, fmt in layouts.items()}
        out = torch.empty_like(base)
        jobs = {"elementwise pass": lambda: torch.add(base, 1.0, out=out)}
        for name, (x, g) in tensors.items():
            saved = torch.ops.aten.native_batch_norm(x, weight, bias, mean.clone(), var.clone(), True, 0.1, 1e-5)
            jobs[f"forward {name}"] = (lambda x=x: torch.ops.aten.native_batch_norm(
                x, weight, bias, mean.clone(), var.clone(), True, 0.1, 1e-5))
            jobs[f"backward {name}"] = (lambda x=x, g=g, saved=saved: torch.ops.aten.native_batch_norm_backward(
                g, x, weight, mean, var, saved[1], saved[2], True, 1e-5, [True, True, True]))
        if args.compile:
            x_cl = tensors["channels_last"][0]
            compiled = torch.compile(lambda x: F.relu(F.batch_norm(x, mean.clone(), var.clone(), weight, bias,
                                                                   True, 0.1, 1e-5)))
            eager = (lambda x: F.relu(F.batch_norm(x, mean.clone(), var.clone(), weight, bias, True, 0.1, 1e-5)))
            jobs["bn+relu forward eager (CL)"] = lambda: eager(x_cl)
            jobs["bn+relu forward compiled (CL)"] = lambda: compiled(x_cl)
        for job in jobs.values():
            job()
            job()
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(args.repeats):
            for name, job in jobs.items():
                start = time.perf_counter()
                job()
                times[name].append(time.perf_counter() - start)
        row = {"crops": crops, "channels": channels, "map": size, "megabytes": base.numel() * 2 / 1e6,
               **{name: 1000 * statistics.median(values) for name, values in times.items()}}
        rows.append(row)
        print(f"{crops:>2} x {channels:>4} x {size:>3}x{size:<3} ({row['megabytes']:5.1f} MB): "
              + "  ".join(f"{name} {row[name]:.2f}" for name in jobs), flush=True)
    print(f"\nbf16 BatchNorm, training mode, {torch.get_num_threads()} threads, medians of {args.repeats} rounds (ms):")
    header = ["shape", "elementwise", "fwd CL", "fwd NCHW", "bwd CL", "bwd NCHW", "CL/NCHW fwd", "CL/NCHW bwd"]
    print("  ".join(f"{h:>12}" for h in header))
    for r in rows:
        print("  ".join(f"{v:>12}" for v in (
            f"{r['crops']}x{r['channels']}x{r['map']}", f"{r['elementwise pass']:.2f}",
            f"{r['forward channels_last']:.2f}", f"{r['forward contiguous']:.2f}",
            f"{r['backward channels_last']:.2f}", f"{r['backward contiguous']:.2f}",
            f"{r['forward channels_last'] / r['forward contiguous']:.2f}",
            f"{r['backward channels_last'] / r['backward contiguous']:.2f}")))
    if args.compile:
        for r in rows:
            print(f"{r['crops']}x{r['channels']}x{r['map']}: BatchNorm + ReLU forward eager "
                  f"{r['bn+relu forward eager (CL)']:.2f} ms, compiled {r['bn+relu forward compiled (CL)']:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

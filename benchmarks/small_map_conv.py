"""ResNet-50's convolutions on a CPU: oneDNN's bf16 convolution vs one matrix product (``SmallMapConv2d``).

Every convolution ResNet-50 runs at 2x224 + 6x96 crops, batch 4 (8 crops of 224 px, 24 of 96 px) is
recorded from one forward pass (shape and how many times it occurs); each distinct shape is then timed
forward + backward in bf16 autocast with channels-last input, the same module once with the matrix path
and once forced through ``F.conv2d``, in interleaved rounds (medians), with the largest difference of
output and gradients (relative to their largest value). The totals weight each shape by its count: all
through oneDNN, the matrix path where ``SmallMapConv2d``'s rule takes it, and the best of the two per shape.

    PYTHONPATH=. python benchmarks/small_map_conv.py --json out.json
    PYTHONPATH=. python benchmarks/small_map_conv.py --kernels 1      # the 1x1 convolutions only
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from machine import describe as describe_machine, header as machine_header  # noqa: E402

from swav.backbones import SmallMapConv2d, build_backbone


def resnet50_convolutions(batch: int = 4) -> Counter:
    """(crops, in channels, out channels, kernel, input map, stride) -> occurrences in one ResNet-50 forward at
    2x224 + 6x96 crops (one pass per resolution, as the model runs them)."""
    trunk, _ = build_backbone("resnet50")
    found: Counter = Counter()

    def record(module, inputs, _output):
        x = inputs[0]
        found[(x.shape[0], module.in_channels, module.out_channels, module.kernel_size[0], x.shape[-1],
               module.stride[0])] += 1

    for module in trunk.modules():
        if isinstance(module, SmallMapConv2d):
            module.register_forward_hook(record)
    with torch.no_grad():
        for crops, size in ((2 * batch, 224), (6 * batch, 96)):
            trunk(torch.zeros(crops, 3, size, size))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--kernels", type=int, nargs="+", default=[1, 3], help="kernel sizes to time (the 7x7 stem never "
                        "takes the matrix path)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(machine_header())
    torch.manual_seed(0)
    shapes = {shape: count for shape, count in sorted(resnet50_convolutions().items(), key=lambda kv: (kv[0][3], kv[0][4]))
              if shape[3] in args.kernels}
    rows = []
    for (crops, cin, cout, kernel, size, stride), count in shapes.items():
        conv = SmallMapConv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        conv = conv.to(memory_format=torch.channels_last)
        x0 = torch.randn(crops, cin, size, size).contiguous(memory_format=torch.channels_last)

        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_model = conv._fast(x0)  # whether ResNet-50 takes the matrix path here (the class's rule)

        def run(matmul: bool):
            conv.force = matmul
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
                     "out_map": out, "count": count, "conv_ms": conv_ms, "matmul_ms": matmul_ms,
                     "speedup": conv_ms / matmul_ms, "max_rel_diff": diff, "matmul_in_the_model": in_model})
        print(f"{count:>2} x {crops:>3} crops {cin:>4}->{cout:<4} {kernel}x{kernel} on {size:>3}x{size:<3} stride {stride} "
              f"-> {out}x{out}: oneDNN {conv_ms:7.1f} ms  matmul {matmul_ms:7.1f} ms  {conv_ms / matmul_ms:5.2f}x  "
              f"(max rel. diff {diff:.4f}){'  matmul in the model' if in_model else ''}", flush=True)
    onednn = sum(r["count"] * r["conv_ms"] for r in rows)
    rule = sum(r["count"] * (r["matmul_ms"] if r["matmul_in_the_model"] else r["conv_ms"]) for r in rows)
    best = sum(r["count"] * min(r["conv_ms"], r["matmul_ms"]) for r in rows)
    print(f"\nResNet-50, 2x224 + 6x96, batch 4: forward + backward of its {sum(r['count'] for r in rows)} "
          f"convolutions with kernels {args.kernels}, bf16 autocast, channels-last, {torch.get_num_threads()} threads, "
          f"medians of {args.repeats} rounds, weighted by occurrences:")
    print(f"  all through oneDNN      {onednn:8.1f} ms")
    print(f"  SmallMapConv2d's rule   {rule:8.1f} ms  ({onednn / rule:.2f}x)")
    print(f"  best of the two each    {best:8.1f} ms  ({onednn / best:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "threads": torch.get_num_threads(), "rows": rows,
                                         "total_ms": {"onednn": onednn, "rule": rule, "best": best}}, indent=2))


if __name__ == "__main__":
    main()

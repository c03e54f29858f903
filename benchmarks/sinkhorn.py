"""Sinkhorn-Knopp timing for the batch/prototype sizes that matter (issue: speed, item 3).

    PYTHONPATH=. python benchmarks/sinkhorn.py [--device cuda] [--json out.json]

Prints milliseconds per call (the median of --repeats single calls after a warm-up; 3 iterations, eps 0.05, float32) for the exp-domain and the
log-domain variants at (B, K) = (256, 3000), (4096, 3000), (4096, 30000) (``--sizes`` for others), and
the peak memory of each row: on a GPU the memory allocated, on the CPU the process's peak resident memory
while the row ran (the scores, the codes, the iterations' buffers, plus the process's baseline, printed first).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe as describe_machine, header as machine_header, peak_rss_gib, peak_windows_supported, reset_peak_rss  # noqa: E402
import torch.nn.functional as F

from swav.sinkhorn import sinkhorn_knopp

SIZES = [(256, 3000), (4096, 3000), (4096, 30000)]


def measure(B: int, K: int, log_domain: bool, device: torch.device, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    scores = (F.normalize(torch.randn(B, 128, generator=g), dim=1) @ F.normalize(torch.randn(K, 128, generator=g), dim=1).t()).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sinkhorn_knopp(scores, log_domain=log_domain)  # warm-up
    sync()
    times = []
    for _ in range(repeats):  # the median of single calls: a slow spell of a shared machine hits one of them
        start = time.perf_counter()
        sinkhorn_knopp(scores, log_domain=log_domain)
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def peak_memory_of(fn, device: torch.device) -> tuple[float, float]:
    """(fn's result, peak GiB while it ran)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        return result, torch.cuda.max_memory_allocated(device) / 2**30
    reset_peak_rss()
    result = fn()
    return result, peak_rss_gib()


def parse_size(text: str) -> tuple[int, int]:
    b, _, k = text.lower().partition("x")
    try:
        return int(b), int(k)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BxK (for example 4096x3000)") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=SIZES, metavar="BxK")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(machine_header())
    windows = peak_windows_supported()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    baseline = 0.0 if device.type == "cuda" else (reset_peak_rss(), peak_rss_gib())[1]
    rows = []
    for B, K in args.sizes:
        exp_ms, exp_gib = peak_memory_of(lambda: measure(B, K, False, device, args.repeats), device)
        log_ms, log_gib = peak_memory_of(lambda: measure(B, K, True, device, args.repeats), device)
        rows.append({"B": B, "K": K, "exp_ms": exp_ms, "log_ms": log_ms, "exp_peak_gib": exp_gib,
                     "log_peak_gib": log_gib})
    print(f"Sinkhorn-Knopp, 3 iterations, float32, device {device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} timed calls per row" + ("" if device.type == "cuda" else
                                                     f"; the process alone: {baseline:.2f} GiB resident"))
    print(f"{'B':>6}{'K':>8}{'exp-domain ms':>16}{'log-domain ms':>16}{'exp peak GiB':>14}{'log peak GiB':>14}")
    for r in rows:
        print(f"{r['B']:>6}{r['K']:>8}{r['exp_ms']:>16.2f}{r['log_ms']:>16.2f}{r['exp_peak_gib']:>14.2f}"
              f"{r['log_peak_gib']:>14.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "peak_window_reset": windows, "device": str(device), "repeats": args.repeats,
                                         "process_baseline_gib": baseline, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Sinkhorn-Knopp timing for the batch/prototype sizes that matter (issue: speed, item 3).

    PYTHONPATH=. python benchmarks/sinkhorn.py [--device cuda] [--json out.json]

Prints milliseconds per call (3 iterations, eps 0.05, float32) for the exp-domain and the
log-domain variants at (B, K) = (256, 3000), (4096, 3000), (4096, 30000).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swav.sinkhorn import sinkhorn_knopp

SIZES = [(256, 3000), (4096, 3000), (4096, 30000)]


def measure(B: int, K: int, log_domain: bool, device: torch.device, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    scores = (F.normalize(torch.randn(B, 128, generator=g), dim=1) @ F.normalize(torch.randn(K, 128, generator=g), dim=1).t()).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sinkhorn_knopp(scores, log_domain=log_domain)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        sinkhorn_knopp(scores, log_domain=log_domain)
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for B, K in SIZES:
        rows.append({"B": B, "K": K, "exp_ms": measure(B, K, False, device, args.repeats),
                     "log_ms": measure(B, K, True, device, args.repeats)})
    print(f"Sinkhorn-Knopp, 3 iterations, float32, device {device}, {torch.get_num_threads()} threads")
    print(f"{'B':>6}{'K':>8}{'exp-domain ms':>16}{'log-domain ms':>16}")
    for r in rows:
        print(f"{r['B']:>6}{r['K']:>8}{r['exp_ms']:>16.2f}{r['log_ms']:>16.2f}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Distributed training on this machine: memory, step time and all-reduce volume per step (issue 5).

    PYTHONPATH=. python benchmarks/distributed_scaling.py            # worlds 1 2 4, the fashion_mnist_cpu recipe
    PYTHONPATH=. python benchmarks/distributed_scaling.py --worlds 1 2 --steps 2 --json results.json

Part 1 (scaling): for each world size W, W gloo processes on this CPU run the engine's own pieces
(``swav.train._wrap``: cross-rank BatchNorm if the recipe asks for it + DDP; ``SwAVStep``; the engine's
loader on the real data) with the recipe read from its YAML at run time (per-device batch fixed, so
the global batch grows with W). Reported: the median step time (data + step, slowest rank), images/s
of the global batch, and each process's peak resident memory (``ru_maxrss``; includes torch itself and
the in-memory data set). One torch thread per process (torchrun's default; ``--threads``), so W = 4
oversubscribes a 2-core machine: these numbers measure CPU contention, not network scaling.

Part 2 (all-reduce volume): one step on 2 ranks with cross-rank BatchNorm on, for several K and
batch sizes, counting the bytes of every ``torch.distributed.all_reduce`` by calling module, the
DDP gradient buckets (a counting comm hook) and DDP's buffer broadcast, against the formula::

    DDP gradients     4 * P                                   P = number of parameters (grows with K*D)
    BatchNorm stats   sum over BN calls of 2 * 4 * (2C + 1)   forward (sum, count; centred squares) and the
                                                              same again in backward; backbone BNs run once
                                                              per crop resolution, the head's BN once
    Sinkhorn          H * A * 4 * (3 + iterations * K)        row count, global max, total; K row sums/iter
    NaN/stop flags    12                                      3 floats, every step (run.nan_check)
    loss for logging  4 every run.log_every_steps steps       (not in the per-step figure)
    DDP buffers       sum over BN layers of 8C + 8            broadcast from rank 0 (not an all-reduce)

None of it depends on the batch size: Sinkhorn all-reduces K-vectors, never the scores. (On CUDA,
``nn.SyncBatchNorm`` all-gathers ``2C + 1`` values per rank in forward and all-reduces ``2C`` in backward.)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch
from machine import describe as describe_machine, header as machine_header  # noqa: E402
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from swav.config import Config, config_from_dict, config_to_dict, with_values
from swav.derived import derive_values
from swav.dist_setup import DistContext
from swav.lars import LARS
from swav.model import build_model
from swav.recipes import load_recipe
from swav.schedule import warmup_cosine_schedule
from swav.train import _wrap, model_spec_from_config
from swav.train_step import SwAVStep

CPU = torch.device("cpu")


class ByteCounter:
    """Counts the bytes each part of the code hands to collectives (this process's view)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self._all_reduce = dist.all_reduce
        self._broadcast_coalesced = dist._broadcast_coalesced

    def install(self) -> "ByteCounter":
        counter = self

        def all_reduce(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(("torch", "swav.distributed")):
                frame = frame.f_back
            caller = frame.f_globals.get("__name__", "?") if frame else "?"
            counter.bytes[caller] += tensor.numel() * tensor.element_size()
            return counter._all_reduce(tensor, *args, **kwargs)

        def broadcast_coalesced(group, tensors, *args, **kwargs):
            counter.bytes["ddp buffer broadcast"] += sum(t.numel() * t.element_size() for t in tensors)
            return counter._broadcast_coalesced(group, tensors, *args, **kwargs)

        dist.all_reduce = all_reduce
        dist._broadcast_coalesced = broadcast_coalesced
        return self

    def ddp_hook(self, state, bucket):
        """DDP comm hook: count the bucket, then average it over ranks like DDP's default."""
        buffer = bucket.buffer()
        self.bytes["ddp gradients"] += buffer.numel() * buffer.element_size()
        buffer.div_(dist.get_world_size())
        work = self._all_reduce(buffer, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    def take(self) -> dict[str, int]:
        out, self.bytes = dict(self.bytes), defaultdict(int)
        return out


def _step_objects(config: Config, rank: int, world: int, counter: ByteCounter, steps: int):
    torch.manual_seed(0)
    raw = build_model(model_spec_from_config(config))
    ctx = DistContext(rank, world, 0, CPU, "gloo" if world > 1 else None, False)
    model = _wrap(raw, ctx, config)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.register_comm_hook(None, counter.ddp_hook)
    o = config.optim
    optimizer = LARS(raw.parameters(), lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay)
    schedule = warmup_cosine_schedule(o.base_lr, o.final_lr, 1, steps)
    step = SwAVStep(model, raw, optimizer, config=config, lr_schedule=schedule, queue_length_per_rank=0,
                    precision="fp32", device=CPU, rank=rank)
    return raw, step


def _scaling(task: dict, rank: int, world: int, counter: ByteCounter) -> dict:
    from swav.datasets import build_dataset
    from swav.train_data import build_train_loader, resolve_pipeline

    config = with_values(config_from_dict(task["config"]), {"run.precision": "fp32"})
    dataset = build_dataset(config.data.path, channels=config.data.channels, download=False)
    pipeline = resolve_pipeline(config.data.pipeline, dataset, config.data.channels)
    derive_values(config, world_size=world, dataset_size=len(dataset), device="cpu", precision="fp32",
                  pipeline=pipeline)  # the same checks as the engine
    steps = task["warmup"] + task["steps"]
    raw, step_fn = _step_objects(config, rank, world, counter, steps)
    loader = build_train_loader(config, dataset, pipeline=pipeline, rank=rank, world_size=world, device=CPU)
    loader.set_epoch(0)
    times, start = [], time.perf_counter()
    for k, crops in enumerate(loader):
        if k == task["warmup"]:
            counter.take()
        step_fn(crops, k)
        now = time.perf_counter()
        times.append(now - start)
        start = now
        if k + 1 == steps:
            break
    timed = times[task["warmup"]:]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    return {"step_s": statistics.median(timed), "peak_rss_bytes": peak_rss,
            "bytes_per_step": {k: v / len(timed) for k, v in counter.take().items()},
            "batch_per_device": config.optim.batch_size_per_device, "backbone": config.model.backbone,
            "sync_bn": config.run.sync_bn, "threads": torch.get_num_threads()}


def expected_bytes(config: Config, raw: nn.Module, world: int) -> dict[str, int]:
    """The formula of the module docstring for this config and model."""
    sizes = [s for s, n in zip(config.crops.sizes, config.crops.counts) for _ in range(n)]
    passes = 1 + sum(a != b for a, b in zip(sizes, sizes[1:]))  # one backbone pass per run of equal sizes
    bn = [m for m in raw.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    backbone_bn = {id(m) for m in raw.backbone.modules()}
    calls = [(m.num_features, passes if id(m) in backbone_bn else 1) for m in bn]
    sync = world > 1 and config.run.sync_bn
    s = config.swav
    return {
        "ddp gradients": 4 * sum(p.numel() for p in raw.parameters()) if world > 1 else 0,
        "swav.sync_batchnorm": sum(2 * 4 * (2 * c + 1) * n for c, n in calls) if sync else 0,
        "swav.sinkhorn": sum(len(s.crops_for_assign) * 4 * (3 + s.sinkhorn_iterations * k)
                             for k in config.model.num_prototypes) if world > 1 else 0,
        "swav.train_step": 12 if world > 1 else 0,
        "ddp buffer broadcast": sum(8 * m.num_features + 8 for m in bn) if world > 1 else 0,
    }


def _volume(task: dict, rank: int, world: int, counter: ByteCounter) -> list[dict]:
    rows = []
    for k, batch in task["grid"]:
        config = with_values(config_from_dict(task["config"]), {"model.num_prototypes": k, "run.sync_bn": True,
                                                           "optim.batch_size_per_device": batch,
                                                           "run.precision": "fp32"})
        raw, step_fn = _step_objects(config, rank, world, counter, 2)
        g = torch.Generator().manual_seed(rank)
        crops = [torch.randn(batch, config.data.channels, s, s, generator=g)
                 for s, n in zip(config.crops.sizes, config.crops.counts) for _ in range(n)]
        step_fn(crops, 0)
        counter.take()
        step_fn(crops, 1)
        measured = counter.take()
        rows.append({"K": k, "batch": batch, "measured": measured, "expected": expected_bytes(config, raw, world),
                     "parameters": sum(p.numel() for p in raw.parameters())})
    return rows


def _rank_main(rank: int, world: int, port: int, task: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(task.get("threads") or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = ByteCounter().install()
    try:
        run = _scaling if task["kind"] == "scaling" else _volume
        result = run(task, rank, world, counter)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(task: dict, world: int) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, free_port(), task, tmp), nprocs=world, join=True)
        return [json.load(open(os.path.join(tmp, f"rank{r}.json"), encoding="utf-8")) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fashion_mnist_cpu")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per world size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (torchrun's default OMP_NUM_THREADS=1); 0 = cores // W")
    parser.add_argument("--grid", default="100:16,100:256,3000:16,3000:256", help="K:batch pairs for part 2")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    print(machine_header())

    recipe = config_to_dict(load_recipe(args.recipe))  # read once: the YAML may change while this runs
    results: dict = {"machine": describe_machine(), "recipe": args.recipe, "config": recipe, "load_average": os.getloadavg(),
                     "cpu_count": os.cpu_count(), "torch": torch.__version__, "scaling": [], "volume": []}
    print(f"part 1: recipe {args.recipe}, gloo on {os.cpu_count()} CPU cores (contention-bound, not network-bound)")
    print(f"{'W':>2} {'threads':>7} {'batch/dev':>9} {'step s':>7} {'img/s':>7} {'peak RSS/process MiB':>22} "
          f"{'all-reduce B/step':>18}")
    for world in args.worlds:
        ranks = run_ranks({"kind": "scaling", "config": recipe, "steps": args.steps, "warmup": args.warmup,
                           "threads": args.threads}, world)
        step = max(r["step_s"] for r in ranks)
        rss = [r["peak_rss_bytes"] / 2**20 for r in ranks]
        volume = sum(v for k, v in ranks[0]["bytes_per_step"].items() if k != "ddp buffer broadcast")
        row = {"world_size": world, "step_s": step, "images_per_s": ranks[0]["batch_per_device"] * world / step,
               "peak_rss_mib": rss, "all_reduce_bytes_per_step": volume, "bytes_by_part": ranks[0]["bytes_per_step"],
               "threads": ranks[0]["threads"], "backbone": ranks[0]["backbone"], "sync_bn": ranks[0]["sync_bn"]}
        results["scaling"].append(row)
        print(f"{world:>2} {row['threads']:>7} {ranks[0]['batch_per_device']:>9} {step:>7.2f} "
              f"{row['images_per_s']:>7.0f} {' / '.join(f'{m:.0f}' for m in rss):>22} {volume:>18,.0f}")
    print(f"(backbone {results['scaling'][0]['backbone']}, sync_bn {results['scaling'][0]['sync_bn']}; load average "
          f"before: {results['load_average'][0]:.1f})\n")

    grid = [tuple(int(x) for x in pair.split(":")) for pair in args.grid.split(",")]
    rows = run_ranks({"kind": "volume", "config": recipe, "grid": grid}, 2)[0]
    parts = ["ddp gradients", "swav.sync_batchnorm", "swav.sinkhorn", "swav.train_step"]
    print("part 2: bytes all-reduced per step and rank (2 ranks, sync_bn on); measured = formula?")
    print(f"{'K':>5} {'batch':>5} {'params':>9} " + " ".join(f"{p:>20}" for p in parts) + f" {'total':>10} {'match':>5}"
          f" {'buffer bcast':>12}")
    for row in rows:
        m, e = row["measured"], row["expected"]
        match = all(int(m.get(p, 0)) == e[p] for p in parts + ["ddp buffer broadcast"])
        total = sum(int(m.get(p, 0)) for p in parts)
        row["match"], row["total"] = match, total
        print(f"{row['K']:>5} {row['batch']:>5} {row['parameters']:>9,} "
              + " ".join(f"{int(m.get(p, 0)):>20,}" for p in parts) + f" {total:>10,} {'yes' if match else 'NO':>5} {int(m.get('ddp buffer broadcast', 0)):>12,}")
        unexpected = set(m) - set(parts) - {"ddp buffer broadcast"}
        if unexpected:
            print(f"      also counted: {', '.join(f'{k}={v}' for k, v in m.items() if k in unexpected)}")
    results["volume"] = rows
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    return 0 if all(r["match"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

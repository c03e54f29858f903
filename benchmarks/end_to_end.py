"""End-to-end `swav pretrain` throughput on the Fashion-MNIST CPU recipe, data loading included (issue "Speed",
item 4), side by side with the same training steps on pre-made crops.

    PYTHONPATH=. python benchmarks/end_to_end.py --steps 40 --repeats 3 [--threads 2] [--json out.json]

1. engine: :func:`swav.train.train` with the recipe (``data.pipeline`` auto = in-memory tensor crops),
   ``run.max_steps`` = warm-up + ``--steps``; images/s between the first and the last logged step (the
   start-up, the bf16 self-check and the first interval are excluded).
2. pre-made crops: the same loader's batches produced beforehand (their production timed separately),
   then the same model, optimiser and :class:`~swav.train_step.SwAVStep` on them, timed alone.
Both are repeated, alternately; prints one table of the medians (images/s, ratio engine / pre-made) and
writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from swav.config import apply_overrides, with_values
from swav.datasets import build_dataset
from swav.model import build_model
from swav.recipes import load_recipe
from swav.schedule import warmup_cosine_schedule
from swav.train import _optimizer, model_spec_from_config, train
from swav.train_data import build_train_loader, resolve_pipeline
from swav.train_step import SwAVStep, resolve_precision


def engine_rate(config, steps: int, warmup: int, out: Path) -> float:
    config = with_values(config, {"run.max_steps": warmup + steps, "run.log_every_steps": 10,
                                  "run.output_dir": str(out), "run.checkpoint_every_epochs": 0,
                                  "run.tensorboard": False})
    train(config, overwrite=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("kind") == "step" and r["step"] >= warmup]
    first, last = logged[0], logged[-1]
    return (last["step"] - first["step"]) * config.optim.batch_size_per_device / (last["time"] - first["time"])


def premade_rate(config, steps: int, warmup: int) -> tuple[float, float]:
    """(images/s of the steps alone on pre-made crops, milliseconds per batch to make the crops)."""
    device = torch.device("cpu")
    dataset = build_dataset(config.data.path, split="train", channels=config.data.channels)
    pipeline = resolve_pipeline(config.data.pipeline, dataset, config.data.channels)
    loader = build_train_loader(config, dataset, pipeline=pipeline, rank=0, world_size=1, device=device)
    loader.set_epoch(0)
    start = time.perf_counter()
    batches = []
    for crops in loader:
        batches.append(crops)
        if len(batches) == warmup + steps:
            break
    make_ms = 1000 * (time.perf_counter() - start) / len(batches)
    torch.manual_seed(config.run.seed)
    model = build_model(model_spec_from_config(config))
    if config.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, config)
    schedule = warmup_cosine_schedule(config.optim.base_lr, config.optim.final_lr, 1, warmup + steps)
    step = SwAVStep(model, model, optimizer, config=config, lr_schedule=schedule, queue_length_per_rank=0,
                    precision=resolve_precision(config.run.precision, device), device=device, rank=0)
    for i in range(warmup):
        step(batches[i], i)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(batches[i], i)
    return steps * config.optim.batch_size_per_device / (time.perf_counter() - start), make_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion_mnist_cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_recipe(args.recipe)
    if args.overrides:
        config = apply_overrides(config, args.overrides)
    engines, premades, makes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # alternated: a shared machine's load drifts
            engines.append(engine_rate(config, args.steps, args.warmup, Path(tmp) / f"run{r}"))
            rate, make_ms = premade_rate(config, args.steps, args.warmup)
            premades.append(rate)
            makes.append(make_ms)
            print(f"repeat {r + 1}: engine {engines[-1]:.1f} img/s, pre-made crops {rate:.1f} img/s", flush=True)
    engine, premade, make_ms = statistics.median(engines), statistics.median(premades), statistics.median(makes)
    batch = config.optim.batch_size_per_device
    print(f"\n{args.recipe}: batch {batch}, {args.steps} timed steps after {args.warmup}, medians of {args.repeats} "
          f"alternated repeats, {torch.get_num_threads()} threads, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    print(f"{'run':<44}{'img/s':>9}{'ratio':>8}")
    print(f"{'swav pretrain (engine, data loading included)':<44}{engine:>9.1f}{engine / premade:>8.3f}")
    print(f"{'same steps on pre-made crops':<44}{premade:>9.1f}{1.0:>8.3f}")
    print(f"making the crops alone: {make_ms:.1f} ms per batch of {batch} ({1000 * batch / make_ms:.0f} img/s)")
    if args.json:
        args.json.write_text(json.dumps({"recipe": args.recipe, "batch": batch, "threads": torch.get_num_threads(),
                                         "engine_images_per_s": engine, "premade_images_per_s": premade,
                                         "ratio": engine / premade, "make_crops_ms_per_batch": make_ms,
                                         "engine_runs": engines, "premade_runs": premades}, indent=2))


if __name__ == "__main__":
    main()

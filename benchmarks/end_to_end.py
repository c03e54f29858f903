"""End-to-end `swav pretrain` throughput on the Fashion-MNIST CPU recipe, data loading included (issue "Speed",
item 4), side by side with the same training steps on pre-made crops.

    PYTHONPATH=. python benchmarks/end_to_end.py --steps 40 --repeats 3 [--threads 2] [--json out.json]

1. engine: :func:`swav.train.train` with the recipe (``data.pipeline`` auto = in-memory tensor crops),
   ``run.max_steps`` = warm-up + ``--steps``; images/s between the first and the last logged step (the
   start-up, the bf16 self-check and the first interval are excluded).
2. pre-made crops: the same loader's batches produced beforehand (their production timed separately),
   then the same model, optimiser and :class:`~swav.train_step.SwAVStep` on them, timed alone.
Both are repeated, alternately, and timed in intervals of 10 steps (the engine's logging interval). The
table gives the median over all intervals of each side (a short slow spell of a shared machine spoils
one interval, not the figure) and, as a cross-check, the median of the per-repeat ratios; JSON holds
every interval, and the process's peak resident memory while each side ran. The pre-made side uses the
precision the engine resolves (bf16 on CPUs with native bf16, unless the engine's bf16 self-check falls
back to fp32).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe as describe_machine, header as machine_header, peak_rss_gib, peak_windows_supported, reset_peak_rss  # noqa: E402

from swav.config import apply_overrides, with_values
from swav.datasets import build_dataset
from swav.model import build_model
from swav.recipes import load_recipe
from swav.schedule import warmup_cosine_schedule
from swav.train import _checked_precision, _optimizer, model_spec_from_config, train
from swav.train_data import build_train_loader, resolve_pipeline
from swav.train_step import SwAVStep, resolve_channels_last


INTERVAL = 10


def engine_rates(config, steps: int, warmup: int, out: Path) -> list[float]:
    """images/s of every logging interval of ``swav pretrain`` after the warm-up."""
    config = with_values(config, {"run.max_steps": warmup + steps, "run.log_every_steps": INTERVAL,
                                  "run.output_dir": str(out), "run.checkpoint_every_epochs": 0,
                                  "run.checkpoint_every_steps": 0,
                                  "run.tensorboard": False})
    train(config, overwrite=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("kind") == "step" and r["step"] >= warmup]
    batch = config.optim.batch_size_per_device
    return [(b["step"] - a["step"]) * batch / (b["time"] - a["time"]) for a, b in zip(logged, logged[1:])]


def premade_rates(config, steps: int, warmup: int) -> tuple[list[float], float]:
    """(images/s of every interval of steps on pre-made crops, milliseconds per batch to make the crops)."""
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
    precision = _checked_precision(config, model, device)
    if resolve_channels_last(config.run.channels_last, device, precision):  # the layout swav pretrain picks
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, config)
    schedule = warmup_cosine_schedule(config.optim.base_lr, config.optim.final_lr, 1, warmup + steps)
    step = SwAVStep(model, model, optimizer, config=config, lr_schedule=schedule, queue_length_per_rank=0,
                    precision=precision, device=device, rank=0)
    for i in range(warmup):
        step(batches[i], i)
    rates = []
    for first in range(warmup, warmup + steps - INTERVAL + 1, INTERVAL):
        start = time.perf_counter()
        for i in range(first, first + INTERVAL):
            step(batches[i], i)
        rates.append(INTERVAL * config.optim.batch_size_per_device / (time.perf_counter() - start))
    return rates, make_ms


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
    if args.steps % INTERVAL or args.warmup % INTERVAL or args.steps < INTERVAL or args.warmup < INTERVAL:
        # the engine's rates come from its logged steps (every INTERVAL, the first one after INTERVAL steps)
        parser.error(f"--steps and --warmup must be positive multiples of {INTERVAL} (the engine's logging "
                     "interval), so that both sides time the same steps")
    print(machine_header())
    windows = peak_windows_supported()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_recipe(args.recipe)
    if args.overrides:
        config = apply_overrides(config, args.overrides)
    engines, premades, makes, ratios, peaks = [], [], [], [], {"engine": 0.0, "premade": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # alternated: a shared machine's load drifts
            reset_peak_rss()
            engine_runs = engine_rates(config, args.steps, args.warmup, Path(tmp) / f"run{r}")
            peaks["engine"] = max(peaks["engine"], peak_rss_gib())
            reset_peak_rss()
            premade_runs, make_ms = premade_rates(config, args.steps, args.warmup)
            peaks["premade"] = max(peaks["premade"], peak_rss_gib())
            engines.append(engine_runs)
            premades.append(premade_runs)
            makes.append(make_ms)
            ratios.append(statistics.median(engine_runs) / statistics.median(premade_runs))
            print(f"repeat {r + 1}: engine {statistics.median(engine_runs):.1f} img/s, pre-made crops "
                  f"{statistics.median(premade_runs):.1f} img/s (intervals of {INTERVAL} steps: "
                  f"{' '.join(f'{x:.0f}' for x in engine_runs)} | {' '.join(f'{x:.0f}' for x in premade_runs)})",
                  flush=True)
    engine = statistics.median(x for run in engines for x in run)
    premade = statistics.median(x for run in premades for x in run)
    make_ms = statistics.median(makes)
    batch = config.optim.batch_size_per_device
    print(f"\n{args.recipe}: batch {batch}, {args.steps} timed steps after {args.warmup}, {args.repeats} alternated "
          f"repeats, medians over all {INTERVAL}-step intervals, {torch.get_num_threads()} threads")
    print(f"{'run':<44}{'img/s':>9}{'ratio':>8}{'peak GiB':>10}")
    print(f"{'swav pretrain (engine, data loading included)':<44}{engine:>9.1f}{engine / premade:>8.3f}"
          f"{peaks['engine']:>10.2f}")
    print(f"{'same steps on pre-made crops':<44}{premade:>9.1f}{1.0:>8.3f}{peaks['premade']:>10.2f}")
    print("peak GiB: the process's peak resident memory while that side ran (the pre-made side holds all its crops)")
    print(f"median of the per-repeat ratios: {statistics.median(ratios):.3f} "
          f"({' '.join(f'{x:.3f}' for x in ratios)})")
    print(f"making the crops alone: {make_ms:.1f} ms per batch of {batch} ({1000 * batch / make_ms:.0f} img/s)")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "peak_window_reset": windows, "recipe": args.recipe, "overrides": args.overrides,
                                         "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                                         "batch": batch, "threads": torch.get_num_threads(),
                                         "peak_rss_gib": peaks,
                                         "engine_images_per_s": engine, "premade_images_per_s": premade,
                                         "ratio": engine / premade, "median_repeat_ratio": statistics.median(ratios),
                                         "repeat_ratios": ratios, "make_crops_ms_per_batch": make_ms,
                                         "engine_runs": engines, "premade_runs": premades}, indent=2))


if __name__ == "__main__":
    main()

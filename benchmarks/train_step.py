"""Training-step throughput on this machine, each optimisation on and off (issue: speed, item 2).

    PYTHONPATH=. python benchmarks/train_step.py --preset resnet50        # 2x224 + 6x96, batch 4
    PYTHONPATH=. python benchmarks/train_step.py --preset fashion_mnist_cpu

For every configuration (fp32 / bf16 autocast, contiguous / channels-last, small-map convolutions as
matrix products or through oneDNN, LARS with or without the fused kernel, optionally torch.compile: see
VARIANTS) it times the engine's full SwAV step (lr, prototype normalisation, multi-crop
forward, Sinkhorn codes, loss, backward, optimiser step: LARS, or SGD for recipes that train with it) and a backbone-only forward+backward on the
same crops, and reports images/s, the ratio to the plain fp32 step, the step/backbone ratio, and
how far the first step's loss and codes are from fp32 (same weights, same crops; the tolerances are stated in
LOSS_TOLERANCE and CODES_MEAN_L1_TOLERANCE, and a configuration outside them makes the script exit with 1). Before timing, each configuration runs in a child process of its own (build,
warm-up, one step and one backbone-only call) whose peak resident memory is the "peak GiB" column.

The configurations are timed in rounds: each round runs one step and one backbone-only call of every
configuration in turn (a different configuration first in each round), so that a slow spell of a shared machine falls on all of them alike. The table
gives the median over rounds (and the fastest round, which is the least disturbed one); ratios are
ratios of medians, except "paired": the median over rounds of step / backbone-only measured back to back
(alternating which comes first), which a slow spell of a few seconds disturbs much less. "opt ms" is the optimiser step alone (over every parameter), timed on the
gradients the step left: the part of the step overhead that does not shrink with the batch.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe as describe_machine, header as machine_header, peak_rss_gib  # noqa: E402

from swav.backbones import SmallMapConv2d
from swav.compact_backbones import CompactResNet
from swav.config import Config, with_values
from swav.lars import LARS
from swav.model import build_model
from swav.recipes import load_recipe
from swav.schedule import warmup_cosine_schedule
from swav.train import _optimizer, model_spec_from_config
from swav.train_step import SwAVStep


def preset_config(name: str, batch: int | None) -> Config:
    if name == "resnet50":
        config = with_values(Config(), {"crops.counts": [2, 6], "crops.sizes": [224, 96],
                                        "crops.min_scales": [0.14, 0.05], "crops.max_scales": [1.0, 0.14],
                                        "optim.batch_size_per_device": batch or 4})
    else:
        config = load_recipe(name)
        if batch:
            config = with_values(config, {"optim.batch_size_per_device": batch})
    return with_values(config, {"run.log_every_steps": 10**9})


# precision, channels-last, torch.compile, which convolutions on small maps run as matrix products
# (SmallMapConv2d: "all" = its rule for this CPU, "all+kxk1" = stride-1 3x3 ones too as on AMX CPUs,
# "1x1" only, or "none" = every convolution through oneDNN), and whether LARS
# uses PyTorch's fused SGD kernel (on CPUs with the trust ratio passed into it) or rescales the gradients
# first and then runs the foreach SGD update, and whether the compact trunks pool their last map with a matrix
# product (CompactResNet.MATMUL_POOL) or with adaptive_avg_pool2d
# (fused None: LARS's own default, the fused kernel wherever PyTorch has one)
VARIANTS = {"fp32": ("fp32", False, False, "all", None, False), "bf16": ("bf16", False, False, "all", None, False),
            "bf16-cl-onednn": ("bf16", True, False, "none", None, False),
            "bf16-cl-1x1": ("bf16", True, False, "1x1", None, False),
            "bf16-cl": ("bf16", True, False, "all", None, False),
            "bf16-cl-compile": ("bf16", True, True, "all", None, False),
            "bf16-cl-kxk1": ("bf16", True, False, "all+kxk1", None, False),
            "bf16-cl-unfused-lars": ("bf16", True, False, "all", False, False),
            "bf16-cl-matmul-pool": ("bf16", True, False, "all", None, True)}


# how far a configuration's first step may be from the reference's (the first variant, fp32 by default) on the
# same weights and crops: the loss, and the codes as the mean L1 distance between a crop's two code rows (the
# share of a row's probability mass moved, x2); bf16 rounds the backbone's activations, Sinkhorn stays fp32
LOSS_TOLERANCE = 0.01
CODES_MEAN_L1_TOLERANCE = 0.1


def agreement(loss: float, codes: torch.Tensor, reference: tuple[float, torch.Tensor]) -> dict:
    """The differences to the reference's first step and whether they are within the stated tolerances."""
    ref_loss, ref_codes = reference
    row_l1 = (codes - ref_codes).abs().sum(dim=-1)
    result = {"loss_diff_vs_fp32": abs(loss - ref_loss), "codes_max_diff_vs_fp32": float((codes - ref_codes).abs().max()),
              "codes_mean_row_l1_vs_fp32": float(row_l1.mean()),
              "codes_argmax_agreement_vs_fp32": float((codes.argmax(-1) == ref_codes.argmax(-1)).float().mean())}
    result["within_tolerance"] = bool(result["loss_diff_vs_fp32"] <= LOSS_TOLERANCE
                                      and result["codes_mean_row_l1_vs_fp32"] <= CODES_MEAN_L1_TOLERANCE)
    return result


def make_crops(config: Config, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, c = config.optim.batch_size_per_device, config.data.channels
    return [torch.randn(b, c, size, size, generator=g)
            for size, count in zip(config.crops.sizes, config.crops.counts) for _ in range(count)]


def make_step(config: Config, model, precision: str, channels_last: bool, compile_model: bool,
              small_map_matmul: str = "all", fused_lars: bool | None = None, matmul_pool: bool = False) -> SwAVStep:
    config = with_values(config, {"run.channels_last": channels_last})
    model = copy.deepcopy(model)
    kinds = {type(m) for m in model.modules()}
    if small_map_matmul != "all" and SmallMapConv2d not in kinds:
        print(f"note: small-map matmul={small_map_matmul!r} changes nothing here: this backbone has no SmallMapConv2d")
    if matmul_pool and CompactResNet not in kinds:
        print("note: matmul_pool=True changes nothing here: this backbone is not a CompactResNet")
    for module in model.modules():  # the others through oneDNN's convolution
        if isinstance(module, CompactResNet):
            module.MATMUL_POOL = matmul_pool
        if not isinstance(module, SmallMapConv2d):
            continue
        if small_map_matmul == "all+kxk1":  # stride-1 3x3 ones too, whatever the CPU (the rule for AMX CPUs)
            module.KXK_STRIDE1_MATMUL = True
        elif not (small_map_matmul == "all" or small_map_matmul == "1x1" and module.kernel_size == (1, 1)):
            module.MATMUL_MAX_PIXELS = 0
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped = torch.compile(model) if compile_model else model
    if config.optim.lars:
        optimizer = LARS(model.parameters(), lr=0.1, weight_decay=config.optim.weight_decay, fused=fused_lars)
    else:  # the recipe's own optimiser (the CPU recipes train with SGD + momentum)
        if fused_lars is not None:
            print(f"note: fused_lars={fused_lars} changes nothing here: this recipe trains with SGD")
        optimizer = _optimizer(model, config)
    schedule = warmup_cosine_schedule(0.6, 0.0006, 10, 1000)
    return SwAVStep(wrapped, model, optimizer, config=config, lr_schedule=schedule, queue_length_per_rank=0,
                    precision=precision, device=torch.device("cpu"), rank=0)


def backbone_only(step: SwAVStep, crops: list[torch.Tensor]) -> None:
    """Forward + backward of the backbone alone, one pass per resolution, same precision/layout."""
    model = step.raw_model
    if step.channels_last:
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    runs, start = [], 0
    for size, count in zip(step.config.crops.sizes, step.config.crops.counts):
        runs.append(torch.cat(crops[start:start + count]))
        start += count
    with torch.autocast("cpu", dtype=step.dtype or torch.float32, enabled=step.dtype is not None):
        loss = sum(model.backbone(x).float().mean() for x in runs)
    model.zero_grad(set_to_none=True)
    loss.backward()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def bootstrap_ci(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the median (how far the noise of this machine leaves the figure open)."""
    rng = np.random.default_rng(0)
    data = np.asarray(values)
    medians = np.median(rng.choice(data, (resamples, len(data))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def probe_memory(preset: str, batch: int | None, variant: str, warmup: int) -> float:
    """Peak resident memory (GiB) of a fresh process that builds ``variant``, warms it up and runs it once."""
    command = [sys.executable, __file__, "--preset", preset, "--warmup", str(warmup), "--memory-probe", variant]
    if batch:
        command += ["--batch", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {variant} failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_gib"])


def run_memory_probe(config: Config, variant: str, warmup: int) -> None:
    """The child's side of :func:`probe_memory`: prints one JSON line."""
    torch.manual_seed(0)
    step = make_step(config, build_model(model_spec_from_config(config)), *VARIANTS[variant])
    crops = make_crops(config)
    for _ in range(warmup + 1):
        step(crops, 10**6)
        backbone_only(step, crops)
    print(json.dumps({"variant": variant, "peak_rss_gib": peak_rss_gib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet50", help="resnet50 or a recipe name")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["fp32", "bf16", "bf16-cl-onednn", "bf16-cl"],
                        help="configurations to time (the first is the reference of 'vs fp32'); fewer "
                             "configurations leave time for more rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory probes")
    parser.add_argument("--memory-probe", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = preset_config(args.preset, args.batch)
    if args.memory_probe:
        run_memory_probe(config, args.memory_probe, args.warmup)
        return
    print(machine_header())
    names = list(dict.fromkeys(list(args.variants) + (["bf16-cl-compile"] if args.compile else [])))  # no repeats
    peaks = {}
    if not args.no_memory:
        for name in names:
            peaks[name] = probe_memory(args.preset, args.batch, name, args.warmup)
            print(f"{name}: peak resident memory {peaks[name]:.2f} GiB (a process of its own)", flush=True)
    torch.manual_seed(0)
    model = build_model(model_spec_from_config(config))
    crops = make_crops(config)
    reference = None
    rows, steps = [], []
    for name in names:
        precision, channels_last, compile_model, small_map_matmul, fused_lars, matmul_pool = VARIANTS[name]
        step = make_step(config, model, precision, channels_last, compile_model, small_map_matmul, fused_lars,
                         matmul_pool)
        first = step(crops, 10**6)  # past prototype freezing; same weights and crops for every variant
        loss, codes = float(first.loss), first.codes_ABK.float()
        if reference is None:
            reference = (loss, codes)
        for _ in range(args.warmup):
            step(crops, 10**6)
            backbone_only(step, crops)
        steps.append(step)
        rows.append({"variant": name, "precision": precision, "channels_last": channels_last, "compile": compile_model,
                     "small_map_matmul": small_map_matmul, "fused_lars": fused_lars, "matmul_pool": matmul_pool, "peak_rss_gib": peaks.get(name),
                     "loss": loss, **agreement(loss, codes, reference),
                     "step_times_s": [], "backbone_only_times_s": [], "optimizer_times_s": []})
    for round_index in range(args.repeats):
        first = round_index % len(rows)  # each configuration leads a round in turn (none always runs cold first)
        for step, row in list(zip(steps, rows))[first:] + list(zip(steps, rows))[:first]:
            # step and backbone-only back to back, in alternating order: their ratio within a round is
            # much less exposed to the shared host's slow spells than a ratio of medians over all rounds
            if round_index % 2:
                row["backbone_only_times_s"].append(timed(lambda: backbone_only(step, crops)))
            row["step_times_s"].append(timed(lambda: step(crops, 10**6)))
            # the step leaves its gradients in place: one more optimiser step alone, on them
            row["optimizer_times_s"].append(timed(step.optimizer.step))
            if not round_index % 2:
                row["backbone_only_times_s"].append(timed(lambda: backbone_only(step, crops)))
        print(f"round {round_index + 1}/{args.repeats}: "
              + "  ".join(f"{r['step_times_s'][-1]:.3f}/{r['backbone_only_times_s'][-1]:.3f}" for r in rows),
              flush=True)
    batch = config.optim.batch_size_per_device
    for row in rows:
        step_s, bb_s = median(row["step_times_s"]), median(row["backbone_only_times_s"])
        row.update({"step_s": step_s, "step_min_s": min(row["step_times_s"]), "images_per_s": batch / step_s,
                    "backbone_only_s": bb_s, "step_over_backbone": step_s / bb_s,
                    "step_over_backbone_paired": median([a / b for a, b in zip(row["step_times_s"],
                                                                               row["backbone_only_times_s"])]),
                    "step_over_backbone_paired_ci95": bootstrap_ci([a / b for a, b in zip(
                        row["step_times_s"], row["backbone_only_times_s"])]),
                    "optimizer_s": median(row["optimizer_times_s"])})
    base = rows[0]["images_per_s"]
    print(f"\n{args.preset}: crops {list(config.crops.counts)} x {list(config.crops.sizes)} px, batch "
          f"{config.optim.batch_size_per_device}, backbone {config.model.backbone}, {torch.get_num_threads()} threads; "
          f"this process, every configuration resident: peak {peak_rss_gib():.2f} GiB")
    print(f"medians of {args.repeats} interleaved rounds (min: fastest round); 'vs ref', |dloss| and |dcodes| "
          f"against the first configuration, {names[0]}")
    print(f"{'variant':<23}{'precision':<10}{'ch-last':>8}{'matmul':>9}{'compile':>8}{'s/step':>9}{'min':>8}{'img/s':>9}{'vs ref':>9}"
          f"{'min vs':>8}{'step/bb':>9}{'paired':>8}{'opt ms':>8}{'|dloss|':>10}{'|dcodes|':>10}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['variant']:<23}{r['precision']:<10}{str(r['channels_last']):>8}{r['small_map_matmul']:>9}{str(r['compile']):>8}{r['step_s']:>9.3f}"
              f"{r['step_min_s']:>8.3f}{r['images_per_s']:>9.2f}{r['images_per_s'] / base:>9.2f}"
              f"{rows[0]['step_min_s'] / r['step_min_s']:>8.2f}{r['step_over_backbone']:>9.3f}"
              f"{r['step_over_backbone_paired']:>8.3f}"
              f"{1000 * r['optimizer_s']:>8.1f}"
              f"{r['loss_diff_vs_fp32']:>10.4f}{r['codes_max_diff_vs_fp32']:>10.4f}"
              f"{'-' if r['peak_rss_gib'] is None else format(r['peak_rss_gib'], '.2f'):>10}")
    for r in rows[1:]:
        speedups = [a / b for a, b in zip(rows[0]["step_times_s"], r["step_times_s"])]
        r["speedup_paired"], r["speedup_paired_ci95"] = median(speedups), bootstrap_ci(speedups)
        print(f"{r['variant']}: step {r['speedup_paired']:.2f}x faster than "
              f"{rows[0]['variant']} (median of per-round ratios; 95% interval {r['speedup_paired_ci95'][0]:.2f}-"
              f"{r['speedup_paired_ci95'][1]:.2f})")
    for r in rows:
        low, high = r["step_over_backbone_paired_ci95"]
        print(f"{r['variant']}: paired step/backbone {r['step_over_backbone_paired']:.3f},"
              f" 95% bootstrap interval {low:.3f}-{high:.3f} over {args.repeats} rounds")
    print(f"first step against {names[0]} (same weights and crops; tolerance: |dloss| <= {LOSS_TOLERANCE}, mean L1 "
          f"between code rows <= {CODES_MEAN_L1_TOLERANCE}):")
    for r in rows[1:]:
        print(f"  {r['variant']}: |dloss| {r['loss_diff_vs_fp32']:.4f}, codes mean row L1 "
              f"{r['codes_mean_row_l1_vs_fp32']:.4f} (max element {r['codes_max_diff_vs_fp32']:.4f}), same argmax "
              f"for {100 * r['codes_argmax_agreement_vs_fp32']:.1f}% of rows: "
              f"{'within tolerance' if r['within_tolerance'] else 'OUT OF TOLERANCE'}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": describe_machine(), "preset": args.preset, "batch": config.optim.batch_size_per_device,
            "crops": {"counts": list(config.crops.counts), "sizes": list(config.crops.sizes)},
            "backbone": config.model.backbone, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "warmup": args.warmup, "reference_variant": names[0],  # what the *_vs_fp32 fields compare with
            "process_peak_rss_gib": peak_rss_gib(), "loss_tolerance": LOSS_TOLERANCE,
            "codes_mean_row_l1_tolerance": CODES_MEAN_L1_TOLERANCE, "rows": rows}, indent=2))
    if not all(r["within_tolerance"] for r in rows):
        sys.exit(f"configurations out of tolerance against {names[0]}: "
                 + ", ".join(r["variant"] for r in rows if not r["within_tolerance"]))


if __name__ == "__main__":
    main()

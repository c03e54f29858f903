"""The batched colour stage alone on a CPU: where its time goes, eager and with ``compile=True``.

``data_pipeline.py`` times whole pipelines (decode, crops, colour) against the per-image chains; its rounds
last seconds, and this machine's speed drifts by tens of percent within that, which hides differences of
10-20% in one stage. This times only :class:`~swav.batch_augment.BatchColorAugment` on the crops of real
photos (2x224 + 6x96, batches of 64 images), alternating the variants batch by batch so that a drift hits
them alike, and splits the eager grouped strategy's time by op (the ops are wrapped with timers; the rest is
conversion, normalisation, gathering and scattering pieces, and Python).

Variants: ``opencv`` (the CPU default where OpenCV is installed: crop by crop, each op one OpenCV pass),
``grouped`` (the CPU default without OpenCV), ``compiled`` (``compile=True``: the grouped strategy with the hue
rotation compiled; compiled before timing) and ``masked`` (the GPU default, each op once over the whole
batch's subset). ``--compare-with REV`` adds the grouped strategy of an earlier git revision of this
repository (its ``swav/color_ops.py`` and ``swav/batch_augment.py``, loaded beside the current ones), to
measure a change side by side rather than across sessions.

    PYTHONPATH=. python benchmarks/colour_stage.py --data .bench_photos --json benchmarks/results_cpu2_colour_stage.json
    PYTHONPATH=. python benchmarks/colour_stage.py --data .bench_photos --compare-with e84b754
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import describe as describe_machine, header as machine_header  # noqa: E402

import swav.batch_augment as batch_augment
from swav import opencv_colour
from swav.batch_augment import BatchColorAugment, FastMultiCrop, multicrop_collate
from swav.multicrop import crop_groups_from_lists

DEFAULT_DATA = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "photos-500x375"
GROUPS = crop_groups_from_lists([2, 6], [224, 96], [0.14, 0.05], [1.0, 0.14])
WRAPPED = ("adjust_hue_batch", "gaussian_blur_batch", "grayscale_batch", "flip_batch")


def colour_stage_at(revision: str):
    """``BatchColorAugment`` of an earlier revision, as a module of its own (``swav_at_revision``)."""
    root = Path(__file__).resolve().parent.parent
    package = Path(tempfile.mkdtemp(prefix="swav-colour-")) / "swav_at_revision"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("color_ops", "batch_augment"):
        shown = subprocess.run(["git", "-C", str(root), "show", f"{revision}:swav/{name}.py"], capture_output=True,
                               text=True)
        if shown.returncode:
            raise SystemExit(f"--compare-with {revision}: {shown.stderr.strip()}")
        (package / f"{name}.py").write_text(shown.stdout.replace("from swav.color_ops import",
                                                                 "from swav_at_revision.color_ops import"))
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("swav_at_revision.batch_augment").BatchColorAugment


def wrap_ops(spent: collections.Counter) -> Callable[[], None]:
    """Time every op the grouped strategy calls; returns a function that undoes it."""
    saved_module = {name: getattr(batch_augment, name) for name in WRAPPED}
    saved_jitter = dict(batch_augment.JITTER_FNS)

    def timer(name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.process_time() - start
        return timed

    for name, fn in saved_module.items():
        setattr(batch_augment, name, timer(name.replace("_batch", "").replace("adjust_", ""), fn))
    for name, fn in saved_jitter.items():
        batch_augment.JITTER_FNS[name] = timer(name, fn)

    def undo() -> None:
        for name, fn in saved_module.items():
            setattr(batch_augment, name, fn)
        batch_augment.JITTER_FNS.update(saved_jitter)
    return undo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches of crops, cycled")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the batches")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", nargs="+",
                        default=["grouped"] + (["opencv"] if opencv_colour.available() else []) + ["compiled", "masked"],
                        choices=["grouped", "opencv", "compiled", "masked"])
    parser.add_argument("--compare-with", metavar="REV", default=None,
                        help="also time the grouped strategy of this git revision (e.g. a commit before a change)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(machine_header())
    torch.set_num_threads(1)
    if not args.data.is_dir():
        raise SystemExit(f"--data {str(args.data)!r} is not a folder: pass a folder of JPEG photos (ImageNet-size, "
                         "e.g. 500 x 375), as --data DIR")
    files = sorted(p for p in args.data.resolve().iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no JPEG files in {args.data}")
    cropper = FastMultiCrop(GROUPS, seed=0).cropper
    batches = [multicrop_collate([cropper(files[(b * args.batch_size + i) % len(files)])
                                  for i in range(args.batch_size)]) for b in range(args.batches)]
    makers = {"grouped": lambda: BatchColorAugment(seed=1, strategy="grouped"),
              "compiled": lambda: BatchColorAugment(seed=1, compile=True),
              "masked": lambda: BatchColorAugment(seed=1, strategy="masked"),
              "opencv": lambda: BatchColorAugment(seed=1, strategy="opencv")}
    augments = {name: makers[name]() for name in args.variants}
    if args.compare_with:
        augments[f"{args.compare_with} grouped"] = colour_stage_at(args.compare_with)(seed=1, strategy="grouped")
    compile_s = {}
    for name, augment in augments.items():  # warm-up; compiles the compiled variant
        start = time.perf_counter()
        augment(batches[0])
        compile_s[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in augments}
    for _ in range(args.rounds):
        for batch in batches:
            for name, augment in augments.items():
                start = time.process_time()
                augment(batch)
                times[name].append(time.process_time() - start)
    per_image = {name: statistics.median(t) * 1e3 / args.batch_size for name, t in times.items()}
    first = next(iter(times))
    ratios = {name: statistics.median(a / b for a, b in zip(times[first], t)) for name, t in times.items()}
    spent: collections.Counter = collections.Counter()
    breakdown: dict[str, float] = {}
    if "grouped" in augments:
        undo = wrap_ops(spent)
        try:
            total = 0.0
            for _ in range(args.rounds):
                for batch in batches:
                    start = time.process_time()
                    augments["grouped"](batch)
                    total += time.process_time() - start
        finally:
            undo()
        images = args.rounds * len(batches) * args.batch_size
        breakdown = {name: seconds * 1e3 / images for name, seconds in spent.most_common()}
        breakdown["rest (conversion, normalisation, pieces, Python)"] = (total - sum(spent.values())) * 1e3 / images
    print(f"colour stage, {len(batches)} batches of {args.batch_size} photos x (2x224 + 6x96) crops, "
          f"{args.rounds} rounds, one thread; process CPU time, medians over batches")
    print(f"{'variant':<18} {'ms per image':>13} {f'speed vs {first}':>18} {'first call s':>13}")
    for name in augments:
        print(f"{name:<18} {per_image[name]:>13.2f} {ratios[name]:>17.2f}x {compile_s[name]:>13.1f}")
    if breakdown:
        print("\ngrouped (eager), ms per image by op (a timed pass of its own):")
        for name, ms in breakdown.items():
            print(f"  {name:<50} {ms:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(), "torch": torch.__version__, "batches": len(batches), "batch_size": args.batch_size,
                                         "rounds": args.rounds, "compare_with": args.compare_with, "ms_per_image": per_image, "speed_vs_first": ratios,
                                         "first_call_s": compile_s, "grouped_breakdown_ms_per_image": breakdown},
                                        indent=2))


if __name__ == "__main__":
    main()

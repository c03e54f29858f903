"""``swav pretrain`` (and ``swav demo``): SwAV pretraining from the command line.

Contract (other tools rely on these names)::

    swav pretrain --data PATH --output-dir DIR --epochs N --batch-size B
                  [--config FILE] [--recipe NAME] [--set section.key=value ...] [--resume] [--overwrite]
                  [--device auto|cpu|cuda] [--workers N] [--seed N]

plus the original script's flags verbatim (``--nmb_crops 2 6 --size_crops 224 96 ...``, SPEC §9).
Precedence: defaults < recipe < ``--config`` file < flags < ``--set``. With ``--resume`` and no
recipe/config, the run folder's own ``config.yaml`` is the starting point. With no ``--data`` (and no
recipe/config), or as ``swav demo``, the ``fashion_mnist_cpu`` recipe runs on Fashion-MNIST and the
run ends with a k-NN summary (written to ``<output-dir>/summary.json``). Limits of one invocation
(``run.max_steps``, ``run.time_budget_minutes``, ``debug.*``) are not taken over from a run's config.yaml.

Exit status: 0 done (or stopped by --set run.max_steps / run.time_budget_minutes, or --resume on a complete
run), 1 error, 2 usage error, 128 + signal after SIGTERM/SIGUSR1 (a checkpoint was saved; rerun with --resume).

Example:
    swav pretrain --data ~/images --recipe swav_200ep_bs256 --output-dir runs/r50 --set optim.epochs=100
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from swav.config import Config, config_to_dict, load_config_file, parse_override, read_config_values, with_values
from swav.official_flags import add_official_flags, official_values
from swav.usage import UsageError

logger = logging.getLogger(__name__)

__all__ = ["register", "run", "resolve_config", "DEMO_RECIPE", "DEMO_OUTPUT_DIR"]

_DESCRIPTION = """\
Pretrain an image encoder with SwAV.

  swav pretrain --data PATH --output-dir DIR [--recipe NAME] [--config FILE] [--epochs N] [--batch-size B]
                [--set section.key=value ...] [--resume | --overwrite] [--device auto|cpu|cuda]

PATH is a folder of images (subfolders are read too), a folder of shards (see `swav pack-shards`) or a named
data set (fashion-mnist, cifar10, ...). The original script's flags are accepted as they are
(--nmb_crops 2 6 --size_crops 224 96 ...). Settings are taken from, last one winning: the defaults, --recipe,
the --config file, the flags, then --set. With no --data, --recipe or --config (or as `swav demo`) the
fashion_mnist_cpu recipe (sized for a CPU) runs on Fashion-MNIST and ends with a k-NN summary
(<output-dir>/summary.json). --resume continues the run in --output-dir (its config.yaml is the starting
point unless a recipe or config is given); run.max_steps, run.time_budget_minutes and debug.* apply to this
invocation only.

Exit status: 0 done (or stopped by run.max_steps / run.time_budget_minutes, or --resume on a complete run),
1 error, 2 usage error, 128 + signal after SIGTERM/SIGUSR1 (a checkpoint was saved; rerun with --resume).
`swav pretrain --list-recipes` lists the shipped recipes.
"""

DEMO_RECIPE = "fashion_mnist_cpu"
DEMO_OUTPUT_DIR = "swav-demo"
_SMALL_LABELLED = ("fashion-mnist", "fashion_mnist", "fashionmnist", "mnist")
# limits of one invocation: not taken over from a resumed run's config.yaml
_PER_INVOCATION = {"run.max_steps": 0, "run.time_budget_minutes": 0.0, "debug.inject_nan_step": -1,
                   "debug.inject_nan_rank": -1, "debug.inject_error_step": -1, "debug.inject_error_rank": -1}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", action="append", default=[],
                        help="YAML config (full or partial), applied after --recipe; repeatable: later files' values "
                             "win")
    parser.add_argument("--recipe", metavar="NAME", help="a shipped recipe (see --list-recipes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set optim.base_lr=0.6")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its newest valid checkpoint (start if none)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    parser.add_argument("--partial", action="store_true",
                        help="with --resume: load what fits from a checkpoint of another model or crop set "
                             "(the skipped tensors are listed)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (default auto)")
    parser.add_argument("--summary", dest="summary", action="store_true", default=None,
                        help="end with the k-NN summary (default: on for the demo and Fashion-MNIST/MNIST)")
    parser.add_argument("--no-summary", dest="summary", action="store_false", help="skip the k-NN summary")
    parser.add_argument("--knn-test-limit", type=int, default=0, metavar="N",
                        help="use only N test images for the summary (0 = all)")
    parser.add_argument("--knn-train-limit", type=int, default=None, metavar="N",
                        help="use only the first N training images as the k-NN bank (default: data.limit or all)")
    parser.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_official_flags(parser, aliases={"data_path": ["--data"], "dump_path": ["--output-dir"],
                                        "batch_size": ["--batch-size"]})


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pretrain`` and its alias ``demo``."""
    for name, text in (("pretrain", "pretrain SwAV on a folder of images or a named data set"),
                       ("demo", "the CPU demo: pretrain on Fashion-MNIST and print what was learned")):
        parser = subparsers.add_parser(name, help=text, description=_DESCRIPTION, epilog="example: swav pretrain "
                                       "--data ~/images --recipe swav_200ep_bs256 --output-dir runs/r50 --set optim.epochs=100",
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_arguments(parser)
        parser.set_defaults(func=run, demo=name == "demo")


def resolve_config(args: argparse.Namespace) -> tuple[Config, bool]:
    """The config the command line describes, and whether this is the demo run.

    Anything wrong with it (a flag's or ``--set`` value, a recipe name, a ``--config`` file, crop lists that
    do not match, a CUDA device this machine lacks) is a :class:`~swav.usage.UsageError` (exit status 2).
    """
    from swav.cli import check_device

    try:
        config, demo = _resolve_config(args)
        check_device(config.run.device)
    except UsageError:
        raise
    except ValueError as exc:  # config validation: the command line's values cannot work as given
        raise UsageError(str(exc)) from exc
    return config, demo


def _stored_config(output_dir: Path) -> Config | None:
    """The config of the run in ``output_dir``: its config.yaml, or where that file is missing the one stored
    in its newest readable checkpoint (with a warning); None when the folder holds neither."""
    own = output_dir / "config.yaml"
    if own.is_file():
        from swav.config import SECTIONS, read_config_values

        try:  # a run writes every section: an empty or cut file is damaged, not a config of defaults
            sections = {key.split(".")[0] for key in read_config_values(own)}
            if sections >= set(SECTIONS):
                return load_config_file(own)
            logger.warning("%s is incomplete (sections %s missing)", own, sorted(set(SECTIONS) - sections))
        except ValueError as exc:  # damaged: the checkpoint's copy below
            logger.warning("%s is unreadable (%s)", own, str(exc).splitlines()[0])
    from swav.checkpoint import CheckpointError, find_latest_checkpoint
    from swav.config import config_from_dict

    try:
        found = find_latest_checkpoint(output_dir)
    except CheckpointError:
        return None  # the run itself names the damaged checkpoints
    if found is None or not isinstance(found[1].get("config"), dict):
        return None
    logger.warning("%s is missing or unreadable: continuing with the config stored in %s", own, found[0])
    return config_from_dict(found[1]["config"])


def _resolve_config(args: argparse.Namespace) -> tuple[Config, bool]:
    from swav.recipes import load_recipe

    if args.partial and not args.resume:  # only a resumed run loads a checkpoint
        raise UsageError("--partial applies with --resume only (it loads what fits from the run's checkpoint): "
                         "add --resume to continue the run in --output-dir from a checkpoint of another model or "
                         "crop set")
    flags = official_values(args)
    # `--output-dir RUN --resume` with nothing else continues RUN with its own config.yaml: not the demo
    explicit_dir = flags.get("run.output_dir")
    if explicit_dir:  # `--output-dir=~/run` reaches us unexpanded
        explicit_dir = flags["run.output_dir"] = str(Path(explicit_dir).expanduser())
    stored = _stored_config(Path(explicit_dir)) if args.resume and explicit_dir else None
    resumed_run = stored is not None
    if (args.resume and explicit_dir and not resumed_run and not getattr(args, "demo", False)
            and "data.path" not in flags and not args.recipe and not args.config):
        from swav.run_folder import holds_run
        if not holds_run(Path(explicit_dir)):  # a typo would otherwise start the demo there
            raise UsageError(f"--resume: {explicit_dir!r} holds no run (no config.yaml or checkpoints): check the "
                             "path, or give --data (and --recipe) to start a run there")
    demo = bool(getattr(args, "demo", False)) or ("data.path" not in flags and not args.recipe and not args.config
                                                  and not resumed_run)
    output_dir = flags.get("run.output_dir") or (DEMO_OUTPUT_DIR if demo else None)
    if args.resume and output_dir and not explicit_dir:  # the default job's own folder
        stored = _stored_config(Path(output_dir))
    data = flags.get("data.path")
    if getattr(args, "demo", False) and isinstance(data, str) and Path(data).expanduser().is_dir():
        from swav.datasets import detect_data_set_folder
        if not detect_data_set_folder(Path(data).expanduser()):  # a plain folder of images
            raise UsageError(f"swav demo runs the Fashion-MNIST recipe, made for small labelled data sets (IDX or CIFAR "
                             f"files, or their shards), and --data {data!r} holds none: pass the folder that holds "
                             "the files, or for a folder of your own images run `swav pretrain --data PATH` (the "
                             "ResNet-50 defaults; --recipe NAME for another recipe)")
    if args.recipe:
        config = load_recipe(args.recipe)
    elif args.resume and not args.config and stored is not None:
        config = with_values(stored, _PER_INVOCATION)
    elif demo or (isinstance(data, str) and data.lower() in _SMALL_LABELLED and not args.config):
        config = load_recipe(DEMO_RECIPE)
    else:
        config = Config()
    file_values: dict[str, object] = {}
    if isinstance(args.config, (str, Path)):  # a Namespace made by a caller, not by the parser
        args.config = [args.config]
    for path in args.config or []:  # in order, later files' values win
        if not Path(path).expanduser().is_file():
            raise UsageError(f"--config {path!r} does not exist (or is not a file): give the path of a "
                             "YAML config, e.g. a run's config.yaml, or use --recipe NAME")
        # the files' values join the flags and --set below, validated together: a partial file may need a flag
        # to make sense (epochs: 5 in the file, --warmup_epochs 1 on the command line)
        file_values.update(read_config_values(Path(path).expanduser()))
    if demo and "run.output_dir" not in flags:  # the command line's own --output-dir only, not the file's
        flags["run.output_dir"] = DEMO_OUTPUT_DIR
    if args.device:
        flags["run.device"] = args.device
    # flags and --set in one step, validated together: a --set may fix what a flag alone makes inconsistent
    # (--epochs 2 with the recipe's 10 warm-up epochs, --set optim.warmup_epochs=0)
    command_line = dict(flags)
    for text in args.overrides:
        key, value = parse_override(text)
        command_line[key] = value
    values = {**file_values, **command_line}
    if not values:
        return config, demo
    try:
        return with_values(config, values), demo
    except ValueError as exc:
        if file_values:  # name the file where its values take part in the error
            try:
                with_values(config, command_line)
            except ValueError:
                raise exc from None  # the command line alone is wrong already
            files = " ".join(args.config)
            raise ValueError(f"{exc} (values from --config {files}, the flags and --set, applied together)") from None
        raise


def _summary_wanted(args: argparse.Namespace, config: Config, demo: bool) -> bool:
    if args.summary is not None:
        return bool(args.summary)
    return demo or str(config.data.path).lower() in _SMALL_LABELLED


def run(args: argparse.Namespace) -> int:
    """Run ``swav pretrain``; returns the exit status."""
    if args.list_recipes:
        from swav.recipes import available_recipes
        print("\n".join(available_recipes()))
        return 0
    config, demo = resolve_config(args)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    from swav.train import train

    if args.summary and not demo:  # asked for: its labelled data is checked before training, not after
        from swav.pretrain_summary import check_summary_data
        check_summary_data(config)
    result = train(config, resume=args.resume, overwrite=args.overwrite, partial=args.partial)
    if result.rank != 0:  # under torchrun every rank returns here: rank 0 speaks for the run
        return result.exit_code
    kept = f"checkpoint {result.checkpoint}" if result.checkpoint is not None else \
        "no new checkpoint (nothing was left to train before this limit), the newest one is kept"
    if result.status == "already_complete":
        print(f"the run in {result.output_dir} is already complete (step {result.step}); nothing to do")
    elif result.status == "preempted":
        print(f"stopped by a signal at step {result.step}; {kept}; continue with --resume", file=sys.stderr)
        return result.exit_code
    elif result.status != "complete":
        print(f"stopped at step {result.step} ({result.status}); {kept}; continue with --resume")
    summary_file = result.output_dir / "summary.json"
    if result.status == "already_complete" and summary_file.is_file():
        from swav.pretrain_summary import format_summary  # a finished run is left untouched
        print(format_summary(json.loads(summary_file.read_text(encoding="utf-8"))))
    elif result.status in ("complete", "already_complete") and _summary_wanted(args, config, demo):
        _print_summary(config, result.output_dir, args.knn_train_limit, args.knn_test_limit)
    return 0


def _print_summary(config: Config, output_dir: Path, train_limit: int | None, test_limit: int) -> None:
    import torch

    from swav.checkpoint import load_model
    from swav.dist_setup import select_device
    from swav.distributed import get_rank
    from swav.pretrain_summary import format_summary, knn_summary

    if get_rank() != 0:
        return
    model = load_model(output_dir / "model.pt")
    derived = json.loads((output_dir / "derived.json").read_text(encoding="utf-8"))
    device = select_device(derived.get("device", "cpu").split(":")[0], 0)
    amp = torch.bfloat16 if derived.get("precision") == "bf16" else None
    summary = knn_summary(model, config, device=device, amp_dtype=amp, train_limit=train_limit,
                          test_limit=test_limit)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(format_summary(summary))

"""The original training script's command-line flags (SPEC §9), mapped onto :class:`swav.config.Config`.

Users' launch scripts pass ``--nmb_crops 2 6 --size_crops 224 96 --epsilon 0.05 ...``; these flags are
accepted verbatim and each lands in one typed config field. Values are converted by the same code
as ``--set`` (booleans as true/false, on/off or 1/0). Two flags change meaning on the way:
``--use_fp16 true|false`` selects ``run.precision`` fp16 or fp32, and ``--sync_bn pytorch|apex|none``
(or a boolean) switches ``run.sync_bn`` (PyTorch's SyncBatchNorm is used for "apex" too).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_official_flags(parser)
    >>> args = parser.parse_args(["--nmb_crops", "2", "6", "--use_fp16", "false", "--wd", "1e-6"])
    >>> values = official_values(args)
    >>> values["crops.counts"], values["run.precision"], values["optim.weight_decay"]
    (['2', '6'], 'fp32', '1e-6')
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from swav.usage import UsageError

__all__ = ["OFFICIAL_FLAGS", "add_official_flags", "official_values", "official_to_config_value"]

#: flag name -> (config key, argparse nargs); "+" for the per-resolution lists
OFFICIAL_FLAGS: dict[str, tuple[str, str | None]] = {
    "data_path": ("data.path", None),
    "nmb_crops": ("crops.counts", "+"),
    "size_crops": ("crops.sizes", "+"),
    "min_scale_crops": ("crops.min_scales", "+"),
    "max_scale_crops": ("crops.max_scales", "+"),
    "crops_for_assign": ("swav.crops_for_assign", "+"),
    "temperature": ("swav.temperature", None),
    "epsilon": ("swav.epsilon", None),
    "sinkhorn_iterations": ("swav.sinkhorn_iterations", None),
    "feat_dim": ("model.output_dim", None),
    "nmb_prototypes": ("model.num_prototypes", "+"),
    "queue_length": ("swav.queue_length", None),
    "epoch_queue_starts": ("swav.queue_start_epoch", None),
    "epochs": ("optim.epochs", None),
    "batch_size": ("optim.batch_size_per_device", None),
    "base_lr": ("optim.base_lr", None),
    "final_lr": ("optim.final_lr", None),
    "freeze_prototypes_niters": ("swav.freeze_prototypes_steps", None),
    "wd": ("optim.weight_decay", None),
    "warmup_epochs": ("optim.warmup_epochs", None),
    "start_warmup": ("optim.start_warmup", None),
    "dist_url": ("run.dist_url", None),
    "world_size": ("run.world_size", None),
    "rank": ("run.rank", None),
    "local_rank": ("run.local_rank", None),
    "arch": ("model.backbone", None),
    "hidden_mlp": ("model.hidden_dim", None),
    "workers": ("data.workers", None),
    "checkpoint_freq": ("run.keep_every_epochs", None),
    "use_fp16": ("run.precision", None),
    "sync_bn": ("run.sync_bn", None),
    "syncbn_process_group_size": ("run.sync_bn_group_size", None),
    "dump_path": ("run.output_dir", None),
    "seed": ("run.seed", None),
}

_TRUE = {"true", "on", "1", "yes"}
_FALSE = {"false", "off", "0", "no"}


def _dest(name: str) -> str:
    return f"official_{name}"


def add_official_flags(parser: argparse.ArgumentParser,
                       aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """Register every official flag on ``parser``; ``aliases`` adds spellings (``{"dump_path": ["--output-dir"]}``).

    ``--local_rank`` is also accepted as ``--local-rank`` (what newer launchers pass).
    """
    aliases = dict(aliases or {})
    aliases.setdefault("local_rank", ["--local-rank"])
    group = parser.add_argument_group("official SwAV flags (the same names and meanings as the original main_swav.py)")
    for name, (key, nargs) in OFFICIAL_FLAGS.items():
        flags = [*aliases.get(name, ()), f"--{name}"]
        group.add_argument(*flags, dest=_dest(name), nargs=nargs, default=None, metavar="V",
                           help=f"-> {key}")


def official_to_config_value(name: str, raw: Any) -> tuple[str, Any]:
    """``(config key, value)`` for one flag; the value is left for the config to type-check."""
    key, _ = OFFICIAL_FLAGS[name]
    if name == "use_fp16":
        word = str(raw).strip().lower()
        if word not in _TRUE | _FALSE:
            raise UsageError(f"--use_fp16={raw!r} is invalid: expected true/false, on/off or 1/0")
        return key, "fp16" if word in _TRUE else "fp32"
    if name == "sync_bn":
        word = str(raw).strip().lower()
        if word in ("pytorch", "apex") or word in _TRUE:
            return key, True
        if word in ("none", "") or word in _FALSE:
            return key, False
        raise UsageError(f"--sync_bn={raw!r} is invalid: expected pytorch, apex, none or a boolean")
    return key, raw


def official_values(args: argparse.Namespace) -> dict[str, Any]:
    """``{config key: value}`` for every official flag given on the command line."""
    values: dict[str, Any] = {}
    for name in OFFICIAL_FLAGS:
        raw = getattr(args, _dest(name), None)
        if raw is not None:
            key, value = official_to_config_value(name, raw)
            values[key] = value
    # the original's --sync_bn pytorch synchronises BatchNorm over all processes; only apex uses
    # --syncbn_process_group_size
    if str(getattr(args, _dest("sync_bn"), None)).strip().lower() == "pytorch" and \
            getattr(args, _dest("syncbn_process_group_size"), None) is None:
        values["run.sync_bn_group_size"] = 0
    return values

"""The run folder: refuse to overwrite another run, clear it on request, check a resume is compatible.

A folder "holds a run" when it has ``config.yaml`` or checkpoint files. Starting there needs
``--resume`` (continue it) or ``--overwrite`` (delete the run's files, nothing else) (issue 8, item 10).
Resuming from a checkpoint whose architecture, crops or prototype count differ from the config is
refused with every difference listed (item 6); other differences are listed in a WARNING.

Example:
    >>> import tempfile
    >>> from swav.config import Config, config_to_dict, with_values
    >>> saved = config_to_dict(Config())
    >>> fatal, soft = resume_differences(saved, with_values(Config(), {"model.num_prototypes": 100,
    ...                                                                "optim.base_lr": 0.6}))
    >>> fatal, soft
    (['model.num_prototypes: checkpoint [3000], config [100]'], ['optim.base_lr: checkpoint 4.8, config 0.6'])
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from swav.checkpoint import checkpoint_dir, list_checkpoints
from swav.config import Config, config_to_dict

__all__ = ["RunExistsError", "RUN_FILES", "holds_run", "clear_run", "check_run_folder", "resume_differences",
           "FATAL_KEYS"]

logger = logging.getLogger(__name__)

#: files and folders a run writes (what --overwrite removes)
RUN_FILES = ("config.yaml", "derived.json", "metrics.jsonl", "train.log", "model.pt", "summary.json",
             "bad_images.txt", "checkpoints", "tensorboard")
#: config keys that must match for a resume: they change the model's shapes or the meaning of the codes
FATAL_KEYS = ("model.backbone", "model.small_images", "model.hidden_dim", "model.output_dim",
              "model.num_prototypes", "model.head_batch_norm", "data.channels", "crops.counts", "crops.sizes",
              "swav.crops_for_assign")
_IGNORED_SECTIONS = ("run", "debug")
_IGNORED_KEYS = ("data.workers", "data.pipeline", "data.download")


class RunExistsError(FileExistsError):
    """The output folder already holds a run and neither --resume nor --overwrite was given."""


def holds_run(output_dir: str | os.PathLike) -> bool:
    folder = Path(output_dir)
    return (folder / "config.yaml").is_file() or bool(list_checkpoints(folder)) or \
        (checkpoint_dir(folder).is_dir() and any(checkpoint_dir(folder).iterdir()))


def clear_run(output_dir: str | os.PathLike) -> list[str]:
    """Delete the files a run writes (see :data:`RUN_FILES`); other files in the folder stay."""
    removed = []
    for name in RUN_FILES:
        path = Path(output_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(name)
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(name)
    return removed


def check_run_folder(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Raise :class:`RunExistsError` if the folder holds a run and neither flag allows touching it."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run or replace it")
    if not resume and not overwrite and holds_run(output_dir):
        raise RunExistsError(
            f"output folder {os.fspath(output_dir)!r} already holds a run (config.yaml or checkpoints/). "
            "Pass --resume to continue it, --overwrite to replace it, or choose another --output-dir")


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in d.items() if isinstance(values, dict)
            for key, value in values.items()}


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resume_differences(saved_config: dict[str, Any], config: Config) -> tuple[list[str], list[str]]:
    """``(fatal, soft)`` lists of ``'key: checkpoint X, config Y'`` between a checkpoint's config and ``config``."""
    old, new = _flatten(saved_config), _flatten(config_to_dict(config))
    fatal, soft = [], []
    for key in sorted(set(old) | set(new), key=lambda k: list(new).index(k) if k in new else len(new)):
        if key.split(".")[0] in _IGNORED_SECTIONS or key in _IGNORED_KEYS:
            continue
        a, b = _norm(old.get(key, "<absent>")), _norm(new.get(key, "<absent>"))
        if a != b:
            (fatal if key in FATAL_KEYS else soft).append(f"{key}: checkpoint {a}, config {b}")
    return fatal, soft

"""Saving and restoring the complete training state (model, optimiser, scaler, queues, RNG, position).

Saving is collective: every rank contributes its queue and RNG state (``all_gather_object``), rank 0
writes one file atomically, and all ranks learn whether the write succeeded, so a disk-full error
stops every rank with the same message. Restoring: each rank takes its own queue and RNG state; after
a change of world size the queued rows of all ranks are re-split over the new ranks
(:mod:`swav.queue_resplit`) and the position inside the epoch is converted by the number of samples
seen, both with a WARNING (issue 5).

Example:
    >>> Progress(epoch=2, batch_in_epoch=5, step=25).as_dict()
    {'epoch': 2, 'batch_in_epoch': 5, 'step': 25}
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from swav.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, CheckpointSaveError,
                             capture_rng_state, restore_rng_state, save_checkpoint)
from swav.config import Config, config_to_dict
from swav.derived import DerivedValues
from swav.distributed import all_reduce_max_, get_world_size, is_distributed
from swav.queue import EmbeddingQueue
from swav.queue_resplit import resplit_queues
from swav.run_folder import resume_differences
from swav.train_step import SwAVStep

__all__ = ["Progress", "save_training_state", "restore_training_state", "ResumeMismatchError"]

logger = logging.getLogger(__name__)


class ResumeMismatchError(CheckpointError):
    """The checkpoint's architecture, crops or prototypes differ from the config."""


@dataclass
class Progress:
    """Where training stands: ``step`` optimisation steps done, ``batch_in_epoch`` of epoch ``epoch``."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _gather(obj: Any) -> list[Any]:
    if not (is_distributed() and get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_training_state(path: str | os.PathLike, step_fn: SwAVStep, progress: Progress, *, config: Config,
                        derived: DerivedValues, rank: int, finished: bool = False) -> Path:
    """Write the full training state to ``path`` (collective; rank 0 writes)."""
    queue = step_fn.queue
    local = {"queue": None if queue is None else {k: v.detach().cpu() for k, v in queue.state_dict().items()},
             "rng": capture_rng_state()}
    gathered = _gather(local)
    error = ""
    if rank == 0:
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model": {k: v.detach().cpu() for k, v in step_fn.raw_model.state_dict().items()},
            "model_spec": step_fn.raw_model.spec.to_dict() if step_fn.raw_model.spec else {},
            "optimizer": step_fn.optimizer.state_dict(), "scaler": step_fn.scaler.state_dict(),
            "queues": [g["queue"] for g in gathered], "rng": [g["rng"] for g in gathered],
            **progress.as_dict(), "world_size": derived.world_size, "finished": finished,
            "config": config_to_dict(config), "derived": derived.to_dict(), "torch_version": str(torch.__version__),
        }
        try:
            save_checkpoint(state, path)
        except CheckpointSaveError as exc:
            error = str(exc)
    failed = torch.tensor([1.0 if error else 0.0], device=step_fn.device)
    all_reduce_max_(failed)
    if failed.item():
        raise CheckpointSaveError(error or f"rank 0 could not write checkpoint {os.fspath(path)!r}; see its log")
    logger.info("saved checkpoint %s (step %d, epoch %d)", path, progress.step, progress.epoch)
    return Path(path)


def _check_compatible(ckpt: dict[str, Any], config: Config, spec: dict[str, Any], path: str) -> None:
    fatal, soft = resume_differences(ckpt.get("config", {}), config)
    saved_spec = ckpt.get("model_spec") or {}
    spec_diff = [f"model_spec.{k}: checkpoint {saved_spec.get(k)}, config {v}" for k, v in spec.items()
                 if saved_spec and saved_spec.get(k) != v]
    fatal = fatal or spec_diff  # the config keys name the cause better; the spec catches the rest
    if fatal:
        raise ResumeMismatchError(
            f"checkpoint {path} was trained with a different model or crops; refusing to resume. Differences:\n  "
            + "\n  ".join(fatal) + "\nUse the original settings, or start a new run (another --output-dir or --overwrite)")
    if soft:
        logger.warning("resuming %s with changed settings:\n  %s", path, "\n  ".join(soft))


def _restored_queue(queues: list[Any], saved_world: int, rank: int, derived: DerivedValues,
                    device: torch.device) -> EmbeddingQueue | None:
    """This rank's queue from the checkpoint (re-split after a change of world size), or None (restart empty,
    with a WARNING) when the saved per-rank length differs from the config's at the same world size."""
    mine = queues[rank] if rank < len(queues) else None
    if saved_world != derived.world_size:
        if not any(q is not None for q in queues):
            logger.warning("checkpoint was written by %d ranks, this run has %d (no queue to re-split; the data "
                           "order of the rest of the run differs from a run on %d ranks)", saved_world,
                           derived.world_size, saved_world)
            return None
        if derived.queue_length_per_rank < 1:
            logger.warning("checkpoint holds a queue but this run has none (swav.queue_length=0): "
                           "queue dropped")
            return None
        mine = resplit_queues(queues, world_size=derived.world_size, length=derived.queue_length_per_rank)[rank]
        logger.warning("checkpoint was written by %d ranks, this run has %d: the queued embeddings of all ranks "
                       "were re-split, %d per rank (%d of %d rows filled on this rank)", saved_world,
                       derived.world_size, derived.queue_length_per_rank, int(mine["filled"]),  # type: ignore[index]
                       derived.queue_length_per_rank)
    if mine is None:
        return None
    a, length, d = mine["embeddings"].shape
    if length != derived.queue_length_per_rank:
        logger.warning("the checkpoint's queue holds %d rows per rank, the config asks for %d: the queue restarts "
                       "empty", length, derived.queue_length_per_rank)
        return None
    queue = EmbeddingQueue(a, length, d).to(device)
    queue.load_state_dict(mine)
    return queue


def _apply_optimizer_settings(optimizer: torch.optim.Optimizer, config: Config) -> None:
    """The config's momentum, weight decay and trust coefficient in the optimiser: ``load_state_dict`` restores
    the checkpoint's, so a resume that changes them (and says so) would otherwise train with the old ones."""
    o = config.optim
    for group in optimizer.param_groups:
        group["momentum"] = o.momentum
        group["lars_weight_decay" if "lars_weight_decay" in group else "weight_decay"] = o.weight_decay
    if hasattr(optimizer, "trust_coefficient"):
        optimizer.trust_coefficient = o.trust_coefficient


def step_converter(ckpt: dict[str, Any], derived: DerivedValues) -> Callable[[int], int] | None:
    """Where a global step of the checkpoint's numbering lies in this run's, when the global batch or the epoch
    length changed (None when they did not): the same epoch, at the batch that the images seen so far in it
    reach with the new batch (rounded down, and never past the epoch's last batch)."""
    saved = ckpt.get("derived") or {}
    old_batch = int(saved.get("global_batch_size", derived.global_batch_size))
    old_epoch_steps = int(saved.get("steps_per_epoch", derived.steps_per_epoch))
    if (old_batch, old_epoch_steps) == (derived.global_batch_size, derived.steps_per_epoch):
        return None

    def convert(step: int) -> int:
        epoch, batch = divmod(step, old_epoch_steps)
        return epoch * derived.steps_per_epoch + _batch_in_new_numbering(batch, old_batch, derived)
    return convert


def _batch_in_new_numbering(batch: int, old_batch: int, derived: DerivedValues) -> int:
    """The batch of the epoch that the images seen in its first ``batch`` batches of ``old_batch`` images reach
    with this run's global batch (rounded down, and never past the epoch's last batch)."""
    return min(batch * old_batch // derived.global_batch_size, derived.steps_per_epoch - 1)


def restore_training_state(ckpt: dict[str, Any], step_fn: SwAVStep, *, config: Config, derived: DerivedValues,
                           rank: int, path: str) -> Progress:
    """Load ``ckpt`` into the objects of ``step_fn`` (strictly) and return the position to continue from."""
    from swav.interop import load_state_checked

    spec = step_fn.raw_model.spec.to_dict() if step_fn.raw_model.spec else {}
    _check_compatible(ckpt, config, spec, path)
    load_state_checked(step_fn.raw_model, ckpt["model"], strict=True, source=path)
    step_fn.optimizer.load_state_dict(ckpt["optimizer"])
    _apply_optimizer_settings(step_fn.optimizer, config)  # the saved groups' settings would win otherwise
    if ckpt.get("scaler"):
        step_fn.scaler.load_state_dict(ckpt["scaler"])
    saved_world = int(ckpt.get("world_size", 1))
    progress = Progress(int(ckpt["epoch"]), int(ckpt["batch_in_epoch"]), int(ckpt["step"]))
    queues, rngs = ckpt.get("queues") or [], ckpt.get("rng") or []
    step_fn.queue = _restored_queue(queues, saved_world, rank, derived, step_fn.device)
    if step_fn.queue is not None and step_fn.queue.is_full:  # in use already before the checkpoint: said then
        step_fn._queue_in_use_logged = True
    if rank < len(rngs):
        restore_rng_state(rngs[rank])
    saved = ckpt.get("derived") or {}
    if step_converter(ckpt, derived) is not None:
        old_batch = int(saved.get("global_batch_size", derived.global_batch_size))
        seen = progress.batch_in_epoch * old_batch
        batch = _batch_in_new_numbering(progress.batch_in_epoch, old_batch, derived)
        converted = Progress(progress.epoch, batch, progress.epoch * derived.steps_per_epoch + batch)
        again = seen - batch * derived.global_batch_size
        logger.warning("global batch or epoch length changed since the checkpoint (%s -> %s): continuing at "
                       "epoch %d, batch %d (step %d); the learning-rate schedule follows the new length%s",
                       saved.get("global_batch_size"), derived.global_batch_size, converted.epoch,
                       converted.batch_in_epoch, converted.step,
                       f". The {seen} images of the epoch already trained on end inside a batch of the new size, "
                       f"and the position is rounded down to a whole batch: about {again} images of this epoch are "
                       "trained on a second time" if again > 0 else "")
        progress = converted
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, progress.step, progress.epoch,
                progress.batch_in_epoch)
    return progress

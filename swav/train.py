"""The SwAV pretraining loop: config in, run folder out (engine layer; SPEC §2-§9, issues 3, 5, 8).

:func:`train` sets up the process (distributed if launched so), checks the run folder, builds the data,
model, optimiser and schedule, resumes from the newest valid checkpoint when asked, and runs
:class:`~swav.train_step.SwAVStep` over epochs. Checkpoints are written every
``run.checkpoint_every_steps`` steps and every ``run.checkpoint_every_epochs`` epochs, when a stop is
requested (``run.max_steps``, ``run.time_budget_minutes``, SIGTERM/SIGUSR1), and at the end
(``checkpoints/final.pt`` + ``model.pt``). Metrics go to ``metrics.jsonl``, TensorBoard and ``train.log``.

Example (a few steps of the Fashion-MNIST CPU recipe; see the README for the command line)::

    from swav.config import with_values
    from swav.recipes import load_recipe
    cfg = with_values(load_recipe("fashion_mnist_cpu"), {"run.output_dir": "runs/demo", "run.max_steps": 20})
    result = train(cfg)
    print(result.status, result.step)
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import random
import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, IterableDataset, Subset

from swav.checkpoint import (CheckpointError, CheckpointSaveError, archive_checkpoint, clean_temp_files,
                             final_checkpoint_path, find_latest_checkpoint, list_checkpoints, load_checkpoint,
                             prune_checkpoints, renumber_after_resplit, save_checkpoint, save_model_file,
                             step_checkpoint_path)
from swav.config import Config, RunConfig, config_to_dict, save_config
from swav.datasets import ImageFolderDataset
from swav.derived import DerivedValues, derive_values
from swav.dist_setup import DistContext, configure_rank_logging, init_distributed, shutdown_distributed
from swav.distributed import all_reduce_max_, all_reduce_sum_
from swav.health import CollapseMonitor, NonFiniteError, NonFiniteStateError, nonfinite_state_names, prototypes_in_use_globally
from swav.lars import LARS
from swav.metrics import MetricsWriter, RateMeter, format_duration, truncate_metrics
from swav.model import ModelSpec, SwAVModel, build_model
from swav.output_paths import check_output_folder
from swav.preemption import StopSignals, exit_code_for_signal
from swav.cpu_features import describe_environment
from swav.pretrain_summary import KnnMonitor
from swav.run_folder import (RunExistsError, RunLock, bad_images_offset, check_run_folder, clear_run,
                             count_bad_images, holds_run,
                              partial_resume_checkpoint, resume_differences, resume_refusal)
from swav.schedule import warmup_cosine_schedule
from swav.train_data import TrainLoader, build_train_loader, colour_stage, data_sizes, resolve_pipeline
from swav.train_state import (Progress, ResumeMismatchError, restore_training_state, save_training_state,
                              step_converter)
from swav.train_step import SwAVStep, autocast_dtype, bf16_gradients_agree, resolve_channels_last, resolve_precision
from swav.usage import UsageError

__all__ = ["TrainResult", "train", "model_spec_from_config"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """How a call to :func:`train` ended."""

    status: str  # complete | already_complete | max_steps | time_budget | preempted
    output_dir: Path
    step: int
    epoch: int
    checkpoint: Path | None = None
    signal: int = 0
    loss: float | None = None
    rank: int = 0  # of the process that returns it (the command line reports on rank 0 only)

    @property
    def exit_code(self) -> int:
        """0, or 128 + signal number after a preemption (the run can be resumed)."""
        return exit_code_for_signal(self.signal) if self.status == "preempted" else 0


def model_spec_from_config(config: Config) -> ModelSpec:
    m = config.model
    return ModelSpec(backbone=m.backbone, small_images=m.small_images, in_channels=config.data.channels,
                     hidden_dim=m.hidden_dim, output_dim=m.output_dim, num_prototypes=m.num_prototypes,
                     head_batch_norm=m.head_batch_norm)


def train(config: Config, *, resume: bool = False, overwrite: bool = False, dataset: Dataset | None = None,
          model_builder: Callable[[ModelSpec], SwAVModel] = build_model, partial: bool = False) -> TrainResult:
    """Run (or continue) pretraining as configured; see the module docstring.

    ``resume``: continue from the newest valid checkpoint in ``run.output_dir`` if there is one (a
    finished run is reported complete and left unchanged). ``overwrite``: replace a run in that folder.
    Neither: an unfinished run of this same config there is continued, any other run refused
    (:func:`~swav.run_folder.check_run_folder`). ``partial``: resume even from a checkpoint of another
    architecture, crop set or prototype count, loading what fits (:func:`~swav.run_folder.partial_resume_checkpoint`).
    ``dataset`` (items: images, or ``(image, label)`` tuples; PIL images or uint8 ``C x H x W`` tensors)
    replaces ``data.path``; ``model_builder`` replaces the backbone registry (for custom networks; the
    spec is stored in checkpoints either way; load the result with ``load_pretrained(path,
    model_builder=...)``). Where logging is not set up (a script, a notebook), the progress lines go to
    stderr for the duration of the call, as with the ``swav pretrain`` command.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config is {type(config).__name__}: expected a swav.Config, e.g. "
                        "swav.with_values(swav.Config(), {'data.path': ..., 'run.output_dir': ...}) or "
                        "swav.load_recipe(name)")
    if partial and not resume:  # only a resumed run loads a checkpoint (as the command line's --partial)
        raise UsageError("partial=True applies with resume=True only (it loads what fits from the run's checkpoint): "
                         "pass both, or neither")
    package_logger = logging.getLogger("swav")
    console = None
    if not package_logger.hasHandlers():  # a Python caller without logging set up would see no progress
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        package_logger.addHandler(console)
    try:
        return _train(config, resume=resume, overwrite=overwrite, dataset=dataset, model_builder=model_builder,
                      partial=partial)
    finally:
        if console is not None:
            package_logger.removeHandler(console)


def _train(config: Config, *, resume: bool, overwrite: bool, dataset: Dataset | None,
           model_builder: Callable[[ModelSpec], SwAVModel], partial: bool) -> TrainResult:
    run = config.run
    out = check_output_folder(run.output_dir, "--output-dir (run.output_dir)")  # before a process group exists
    ctx = init_distributed(run.device, world_size=run.world_size, rank=run.rank, local_rank=run.local_rank,
                           dist_url=run.dist_url, timeout_minutes=run.dist_timeout_minutes)
    configure_rank_logging(ctx.rank)
    log_handler, lock = None, RunLock(out)
    early_log: logging.handlers.MemoryHandler | None = None
    workers_stopped = ctx.world_size == 1  # no process may append to bad_images.txt any more (see finally)
    bad_offset = 0  # where this invocation's lines of bad_images.txt begin (set once the folder is prepared)
    try:
        existing = holds_run(out)
        continuing = check_run_folder(out, resume=resume, overwrite=overwrite, config=config)
        found = _agreed_checkpoint(out, continuing, ctx.world_size, ctx.rank)
        refusal = resume_refusal(found[1], config, model_spec_from_config(config).to_dict(), str(found[0])) \
            if found is not None and not partial and not found[1].get("finished") else ""
        if refusal:  # before anything in the folder is written (issue 8, item 6)
            raise ResumeMismatchError(refusal)
        if found is not None and found[1].get("finished"):
            ckpt = found[1]
            fatal, soft = resume_differences(ckpt.get("config") or {}, config)
            if fatal or soft:  # "nothing to do" would leave the asked-for training (more epochs...) undone
                raise RunExistsError(
                    f"the run in {str(out)!r} is complete (step {ckpt['step']}, epoch {ckpt['epoch']}), and this "
                    f"command asks for another config ({'; '.join((fatal + soft)[:4])}): a finished run's learning-"
                    "rate schedule has ended, so it cannot be continued with other settings. Start a new run (another "
                    "--output-dir, or --overwrite to replace this one), or run the same config to confirm it is done")
            logger.info("the run in %s is complete (step %d, epoch %d; %s); nothing to do", out, ckpt["step"],
                        ckpt["epoch"], found[0])
            return TrainResult("already_complete", out, int(ckpt["step"]), int(ckpt["epoch"]), found[0],
                               rank=ctx.rank)
        if ctx.is_main and existing:  # before anything is said about the run there (another may be training it)
            lock.acquire()  # no second process may train into this folder (issue 8)
        _barrier()
        replace = overwrite and existing
        # a new run, or one replacing another, writes nothing until its data, model and crops are known to work:
        # a bad path or config loses nothing saved and leaves no files behind; the log lines until then are kept
        # in memory for train.log
        deferred = replace or not existing
        if ctx.is_main and deferred:
            early_log = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
            logging.getLogger("swav").addHandler(early_log)

        def prepare_folder() -> None:
            """Clear a run being replaced, open the log file (with the lines logged so far) and hold the lock."""
            nonlocal log_handler, early_log, bad_offset
            if ctx.is_main:
                lock.acquire()  # a no-op when held already
                if not existing and holds_run(out):  # another process started (and left) a run here meanwhile
                    raise RunExistsError(f"output folder {str(out)!r} received a run from another process while this "
                                         "one was loading its data and model; nothing of it was changed. Pass "
                                         "--resume to continue it, --overwrite to replace it, or choose another "
                                         "--output-dir (Python: swav.pretrain(..., resume=True) or overwrite=True, or "
                                         "another run.output_dir)")
                if replace:
                    logger.warning("--overwrite: removed %s from %s", ", ".join(clear_run(out)), out)
                out.mkdir(parents=True, exist_ok=True)
                clean_temp_files(out)
                bad_offset = bad_images_offset(out)  # earlier runs' list (a resumed run's), counted apart
                log_handler = _attach_log_file(out / "train.log")
                if early_log is not None:
                    early_log.setTarget(log_handler)
                    early_log.flush()
                    logging.getLogger("swav").removeHandler(early_log)
                    early_log.close()
                    early_log = None
            _barrier()

        if not deferred:
            prepare_folder()  # train.log is open from here on: the lines below reach it
        if ctx.is_main and continuing and not resume:
            logger.warning("%s holds an unfinished run of this same config: %s (pass --overwrite to start again "
                           "instead)", out, "continuing it from its newest valid checkpoint" if found is not None
                           else "it has no checkpoint yet, so it starts from scratch")
        elif ctx.is_main and resume and found is None:
            logger.info("--resume: no checkpoint in %s yet, starting from scratch", out)
        with StopSignals() as stop:
            result = _fit(config, ctx, out, found, dataset, model_builder, stop, partial,
                          prepare_folder if deferred else None)
        if ctx.world_size > 1:
            _barrier()  # every rank has stopped its data-loader workers, which append to bad_images.txt
            workers_stopped = True
        result.rank = ctx.rank
        return result
    except KeyboardInterrupt:
        _note_in_log(log_handler, "interrupted by the user (Ctrl-C); the newest checkpoint is kept")
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        _note_in_log(log_handler, f"stopped by an error: {type(exc).__name__}: {reason}")  # the console has it too
        agreed = isinstance(exc, (NonFiniteError, CheckpointError, OtherRankFailedError)) or \
            getattr(exc, "agreed_by_all_ranks", False)
        if ctx.world_size > 1 and not agreed:  # (agreed errors stop every rank at once, naming the rank at fault)
            logger.error("rank %d of %d stopped: %s: %s. The other ranks stop at their next collective operation "
                         "(it fails, or times out after run.dist_timeout_minutes=%g); under torchrun the launcher "
                         "also ends them. The earliest error is the cause", ctx.rank, ctx.world_size,
                         type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", run.dist_timeout_minutes)
        raise
    finally:
        if log_handler is not None:
            try:  # rewritten without duplicates only once nothing appends to it (else counted as it is)
                met = count_bad_images(out, since=bad_offset) if bad_offset else None
                bad = count_bad_images(out, deduplicate=workers_stopped)
            except OSError as exc:  # a full disk must not hide the run's own outcome (or error)
                logger.warning("could not rewrite %s without duplicates: %s", out / "bad_images.txt", exc)
                met, bad = None, count_bad_images(out)
            if bad:
                if met is None:
                    logger.warning("%d unreadable image files skipped, listed in %s", bad, out / "bad_images.txt")
                elif met:
                    logger.warning("%d unreadable image files skipped in this run; %s lists %d with earlier runs'",
                                   met, out / "bad_images.txt", bad)
                else:
                    logger.info("no unreadable image file met in this run (%s lists %d from earlier runs)",
                                out / "bad_images.txt", bad)
            logging.getLogger("swav").removeHandler(log_handler)
            log_handler.close()
        if early_log is not None:  # stopped before anything was written: the console had these lines
            logging.getLogger("swav").removeHandler(early_log)
            early_log.close()
        lock.release()
        shutdown_distributed(ctx)


def _note_in_log(handler: logging.Handler | None, message: str) -> None:
    """Write ``message`` to train.log only: the console shows the error (or the interruption) once already."""
    if handler is not None:
        handler.handle(logging.LogRecord("swav.train", logging.ERROR, __file__, 0, message, None, None))


def _agreed_checkpoint(out: Path, continuing: bool, world_size: int, rank: int) -> tuple[Path, dict] | None:
    """The checkpoint every rank resumes from: rank 0's newest valid one, loaded by every rank.

    Each rank lists the folder itself, and a stale network-file-system listing, a read error on one node or
    an output folder that is not shared would let ranks pick different files and train apart. So rank 0's
    choice is followed by all; a rank that cannot read that file stops every rank with one clear error
    before anything is trained or written.
    """
    if world_size == 1:
        return find_latest_checkpoint(out) if continuing else None
    found, error = None, ""
    try:
        found = find_latest_checkpoint(out) if continuing else None
    except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below, whatever failed here
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    mine = None if found is None else found[0].relative_to(out).as_posix()
    views = _gather_objects((mine, error))
    errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(views) if e]
    if errors:
        raise CheckpointError("cannot resume: " + "; ".join(errors))
    chosen = views[0][0]
    problem = ""
    if chosen != mine:
        if chosen is None:
            problem = f"rank {rank} finds checkpoint {mine!r} in {str(out)!r} but rank 0 finds none"
        else:
            try:
                found = (out / chosen, load_checkpoint(out / chosen))
                logger.warning("rank %d: its newest readable checkpoint is %s, rank 0's is %s (a stale file-system "
                               "listing on this node?): resuming from rank 0's, as every rank does", rank, mine,
                               chosen)
            except Exception as exc:  # noqa: BLE001 - damaged, unsafe, missing, memory: agreed below
                problem = f"rank {rank} cannot read rank 0's newest checkpoint {str(out / chosen)!r}: {exc}"
    problems = [p for p in _gather_objects(problem) if p]
    if problems:
        raise CheckpointError("the ranks do not see the same checkpoints, so they cannot resume from one state: "
                              + "; ".join(problems) + ". The output folder must be one folder shared by every node "
                              "(the same files under the same path, e.g. on a network file system); nothing was "
                              "trained or written. On a network file system whose listings lag, start the job again")
    return found


def _main_writes(ctx: DistContext, what: str, write: Callable[[], Any]) -> None:
    """A file operation that rank 0 alone does, its failure agreed by every rank: rank 0 raises its error,
    the others a :class:`CheckpointSaveError` that names rank 0's, so none waits at the next collective
    and none is blamed for it."""
    if ctx.world_size == 1:
        write()
        return
    error = ""
    try:
        if ctx.is_main:
            write()
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _gather_objects(error)
        exc.agreed_by_all_ranks = True  # type: ignore[attr-defined]  (the others stop with it: see _train)
        raise
    failed = _gather_objects(error)[0]
    if failed:
        raise CheckpointSaveError(f"rank 0 could not {what} ({failed}); every rank stops. The checkpoints written "
                                  "so far are kept: free the space or fix the folder, then run the command again "
                                  "with --resume")


class OtherRankFailedError(RuntimeError):
    """Raised on every rank when another rank failed at a step all of them agree on."""


def _in_turn(ctx: DistContext, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank, but in turn: rank 0 first, then one process per node (local rank 0), then the
    others, so that a download or cache fill is done once (per node where nodes do not share the folder)
    and read by the rest, never written by several processes at once. A failure stops every rank."""
    result, error = None, ""
    turns = (ctx.rank == 0, ctx.rank != 0 and ctx.local_rank == 0, ctx.rank != 0 and ctx.local_rank != 0)
    for mine in turns:
        if mine:
            try:
                result = fn()
            except Exception as exc:
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                _gather_objects(error)
                exc.agreed_by_all_ranks = True  # type: ignore[attr-defined]
                raise
        failed = [f"rank {r}: {e}" for r, e in enumerate(_gather_objects(error)) if e]
        if failed:
            raise OtherRankFailedError(f"could not {what} ({'; '.join(failed)}); every rank stops")
    return result


def _gather_objects(obj: Any) -> list[Any]:
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, obj)
    return views


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_LOG_FORMAT)
    logging.getLogger("swav").addHandler(handler)
    return handler


def _build_dataset(config: Config, out: Path, dataset: Dataset | None) -> Dataset:
    if dataset is None:
        if not config.data.path:
            raise ValueError("data.path is not set: pass --data PATH (a folder of images, IDX or CIFAR files, "
                             "shards:PATTERN) or a data set name such as fashion-mnist or cifar10 (Python: set "
                             "data.path in the config, or pass swav.pretrain(..., dataset=...))")
        from swav.datasets import build_dataset
        dataset = build_dataset(config.data.path, split="train", channels=config.data.channels,
                                download=config.data.download, max_bad_fraction=config.data.max_bad_fraction,
                                bad_list_path=out / "bad_images.txt", bit_depth=config.data.bit_depth,
                                shard_options={"seed": config.run.seed, "return_key": True})
    elif getattr(dataset, "bit_depth", None) != config.data.bit_depth and hasattr(dataset, "bit_depth"):
        raise ValueError(f"the data set reads 16-bit files with bit_depth={dataset.bit_depth} but the config has "
                         f"data.bit_depth={config.data.bit_depth}: set data.bit_depth={dataset.bit_depth} in the "
                         "config, which the run stores so that evaluation and extraction read the files the same way")
    limit = config.data.limit
    if limit and isinstance(dataset, IterableDataset):
        raise ValueError(f"data.limit={limit} is not supported for streaming shards: write fewer shards "
                         "(swav pack-shards) or select some with a brace pattern, "
                         "shards:DIR/shard-{000000..000003}.tar")
    if limit and limit < len(dataset):  # type: ignore[arg-type]
        tracker = getattr(dataset, "tracker", None)
        if tracker is not None:
            tracker.total = limit  # the abort rule counts against the files used
        dataset = Subset(dataset, range(limit))
    # a sample of the image files decoded now: a folder the run would stop on is refused before the run folder
    # is changed (and, with --overwrite, before the old run there is removed)
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
    if isinstance(base, ImageFolderDataset) and config.data.check_files:
        checked, unreadable = base.check_sample(indices, count=config.data.check_files)
        logger.info("checked %d of the image files: %d unreadable", checked, unreadable)
    return dataset


def _wrap(raw: SwAVModel, ctx: DistContext, config: Config) -> nn.Module:
    """SyncBatchNorm (world > 1 and run.sync_bn), DistributedDataParallel, torch.compile."""
    model: nn.Module = raw
    if ctx.world_size > 1:
        if config.run.sync_bn:
            group = _sync_bn_group(config.run.sync_bn_group_size, ctx.world_size)
            if ctx.device.type == "cuda":
                nn.SyncBatchNorm.convert_sync_batchnorm(raw, process_group=group)
            else:
                from swav.sync_batchnorm import convert_sync_batchnorm
                convert_sync_batchnorm(raw, process_group=group)
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                                    else None)
    if config.run.compile:
        model = torch.compile(model)
    return model


def _sync_bn_group(group_size: int, world_size: int) -> dist.ProcessGroup | None:
    if group_size == 0 or world_size <= group_size:  # 0: all ranks
        return None
    if world_size % group_size:
        logger.warning("world size %d is not a multiple of run.sync_bn_group_size=%d: BatchNorm statistics are "
                       "synchronised over all ranks", world_size, group_size)
        return None
    group, _ = dist.new_subgroups(group_size)
    return group


def _checked_precision(config: Config, raw: SwAVModel, device: torch.device, layout: bool | None = None) -> str:
    """Resolve run.precision; on CPU, bf16 must give the same gradients as fp32 (see bf16_gradients_agree), in the
    memory layout ``layout`` (run.channels_last, possibly set to false for a network that cannot take it)."""
    layout = config.run.channels_last if layout is None else layout
    precision = resolve_precision(config.run.precision, device)
    if precision != "bf16" or device.type != "cpu":
        return precision
    shapes = sorted({(config.data.channels, s, s) for s in config.crops.sizes}, reverse=True)
    bad = bf16_gradients_agree(raw, shapes, channels_last=resolve_channels_last(layout, device, "bf16"))
    if not bad:
        return precision
    if config.run.precision == "auto":
        logger.warning("bf16 autocast gives wrong gradients on this CPU for %s (a torch kernel bug with these "
                       "crop sizes); using fp32", ", ".join(bad[:3]))
        return "fp32"
    logger.warning("run.precision=bf16: this CPU's bf16 kernels give wrong gradients for %s with these crop sizes; "
                   "consider fp32 or other crop sizes", ", ".join(bad[:3]))
    return precision


def _optimizer(raw: SwAVModel, config: Config) -> torch.optim.Optimizer:
    o = config.optim
    if o.lars:
        return LARS(raw.parameters(), lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay,
                    trust_coefficient=o.trust_coefficient)
    return torch.optim.SGD(raw.parameters(), lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay)


def _fit(config: Config, ctx: DistContext, out: Path, found: tuple[Path, dict] | None, dataset: Dataset | None,
         model_builder: Callable[[ModelSpec], SwAVModel], stop: StopSignals, partial: bool = False,
         prepare_folder: Callable[[], None] | None = None) -> TrainResult:
    seed = config.run.seed
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if dataset is None and config.data.download and ctx.world_size > 1:  # one download, not one per rank
        dataset = _in_turn(ctx, "prepare the data set", lambda: _build_dataset(config, out, None))
    else:
        dataset = _build_dataset(config, out, dataset)
    pipeline = resolve_pipeline(config.data.pipeline, dataset, config.data.channels)
    spec = model_spec_from_config(config)
    raw = model_builder(spec)
    raw.spec = spec
    raw.to(ctx.device)
    if ctx.device.type == "cuda":  # fixed crop sizes: the fastest algorithm per shape, found in the first steps
        torch.backends.cudnn.benchmark = config.run.cudnn_benchmark
    _check_model_takes_crops(raw, config, ctx.device)  # before the bf16 check on a CPU, which runs the network too
    layout = config.run.channels_last
    # probed only where the layout can resolve to channels-last (fp32 on a CPU stays contiguous)
    if layout or (layout is None and (ctx.device.type == "cuda" or config.run.precision != "fp32")):
        probe = _crop_probe_failure(raw, config, ctx.device, channels_last=True)
        failure = probe[1] if probe else ""
        if failure and layout:
            raise ValueError(f"run.channels_last=true, but this network fails on channels-last crops ({failure}); "
                             "set run.channels_last to false (or null: channels-last where the network takes it)")
        if failure:
            logger.warning("this network fails on channels-last crops (%s; e.g. a .view() of a channels-last map): "
                           "training in the contiguous layout, which is slower on GPUs and in bf16; "
                           "--set run.channels_last=false says so and silences this", failure)
            layout = False
    precision = _checked_precision(config, raw, ctx.device, layout)
    channels_last = resolve_channels_last(layout, ctx.device, precision)
    if channels_last:
        raw.to(memory_format=torch.channels_last)  # before DDP registers the parameters
    dataset_size, samples_per_rank = data_sizes(dataset, ctx.world_size)
    derived = derive_values(config, world_size=ctx.world_size, dataset_size=dataset_size,
                            samples_per_rank=samples_per_rank, device=str(ctx.device), precision=precision,
                            pipeline=pipeline)
    logger.info("derived values: %s", json.dumps(derived.to_dict()))
    logger.info("environment: %s", describe_environment(ctx.device))
    knn_monitor = KnnMonitor(config, device=ctx.device, amp_dtype=autocast_dtype(precision)) \
        if config.run.knn_every_epochs and ctx.is_main else None  # its labelled data is checked here
    # the folder is written only now that data, model, crops and monitors are known to work: with --overwrite the
    # old run goes only now, and a fresh folder keeps no config.yaml that would refuse the corrected command
    if prepare_folder is not None:
        prepare_folder()
    model = _wrap(raw, ctx, config)
    o = config.optim
    schedule = warmup_cosine_schedule(o.base_lr, o.final_lr, o.epochs, derived.steps_per_epoch, o.warmup_epochs,
                                      o.start_warmup)
    step_fn = SwAVStep(model, raw, _optimizer(raw, config), config=config, lr_schedule=schedule,
                       queue_length_per_rank=derived.queue_length_per_rank, precision=precision, device=ctx.device,
                       rank=ctx.rank, channels_last=channels_last)
    progress = Progress()
    if found is not None:
        ckpt = partial_resume_checkpoint(found[1], config, raw, step_fn.optimizer, source=str(found[0])) \
            if partial else found[1]
        progress = restore_training_state(ckpt, step_fn, config=config, derived=derived, rank=ctx.rank,
                                          path=str(found[0]))
        old_step, convert = int(ckpt["step"]), step_converter(ckpt, derived)

        def tidy_folder() -> None:
            if progress.step != old_step:  # converted to the new global batch's numbering
                renumber_after_resplit(out, found[0], progress.step)
                # the renamed file holds its position in the new numbering too, so that a later resume from it
                # (this run stopping before its first checkpoint) converts nothing, and the metrics records
                # below are renumbered once only
                save_checkpoint({**found[1], **progress.as_dict(), "derived": {**(found[1].get("derived") or {}),
                                 "global_batch_size": derived.global_batch_size,
                                 "steps_per_epoch": derived.steps_per_epoch}},
                                step_checkpoint_path(out, progress.step))
            truncate_metrics(out, old_step, renumber=convert)  # the records after the checkpoint are redone

        _main_writes(ctx, "prepare the run folder for the resume", tidy_folder)
    if ctx.is_main:  # after the resume's restore: a resume that cannot load leaves the folder's config as it was
        save_config(config, out / "config.yaml")
        (out / "derived.json").write_text(json.dumps(derived.to_dict(), indent=1) + "\n", encoding="utf-8")
    loader = build_train_loader(config, dataset, pipeline=pipeline, rank=ctx.rank, world_size=ctx.world_size,
                                device=ctx.device)
    if found is not None and progress.batch_in_epoch and hasattr(loader, "stream"):  # a shard stream, mid-epoch
        _warn_if_shard_layout_changed(found[1], config, ctx.world_size, progress.epoch)
    ahead = getattr(loader, "prefetch", 0)
    colour = ""
    if pipeline in ("batched", "device"):
        stage = colour_stage(config, ctx.device)
        strategy = stage.resolved_strategy(ctx.device)
        colour = f" (colour stage: {strategy}"
        if strategy == "grouped" and ctx.device.type == "cpu" and stage.channels == 3 and not stage.compile:
            from swav import opencv_colour
            colour += ("; pip install opencv-python-headless makes it about 2x faster" if opencv_colour.cv2 is None
                       else "; the installed OpenCV failed the opencv stage's check, see the warning")
        colour += ")"
    logger.info("training %s: %d images, %d steps per epoch, %d steps in total, global batch %d, %s, %s pipeline%s%s",
                spec.backbone if model_builder is build_model else
                f"the network of {getattr(model_builder, '__qualname__', 'model_builder')}() (load it back with "
                "load_pretrained(..., model_builder=...))", derived.dataset_size, derived.steps_per_epoch, derived.total_steps,
                derived.global_batch_size, precision + (", channels-last" if channels_last else ""), pipeline, colour,
                f" (batches made {ahead} ahead in a background thread)" if ahead else "")
    return _loop(config, derived, step_fn, loader, progress, out, ctx, stop, knn_monitor)


def _warn_if_shard_layout_changed(ckpt: dict, config: Config, world_size: int, epoch: int) -> None:
    """A resume inside an epoch of streamed shards is exact for the same data-loader workers and processes
    (each worker's stream depends on both); say so when the checkpoint was written with others."""
    saved_workers = ((ckpt.get("config") or {}).get("data") or {}).get("workers")
    saved_world = int(ckpt.get("world_size", 1))
    if saved_workers is None:
        return
    if max(int(saved_workers), 1) != max(config.data.workers, 1) or saved_world != world_size:
        logger.warning("resuming inside epoch %d of streamed shards with %d data-loader worker(s) x %d process(es); "
                       "the checkpoint was written with %d x %d. Each worker's stream depends on both, so the rest "
                       "of this epoch is not exactly the interrupted one: some of its images are seen twice and "
                       "others not at all (later epochs are complete as usual). Resume with data.workers=%d on %d "
                       "process(es) for an exact epoch", epoch, max(config.data.workers, 1), world_size,
                       max(int(saved_workers), 1), saved_world, int(saved_workers), saved_world)


def _crop_probe_failure(raw: SwAVModel, config: Config, device: torch.device,
                        channels_last: bool = False) -> tuple[int, str] | None:
    """None if one forward of one blank crop per crop size works, else (the crop size, the error's first line). Eval mode without
    gradients (no state changes); ``channels_last``: crops and weights in that layout for the probe (a user's
    network may flatten with ``.view()``), the weights contiguous again afterwards."""
    was_training = raw.training
    raw.eval()
    if channels_last:
        raw.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            for size in sorted(set(config.crops.sizes)):
                crop = torch.zeros(1, config.data.channels, size, size, device=device)
                try:
                    raw([crop.contiguous(memory_format=torch.channels_last) if channels_last else crop])
                except torch.cuda.OutOfMemoryError:
                    raise
                except (RuntimeError, AssertionError, ValueError) as exc:
                    return size, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None
    finally:
        if channels_last:
            raw.to(memory_format=torch.contiguous_format)
        raw.train(was_training)


def _check_model_takes_crops(raw: SwAVModel, config: Config, device: torch.device) -> None:
    """A network that cannot take the crop sizes is named before anything in the run folder is written."""
    failure = _crop_probe_failure(raw, config, device)
    if failure:
        size, reason = failure
        vit = str(config.model.backbone).startswith("vit")
        raise ValueError(
            f"model.backbone={config.model.backbone!r} fails on a {size}x{size} crop "
            f"(crops.sizes={list(config.crops.sizes)}, data.channels={config.data.channels}): {reason}. "
            + ("torchvision's vision transformers take only their image size, 224: make every crop 224 "
               "or choose a convolutional backbone" if vit else
               "Check that this network takes these crop sizes and channels"))


def _loop(config: Config, derived: DerivedValues, step_fn: SwAVStep, loader: TrainLoader, progress: Progress,
          out: Path, ctx: DistContext, stop: StopSignals, knn_monitor: KnnMonitor | None) -> TrainResult:
    run = config.run
    writer = MetricsWriter(out, enabled=ctx.is_main, tensorboard=run.tensorboard,
                           purge_step=progress.step + 1 if progress.step else None)
    meter = RateMeter(derived.global_batch_size, derived.total_steps, progress.step)
    monitor = CollapseMonitor(derived.collapse_loss,
                              start_step=max(derived.warmup_steps, config.swav.freeze_prototypes_steps),
                              nan_check=run.nan_check)
    deadline = time.monotonic() + 60 * run.time_budget_minutes if run.time_budget_minutes else None
    last: Path | None = None
    loss_value: float | None = None

    def check_state() -> None:
        """No file may hold NaN/Inf weights: the NaN check sees losses and gradients, not what an update or a
        BatchNorm running statistic became (also the only guard with run.nan_check=false)."""
        step_fn.flush()  # run.check_sync=deferred: the last step's NaN check, before anything is written
        names = nonfinite_state_names(step_fn.raw_model)
        flag = torch.tensor([1.0 if names else 0.0], device=ctx.device)
        all_reduce_max_(flag)
        if flag.item():
            newest = list_checkpoints(out)
            raise NonFiniteStateError(progress.step, names, str(newest[0]) if newest else None,
                                      nan_check=run.nan_check)

    def save(path: Path, finished: bool = False) -> Path:
        check_state()
        saved = save_training_state(path, step_fn, progress, config=config, derived=derived, rank=ctx.rank,
                                    finished=finished)
        if not finished:
            _main_writes(ctx, "remove old step checkpoints", lambda: prune_checkpoints(out, run.keep_checkpoints))
        return saved

    if run.max_steps and progress.step >= run.max_steps:
        logger.warning("run.max_steps=%d already reached (step %d): nothing to do", run.max_steps, progress.step)
        writer.close()
        return TrainResult("max_steps", out, progress.step, progress.epoch)
    batches: Any = None
    try:
        while progress.epoch < config.optim.epochs:
            step_fn.start_epoch(progress.epoch)
            loader.set_epoch(progress.epoch, progress.batch_in_epoch)
            epoch_loss, epoch_steps = torch.zeros((), device=ctx.device), 0
            batches = iter(loader)
            for crops in batches:
                time_over = deadline is not None and time.monotonic() > deadline
                result = step_fn(crops, progress.step, stop_signal=stop.received, time_over=time_over)
                progress.step += 1
                progress.batch_in_epoch += 1
                epoch_loss += result.loss
                epoch_steps += 1
                if progress.step % run.log_every_steps == 0 or progress.step == derived.total_steps:
                    loss_value = _log_step(writer, meter, monitor, result, progress, derived, config, ctx)
                epoch_done = progress.batch_in_epoch == derived.steps_per_epoch
                if epoch_done:
                    loss_value = _log_epoch(writer, epoch_loss, epoch_steps, progress, ctx)
                    _monitor_knn(knn_monitor, step_fn, writer, progress, config)
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
                reason = _stop_reason(result.stop_signal, result.time_over, progress, derived, run)
                by_steps = run.checkpoint_every_steps and progress.step % run.checkpoint_every_steps == 0
                by_epochs = epoch_done and run.checkpoint_every_epochs and \
                    progress.epoch % run.checkpoint_every_epochs == 0
                keep = epoch_done and run.keep_every_epochs and progress.epoch % run.keep_every_epochs == 0
                if (by_steps or by_epochs or keep or reason) and progress.step < derived.total_steps:
                    last = save(step_checkpoint_path(out, progress.step))
                    if keep:
                        _main_writes(ctx, "keep the epoch's checkpoint",
                                     lambda: archive_checkpoint(last, progress.epoch))
                if reason:
                    logger.warning("stopping at step %d (%s); resume with --resume", progress.step, reason)
                    return TrainResult(reason, out, progress.step, progress.epoch, last, result.stop_signal,
                                       loss_value)
            if progress.batch_in_epoch:
                raise RuntimeError(f"the data loader ended after {progress.batch_in_epoch} of "
                                   f"{derived.steps_per_epoch} batches of epoch {progress.epoch}")
        check_state()  # the last step's deferred NaN check and the weights' check come before model.pt
        # model.pt first: final.pt marks the run complete, so a crash between leaves it resumable
        _main_writes(ctx, f"write {out / 'model.pt'}", lambda: save_model_file(
            out / "model.pt", step_fn.raw_model, step_fn.raw_model.spec.to_dict(),  # type: ignore
            config=config_to_dict(config), step=progress.step, epoch=progress.epoch))
        last = save(final_checkpoint_path(out), finished=True)
        logger.info("training complete: %d steps, %d epoch%s; model in %s", progress.step, progress.epoch,
                    "" if progress.epoch == 1 else "s",
                    out / "model.pt")
        return TrainResult("complete", out, progress.step, progress.epoch, last, 0, loss_value)
    finally:
        if batches is not None and hasattr(batches, "close"):
            batches.close()  # the batch thread and the epoch's iterator, then the worker processes
        if hasattr(loader, "close"):
            loader.close()
        writer.close()


def _stop_reason(signal_received: int, time_over: bool, progress: Progress, derived: DerivedValues,
                 run: RunConfig) -> str:
    if progress.step >= derived.total_steps:
        return ""
    if signal_received:
        return "preempted"
    if run.max_steps and progress.step >= run.max_steps:
        return "max_steps"
    if time_over:
        return "time_budget"
    return ""


def _mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    value = value.detach().float().clone()
    all_reduce_sum_(value)
    return float(value) / world_size


def _log_step(writer: MetricsWriter, meter: RateMeter, monitor: CollapseMonitor, result, progress: Progress,
              derived: DerivedValues, config: Config, ctx: DistContext) -> float:
    loss = _mean_over_ranks(result.loss, ctx.world_size)
    rate, eta = meter.update(progress.step)
    used = prototypes_in_use_globally(result.codes_ABK)  # over the global batch: every rank's codes
    k = config.model.num_prototypes[0]
    writer.write({"kind": "step", "step": progress.step, "epoch": progress.epoch, "loss": loss, "lr": result.lr,
                  "images_per_s": rate, "prototypes_in_use": used, "ln_k": derived.collapse_loss, "eta_s": eta,
                  "time": time.time()})
    logger.info("epoch %d/%d step %d/%d loss %.4f (ln K %.3f) lr %.4g | %.0f img/s | prototypes in use %d/%d | "
                "ETA %s", progress.epoch + 1, config.optim.epochs, progress.step, derived.total_steps, loss,
                derived.collapse_loss, result.lr, rate, used, k, format_duration(eta))
    warning = monitor.update(progress.step, loss)
    if warning and ctx.is_main:
        logger.warning(warning)
    return loss


def _log_epoch(writer: MetricsWriter, epoch_loss: torch.Tensor, steps: int, progress: Progress,
               ctx: DistContext) -> float:
    mean = _mean_over_ranks(epoch_loss / max(steps, 1), ctx.world_size)
    writer.write({"kind": "epoch", "step": progress.step, "epoch": progress.epoch + 1, "loss_mean": mean,
                  "time": time.time()}, prefix="epoch")
    logger.info("epoch %d done: mean loss %.4f", progress.epoch + 1, mean)
    return mean


def _monitor_knn(monitor: KnnMonitor | None, step_fn: SwAVStep, writer: MetricsWriter, progress: Progress,
                 config: Config) -> None:
    """Every ``run.knn_every_epochs`` epochs (rank 0): k-NN top-1 of the current features, to the metrics."""
    epoch = progress.epoch + 1
    if monitor is None or epoch % config.run.knn_every_epochs:
        return
    top1 = monitor(step_fn.raw_model)
    writer.write({"kind": "knn", "step": progress.step, "epoch": epoch, "knn_top1": top1, "time": time.time()},
                 prefix="knn")
    logger.info("epoch %d: online k-NN top-1 %.2f%%", epoch, top1)


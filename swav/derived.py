"""Values derived once from the config, the world size and the data set (DESIGN: never re-derived).

Global batch = per-device batch x world size; per-rank queue length = the global queue length
rounded down to a multiple of the global batch, divided by the world size (SPEC §5, §9: the
original rounds silently, we round and log a WARNING); steps per epoch = images per rank //
per-device batch (``drop_last``; DDP needs the same number of steps on every rank); the
learning-rate schedule length. The result is logged and written to ``derived.json`` in the run folder.

Example:
    >>> from swav.config import Config, with_values
    >>> cfg = with_values(Config(), {"swav.queue_length": 3840, "optim.batch_size_per_device": 64})
    >>> d = derive_values(cfg, world_size=4, dataset_size=1_281_167, device="cuda:0", precision="bf16",
    ...                   pipeline="batched")
    >>> d.global_batch_size, d.queue_length_per_rank, d.steps_per_epoch
    (256, 960, 5004)
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from swav.config import Config
from swav.health import loss_floor
from swav.sinkhorn import needs_log_domain

__all__ = ["DerivedValues", "derive_values"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DerivedValues:
    """Everything the training loop needs beyond the config itself."""

    world_size: int
    global_batch_size: int
    dataset_size: int
    samples_per_rank: int
    steps_per_epoch: int
    total_steps: int  # length of the learning-rate schedule
    warmup_steps: int
    queue_length_global: int  # after rounding to a multiple of the global batch
    queue_length_per_rank: int
    num_crops: int
    collapse_loss: float  # mean of ln K over heads: the loss of a collapsed model (SPEC §4)
    device: str
    precision: str  # fp32 | bf16 | fp16, after resolving "auto"
    pipeline: str  # pil | batched | tensor, after resolving "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def derive_values(config: Config, *, world_size: int, dataset_size: int, device: str, precision: str,
                  pipeline: str, samples_per_rank: int | None = None) -> DerivedValues:
    """Compute and check the derived values; ValueError when the data or queue cannot work.

    ``samples_per_rank``: the images every rank is guaranteed per epoch; default
    ``dataset_size // world_size`` (a distributed sampler); streaming shards give less when shard sizes
    differ (see :func:`swav.train_shards.guaranteed_samples_per_rank`).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid: expected >= 1")
    batch = config.optim.batch_size_per_device
    global_batch = batch * world_size
    if samples_per_rank is None:
        samples_per_rank = dataset_size // world_size
    if not 0 <= samples_per_rank <= dataset_size:
        raise ValueError(f"samples_per_rank={samples_per_rank} is invalid: expected 0..dataset_size={dataset_size}")
    steps_per_epoch = samples_per_rank // batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"data: {dataset_size} images give {samples_per_rank} per rank, fewer than one batch of "
            f"optim.batch_size_per_device={batch} (world size {world_size}); use a smaller batch or more data")
    stated = config.optim.lr_global_batch
    if stated and stated != global_batch:
        logger.warning("optim.base_lr=%g was set for a global batch of %d (optim.lr_global_batch), and this run's is "
                       "%d (%d per device x %d process(es)): the learning rate may not fit it. Run on %s, or set "
                       "optim.base_lr for this batch (swav_200ep_bs256 uses 0.6 with a queue at 256) and "
                       "optim.lr_global_batch=%d", config.optim.base_lr, stated, global_batch, batch, world_size,
                       f"{stated // batch} processes of {batch}" if stated % batch == 0 else "that global batch",
                       global_batch)
    queue = config.swav.queue_length
    queue_global = queue - queue % global_batch
    if queue and queue_global == 0:
        raise ValueError(
            f"swav.queue_length={queue} is shorter than the global batch {global_batch} "
            f"({batch} per device x {world_size}): use 0 (no queue) or a multiple of {global_batch}")
    if queue_global != queue:
        logger.warning("swav.queue_length=%d is not a multiple of the global batch %d: rounded down to %d "
                       "(the original code does this silently)", queue, global_batch, queue_global)
    if config.swav.log_domain is False and needs_log_domain(config.swav.epsilon):
        logger.warning("swav.epsilon=%g with swav.log_domain=false: below eps 0.025 exp(scores / eps) can underflow "
                       "to 0 for whole samples or prototypes, giving wrong codes without a NaN; remove "
                       "swav.log_domain=false (the default, null, switches to the log domain there) or set it true",
                       config.swav.epsilon)
    if queue_global and queue_global >= samples_per_rank * world_size:
        logger.warning("swav.queue_length=%d (global) holds at least a whole epoch (%d images): the queue would score "
                       "each image against stale embeddings of itself; use a queue shorter than the data set, or none "
                       "(the queue is meant for small batches on large data sets)", queue_global,
                       samples_per_rank * world_size)
    heads = config.model.num_prototypes
    floor = min(loss_floor(k, config.swav.temperature) / math.log(k) for k in heads if k > 1) \
        if any(k > 1 for k in heads) else 0.0
    if floor > 0.9:
        logger.warning("swav.temperature=%g is so high that even a perfect model's loss stays within %.0f%% of ln K "
                       "(the collapse level): the predictions cannot sharpen; the official value is 0.1",
                       config.swav.temperature, 100 * (1 - floor))
    warmup_steps = int(round(config.optim.warmup_epochs * steps_per_epoch))
    return DerivedValues(
        world_size=world_size,
        global_batch_size=global_batch,
        dataset_size=dataset_size,
        samples_per_rank=samples_per_rank,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * config.optim.epochs,
        warmup_steps=warmup_steps,
        queue_length_global=queue_global,
        queue_length_per_rank=queue_global // world_size,
        num_crops=config.num_crops,
        collapse_loss=sum(math.log(k) for k in heads) / len(heads),
        device=device,
        precision=precision,
        pipeline=pipeline,
    )

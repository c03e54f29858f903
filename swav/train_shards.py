"""Training from streaming WebDataset shards (issue 5; crops per image as in SPEC §7).

:class:`~swav.shards.ShardDataset` is iterable (no sampler), so the engine's epoch logic for shards
lives here:

* Equal steps on every rank (DDP needs it): each epoch the shard order is permuted and rank ``r`` of
  ``W`` reads shards ``r, r+W, ...``; whatever the permutation, every rank holds at least the
  ``floor(S / W)`` smallest of the ``S`` shards, so :func:`guaranteed_samples_per_rank` is a bound
  valid in every epoch and each epoch stops after that many samples // batch steps. With equal
  shards and ``S`` a multiple of ``W`` (``swav pack-shards --num-shards k*W``) nothing is skipped;
  otherwise the samples beyond the bound wait for another epoch.
* Workers: each (rank, worker) reads its own shards, so a worker's last batch may be short; the main
  process re-batches to exactly ``B`` samples. Workers are not persistent: the epoch reaches them when
  the iterator is created (a persistent worker would never see :meth:`set_epoch`).
* Randomness: crops are keyed by ``(seed, epoch, rank, sample key)`` and the batched colour stage by
  ``(seed, rank, epoch, batch index)``, as for image folders; the stream order by ``(seed, epoch)``
  (shards) and ``(seed, epoch, rank, worker)`` (shuffle buffer). An epoch is therefore reproducible.
* Resume inside an epoch is exact: the rest of the epoch holds the same samples, in the same batches,
  with the same crops as an uninterrupted run. Every stream's length is known from the index, so the
  order in which the data loader interleaves its workers' batches (each worker in turn, skipping those
  that have ended) tells how many whole batches of each worker the ``start_batch * B`` samples already
  trained on hold (:func:`resume_skips`). Each worker yields those as :class:`~swav.shards.Skipped`
  placeholders, without decoding them (:meth:`~swav.shards.ShardDataset.set_epoch`, which replays its
  shuffle buffer on sample numbers and opens only the shards that still hold samples of the epoch);
  they are collated into :class:`SkippedBatch` markers, which keep the interleaving as it was, and the
  main process drops them and the samples of the one worker batch that was half trained on. A stand-in
  for an unreadable image right after the resume point copies the readable image before it, read
  again, as in the uninterrupted epoch. Exact for the same ``data.workers`` and number of processes as
  the interrupted run (the engine warns otherwise).

Example (2 ranks, 4 equal shards, batch 2; no process group needed to build the loaders)::

    from swav.shards import ShardDataset
    ds = ShardDataset("shards/", rank=1, world_size=2, seed=31, return_key=True)
    loader = build_train_loader(config, ds, pipeline="batched", rank=1, world_size=2, device=torch.device("cpu"))
    loader.set_epoch(0)
    for crops in loader:          # crops: V float tensors (B, C, S, S)
        print(loader.batch_keys)  # the sample keys of this batch
"""
from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset

from swav.batch_augment import multicrop_collate
from swav.config import Config
from swav.shards import ShardDataset, Skipped
from swav.train_data import TrainLoader, batch_generator, loader_generator, per_image_stages, worker_init

__all__ = ["guaranteed_samples_per_rank", "resume_skips", "sample_index", "ShardCropStream", "ShardTrainLoader",
           "SkippedBatch", "shard_collate", "shard_data_sizes", "build_shard_loader"]

logger = logging.getLogger(__name__)


def guaranteed_samples_per_rank(counts: Sequence[int], world_size: int) -> int:
    """Samples every rank receives in every epoch, whatever the shard permutation.

    Example:
        >>> guaranteed_samples_per_rank([10, 10, 10, 10], 2), guaranteed_samples_per_rank([5, 9, 7], 2)
        (20, 5)
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid: expected >= 1")
    if len(counts) < world_size:
        raise ValueError(f"{len(counts)} shard(s) for {world_size} ranks: every rank needs at least one shard; "
                         f"write at least {world_size} (swav pack-shards --num-shards {world_size})")
    return sum(sorted(counts)[:len(counts) // world_size])


def resume_skips(stream_sizes: Sequence[int], batch_size: int, samples_done: int) -> list[int]:
    """Samples of each worker's stream that lie in its batches trained on entirely, after ``samples_done``
    samples of the main stream.

    ``stream_sizes[w]``: samples worker ``w`` yields in the epoch. The data loader collates each worker's
    stream into batches of ``batch_size`` (the last one short) and hands them out one worker after the other,
    skipping workers that have ended; the main stream is their concatenation.

    Example:
        >>> resume_skips([9, 5], batch_size=4, samples_done=10)  # batches w0 4, w1 4, w0 4, w1 1, w0 1
        [4, 4]
    """
    remaining = [math.ceil(n / batch_size) for n in stream_sizes]
    skips, done = [0] * len(stream_sizes), 0
    while any(remaining):
        for w, left in enumerate(remaining):
            if not left:
                continue
            size = min(batch_size, stream_sizes[w] - skips[w])
            if done + size > samples_done:
                return skips
            done += size
            skips[w] += size
            remaining[w] -= 1
    return skips


def sample_index(key: str) -> int:
    """A stable integer for a sample key (its number when numeric, else a CRC-32): seeds its crops.

    Example:
        >>> sample_index("000042"), sample_index("dogs/a.jpg") == sample_index("dogs/a.jpg")
        (42, True)
    """
    return int(key) if key.isdigit() else zlib.crc32(key.encode("utf-8", "surrogateescape"))


class ShardCropStream(IterableDataset):
    """``(crops, key)`` for every image of this rank's shards; ``transform(image, index=...)`` makes the crops."""

    def __init__(self, shards: ShardDataset, transform: Any) -> None:
        if not shards.return_key or shards.transform is not None:
            raise ValueError("ShardCropStream needs ShardDataset(..., return_key=True) without a transform: the "
                             "training crops are seeded by each sample's key")
        self.shards = shards
        self.transform = transform
        self.epoch = 0

    def set_epoch(self, epoch: int, skip_samples: Sequence[int] = ()) -> None:
        self.epoch = epoch
        self.shards.set_epoch(epoch, skip_samples=skip_samples)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], str] | Skipped]:
        self.transform.set_epoch(self.epoch)
        for item in self.shards:
            if isinstance(item, Skipped):
                yield item
                continue
            image, _label, key = item
            yield self.transform(image, index=sample_index(key)), key


class SkippedBatch(NamedTuple):
    """A worker batch of :class:`~swav.shards.Skipped` placeholders (resume): ``size`` samples already trained on."""

    size: int


def shard_collate(batch: Sequence[Any]) -> Any:
    """:func:`~swav.batch_augment.multicrop_collate`, or a :class:`SkippedBatch` for placeholders (a worker
    batch is all placeholders or none: workers skip whole batches)."""
    if isinstance(batch[0], Skipped):
        if not all(isinstance(item, Skipped) for item in batch):
            raise RuntimeError("a worker batch mixes skipped and read samples: resume_skips and the data loader's "
                               "batching disagree")
        return SkippedBatch(len(batch))
    return multicrop_collate(batch)


def _drop_done(batches: Iterator[Any], samples_done: int) -> Iterator[tuple[list[torch.Tensor], list[str]]]:
    """The worker batches after the first ``samples_done`` samples of the main stream (markers and the trained
    part of a half-trained batch dropped)."""
    for batch in batches:
        if isinstance(batch, SkippedBatch):
            samples_done -= batch.size
            continue
        if samples_done > 0:
            crops, keys = batch
            batch = ([v[samples_done:] for v in crops], list(keys)[samples_done:])
            samples_done = max(0, samples_done - len(keys))
            if not batch[1]:
                continue
        yield batch


def _rebatch(batches: Iterator[tuple[list[torch.Tensor], list[str]]], size: int
             ) -> Iterator[tuple[list[torch.Tensor], list[str]]]:
    """Exactly ``size`` samples per batch from batches of any size (short ones end each worker's stream)."""
    parts: list[list[torch.Tensor]] = []
    keys: list[str] = []
    for crops, batch_keys in batches:
        parts.append(crops)
        keys += list(batch_keys)
        while len(keys) >= size:
            merged = parts[0] if len(parts) == 1 else [torch.cat(views) for views in zip(*parts)]
            yield [v[:size] for v in merged], keys[:size]
            parts = [[v[size:] for v in merged]] if len(keys) > size else []
            keys = keys[size:]


class ShardTrainLoader(TrainLoader):
    """The :class:`~swav.train_data.TrainLoader` of a shard stream: ``steps_per_epoch`` batches per epoch."""

    def __init__(self, stream: ShardCropStream, loader: DataLoader, *, batch_size: int, steps_per_epoch: int,
                 augment: Any, seed: int, rank: int, device: torch.device) -> None:
        super().__init__(None, self._batches, device)  # type: ignore[arg-type]
        self.stream, self.loader, self.augment = stream, loader, augment
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.seed, self.rank = seed, rank
        self.epoch, self.start_batch = 0, 0
        self.batch_keys: list[str] = []  # keys of the batch yielded last (for checks and debugging)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch > 0`` (resume) continues it exactly where batch ``start_batch`` begins
        (module docstring)."""
        if not 0 <= start_batch < self.steps_per_epoch:
            raise ValueError(f"start_batch={start_batch} is invalid: expected 0..{self.steps_per_epoch - 1}")
        shards = self.stream.shards
        skips: list[int] = []
        if start_batch:
            shards.set_epoch(epoch, 0)
            count = dict(zip(shards.urls, shards.counts or [], strict=True))
            mine = shards.rank_shards()
            workers = max(self.loader.num_workers, 1)
            sizes = [sum(count[u] for u in mine[w::workers]) for w in range(workers)]
            skips = resume_skips(sizes, self.batch_size, start_batch * self.batch_size)
            logger.info("resuming inside epoch %d of streamed shards after %d samples per rank: the data-loader "
                        "workers pass over the first %s samples of their streams without decoding them", epoch,
                        start_batch * self.batch_size, skips)
        self.stream.set_epoch(epoch, skip_samples=skips)
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch

    def _batches(self) -> Iterator[list[torch.Tensor]]:
        wanted = len(self)
        if wanted <= 0:
            return
        batches = _drop_done(iter(self.loader), self.start_batch * self.batch_size)
        for b, (crops, keys) in enumerate(_rebatch(batches, self.batch_size)):
            self.batch_keys = keys
            crops = [x.to(self.device, non_blocking=True) for x in crops]
            if self.augment is not None:
                self.augment.generator = batch_generator(self.seed, self.rank, self.epoch, self.start_batch + b)
                crops = self.augment(crops)
            yield crops
            if b + 1 == wanted:  # the epoch's share: stop without reading further (workers shut down)
                return


def _require_index(dataset: ShardDataset) -> list[int]:
    if dataset.counts is None:
        raise ValueError(f"training from shards needs their sample counts: no shards.json next to "
                         f"{dataset.urls[0]!r}; pack the data with `swav pack-shards` (it writes the index)")
    return dataset.counts


def shard_data_sizes(dataset: Any, world_size: int) -> tuple[int, int]:
    """(images in the shards, images every rank gets per epoch) from the shard index."""
    if not isinstance(dataset, ShardDataset):
        raise ValueError(f"dataset of type {type(dataset).__name__} is iterable: the engine streams only "
                         "swav.shards.ShardDataset (pass --data shards:PATTERN or a folder of shards)")
    counts = _require_index(dataset)
    return sum(counts), guaranteed_samples_per_rank(counts, world_size)


def build_shard_loader(config: Config, dataset: ShardDataset, *, pipeline: str, rank: int, world_size: int,
                       device: torch.device) -> ShardTrainLoader:
    """The loader for shards: per-image crops in ``data.workers`` workers, re-batched, colour stage on device."""
    guaranteed = shard_data_sizes(dataset, world_size)[1]  # checks the type and the index first
    if (dataset.rank, dataset.world_size) != (rank, world_size):
        raise ValueError(f"ShardDataset is set up for rank {dataset.rank} of {dataset.world_size}, the loader for "
                         f"rank {rank} of {world_size}: build it after init_process_group or pass rank/world_size")
    batch, workers = config.optim.batch_size_per_device, config.data.workers
    counts = _require_index(dataset)
    steps = guaranteed // batch
    used = steps * batch * world_size
    if rank == 0 and sum(counts) - used >= batch * world_size:  # more than the last partial batches
        logger.warning("each epoch trains on %d of the %d images in the shards (%.0f%%): every rank runs the same "
                       "number of steps, so each stops after the %d images that the rank with the smallest shards "
                       "holds. Pack the data into equal shards, a multiple of %d of them (swav pack-shards "
                       "--num-shards %d), to use every image", used, sum(counts), 100 * used / sum(counts), guaranteed,
                       world_size, world_size * max(1, len(counts) // world_size))
    if len(counts) // world_size < max(workers, 1):
        logger.warning("%d shards for %d ranks x %d workers: some workers have nothing to read; write at least "
                       "%d shards (swav pack-shards --num-shards)", len(counts), world_size, workers,
                       world_size * max(workers, 1))
    transform, augment = per_image_stages(config, pipeline, device)
    dataset.fill_bad = True  # unreadable samples replaced, so every epoch has its `steps` batches
    stream = ShardCropStream(dataset, transform)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=shard_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        worker_init_fn=worker_init if workers > 0 else None,
                        generator=loader_generator(config.run.seed, rank))
    return ShardTrainLoader(stream, loader, batch_size=batch, steps_per_epoch=steps, augment=augment,
                            seed=config.run.seed, rank=rank, device=device)

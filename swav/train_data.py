"""Training input: a resumable sampler and three multi-crop pipelines behind one interface (SPEC §7).

Resume must be bit-identical (issue 3), so no randomness may depend on state a resume cannot
restore (worker RNG, iterator position). Hence:

* :class:`ResumableSampler`: ``DistributedSampler`` order seeded by ``(seed, epoch)``, ``drop_last``,
  able to start at batch ``k`` of an epoch; it yields ``(epoch, index)`` so that workers know the
  epoch even with persistent workers.
* augmentation randomness is keyed by ``(seed, epoch, rank, sample index)`` (per-image pipelines)
  or ``(seed, rank, epoch, batch index)`` (batched stages), never by worker state.

Pipelines (``data.pipeline``): ``pil`` (:class:`~swav.multicrop.MultiCropTransform` per image in
workers), ``batched`` (uint8 crops per image in workers + :class:`~swav.batch_augment.BatchColorAugment`
on the device), ``tensor`` (whole data set as a uint8 tensor, :class:`~swav.tensor_multicrop.TensorMultiCrop`
per batch on the device; for in-memory data such as Fashion-MNIST or CIFAR), ``device`` (workers only
read file bytes; :class:`~swav.device_crops.DeviceMultiCrop` decodes (nvJPEG on CUDA) and crops the batch on the
device, then :class:`~swav.batch_augment.BatchColorAugment`; image folders only). ``auto`` picks
``tensor`` for in-memory data and ``batched`` otherwise. Every loader yields a list of V float
crops ``(B, C, S, S)`` on the training device.

Example:
    >>> sampler = ResumableSampler(10, num_replicas=1, rank=0, seed=31, batch_size=4)
    >>> sampler.set_epoch(0, start_batch=1)
    >>> len(list(sampler)), len(sampler)   # 10 samples, the first batch of 4 skipped
    (6, 6)
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

from swav.color_ops import to_device_async
from swav.config import Config
from swav.multicrop import crop_groups_from_lists, mix_seed, resolve_normalization, seed_worker
from swav.preemption import ignore_stop_signals

__all__ = ["ResumableSampler", "CropDataset", "TrainLoader", "worker_init", "loader_generator", "data_sizes", "in_memory_images",
           "resolve_pipeline", "batch_generator", "prefetch_depth", "colour_stage", "per_image_stages", "build_train_loader"]

logger = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """This rank's share of a ``(seed, epoch)``-seeded permutation, skipping the first batches on resume."""

    def __init__(self, dataset_size: int, *, num_replicas: int, rank: int, seed: int, batch_size: int) -> None:
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def indices(self) -> list[int]:
        """This rank's sample indices for the current epoch, from the start batch on."""
        return list(super().__iter__())[self.start_batch * self.batch_size:]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        return iter([(self.epoch, i) for i in self.indices()])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)


class CropDataset(Dataset):
    """Applies ``transform(image, index=i)`` with the epoch from the sampler's ``(epoch, index)`` key."""

    def __init__(self, base: Dataset, transform: Any) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> list[torch.Tensor]:
        epoch, index = key
        image = image_of(self.base[index], index)
        self.transform.set_epoch(epoch)
        return self.transform(image, index=index)


def image_of(item: Any, index: int) -> Any:
    """The image of a data set item: the item itself (a PIL image, a tensor, encoded bytes, a path) or
    the first element of an ``(image, label, ...)`` tuple; anything else is a ``TypeError`` that says so.

    Example:
        >>> image_of((torch.zeros(3, 2, 2), 7), 0).shape, image_of(torch.zeros(3, 2, 2), 0).shape
        (torch.Size([3, 2, 2]), torch.Size([3, 2, 2]))
    """
    from PIL import Image

    images = (Image.Image, torch.Tensor, bytes, bytearray, str, os.PathLike)
    if isinstance(item, images):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], images):
        return item[0]
    raise TypeError(f"data set item {index} is {type(item).__name__}"
                    + (f" starting with {type(item[0]).__name__}" if isinstance(item, (tuple, list)) and item else "")
                    + ": expected an image (a PIL image or a uint8 C x H x W tensor) or an (image, label) tuple")


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: per-(rank, worker) seeds; stop signals are left to the main process."""
    seed_worker(worker_id)
    ignore_stop_signals()


def loader_generator(seed: int, rank: int) -> torch.Generator:
    """The DataLoader's own generator: each of its iterators draws its workers' base seed from it instead of from
    torch's global random state, which a resume restores and the model may draw from (dropout, drop-path): a
    resumed run opens an iterator the uninterrupted one did not, and that extra draw would change every later
    draw of the model."""
    return torch.Generator().manual_seed(mix_seed(seed, rank, 0x10AD) % (1 << 63))


def data_sizes(dataset: Dataset, world_size: int) -> tuple[int, int]:
    """(images in the data set, images every rank gets per epoch): ``N // W`` for a sampler; shards: see
    :func:`swav.train_shards.shard_data_sizes`.

    Example:
        >>> data_sizes(list(range(10)), 3)  # type: ignore[arg-type]
        (10, 3)
    """
    if isinstance(dataset, IterableDataset):
        from swav.train_shards import shard_data_sizes
        return shard_data_sizes(dataset, world_size)
    size = len(dataset)  # type: ignore[arg-type]
    return size, size // world_size


def in_memory_images(dataset: Dataset, channels: int) -> torch.Tensor | None:
    """The data set as a uint8 ``N x C x H x W`` tensor when it keeps one (IDX, CIFAR: a uint8 ``.data`` tensor
    holding the images its items give, checked on its first and last item), else None."""
    base, limit = dataset, None
    if isinstance(dataset, Subset) and isinstance(dataset.indices, range) and dataset.indices.start == 0:
        base, limit = dataset.dataset, len(dataset.indices)
    data = getattr(base, "data", None)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() not in (3, 4) or not len(data):
        return None
    if data.dim() == 3:
        images = data[:, None]
    else:
        images = data.permute(0, 3, 1, 2) if data.shape[-1] in (1, 3) else data
    if not all(_item_is(base, i, images[i]) for i in {0, len(images) - 1}):
        logger.info("the data set's .data tensor is not what its items hold: its items are used")
        return None
    if limit is not None:
        images = images[:limit]
    if images.shape[1] == 3 and channels == 1:
        import torchvision.transforms.v2.functional as TF
        images = TF.rgb_to_grayscale(images)
    elif images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def _item_is(dataset: Any, index: int, expected: torch.Tensor) -> bool:
    """Whether item ``index`` of ``dataset`` holds the image ``expected`` (uint8 C x H x W)."""
    from PIL import Image
    import torchvision.transforms.v2.functional as TF

    try:
        image = image_of(dataset[index], index)
    except (TypeError, IndexError):
        return False
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image)
    if isinstance(image, torch.Tensor) and image.is_floating_point() and image.numel() and \
            0.0 <= float(image.min()) and float(image.max()) <= 1.0:  # ToTensor() items: the same image in [0, 1]
        image = (image * 255).round().to(torch.uint8)
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        return False
    if image.dim() == 2:
        image = image[None]
    if image.dim() == 3 and image.shape[1:] != expected.shape[1:] and image.shape[-1] in (1, 3):
        image = image.permute(2, 0, 1)  # H x W x C
    if image.shape[0] == 3 and expected.shape[0] == 1:  # grey data read as RGB (data.channels=3)
        expected = expected.expand(3, -1, -1)
    elif image.shape[0] == 1 and expected.shape[0] == 3:  # colour data read as grey: luma rounding may differ by 1
        expected = TF.rgb_to_grayscale(expected)
    if image.shape != expected.shape:
        return False
    return bool((image.int() - expected.int()).abs().max() <= 1)


def resolve_pipeline(requested: str, dataset: Dataset, channels: int) -> str:
    """``auto`` -> ``tensor`` for in-memory data, else ``batched``; ``tensor`` needs in-memory data."""
    in_memory = in_memory_images(dataset, channels) is not None
    if requested == "auto":
        return "tensor" if in_memory else "batched"
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    if requested == "device" and getattr(base, "samples", None) is None:
        raise ValueError("data.pipeline='device' needs a folder of image files; use 'batched' for shards "
                         "and 'tensor' (or 'auto') for in-memory data sets")
    if requested == "tensor" and not in_memory:
        raise ValueError("data.pipeline='tensor' needs a data set held in memory as one uint8 tensor "
                         "(Fashion-MNIST/MNIST IDX files, CIFAR); use 'batched' or 'pil' for image files")
    return requested


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(batches: Iterator[Any], depth: int = 1, device: torch.device | None = None) -> Iterator[Any]:
    """``batches`` made by a background thread, up to ``depth`` ahead (torch ops release the GIL, so the
    next batch is cut while the step runs). Errors re-raise in the consumer; closing the consumer stops
    the thread, closes ``batches`` (in the thread that iterates it) and waits for the thread to end. The
    batches and their order are those of ``batches`` (randomness is keyed by batch index).

    On a CUDA ``device`` the thread works on that GPU and on the consumer's current stream (both are per host
    thread, and a new thread starts on GPU 0 and its default stream): otherwise every rank but rank 0 would
    open a context on GPU 0, and batches would cross streams unordered.

    Example:
        >>> list(prefetched(iter(range(5))))
        [0, 1, 2, 3, 4]
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()
    cuda = device is not None and torch.device(device).type == "cuda"
    stream = torch.cuda.current_stream(device) if cuda else None

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            if cuda:  # the stream's device: "cuda" without an index is the consumer's current GPU
                torch.cuda.set_device(stream.device)
                torch.cuda.set_stream(stream)
            for item in batches:
                if not put(item):
                    return
            put(end)
        except BaseException as error:  # noqa: BLE001  (handed to the consumer)
            put(_Failure(error))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # a generator: its clean-up (DataLoader workers) runs here, not at exit
                close()

    thread = threading.Thread(target=produce, name="swav-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is end:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        # the thread finishes the batch it is making (at most one batch's time), then sees the stop
        thread.join(timeout=_PREFETCH_JOIN_S)
        if thread.is_alive():
            logger.warning("the batch thread did not stop within %.0f s (a data-loader worker hung?); "
                           "leaving it behind", _PREFETCH_JOIN_S)


_PREFETCH_JOIN_S = 120.0


class TrainLoader:
    """Iterates one epoch of V-crop batches on ``device``; ``set_epoch(epoch, start_batch)`` before each.
    ``prefetch`` > 0 makes the batches in a background thread (:func:`prefetched`)."""

    def __init__(self, sampler: ResumableSampler, batches: Callable[[], Iterator[list[torch.Tensor]]],
                 device: torch.device, prefetch: int = 0, data_loader: DataLoader | None = None) -> None:
        self.sampler = sampler
        self._batches = batches
        self.device = device
        self.prefetch = prefetch
        self.data_loader = data_loader  # its worker processes are stopped by close()

    def close(self) -> None:
        """Stop the data-loader worker processes now (persistent workers otherwise live until the interpreter
        exits, and a run that stops on an error then ends with their shutdown noise on stderr, or lets them
        write to the run folder after it was tidied up)."""
        iterator = getattr(self.data_loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if self.data_loader is not None:
            self.data_loader._iterator = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        return prefetched(self._batches(), self.prefetch, self.device) if self.prefetch > 0 else self._batches()


def batch_generator(seed: int, rank: int, epoch: int, batch_index: int) -> torch.Generator:
    """The generator of one batch's batched random stages, keyed by ``(seed, rank, epoch, batch index)``."""
    return torch.Generator().manual_seed(mix_seed(seed, rank, epoch, batch_index) >> 1)


def prefetch_depth(config: Config, pipeline: str, device: torch.device) -> int:
    """``data.prefetch_batches``, with null (auto) resolved: 1 for the ``device`` pipeline on a GPU, where
    torchvision's batched GPU JPEG decoder holds the calling thread until the whole batch is decoded (in a
    background thread it runs while the main thread issues the step), else 0.

    Example:
        >>> prefetch_depth(Config(), "device", torch.device("cuda")), prefetch_depth(Config(), "batched", torch.device("cuda"))
        (1, 0)
    """
    if config.data.prefetch_batches is not None:
        return config.data.prefetch_batches
    return 1 if pipeline == "device" and device.type == "cuda" else 0


def colour_stage(config: Config, device: torch.device | None = None) -> Any:
    """The batched colour stage (:class:`~swav.batch_augment.BatchColorAugment`) of ``config``, compiled with
    ``data.compile_colour: true``, or when it is null (auto) with ``run.compile`` on a CUDA device: there the
    dense strategy under ``torch.compile`` (a few fused kernels instead of ~600 small ones), on a CPU the
    grouped strategy with a compiled hue rotation. Same values either way. Not compiled, a CPU stage runs the
    opencv strategy where OpenCV is installed (faster than either; the same values up to float rounding)."""
    from swav.batch_augment import BatchColorAugment
    c, d = config.crops, config.data
    mean, std = resolve_normalization(d.channels, d.mean, d.std)
    if d.compile_colour is not None:
        compiled = bool(d.compile_colour)
    else:
        compiled = bool(config.run.compile) and device is not None and device.type == "cuda"
    return BatchColorAugment(channels=d.channels, mean=mean, std=std, color_jitter_strength=c.color_jitter_strength,
                             grayscale_prob=c.grayscale_prob, blur_prob=c.blur_prob, compile=compiled)


def per_image_stages(config: Config, pipeline: str, device: torch.device | None = None) -> tuple[Any, Any]:
    """``(transform, augment)``: the per-image transform run in workers (``transform(image, index=i)``) and the
    batched colour stage run on the device (None for ``pil``, whose transform does everything)."""
    c, d = config.crops, config.data
    groups = crop_groups_from_lists(c.counts, c.sizes, c.min_scales, c.max_scales)
    mean, std = resolve_normalization(d.channels, d.mean, d.std)
    if pipeline == "pil":
        from swav.multicrop import MultiCropTransform
        transform = MultiCropTransform(groups, channels=d.channels, mean=mean, std=std,
                                       color_jitter_strength=c.color_jitter_strength,
                                       grayscale_prob=c.grayscale_prob, blur_prob=c.blur_prob, seed=config.run.seed)
        return transform, None
    if pipeline == "batched":
        from swav.batch_augment import MultiCropCropper
        return MultiCropCropper(groups, channels=d.channels, seed=config.run.seed), colour_stage(config, device)
    raise ValueError(f"data.pipeline={pipeline!r} is invalid here: expected pil or batched "
                     "(tensor needs in-memory data)")


def build_train_loader(config: Config, dataset: Dataset, *, pipeline: str, rank: int, world_size: int,
                       device: torch.device) -> TrainLoader:
    """The :class:`TrainLoader` for ``pipeline`` (already resolved) over ``dataset`` (shards: streamed, see
    :mod:`swav.train_shards`)."""
    if isinstance(dataset, IterableDataset):
        from swav.train_shards import build_shard_loader
        return build_shard_loader(config, dataset, pipeline=pipeline, rank=rank,  # type: ignore[arg-type]
                                  world_size=world_size, device=device)
    c, d = config.crops, config.data
    groups = crop_groups_from_lists(c.counts, c.sizes, c.min_scales, c.max_scales)
    mean, std = resolve_normalization(d.channels, d.mean, d.std)
    batch, seed = config.optim.batch_size_per_device, config.run.seed
    sampler = ResumableSampler(len(dataset), num_replicas=world_size, rank=rank, seed=seed, batch_size=batch)
    if pipeline == "tensor":
        from swav.tensor_multicrop import TensorMultiCrop
        images = in_memory_images(dataset, d.channels)
        assert images is not None
        images = images.to(device)
        multicrop = TensorMultiCrop(groups, channels=d.channels, mean=mean, std=std,
                                    jitter_strength=0.8 * c.color_jitter_strength, grayscale_prob=c.grayscale_prob,
                                    blur_prob=c.blur_prob)

        def tensor_batches() -> Iterator[list[torch.Tensor]]:
            index = torch.tensor(sampler.indices(), dtype=torch.long)
            for b in range(len(index) // batch):
                chunk = images[to_device_async(index[b * batch:(b + 1) * batch], device)]
                yield multicrop(chunk, batch_generator(seed, rank, sampler.epoch, sampler.start_batch + b))
        return TrainLoader(sampler, tensor_batches, device, prefetch=prefetch_depth(config, pipeline, device))

    if pipeline == "device":
        return _device_loader(config, dataset, sampler, rank=rank, device=device)
    transform, augment = per_image_stages(config, pipeline, device)
    from swav.batch_augment import multicrop_collate
    workers = d.workers
    loader = DataLoader(CropDataset(dataset, transform), batch_size=batch, sampler=sampler, drop_last=True,
                        num_workers=workers, collate_fn=multicrop_collate, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, worker_init_fn=worker_init if workers > 0 else None,
                        generator=loader_generator(seed, rank))

    def file_batches() -> Iterator[list[torch.Tensor]]:
        for b, crops in enumerate(loader):
            crops = [x.to(device, non_blocking=True) for x in crops]
            if augment is not None:
                augment.generator = batch_generator(seed, rank, sampler.epoch, sampler.start_batch + b)
                crops = augment(crops)
            yield crops
    return TrainLoader(sampler, file_batches, device, prefetch=prefetch_depth(config, pipeline, device),
                       data_loader=loader)


def _device_loader(config: Config, dataset: Dataset, sampler: ResumableSampler, *, rank: int,
                   device: torch.device) -> TrainLoader:
    """Workers read bytes; decoding, cropping and colour work run on ``device`` (``data.pipeline=device``)."""
    from swav.device_crops import DeviceMultiCrop, EncodedImageDataset, encoded_collate, split_encoded
    c, d = config.crops, config.data
    groups = crop_groups_from_lists(c.counts, c.sizes, c.min_scales, c.max_scales)
    seed = config.run.seed
    augment = colour_stage(config, device)
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    encoded = EncodedImageDataset(base, groups, seed=seed, channels=d.channels)  # workers draw the crop boxes
    # files that only fail to decode are skipped and listed with the workers' unreadable ones
    cropper = DeviceMultiCrop(groups, channels=d.channels, seed=seed, device=device, tracker=encoded.tracker,
                              bit_depth=getattr(base, "bit_depth", None))
    workers = d.workers
    loader = DataLoader(encoded, batch_size=config.optim.batch_size_per_device, sampler=sampler, drop_last=True,
                        num_workers=workers, collate_fn=encoded_collate, persistent_workers=workers > 0,
                        worker_init_fn=worker_init if workers > 0 else None, generator=loader_generator(seed, rank))

    def device_batches() -> Iterator[list[torch.Tensor]]:
        for b, (buffer, ends, indices, epoch, boxes, sizes) in enumerate(loader):
            names = [encoded.paths[i] for i in sizes[:, 3].tolist()]  # the files read (stand-ins included)
            crops = cropper(split_encoded(buffer, ends), indices, epoch, names=names, boxes=boxes, sizes=sizes)
            augment.generator = batch_generator(seed, rank, sampler.epoch, sampler.start_batch + b)
            yield augment(crops)
    return TrainLoader(sampler, device_batches, device, prefetch=prefetch_depth(config, "device", device),
                       data_loader=loader)

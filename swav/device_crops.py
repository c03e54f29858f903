"""Decode and crop on the training device (issue "Speed": a GPU node not limited by its CPU cores).

The ``device`` pipeline moves everything but file reading off the CPU:

1. DataLoader workers only read the encoded files (:class:`EncodedImageDataset`: bytes, no decoding) and,
   given the crop groups, read the image size from the file header and draw the crop boxes with the
   same seeded distribution as :class:`~swav.batch_augment.MultiCropCropper` (RandomResizedCrop's):
   about 0.18 ms per image of Python (``benchmarks/device_host_time.py``), 23 ms per batch of 128, that would
   otherwise hold the main process's GIL.
2. :class:`DeviceMultiCrop` decodes the whole batch at once with ``torchvision.io.decode_jpeg`` on the
   device (nvJPEG on CUDA; libjpeg-turbo on CPU), draws the boxes of images that came without them (or
   whose decoded size differs from the header's), and cuts every crop of one resolution with a single
   ``torchvision.ops.roi_align`` call per source-image size. The boxes and output rows of the whole batch
   are planned on the host in one go, so a batch of many sizes (ImageNet's) costs about 6 operators per
   size instead of about 44 (``benchmarks/device_crop_plan.py``).
3. :class:`~swav.batch_augment.BatchColorAugment` does flip, jitter, grayscale, blur and normalisation
   on the same device.

Deviation from the per-image pipeline (documented in the README): the resize is roi_align's bilinear
sampling averaged over each output pixel's footprint (``sampling_ratio`` adaptive), an area-averaging
antialias instead of torchvision's antialiased bilinear kernel; crop geometry and every random
decision have the same distribution. Files that are not JPEG (PNG, WebP, ...) or that the device
decoder rejects are decoded on the CPU (PIL) and then follow the same path.

Legend: B batch, V crops, C channels, S crop size.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from PIL import Image
from torchvision.ops import roi_align

from swav.batch_augment import MultiCropCropper, decode_image_source
from swav.multicrop import CropGroup, check_groups, crop_generator

try:  # deprecated in torchvision 0.29 (moving to torchcodec); everything is decoded by PIL without it
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = None

__all__ = ["EncodedImageDataset", "DeviceMultiCrop", "draw_boxes", "encoded_collate", "header_size", "split_encoded"]

logger = logging.getLogger(__name__)
_JPEG_MAGIC = b"\xff\xd8\xff"


def draw_boxes(cropper: MultiCropCropper, seed: int | None, height: int, width: int, index: int,
               epoch: int) -> torch.Tensor:
    """The V crop boxes of image ``index`` in ``epoch`` as float ``(V, 4)`` ``(x1, y1, x2, y2)`` pixels (what
    roi_align takes), keyed by ``(seed, epoch, rank, index)`` like :class:`~swav.batch_augment.MultiCropCropper`."""
    boxes = cropper.sample_boxes(height, width, crop_generator(seed, epoch, int(index), 0))
    return torch.tensor([(b.left, b.top, b.left + b.width, b.top + b.height) for b in boxes], dtype=torch.float32)


def header_size(data: bytes | memoryview) -> tuple[int, int]:
    """``(height, width)`` from an encoded image's header (PIL reads no pixels), ``(-1, -1)`` if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        return height, width
    except Exception:  # noqa: BLE001  (corrupt files are reported where they are decoded)
        return -1, -1


class EncodedImageDataset(Dataset):
    """The files of an :class:`~swav.datasets.ImageFolderDataset` as encoded bytes (uint8 1-D tensors).

    Item ``(epoch, index)`` (the :class:`~swav.train_data.ResumableSampler` key) -> ``(bytes, index, epoch)``;
    with ``groups`` also the crop boxes drawn from the header's image size (:func:`draw_boxes`, float
    ``(V, 4)``) and that size (int ``(2,)``; ``(-1, -1)`` and zero boxes if the header is unreadable), so the
    workers, not the main process, spend the Python time. A file that cannot be read is reported with its
    path and the fix.
    """

    def __init__(self, folder: Dataset, groups: Sequence[CropGroup] | None = None, *, seed: int | None = None,
                 channels: int = 3) -> None:
        samples = getattr(folder, "samples", None)
        if samples is None:
            raise ValueError("data.pipeline='device' needs a folder of image files (ImageFolderDataset); "
                             "use 'batched' for shards and 'tensor' for in-memory data sets")
        self.paths = [path for path, _ in samples]
        self.seed = seed
        self.cropper = None if groups is None else MultiCropCropper(groups, channels=channels, seed=seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path = self.paths[index]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise OSError(f"cannot read image file {path!r} ({exc}); remove it or fix its permissions") from exc
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self.cropper is None:
            return encoded, index, epoch
        height, width = header_size(data)
        views = sum(g.count for g in self.cropper.groups)
        boxes = (draw_boxes(self.cropper, self.seed, height, width, index, epoch) if height > 0
                 else torch.zeros(views, 4))
        return encoded, index, epoch, boxes, torch.tensor([height, width])


def encoded_collate(items: Sequence[tuple]) -> tuple:
    """``(buffer, ends, indices, epoch)``: the batch's encoded files end to end in one uint8 tensor (a worker
    hands one shared-memory block to the main process instead of one per file), where each file ends, the
    sample indices, and the batch's epoch; items with boxes add ``boxes`` ``(B, V, 4)`` and ``sizes``
    ``(B, 2)``. :func:`split_encoded` gives the files back."""
    buffer = torch.cat([item[0] for item in items])
    ends = torch.tensor([len(item[0]) for item in items]).cumsum(0).tolist()
    batch = (buffer, ends, [item[1] for item in items], items[0][2])
    if len(items[0]) > 3:
        batch += (torch.stack([item[3] for item in items]), torch.stack([item[4] for item in items]))
    return batch


def split_encoded(buffer: torch.Tensor, ends: Sequence[int]) -> list[torch.Tensor]:
    """The files of :func:`encoded_collate`'s buffer, as views."""
    return [buffer[start:end] for start, end in zip([0, *ends[:-1]], ends)]


class DeviceMultiCrop:
    """Encoded images -> V uint8 crop batches ``(B, C, S, S)`` on ``device`` (group 0's crops first).

    Crop boxes are keyed by ``(seed, epoch, rank, sample index)`` exactly as in
    :class:`~swav.batch_augment.MultiCropCropper`, so the two pipelines cut the same rectangles.

    Example:
        >>> import io; from PIL import Image
        >>> buf = io.BytesIO(); Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG")
        >>> data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        >>> crops = DeviceMultiCrop([CropGroup(16, 2, 0.3, 1.0), CropGroup(8, 3, 0.05, 0.3)], seed=0)([data], [0])
        >>> [tuple(c.shape) for c in crops]
        [(1, 3, 16, 16), (1, 3, 16, 16), (1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8)]
    """

    def __init__(self, groups: Sequence[CropGroup], *, channels: int = 3, seed: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.groups = check_groups(groups)
        self.cropper = MultiCropCropper(self.groups, channels=channels, seed=seed)
        self.channels = channels
        self.seed = seed
        self.device = torch.device(device)
        self.device_decode = decode_jpeg is not None
        self.cpu_decoded = 0  # images that needed the CPU fallback (not JPEG or rejected by the decoder)
        self._decode_stream: torch.cuda.Stream | None = None

    def _device_decode(self, data, mode):
        """``decode_jpeg`` on the device. On CUDA it runs with a stream of its own current: torchvision's decoder
        allocates its outputs on the current stream but writes them from a private stream that does not wait for
        it, so with the training stream current it can be handed (and overwrite) memory that queued kernels of
        the previous step have yet to read (no error, corrupt activations: this showed as an infinite first-layer
        gradient once the step stopped synchronising with the host). Memory of the decode stream is only reused
        once the training stream's reads of it are done (``record_stream``)."""
        if self.device.type != "cuda":
            return decode_jpeg(data, mode=mode, device=self.device)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._decode_stream):
            decoded = decode_jpeg(data, mode=mode, device=self.device)
        main.wait_stream(self._decode_stream)
        for image in decoded if isinstance(decoded, list) else [decoded]:
            image.record_stream(main)
        return decoded

    def decode(self, encoded: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> list[torch.Tensor]:
        """uint8 ``(C, H, W)`` images on the device; one batched device decode for the JPEGs. ``names`` (e.g.
        file paths) only serve the error message."""
        images: list[torch.Tensor | None] = [None] * len(encoded)
        jpeg = [i for i, data in enumerate(encoded)
                if self.device_decode and bytes(data[:3].tolist()) == _JPEG_MAGIC]
        if jpeg:
            mode = ImageReadMode.RGB if self.channels == 3 else ImageReadMode.GRAY
            try:
                decoded = self._device_decode([encoded[i] for i in jpeg], mode)
                for i, image in zip(jpeg, decoded):
                    images[i] = image
            except RuntimeError as exc:  # one bad file fails the batch: find it image by image
                logger.debug("batched device decode failed (%s); decoding one by one", exc)
                for i in jpeg:
                    try:
                        images[i] = self._device_decode(encoded[i], mode)
                    except RuntimeError:
                        pass
        for i, image in enumerate(images):
            if image is None:
                self.cpu_decoded += 1
                try:
                    cpu = decode_image_source(bytes(encoded[i].numpy()), self.channels)
                except Exception as exc:  # PIL raises many types for corrupt data
                    what = repr(names[i]) if names is not None else f"image {i} of the batch"
                    raise ValueError(f"{what} cannot be decoded ({exc}); find the corrupt "
                                     "file with `swav scan DATA` and remove it") from exc
                images[i] = cpu.to(self.device, non_blocking=True)
        return images  # type: ignore[return-value]

    def __call__(self, encoded: Sequence[torch.Tensor], indices: Sequence[int], epoch: int = 0,
                 names: Sequence[str] | None = None, boxes: torch.Tensor | None = None,
                 sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``boxes`` ``(B, V, 4)`` and ``sizes`` ``(B, 2)`` (from :class:`EncodedImageDataset` with groups) are
        used for every image whose decoded size equals ``sizes``; the others' boxes are drawn here."""
        return self.crop(self.decode(encoded, names), indices, epoch, boxes=boxes, sizes=sizes)

    def crop(self, images: Sequence[torch.Tensor], indices: Sequence[int], epoch: int = 0,
             boxes: torch.Tensor | None = None, sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The crops of decoded uint8 ``(C, H, W)`` images on the device (see :meth:`__call__`)."""
        if not images:
            return [torch.empty(0, self.channels, g.size, g.size, dtype=torch.uint8, device=self.device)
                    for g in self.groups for _ in range(g.count)]
        shapes = [tuple(image.shape[-2:]) for image in images]
        boxes = boxes.clone() if boxes is not None else torch.zeros(len(images), sum(g.count for g in self.groups), 4)
        given = [tuple(s) for s in sizes.tolist()] if sizes is not None else [None] * len(images)
        for b, (shape, index) in enumerate(zip(shapes, indices)):
            if given[b] != shape:  # no boxes from the workers, or EXIF-rotated / unreadable header
                boxes[b] = draw_boxes(self.cropper, self.seed, shape[0], shape[1], int(index), epoch)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for b, shape in enumerate(shapes):
            by_shape.setdefault(shape, []).append(b)
        # one float stack per source size, shared by every crop resolution
        stacks = [torch.stack([images[b] for b in members]).float() for members in by_shape.values()]
        rois, targets, plan = self._plan(boxes, list(by_shape.values()))
        if self.device.type == "cuda":  # one host-to-device copy each for the whole batch
            rois = rois.pin_memory().to(self.device, non_blocking=True)
            targets = targets.pin_memory().to(self.device, non_blocking=True) if targets is not None else None
        out: list[torch.Tensor] = []
        for g, pieces in zip(self.groups, plan):
            cuts = [roi_align(stacks[s], rois[lo:hi], output_size=g.size, spatial_scale=1.0, sampling_ratio=-1,
                              aligned=True) for s, lo, hi in pieces]
            cut = (cuts[0] if len(cuts) == 1 else torch.cat(cuts)).round_().clamp_(0, 255).to(torch.uint8)
            if targets is not None:  # rows in shape order -> rows in (crop, image) order
                first, last = pieces[0][1], pieces[-1][2]
                cut = torch.empty_like(cut).index_copy_(0, targets[first:last], cut)
            out += list(cut.split(len(images)))
        return out

    def _plan(self, boxes: torch.Tensor, members: list[list[int]]
              ) -> tuple[torch.Tensor, torch.Tensor | None, list[list[tuple[int, int, int]]]]:
        """The roi_align calls of a batch, planned on the host in one go (NumPy; the device then gets two copies
        instead of a few small ones per source size and resolution: ImageNet batches hold dozens of sizes).

        ``members`` lists the batch positions of each source size. Returns ``rois`` ``(B V, 5)`` (index in the
        size's stack, box), ordered by resolution group, then source size, then crop, then image; for each
        group the ``(source size, first row, end row)`` of its roi_align calls; and each row's place in its
        group's ``(crop, image)``-ordered output (None with one source size, where rows are in that order).
        """
        batch, box = boxes.shape[0], boxes.numpy()
        rows, places, plan = [], [], []
        start = first = 0
        for g in self.groups:
            pieces = []
            for s, member in enumerate(members):
                index = np.asarray(member)
                picked = box[index, start:start + g.count].transpose(1, 0, 2).reshape(-1, 4)
                position = np.tile(np.arange(len(member), dtype=np.float32), g.count)
                rows.append(np.concatenate([position[:, None], picked], axis=1))
                places.append((np.arange(g.count)[:, None] * batch + index[None, :]).reshape(-1))
                pieces.append((s, first, first + len(picked)))
                first += len(picked)
            plan.append(pieces)
            start += g.count
        rois = torch.from_numpy(np.concatenate(rows))
        targets = None if len(members) == 1 else torch.from_numpy(np.concatenate(places))
        return rois, targets, plan

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
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from PIL import Image, UnidentifiedImageError
from torchvision.ops import roi_align
from torchvision.transforms.v2.functional import pil_to_tensor

from swav.batch_augment import MultiCropCropper
from swav.images import (IMAGE_FORMATS, BadImageTracker, ImageDecodeError, TooManyBadImagesError,
                         apply_orientation, default_max_pixels, exif_orientation, load_image)
from swav.multicrop import CropGroup, check_groups, crop_generator

try:  # deprecated in torchvision 0.29 (moving to torchcodec); everything is decoded by PIL without it
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = None

__all__ = ["EncodedImageDataset", "DeviceMultiCrop", "apply_orientation", "draw_boxes", "encoded_collate", "header_size",
           "read_header", "split_encoded"]

logger = logging.getLogger(__name__)
_JPEG_MAGIC = b"\xff\xd8\xff"


def draw_boxes(cropper: MultiCropCropper, seed: int | None, height: int, width: int, index: int,
               epoch: int) -> torch.Tensor:
    """The V crop boxes of image ``index`` in ``epoch`` as float ``(V, 4)`` ``(x1, y1, x2, y2)`` pixels (what
    roi_align takes), keyed by ``(seed, epoch, rank, index)`` like :class:`~swav.batch_augment.MultiCropCropper`."""
    boxes = cropper.sample_boxes(height, width, crop_generator(seed, epoch, int(index), 0))
    return torch.tensor([(b.left, b.top, b.left + b.width, b.top + b.height) for b in boxes], dtype=torch.float32)


def read_header(data: bytes | memoryview, label: str = "<bytes>", max_pixels: int | None = None
                ) -> tuple[int, int, int]:
    """``(height, width, orientation)`` of an encoded image from its header (PIL reads no pixels): the size as
    displayed, after the EXIF orientation (1 = none; 5-8 swap the sides), checked as
    :func:`swav.images.load_image` checks a file before decoding it (empty, not one of the decoded formats,
    invalid size, more than ``max_pixels``; None = the default limit, 0 = none).

    Raises:
        ImageDecodeError: naming ``label`` and the reason.
    """
    if not len(data):
        raise ImageDecodeError(label, "file is empty (0 bytes)", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                orientation = exif_orientation(image)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(label, f"refused as a decompression bomb ({exc})", "too_large") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(label, f"not a supported image format (starts with {bytes(data[:16])!r})",
                               "not_an_image") from exc
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for corrupt headers)
        raise ImageDecodeError(label, f"cannot parse header ({exc})", "corrupt") from exc
    limit = default_max_pixels() if max_pixels is None else max_pixels
    if width <= 0 or height <= 0:
        raise ImageDecodeError(label, f"invalid size {width}x{height}", "corrupt")
    if limit and width * height > limit:
        raise ImageDecodeError(label, f"{width}x{height} = {width * height} pixels exceeds the limit of {limit} "
                               "(decompression-bomb guard)", "too_large")
    return (width, height, orientation) if orientation >= 5 else (height, width, orientation)


def header_size(data: bytes | memoryview) -> tuple[int, int]:
    """``(height, width)`` as displayed (after the EXIF orientation) from an encoded image's header,
    ``(-1, -1)`` if it is not a readable image (see :func:`read_header`)."""
    try:
        height, width, _ = read_header(data)
        return height, width
    except ImageDecodeError:
        return -1, -1


class EncodedImageDataset(Dataset):
    """The files of an :class:`~swav.datasets.ImageFolderDataset` as encoded bytes (uint8 1-D tensors).

    Item ``(epoch, index)`` (the :class:`~swav.train_data.ResumableSampler` key) -> ``(bytes, index, epoch)``;
    with ``groups`` also the crop boxes drawn from the header's image size (:func:`draw_boxes`, float
    ``(V, 4)``) and int ``(4,)``: that size as displayed, the EXIF orientation and the index of the file read,
    so the workers, not the main process, spend the Python time. A file whose header cannot be read is
    skipped and listed; the next readable file stands in (the index of the file read says which), with
    crops of the requested index.
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
        self.max_pixels = getattr(folder, "max_pixels", None)
        tracker = getattr(folder, "tracker", None)  # unreadable files: skipped, listed, counted as the folder does
        self.tracker = BadImageTracker(tracker.max_bad_fraction, tracker.min_bad_count, tracker.bad_list_path,
                                       total=tracker.total or len(self.paths)) if tracker is not None else \
            BadImageTracker(total=len(self.paths))
        self._known_bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> tuple[bytes, tuple[int, int, int]]:
        path = self.paths[index]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ImageDecodeError(path, f"cannot read file ({exc.strerror or exc})", "unreadable") from exc
        return data, read_header(data, path, self.max_pixels)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple:
        """A file whose header cannot be read (empty, not an image, too large, unreadable) is skipped: the
        next readable file takes its place, as in :class:`~swav.datasets.ImageFolderDataset`; files that
        only fail to decode are handled by :class:`DeviceMultiCrop`."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        n = len(self.paths)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._known_bad:
                continue
            try:
                data, (height, width, orientation) = self._read(i)
            except ImageDecodeError as exc:
                self._known_bad.add(i)
                self.tracker.record_bad(self.paths[i], exc.reason)
                continue
            self.tracker.record_ok()
            break
        else:
            raise TooManyBadImagesError(f"none of the {n} image files can be read; run `swav scan` on the folder")
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self.cropper is None:
            return encoded, index, epoch
        # crops keyed by the requested index (a stand-in gets crops of its own, as in the other pipelines);
        # the file actually read is the last column
        boxes = draw_boxes(self.cropper, self.seed, height, width, index, epoch)
        return encoded, index, epoch, boxes, torch.tensor([height, width, orientation, i])


def encoded_collate(items: Sequence[tuple]) -> tuple:
    """``(buffer, ends, indices, epoch)``: the batch's encoded files end to end in one uint8 tensor (a worker
    hands one shared-memory block to the main process instead of one per file), where each file ends, the
    sample indices, and the batch's epoch; items with boxes add ``boxes`` ``(B, V, 4)`` and ``sizes``
    ``(B, 4)`` (height and width as displayed, EXIF orientation, the index of the file read: another than the
    sample's where that one was unreadable). :func:`split_encoded` gives the files back."""
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
                 device: torch.device | str = "cpu", tracker: BadImageTracker | None = None,
                 bit_depth: int | None = None) -> None:
        self.tracker = tracker  # None: a file that cannot be decoded is an error; else skipped and recorded
        self.groups = check_groups(groups)
        self.cropper = MultiCropCropper(self.groups, channels=channels, seed=seed)
        self.channels = channels
        self.bit_depth = bit_depth  # of 16-bit files (decoded on the CPU), as swav.images.load_image
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

    def decode(self, encoded: Sequence[torch.Tensor], names: Sequence[str] | None = None,
               orientations: Sequence[int] | None = None) -> list[torch.Tensor | None]:
        """uint8 ``(C, H, W)`` images on the device, as displayed (EXIF orientation applied). JPEGs go through
        one batched device decode; other files, and JPEGs the device decoder rejects, through
        :func:`swav.images.load_image` on the CPU, so they follow the other pipelines' rules (16-bit data
        scaled, transparency composited on white, only the decoded formats). ``orientations``: the EXIF
        orientation of each file (from :class:`EncodedImageDataset`); None reads it from the headers here.
        ``names`` (e.g. file paths) serve the messages. A file that cannot be decoded is None in the result
        and recorded in the tracker, or, without one, an error naming it."""
        images: list[torch.Tensor | None] = [None] * len(encoded)
        rejected: tuple[list[int], str] | None = None  # a batch whose every JPEG the device decoder refused
        jpeg = [i for i, data in enumerate(encoded)
                if self.device_decode and bytes(data[:3].tolist()) == _JPEG_MAGIC]
        if jpeg:
            mode = ImageReadMode.RGB if self.channels == 3 else ImageReadMode.GRAY
            try:
                decoded = self._device_decode([encoded[i] for i in jpeg], mode)
                for i, image in zip(jpeg, decoded):
                    images[i] = image
            except torch.cuda.OutOfMemoryError:
                raise  # not a bad file: the GPU is full (decoding on the CPU instead would hide it)
            except RuntimeError as exc:  # one bad file fails the batch: find it image by image
                logger.debug("batched device decode failed (%s); decoding one by one", exc)
                for i in jpeg:
                    try:
                        images[i] = self._device_decode(encoded[i], mode)
                    except torch.cuda.OutOfMemoryError:
                        raise
                    except RuntimeError:
                        pass
                if len(jpeg) >= 4 and all(images[i] is None for i in jpeg):  # the decoder, or the files?
                    rejected = (list(jpeg), str(exc))
            for i in jpeg:  # the device decoder leaves the EXIF orientation to us (load_image applies it)
                if images[i] is not None:
                    orientation = orientations[i] if orientations is not None else self._orientation(encoded[i])
                    images[i] = apply_orientation(images[i], int(orientation))
        for i, image in enumerate(images):
            if image is not None:
                continue
            self.cpu_decoded += 1
            label = names[i] if names is not None else f"image {i} of the batch"
            try:
                pil = load_image(bytes(encoded[i].numpy()), channels=self.channels, name=label,
                                 bit_depth=self.bit_depth)
            except ImageDecodeError as exc:
                if self.tracker is None:
                    shown = repr(names[i]) if names is not None else label
                    raise ValueError(f"{shown} cannot be decoded ({exc.reason}); find the corrupt file with "
                                     "`swav scan DATA` and remove it") from exc
                self.tracker.record_bad(label, exc.reason)
                continue
            images[i] = pil_to_tensor(pil).to(self.device, non_blocking=True)
        if rejected is not None and sum(images[i] is not None for i in rejected[0]) * 2 >= len(rejected[0]):
            # the CPU read most of what the device decoder refused: the decoder does not work here (a batch of
            # corrupt files leaves it on)
            self.device_decode = False
            logger.warning("the device JPEG decoder failed on all %d JPEGs of a batch that the CPU decodes (%s): "
                           "decoding on the CPU from now on (torchvision built without nvJPEG?)", len(rejected[0]),
                           rejected[1])
        return images

    @staticmethod
    def _orientation(data: torch.Tensor) -> int:
        try:
            return read_header(bytes(data.numpy()), max_pixels=0)[2]
        except ImageDecodeError:
            return 1

    def __call__(self, encoded: Sequence[torch.Tensor], indices: Sequence[int], epoch: int = 0,
                 names: Sequence[str] | None = None, boxes: torch.Tensor | None = None,
                 sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``boxes`` ``(B, V, 4)`` and ``sizes`` ``(B, 4)`` (height and width as displayed, EXIF orientation, file
        index: from :class:`EncodedImageDataset` with groups; ``(B, 2)`` or ``(B, 3)`` work too) are used for every
        image whose decoded size equals ``sizes``; the others' boxes are drawn here. With a tracker, a file
        that cannot be decoded is replaced by the next decodable image of the batch, cropped with boxes drawn
        for its own index (as a folder replaces it by the next readable file)."""
        orientations = sizes[:, 2].tolist() if sizes is not None and sizes.shape[1] > 2 else None
        images = self.decode(encoded, names, orientations)
        bad = [b for b, image in enumerate(images) if image is None]
        if bad:
            good = [b for b, image in enumerate(images) if image is not None]
            if not good:
                raise TooManyBadImagesError(f"none of the {len(images)} files of a batch can be decoded (e.g. "
                                            f"{names[bad[0]] if names is not None else 'the first'}); run "
                                            "`swav scan` on the data")
            sizes = sizes.clone() if sizes is not None else None
            for b in bad:
                images[b] = images[next((g for g in good if g > b), good[0])]
                if sizes is not None:
                    sizes[b, :2] = -1  # boxes are drawn for the substitute's size
        return self.crop(images, indices, epoch, boxes=boxes, sizes=sizes)  # type: ignore[arg-type]

    def crop(self, images: Sequence[torch.Tensor], indices: Sequence[int], epoch: int = 0,
             boxes: torch.Tensor | None = None, sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The crops of decoded uint8 ``(C, H, W)`` images on the device (see :meth:`__call__`)."""
        if not images:
            return [torch.empty(0, self.channels, g.size, g.size, dtype=torch.uint8, device=self.device)
                    for g in self.groups for _ in range(g.count)]
        shapes = [tuple(image.shape[-2:]) for image in images]
        boxes = boxes.clone() if boxes is not None else torch.zeros(len(images), sum(g.count for g in self.groups), 4)
        given = [tuple(s[:2]) for s in sizes.tolist()] if sizes is not None else [None] * len(images)
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

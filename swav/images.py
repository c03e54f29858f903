"""Robust image decoding for pretraining data (engine layer, SPEC §7 input side).

Real photo collections contain truncated downloads, empty files, HTML error pages saved as
``.jpg``, CMYK JPEGs, palette images with transparency, 16-bit PNGs and phone photos whose
orientation lives only in EXIF. A multi-day pretraining run must neither crash on them nor
silently feed garbage, so every file goes through :func:`load_image`, which either returns a
fully decoded 8-bit ``RGB`` (or ``L``) image or raises :class:`ImageDecodeError` naming the file
and the reason. Global Pillow settings (``ImageFile.LOAD_TRUNCATED_IMAGES``,
``Image.MAX_IMAGE_PIXELS``) are never modified.

What a dataset does with an unreadable file is decided here too (:class:`BadImageTracker`): the
file is logged, remembered and skipped, and the run is aborted with
:class:`TooManyBadImagesError` once at least ``min_bad_count`` (default 10) distinct bad files were
met *and* they make up more than ``max_bad_fraction`` (default 1%) of the files used, when their number
is known (a folder; with a shared ``bad_list_path`` the bad files every worker and rank met in this run
count together, exactly; without one, a data-loader worker counts its share only, a lenient bound), or of
the decode attempts made so far in this process (a stream of shards, whose size is unknown). Against the
number of files the rule does not depend on the order the files are met in (bad files in one sub-folder
are met in a row, as a folder substitutes the next file for an unreadable one); the count threshold keeps
an early unlucky streak (1 bad of the first 3) from stopping a run. A resumed run's list still names the
files of earlier runs: the rule counts only what was written after its tracker was made.

Because workers are separate processes, bad paths reach the main process through ``bad_list_path``:
every process appends one line per new bad file (a single ``write`` on a file opened in append mode,
which POSIX keeps whole on local disks); :attr:`BadImageTracker.bad_files` reads it back deduplicated.
On a network file system without atomic appends, give each rank its own path (the rule then counts
per rank, leniently).

Example:
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.new("RGBA", (2, 1), (0, 0, 0, 0)).save(buf, "PNG")
    >>> load_image(buf.getvalue()).getpixel((0, 0))   # transparent -> white
    (255, 255, 255)
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
import zlib
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageDecodeError", "load_image", "default_max_pixels", "ImageSource",
    "TooManyBadImagesError", "BadImageTracker", "IMAGE_FORMATS", "apply_orientation", "check_bit_depth",
    "exif_orientation",
]

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

#: Exceptions Pillow's decoders raise on corrupt data (they are not all OSError).
_DECODER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
                   TypeError, KeyError, ZeroDivisionError, zlib.error)

#: Pillow formats we decode. Anything else (EPS, which would start Ghostscript, PSD, ICO, ...)
#: is refused as "not an image", whatever the file name says. JPEG includes multi-picture (MPO)
#: camera files; PPM covers .ppm/.pgm/.pbm.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")

_EXIF_ORIENTATION = 0x0112

#: Reasons an :class:`ImageDecodeError` can carry (``kind``), used by ``swav scan`` to group.
DECODE_ERROR_KINDS = ("empty", "unreadable", "not_an_image", "too_large", "truncated", "corrupt")


class ImageDecodeError(ValueError):
    """A file that is not a decodable image.

    ``path`` names the file (or ``"<bytes>"``), ``reason`` says why in words and ``kind`` is one
    of :data:`DECODE_ERROR_KINDS`. It is a ``ValueError`` so generic handlers still catch it.

    Example:
        >>> err = ImageDecodeError("a.jpg", "file is empty (0 bytes)", kind="empty")
        >>> str(err)
        'cannot decode image a.jpg: file is empty (0 bytes)'
    """

    def __init__(self, path: object, reason: str = "unknown error", kind: str = "corrupt") -> None:
        self.path = str(path)
        self.reason = reason
        self.kind = kind if kind in DECODE_ERROR_KINDS else "corrupt"
        super().__init__(f"cannot decode image {self.path}: {reason}")

    def __reduce__(self):  # keep path/reason/kind across DataLoader worker pickling
        return (type(self), (self.path, self.reason, self.kind))


def default_max_pixels() -> int:
    """Pixel limit used when none is given: Pillow's own error threshold (2 x MAX_IMAGE_PIXELS,
    about 178.9 M pixels with Pillow's defaults), or unlimited if the application set it to None.
    """
    pil_limit = Image.MAX_IMAGE_PIXELS
    return 2 * int(pil_limit) if pil_limit is not None else 0


def _read_source(source: ImageSource, name: str | None) -> tuple[bytes, str]:
    """Read the whole encoded file into memory (one read; no open handle outlives the call)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        label = name or os.fspath(source)
        try:
            with open(source, "rb") as fh:
                data = fh.read()
        except IsADirectoryError as exc:
            raise ImageDecodeError(label, "is a directory, not an image file",
                                   "unreadable") from exc
        except OSError as exc:  # missing, permission denied, broken symlink, I/O error
            raise ImageDecodeError(label, f"cannot read file ({exc.strerror or exc})",
                                   "unreadable") from exc
    else:
        raise TypeError(f"load_image: source must be a path or bytes, got {type(source).__name__}")
    if not data:
        raise ImageDecodeError(label, "file is empty (0 bytes)", "empty")
    return data, label


def _open_checked(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """Parse the header and refuse decompression bombs (nothing decoded yet: :func:`_load_checked`)."""
    try:
        with warnings.catch_warnings():  # the size is checked below against max_pixels, with our own message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(label, f"refused as a decompression bomb ({exc})",
                               "too_large") from exc
    except UnidentifiedImageError as exc:
        head = data[:16]
        raise ImageDecodeError(label, f"not a supported image format (starts with {head!r})",
                               "not_an_image") from exc
    except _DECODER_ERRORS as exc:
        kind = "truncated" if "truncat" in str(exc).lower() else "corrupt"
        raise ImageDecodeError(label, f"cannot parse header ({exc})", kind) from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(label, f"invalid size {width}x{height}", "corrupt")
    if max_pixels and width * height > max_pixels:
        raise ImageDecodeError(
            label, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                   "(decompression-bomb guard; raise max_pixels to allow it)", "too_large")
    return img


def _load_checked(img: Image.Image, label: str) -> Image.Image:
    """Decode an opened image fully (its first frame), naming truncated and corrupt files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # GIF/TIFF/WebP animations: use the first frame
            img.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(label, f"refused as a decompression bomb ({exc})",
                               "too_large") from exc
    except _DECODER_ERRORS as exc:
        message = str(exc)
        kind = "truncated" if ("truncat" in message.lower() or "broken data stream" in message
                               or isinstance(exc, EOFError)) else "corrupt"
        raise ImageDecodeError(label, f"decoding failed ({message or type(exc).__name__})",
                               kind) from exc
    return img


def _apply_exif_orientation(img: Image.Image, label: str) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says; broken EXIF keeps the stored pixels."""
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
            return img  # the common case: no copy
        return ImageOps.exif_transpose(img)
    except _DECODER_ERRORS as exc:  # malformed EXIF must not make a good image unusable
        logger.warning("ignoring malformed EXIF orientation in %s: %s", label, exc)
        return img


def check_bit_depth(bit_depth: int | None) -> int | None:
    """``bit_depth`` if it is None or an integer 8..16, else a ``ValueError`` naming the setting."""
    if bit_depth is not None and (isinstance(bit_depth, bool) or not isinstance(bit_depth, int)
                                  or not 8 <= bit_depth <= 16):
        raise ValueError(f"data.bit_depth={bit_depth!r} is invalid: expected the bits per sample of 16-bit image "
                         "files, 8..16 (12 for most medical and many scientific cameras), or null for full 16-bit")
    return bit_depth


def _high_bit_depth_to_l(img: Image.Image, bit_depth: int | None = None) -> Image.Image:
    """Scale 16-bit / 32-bit / float grey images to 8 bits (scaled, never clipped unless ``bit_depth`` says so).

    ``I;16*`` (16-bit PNG/TIFF) maps 0..65535 to 0..255 (x / 257, rounded); with ``bit_depth`` b (data
    of b bits stored in 16-bit files: 12-bit medical images, 10/12/14-bit sensors) 0..2^b-1 maps to
    0..255 and larger values are clipped (with a warning). Mode ``I`` is treated the same when its values
    lie in 0..65535 (older Pillow versions report 16-bit PNGs as ``I``); otherwise, and for ``F``, the
    image's own min..max range is stretched to 0..255 (a float image already in 0..1 is multiplied by 255).
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
        out = _scale_16bit(arr, bit_depth)
    else:
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out = np.rint((arr - lo) * scale)
    return Image.fromarray(out.astype(np.uint8))  # 2-D uint8 -> mode L


def _scale_16bit(arr: np.ndarray, bit_depth: int | None) -> np.ndarray:
    """16-bit samples to uint8: 0..65535 (or 0..2^bit_depth - 1, larger values clipped) onto 0..255, rounded;
    the low-bit-depth and clipping warnings on the way."""
    maximum = int(arr.max()) if arr.size else 0
    if bit_depth is None:
        _warn_if_low_bit_depth(maximum)
        top = 65535
    else:
        top = (1 << bit_depth) - 1
        _warn_if_clipped(maximum, bit_depth)
    return ((np.minimum(arr.astype(np.uint32), top) * 255 + top // 2) // top).astype(np.uint8)


_low_bit_depth_warned = False
_clipped_warned = False


def _warn_if_clipped(maximum: int, bit_depth: int) -> None:
    """Once per process: a value above what ``bit_depth`` bits hold is clipped (the setting may be too low)."""
    global _clipped_warned
    if maximum >= 1 << bit_depth and not _clipped_warned:
        _clipped_warned = True
        logger.warning("a 16-bit image holds values up to %d, above the %d of data.bit_depth=%d: those are clipped "
                       "to white; raise data.bit_depth (16 or null for full 16-bit data) if they are real",
                       maximum, (1 << bit_depth) - 1, bit_depth)


def _warn_if_low_bit_depth(maximum: int) -> None:
    """Once per process: 16-bit images whose values stay below 4096 (12-bit medical data, 10-bit sensors) come
    out nearly black from the x / 257 scaling (at most 16 of 255), and training on them learns little."""
    global _low_bit_depth_warned
    if 0 < maximum < 4096 and not _low_bit_depth_warned:
        _low_bit_depth_warned = True
        logger.warning("a 16-bit image holds values up to %d only (12-bit or lower data?): scaled to 8 bits as "
                       "16-bit data (x / 257) it is nearly black (at most %d of 255). Set data.bit_depth to "
                       "the data's bits per sample (--set data.bit_depth=12 for 12-bit data: 0..4095 becomes "
                       "0..255), or convert the images to 8 bits with the windowing your data needs",
                       maximum, (maximum * 255 + 32767) // 65535)


_TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}
_no_opencv_warned = False


def is_16bit_colour(img: Image.Image) -> bool:
    """A colour file with 16 bits per sample (48/64-bit PNG, TIFF), which Pillow decodes to 8-bit RGB(A) keeping
    only each sample's high byte; read from the header's raw mode before any pixel is decoded."""
    tiles = getattr(img, "tile", None) or []
    for tile in tiles[:1]:
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
        if isinstance(rawmode, str) and rawmode.split(";")[0] in ("RGB", "RGBA", "RGBX") and ";16" in rawmode:
            return True
    return False


def _decode_16bit_colour(data: bytes, header: Image.Image, label: str, bit_depth: int | None) -> Image.Image | None:
    """The 16-bit colour file at full precision (OpenCV's decoder), scaled to 8 bits as 16-bit grey files are
    (``bit_depth``, the low-bit-depth warning) and turned by its EXIF orientation; None without OpenCV (then
    Pillow's high bytes are used, with a warning once) or when OpenCV cannot read it."""
    global _no_opencv_warned
    try:
        import cv2
    except ImportError:
        if not _no_opencv_warned:
            _no_opencv_warned = True
            logger.warning("16-bit colour image files (such as %s) are read by Pillow as 8 bits (their high bytes: "
                           "12-bit data comes out nearly black, and data.bit_depth has no effect on them); "
                           "pip install opencv-python-headless to read them at full precision", label)
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        return None
    out = _scale_16bit(arr[..., 2::-1], bit_depth)  # OpenCV's BGR(A) -> RGB
    if arr.shape[2] == 4:  # alpha: 16-bit too, scaled by its own range
        out = np.dstack([out, ((arr[..., 3].astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)])
    img = Image.fromarray(out, "RGBA" if arr.shape[2] == 4 else "RGB")
    try:
        orientation = header.getexif().get(_EXIF_ORIENTATION, 1)
    except _DECODER_ERRORS:
        orientation = 1
    if orientation in _TRANSPOSES:
        img = img.transpose(_TRANSPOSES[orientation])
    return img


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info


def _to_8bit(img: Image.Image, channels: int, bit_depth: int | None = None) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB (channels=3) or L (channels=1)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_bit_depth_to_l(img, bit_depth)
    if _has_alpha(img):
        # Composite on white: transparent regions of logos/icons become white, not black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode not in ("RGB", "L"):
        # CMYK, YCbCr, LAB, HSV, P, 1, RGBX, RGBA, ... through Pillow's own conversions.
        img = img.convert("RGB")
    target = "RGB" if channels == 3 else "L"
    if img.mode != target:
        img = img.convert(target)
    return img


def load_image(
    source: ImageSource,
    *,
    channels: int = 3,
    max_pixels: int | None = None,
    name: str | None = None,
    bit_depth: int | None = None,
) -> Image.Image:
    """Decode one image fully into an 8-bit ``RGB`` (``channels=3``) or ``L`` (``channels=1``).

    Handles JPEG/PNG/WebP/BMP/GIF (first frame)/TIFF, applies EXIF orientation, converts CMYK,
    composites transparency (RGBA/LA/P with tRNS) on white and scales 16-bit data to 8 bits.

    Args:
        source: a file path or the encoded bytes (e.g. from a tar shard).
        channels: 3 for RGB, 1 for grey.
        max_pixels: refuse images with more pixels than this (decompression bombs). ``None``
            uses :func:`default_max_pixels`; 0 disables our check. Pillow still refuses images
            above its own global threshold on open; to allow bigger ones the application must
            raise ``PIL.Image.MAX_IMAGE_PIXELS`` itself (we never change globals).
        name: label used in error messages when ``source`` is bytes.
        bit_depth: bits per sample of 16-bit files, grey or colour (8..16; e.g. 12 for 12-bit data stored in
            16-bit PNG/TIFF, so that 0..4095 becomes 0..255); None scales the full 0..65535. 8-bit files are
            not affected.

    Raises:
        ImageDecodeError: empty, unreadable, not an image, too large, truncated or corrupt.
        ValueError: ``channels`` not 1 or 3.

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO(); Image.new("L", (3, 2), 7).save(buf, "PNG")
        >>> img = load_image(buf.getvalue(), channels=3)
        >>> img.mode, img.size
        ('RGB', (3, 2))
    """
    if channels not in (1, 3):
        raise ValueError(f"load_image: channels must be 1 or 3, got {channels!r}")
    if max_pixels is not None and max_pixels < 0:
        raise ValueError(f"load_image: max_pixels must be >= 0 (0 = no limit), got {max_pixels!r}")
    check_bit_depth(bit_depth)
    limit = default_max_pixels() if max_pixels is None else max_pixels
    data, label = _read_source(source, name)
    img = _open_checked(data, label, limit)
    # a 16-bit colour file is decoded once, by OpenCV at full precision (Pillow keeps the high bytes only)
    wide = _decode_16bit_colour(data, img, label, bit_depth) if is_16bit_colour(img) else None
    img = wide if wide is not None else _load_checked(img, label)
    img = _apply_exif_orientation(img, label)  # (a 16-bit colour image made above is turned already: no EXIF)
    try:
        return _to_8bit(img, channels, bit_depth)
    except _DECODER_ERRORS as exc:
        raise ImageDecodeError(label, f"cannot convert mode {img.mode} ({exc})", "corrupt") from exc


_ORIENTATIONS = {k: k for k in range(1, 9)}


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image, 1 when absent or not an integer 1-8 (what PIL's
    ``ImageOps.exif_transpose`` acts on); reads the header only."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
        return _ORIENTATIONS.get(value, 1)  # as exif_transpose looks it up (6.0 counts, "6" does not)
    except (TypeError, *_DECODER_ERRORS):  # TypeError: an unhashable value
        return 1


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Rotate/flip a ``(C, H, W)`` image as EXIF orientation ``orientation`` asks (what PIL's
    ``ImageOps.exif_transpose`` does to the decoded pixels; 1 or unknown: unchanged)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


class TooManyBadImagesError(RuntimeError):
    """Too many unreadable images: the data set is probably broken (wrong folder, bad copy).

    Constructed from one message string so that a DataLoader worker can re-raise it unchanged
    in the main process.
    """


class BadImageTracker:
    """Per-process record of unreadable files and the abort rule described in the module doc.

    Example:
        >>> t = BadImageTracker(max_bad_fraction=0.5, min_bad_count=2)
        >>> t.record_ok(); t.record_bad("a.jpg", "empty")
        >>> t.bad_files, t.attempted
        (['a.jpg'], 2)
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_bad_count: int = 10,
                 bad_list_path: str | os.PathLike | None = None, total: int | None = None) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        if min_bad_count < 1:
            raise ValueError(f"min_bad_count must be >= 1, got {min_bad_count!r}")
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_bad_count = int(min_bad_count)
        self.bad_list_path = os.fspath(bad_list_path) if bad_list_path is not None else None
        self.attempted = 0
        # the number of files used when it is known (a folder): the rule then compares the distinct bad files
        # with it (with bad_list_path, those every process met since this tracker was made); unknown (a stream):
        # this process's bad files with its decode attempts so far, an estimate
        self.total = total
        self.bad: dict[str, str] = {}  # path -> reason, in order of discovery
        # the rule's view of the shared list: only what was written after this tracker was made (a resumed run's
        # list still holds the files of earlier runs, fixed since, perhaps), read incrementally
        self._list_offset = self._list_size()
        self._met: set[str] = set()

    def _list_size(self) -> int:
        try:
            return os.path.getsize(self.bad_list_path) if self.bad_list_path is not None else 0
        except OSError:
            return 0

    def _met_so_far(self) -> int:
        """Distinct bad files met in this run by this process and, through the shared list, by the others."""
        self._met.update(self.bad)
        if self.bad_list_path is not None and self._list_size() > self._list_offset:
            with open(self.bad_list_path, "rb") as fh:
                fh.seek(self._list_offset)
                chunk = fh.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written by another process: next time
            self._list_offset += len(complete)
            self._met.update(line for line in complete.decode("utf-8", "surrogateescape").splitlines() if line)
        return len(self._met)

    def record_ok(self) -> None:
        self.attempted += 1

    def record_bad(self, path: str, reason: str) -> None:
        """Count one failed decode; raise :class:`TooManyBadImagesError` if the rule trips."""
        self.attempted += 1
        if path not in self.bad:
            self.bad[path] = reason
            logger.warning("skipping unreadable image %s: %s", path, reason)
            if self.bad_list_path is not None:
                self._append(path)
        self.check()

    def _append(self, path: str) -> None:
        parent = os.path.dirname(self.bad_list_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        line = path.replace("\n", "\\n") + "\n"
        with open(self.bad_list_path, "a", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(line)

    def check(self) -> None:
        # the number of files known: the distinct bad files met in this run against it (every process's through
        # the shared list: exact; without a list, a data-loader worker counts its share only, a lenient bound);
        # unknown (a stream): this process's bad files against its decode attempts
        exact = bool(self.total)
        n_bad = self._met_so_far() if exact else len(self.bad)
        base = self.total if exact else self.attempted
        if n_bad >= self.min_bad_count and n_bad > self.max_bad_fraction * base:
            examples = "; ".join(f"{p} ({r})" for p, r in list(self.bad.items())[:3])
            what = f"{base} image files" if exact else f"{base} decode attempts in this process"
            raise TooManyBadImagesError(
                f"{n_bad} unreadable images out of {what} ({n_bad / base:.1%} > max_bad_fraction="
                f"{self.max_bad_fraction}); e.g. {examples}. Run `swav scan` on the data to list "
                "them all, then fix or remove them, or allow a larger share (swav pretrain: --set "
                "data.max_bad_fraction=F; extract, cluster and the evaluation commands: --max-bad-fraction F).")

    @property
    def bad_files(self) -> list[str]:
        """Bad paths seen by this process plus those other processes wrote to bad_list_path."""
        paths = list(self.bad)
        if self.bad_list_path is not None and os.path.exists(self.bad_list_path):
            with open(self.bad_list_path, encoding="utf-8", errors="surrogateescape") as fh:
                paths += [line.rstrip("\n") for line in fh if line.strip()]
        return list(dict.fromkeys(paths))

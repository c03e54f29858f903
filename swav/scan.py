"""Check a folder of images before training on it (engine layer; backs ``swav scan``).

A pretraining run skips unreadable images (:class:`swav.images.BadImageTracker`), but it is
better to know up front: :func:`scan_folder` decodes every file exactly as training will
(:func:`swav.images.load_image`, same walk as :class:`swav.datasets.ImageFolderDataset`) and
reports how many are readable, which are not and why, and the range of image sizes.

Example:
    >>> import tempfile; from PIL import Image
    >>> d = tempfile.mkdtemp(); Image.new("RGB", (8, 6)).save(f"{d}/a.png")
    >>> _ = open(f"{d}/b.jpg", "wb")             # an empty file
    >>> report = scan_folder(d, workers=1)
    >>> report.total, report.ok, report.bad_by_kind
    (2, 1, {'empty': 1})
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
from PIL import Image

from swav.datasets import IMAGE_EXTENSIONS, UNREAD_IMAGE_EXTENSIONS, list_image_files
from swav.images import ImageDecodeError, is_16bit_colour, load_image

__all__ = ["BadFile", "ScanReport", "scan_folder", "format_report"]


@dataclass(frozen=True)
class BadFile:
    """One unreadable file: its path, the error kind (see ``DECODE_ERROR_KINDS``) and why."""

    path: str
    kind: str
    reason: str


@dataclass
class ScanReport:
    """Result of :func:`scan_folder`; ``to_dict()`` gives a JSON-ready view."""

    root: str
    total: int = 0
    ok: int = 0
    bad: list[BadFile] = field(default_factory=list)
    widths: list[int] = field(default_factory=list, repr=False)
    heights: list[int] = field(default_factory=list, repr=False)
    seconds: float = 0.0
    high_bit_files: int = 0  # readable 16-bit grey (or 32-bit / float) and 16-bit colour files
    high_bit_max: int = 0  # the largest value in the 16-bit ones
    skipped: dict[str, int] = field(default_factory=dict)  # visible files not read as images, per extension

    @property
    def suggested_bit_depth(self) -> int | None:
        """Bits that hold every value of the 16-bit files when fewer than 16 (``data.bit_depth``), else None."""
        if not self.high_bit_files or self.high_bit_max <= 0:
            return None
        bits = max(8, int(self.high_bit_max).bit_length())
        return bits if bits < 16 else None

    @property
    def bad_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.bad:
            counts[item.kind] = counts.get(item.kind, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    def size_stats(self) -> dict[str, dict[str, float]]:
        """min / median / max / mean of widths and heights of the readable images."""
        stats = {}
        for name, values in (("width", self.widths), ("height", self.heights)):
            if values:
                stats[name] = {"min": min(values), "median": statistics.median(values),
                               "max": max(values), "mean": statistics.fmean(values)}
        return stats

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "total": self.total, "ok": self.ok,
                "bad_count": len(self.bad), "bad_fraction": self.bad_fraction,
                "bad_by_kind": self.bad_by_kind, "bad": [asdict(b) for b in self.bad],
                "sizes": self.size_stats(), "seconds": self.seconds, "high_bit_files": self.high_bit_files,
                "high_bit_max": self.high_bit_max, "suggested_bit_depth": self.suggested_bit_depth,
                "skipped_by_extension": self.skipped}


def _check(path: str, channels: int, max_pixels: int | None) -> tuple[int, int, int] | BadFile:
    """``(width, height, largest value)`` of a readable file (the value for 16-bit grey files, else -1)."""
    try:
        image = load_image(path, channels=channels, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return BadFile(path, exc.kind, exc.reason)
    return (*image.size, _high_bit_maximum(path))


def _high_bit_maximum(path: str) -> int:
    """The largest value of a 16-bit grey or colour file (decoded a second time, for those only), else -1."""
    try:
        with Image.open(path) as opened:  # the header tells the mode
            if is_16bit_colour(opened):
                try:
                    import cv2
                except ImportError:
                    return -1
                values = cv2.imread(path, cv2.IMREAD_UNCHANGED)
                if values is None or values.dtype != np.uint16:
                    return -1
                values = values[..., :3] if values.ndim == 3 else values  # not the alpha channel
            elif not (opened.mode.startswith("I;16") or opened.mode == "I"):
                return -1
            else:
                values = np.asarray(opened)
    except (OSError, ValueError):  # load_image read it: a second read failing is not the file's fault
        return -1
    return int(values.max()) if values.size and 0 <= values.min() and values.max() <= 65535 else -1


def scan_folder(
    root: str | os.PathLike,
    *,
    channels: int = 3,
    workers: int | None = None,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    max_pixels: int | None = None,
) -> ScanReport:
    """Decode every image under ``root`` and report the outcome (bad files in path order).

    ``workers`` threads decode in parallel (Pillow releases the GIL while decoding); the
    default is ``min(8, cpu count)``.

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` missing or not a folder.
    """
    root = os.path.expanduser(os.fspath(root))
    if not os.path.exists(root):
        raise FileNotFoundError(f"scan_folder: {root!r} does not exist; expected a folder of "
                                "images")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"scan_folder: {root!r} is not a folder")
    if channels not in (1, 3):
        raise ValueError(f"scan_folder: channels must be 1 or 3, got {channels!r}")
    workers = workers or min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"scan_folder: workers must be >= 1, got {workers!r}")
    start = time.perf_counter()
    skipped: dict[str, int] = {}
    paths = [os.path.join(root, rel) for rel in list_image_files(root, extensions, skipped)]
    report = ScanReport(root=root, total=len(paths), skipped=dict(sorted(skipped.items())))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(lambda p: _check(p, channels, max_pixels), paths):
            if isinstance(result, BadFile):
                report.bad.append(result)
            else:
                report.ok += 1
                report.widths.append(result[0])
                report.heights.append(result[1])
                if result[2] >= 0:
                    report.high_bit_files += 1
                    report.high_bit_max = max(report.high_bit_max, result[2])
    report.seconds = time.perf_counter() - start
    return report


def format_report(report: ScanReport, max_listed: int = 50) -> str:
    """Human-readable summary: counts, error kinds, size range, then the bad files."""
    lines = [f"scanned {report.root}: {report.total} image files in {report.seconds:.1f} s"]
    unread = {e: n for e, n in report.skipped.items() if e in UNREAD_IMAGE_EXTENSIONS}
    others = sum(n for e, n in report.skipped.items() if e not in UNREAD_IMAGE_EXTENSIONS)
    if unread:
        lines.append("  images in formats swav does not read, left out: "
                     + ", ".join(f"{e} {n}" for e, n in unread.items()) + " (convert them to PNG or JPEG to use them)")
    if others:
        lines.append(f"  other files, not images: {others} ("
                     + ", ".join(f"{e or '(no extension)'} {n}" for e, n in report.skipped.items()
                                 if e not in UNREAD_IMAGE_EXTENSIONS) + ")")
    if report.total == 0:
        lines.append("  no image files found (hidden files and folders are skipped)")
        return "\n".join(lines)
    lines.append(f"  readable:   {report.ok} ({report.ok / report.total:.1%})")
    kinds = ", ".join(f"{k} {n}" for k, n in report.bad_by_kind.items())
    lines.append(f"  unreadable: {len(report.bad)} ({report.bad_fraction:.1%})"
                 + (f": {kinds}" if kinds else ""))
    stats = report.size_stats()
    if stats:
        w, h = stats["width"], stats["height"]
        lines.append(f"  width  min {w['min']}, median {w['median']:g}, max {w['max']}")
        lines.append(f"  height min {h['min']}, median {h['median']:g}, max {h['max']}")
    if report.high_bit_files:
        bits = report.suggested_bit_depth
        brightest = (report.high_bit_max * 255 + 32767) // 65535
        lines.append(f"  16-bit files: {report.high_bit_files}, values up to {report.high_bit_max}"
                     + (f": {bits}-bit data? Train with --set data.bit_depth={bits} (scaled as 16-bit data they "
                        f"reach at most {brightest} of 255)" if bits else
                        " (all zero)" if report.high_bit_max == 0 else " (full 16-bit range)"))
    if report.bad:
        lines.append("unreadable files:")
        for item in report.bad[:max_listed]:
            lines.append(f"  [{item.kind}] {item.path}: {item.reason}")
        if len(report.bad) > max_listed:
            lines.append(f"  ... and {len(report.bad) - max_listed} more (write them all with "
                         "--json or --bad-list)")
    return "\n".join(lines)

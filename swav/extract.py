"""Resumable extraction of features and embeddings for a whole data set (issue 7, SPEC §2).

For every image it stores the pooled backbone feature h (``features``, N x C) and/or the unit
projection z = g(h) / ||g(h)|| (``embeddings``, N x D), the label and the path, plus the unit
prototypes of every head, so that clustering (``swav.cluster``) needs no model afterwards.

Work is written in chunks of rows (``chunks/<name>_<i>.npy``) and a marker ``progress.json``
is replaced atomically after each complete chunk; a re-run with the same model, data and
options continues after the last complete chunk. At the end the chunks are assembled into
``features.npy`` / ``embeddings.npy`` / ``labels.npy`` / ``index.csv`` (row, path, label)
(optionally one ``extracted.safetensors``) and removed.

Unreadable images: :class:`swav.datasets.ImageFolderDataset` hands out another (readable) image
for an unreadable file. Extraction detects that substitution and leaves the row out, so row i of
every array is always the image named in row i of ``index.csv``; the unreadable files are listed
in ``bad_images.txt`` and their source rows in ``meta.json`` (``unreadable_rows``).

Before anything in ``output_dir`` is written or removed, one image is read and passed through the
model, so a data set that cannot be read (or a model that cannot process it) leaves an earlier
extraction there untouched, even with ``overwrite=True``.
Legend: N images, C backbone feature dim, D embedding dim, K prototypes.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from swav.features import split_batch
from swav.model import SwAVModel
from swav.run_folder import RunLock

__all__ = [
    "BAD_IMAGES_FILE",
    "EXTRACT_WHATS",
    "DamagedExtractionError",
    "ExtractedData",
    "align_to_extraction",
    "check_output_dir",
    "dataset_paths",
    "extract_job",
    "extract_to_dir",
    "extraction_source_rows",
    "load_extracted",
    "open_source_dataset",
]

logger = logging.getLogger(__name__)

EXTRACT_WHATS = ("features", "embeddings", "both")
_MARKER = "progress.json"
#: 2: chunks hold only readable rows plus their source rows (``rows_*``) and the unreadable ones (``bad_*``)
_FORMAT_VERSION = 2
#: list of the files that could not be read (one path a line), written when there are any
BAD_IMAGES_FILE = "bad_images.txt"
#: files an extraction writes in its folder (``overwrite=True`` removes these and nothing else)
_OUTPUT_FILES = ("meta.json", "features.npy", "embeddings.npy", "labels.npy", "index.csv",
                 "extracted.safetensors", BAD_IMAGES_FILE)


class DamagedExtractionError(ValueError):
    """A finished extraction folder whose files are missing, truncated or inconsistent."""


@dataclass
class ExtractedData:
    """What :func:`load_extracted` reads back; arrays are memory-mapped (read-only)."""

    labels: np.ndarray
    paths: list[str]
    features: np.ndarray | None
    embeddings: np.ndarray | None
    prototypes: list[np.ndarray] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    #: row of the source data set of each extracted row (unreadable images are left out)
    source_rows: np.ndarray | None = None


def _names(what: str) -> tuple[str, ...]:
    if what not in EXTRACT_WHATS:
        raise ValueError(f"what must be one of {EXTRACT_WHATS}, got {what!r}")
    return ("features", "embeddings") if what == "both" else (what,)


def dataset_paths(dataset: Dataset, num_rows: int, source: str | None = None) -> list[str]:
    """File path of each row when the data set has them (``samples`` of (path, label) pairs, as
    :class:`swav.datasets.ImageFolderDataset`), else ``"<source>#<row>"``.

    Example:
        >>> dataset_paths([0, 1], 2, "fashion-mnist:test")
        ['fashion-mnist:test#0', 'fashion-mnist:test#1']
    """
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, (list, tuple)) and len(samples) >= num_rows and num_rows and \
            isinstance(samples[0], (list, tuple)) and isinstance(samples[0][0], (str, os.PathLike)):
        return [os.fspath(samples[i][0]) for i in range(num_rows)]
    source = source or type(dataset).__name__
    return [f"{source}#{i}" for i in range(num_rows)]


def _data_digest(dataset: Dataset, num_rows: int) -> str | None:
    """SHA-256 of what the first ``num_rows`` items of ``dataset`` are: an image folder's file names and labels
    (relative to its root, so that moving the whole folder keeps it; a file replaced in place under the same name
    is not noticed), in-memory data's bytes (IDX, CIFAR), shards' file names; None for other data sets."""
    digest = hashlib.sha256()
    samples = getattr(dataset, "samples", None)
    data = getattr(dataset, "data", None)
    urls = getattr(dataset, "urls", None)
    if isinstance(samples, list):
        root = os.fspath(getattr(dataset, "root", ""))
        prefix = os.path.join(root, "") if root else ""
        for path, label in samples[:num_rows]:
            name = path[len(prefix):] if prefix and path.startswith(prefix) else path
            digest.update(f"{name}\0{label}\n".encode("utf-8", "surrogateescape"))
    elif isinstance(data, torch.Tensor):
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data[:num_rows].contiguous().numpy().tobytes())
    elif isinstance(data, np.ndarray):
        digest.update(str(data.shape).encode())
        digest.update(np.ascontiguousarray(data[:num_rows]).tobytes())
    elif isinstance(urls, (list, tuple)):
        digest.update("\n".join(os.path.basename(os.fspath(u)) for u in urls).encode("utf-8", "surrogateescape"))
    else:
        return None
    return digest.hexdigest()


def _add_safetensors(out: Path) -> None:
    """``extracted.safetensors`` for a complete extraction made without it (meta.json then says so)."""
    from safetensors.numpy import save_file

    with open(out / "meta.json", encoding="utf-8") as fh:
        meta = json.load(fh)
    names = [n for n in ("features", "embeddings") if (out / f"{n}.npy").is_file()]
    tensors = {name: np.ascontiguousarray(np.load(out / f"{name}.npy")) for name in names}
    save_file({**tensors, "labels": np.load(out / "labels.npy")}, str(out / "extracted.safetensors"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "extracted.safetensors", 0o666 & ~umask)
    meta["safetensors"] = True
    _atomic_json(out / "meta.json", meta)
    logger.info("wrote %s (the extraction was complete without it)", out / "extracted.safetensors")


def _model_digest(model: torch.nn.Module) -> str:
    """sha256 of the state dict: a resumed run must use the very same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def check_output_dir(path: str | os.PathLike, option: str = "output_dir") -> Path:
    """``path`` as a :class:`~pathlib.Path` if it can be (or already is) a writable folder; ValueError naming
    ``option`` otherwise (:func:`swav.output_paths.check_output_folder`). Creates nothing."""
    from swav.output_paths import check_output_folder

    return check_output_folder(path, option)


class _SourceRows(Dataset):
    """Items ``start..stop-1`` of ``dataset`` as ``(row, readable, item)``.

    ``row`` is the source row the item was asked for; ``readable`` is False when the data set
    handed out another image because the file of ``row`` cannot be read (what
    :class:`swav.datasets.ImageFolderDataset` does, recording the file in ``tracker.bad``), so
    that the caller can leave the row out instead of storing another image's features under its
    name. The check runs in the process that loaded the item (data-loader workers included).
    Items read ahead (the validation probe) are kept in ``read`` and served from there, so every
    row is loaded once.
    """

    def __init__(self, dataset: Dataset, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop
        self.read: dict[int, tuple[bool, Any]] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> tuple[int, bool, Any]:
        row = self.start + j
        if row in self.read:
            readable, item = self.read.pop(row)
            return row, readable, item
        item = self.dataset[row]
        return row, _readable(self.dataset, row), item

    def read_ahead(self, j: int) -> tuple[int, bool, Any]:
        """Item ``j`` now; the next ``self[j]`` returns it without loading it again."""
        row, readable, item = self[j]
        self.read[row] = (readable, item)
        return row, readable, item


def _readable(dataset: Dataset, row: int) -> bool:
    """False when ``dataset`` recorded the file of ``row`` as unreadable (so item ``row`` is a stand-in)."""
    bad = getattr(getattr(dataset, "tracker", None), "bad", None)
    samples = getattr(dataset, "samples", None)
    if not bad or not isinstance(bad, Mapping) or not isinstance(samples, (list, tuple)):
        return True
    return samples[row][0] not in bad


def _forward(model: SwAVModel, images: torch.Tensor, names: tuple[str, ...], device: torch.device,
             amp_dtype: torch.dtype | None) -> dict[str, np.ndarray]:
    """Features / unit embeddings (float32 numpy) of a batch, in the model's current mode."""
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        features_BC = model.forward_features(images.to(device, non_blocking=True))
        outputs = {"features": features_BC}
        if "embeddings" in names:
            outputs["embeddings"] = F.normalize(model.projection_head(features_BC).float(), dim=1)
    return {name: outputs[name].float().cpu().numpy() for name in names}


def _probe(model: SwAVModel, rows: _SourceRows, names: tuple[str, ...], device: torch.device,
           amp_dtype: torch.dtype | None) -> None:
    """Read the first readable image of ``rows`` and pass it through the model; raise (touching
    no file) when the data cannot be read or the model cannot process it."""
    start, stop = rows.start, rows.stop
    for j in range(len(rows)):
        row, readable, item = rows.read_ahead(j)
        if readable:
            break
    else:
        raise ValueError(f"the data (--data) has no readable image in rows {start}..{stop - 1}; "
                         "run `swav scan` on it to see why")
    images, _ = split_batch(torch.utils.data.default_collate([item]))
    # a few more images: sizes that cannot be batched show now, not after an earlier extraction is cleared
    shapes = {tuple(images.shape[1:])}
    for k in range(j + 1, min(j + 16, len(rows))):
        _, readable, more = rows.read_ahead(k)
        if readable:
            shapes.add(tuple(split_batch(torch.utils.data.default_collate([more]))[0].shape[1:]))
    if len(shapes) > 1:
        raise ValueError(_sizes_message(shapes))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _forward(model, images, names, device, amp_dtype)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"the model cannot process the data set's images (row {row}: image of shape "
                         f"{tuple(images.shape[1:])}): {exc}") from exc
    finally:
        if was_training:
            model.train()


_LATER_KEYS = frozenset({"data_sha256", "transform", "amp"})  # fingerprint keys added after the first versions


def _read_marker(out: Path, fingerprint: dict[str, Any], chunk_rows: int) -> tuple[int, int, bool]:
    """Read the marker: ``(chunk_rows, completed_chunks, complete)``; refuse foreign work. Writes nothing."""
    marker_path = out / _MARKER
    if not marker_path.exists():
        return chunk_rows, 0, False
    fix = "pass --overwrite (Python: overwrite=True) to start the extraction again"
    try:
        with open(marker_path, encoding="utf-8") as fh:
            marker = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{marker_path} is damaged ({exc}); {fix}") from exc
    if not isinstance(marker, dict) or not {"chunk_rows", "completed_chunks"} <= set(marker):
        raise ValueError(f"{marker_path} is damaged (not a progress record); {fix}")
    saved = marker.get("fingerprint") if isinstance(marker.get("fingerprint"), dict) else {}
    # keys a marker of an earlier version lacks (the data digest, transform, precision) are not compared
    changed = sorted(k for k in set(fingerprint) | set(saved) if (k in saved or k not in _LATER_KEYS)
                     and fingerprint.get(k) != saved.get(k))
    if changed:
        if changed == ["format"]:
            raise ValueError(
                f"{str(out)!r} holds an extraction made by an earlier version of swav (format "
                f"{marker.get('fingerprint', {}).get('format')}, now {_FORMAT_VERSION}: unreadable images are now "
                "left out); extract again with --overwrite (Python: overwrite=True)")
        why = {"data_sha256": "the images (files added, removed or renamed since)", "transform": "the image "
               "transform (normalisation or sizes of another checkpoint file, or another torchvision version)", "amp": "the precision (--amp)",
               "model_sha256": "the model's weights"}
        raise ValueError(
            f"{str(out)!r} holds an extraction of a different job (differs in "
            f"{', '.join(why.get(k, k) for k in changed)}); its rows would not match this one's. Choose another "
            "--output-dir, or pass --overwrite (Python: overwrite=True) to start again")
    if marker["chunk_rows"] != chunk_rows:
        logger.info("resuming with the chunk size of the first run (%d rows)", marker["chunk_rows"])
    return int(marker["chunk_rows"]), int(marker["completed_chunks"]), bool(marker.get("complete"))


def _clear_outputs(out: Path) -> None:
    """Remove what an extraction wrote in ``out`` (meta.json first: the folder never looks finished)."""
    for name in (*_OUTPUT_FILES, *(p.name for p in out.glob("prototypes_head*.npy")),
                 *(p.name for p in out.glob("*.tmp.npy")), *(p.name for p in out.glob("*.json.tmp")), _MARKER):
        if (out / name).is_file():
            (out / name).unlink()
    shutil.rmtree(out / "chunks", ignore_errors=True)


def extract_to_dir(
    model: SwAVModel, dataset: Dataset, output_dir: str | os.PathLike, *, what: str = "both",
    batch_size: int = 256, chunk_rows: int | None = None, device: str | torch.device = "cpu",
    workers: int = 0, amp_dtype: torch.dtype | None = None, limit: int | None = None,
    write_safetensors: bool = False, source: str | None = None,
    metadata: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = True,
) -> Path:
    """Extract ``what`` (features | embeddings | both) for the first ``limit`` (default all)
    images of ``dataset`` into ``output_dir``; resumable (see the module doc). Returns the folder.

    ``dataset`` yields ``(image_tensor, label)`` (label -1 when unlabelled), already transformed
    for evaluation; ``model`` must already be on ``device``. It runs in eval mode (BatchNorm
    running statistics), without gradients, under autocast when ``amp_dtype`` is given.
    ``metadata`` (e.g. checkpoint and data spec) is stored in ``meta.json``. Unreadable images
    are left out (listed in ``bad_images.txt``); nothing in ``output_dir`` is touched before one
    image has been read and passed through the model.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> from torch.utils.data import TensorDataset
        >>> net = SwAVModel(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), 6, 8, 4, 5)
        >>> data = TensorDataset(torch.randn(10, 3, 2, 2), torch.arange(10) % 2)
        >>> folder = extract_to_dir(net, data, tempfile.mkdtemp(), batch_size=4, progress=False)
        >>> load_extracted(folder).embeddings.shape
        (10, 4)
    """
    names = _names(what)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all images), got {limit}")
    out = check_output_dir(output_dir)
    num_rows = len(dataset) if limit is None else min(limit, len(dataset))
    if num_rows == 0:
        raise ValueError("the data (--data) is empty; nothing to extract")
    device = torch.device(device)
    fingerprint = {"format": _FORMAT_VERSION, "num_rows": num_rows, "what": what,
                   "source": source or type(dataset).__name__, "model_sha256": _model_digest(model),
                   # what a resume must find unchanged besides: the images (their listing), how they are
                   # transformed (normalisation, sizes) and the precision
                   "data_sha256": _data_digest(dataset, num_rows),
                   "transform": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(getattr(dataset, "transform", None))),
                   "amp": str(amp_dtype) if amp_dtype is not None else None}
    if overwrite:
        chunk_rows, done, complete = chunk_rows or 16 * batch_size, 0, False
    else:  # read only: refuses another job's folder before anything is written
        chunk_rows, done, complete = _read_marker(out, fingerprint, chunk_rows or 16 * batch_size)
    num_chunks = -(-num_rows // chunk_rows)
    if complete:
        try:
            _check_complete(out)  # every file there and of the right shape, or it is written again
        except DamagedExtractionError as exc:
            logger.warning("%s held a complete extraction, but %s: extracting it again", out,
                           str(exc).split("; re-run", 1)[0])
            chunk_rows, done, complete, overwrite = chunk_rows or 16 * batch_size, 0, False, True
        else:
            if write_safetensors and not (out / "extracted.safetensors").is_file():
                with RunLock(out, activity="extracting"):
                    _add_safetensors(out)
            logger.info("%s already holds the complete extraction; nothing to do", out)
            return out
    rows = _SourceRows(dataset, min(done * chunk_rows, num_rows), num_rows)
    if done < num_chunks and (overwrite or done == 0):
        # validate first: a data set or model that cannot work must not cost an earlier extraction (a resume
        # of this same job has proven both already, and may have no rows left: stopped while assembling)
        _probe(model, rows, names, device, amp_dtype)
    with RunLock(out, activity="extracting"):  # one process writes the folder at a time
        if not overwrite:  # read again under the lock: another process may have written chunks meanwhile
            chunk_rows, done, complete = _read_marker(out, fingerprint, chunk_rows)
            if complete:
                logger.info("%s received the complete extraction from another process meanwhile", out)
                return out
            rows = _SourceRows(dataset, min(done * chunk_rows, num_rows), num_rows)
            num_chunks = -(-num_rows // chunk_rows)
        _write_extraction(out, model, dataset, rows, names, fingerprint, chunk_rows, done, num_chunks, num_rows,
                          overwrite=overwrite, batch_size=batch_size, device=device, workers=workers,
                          amp_dtype=amp_dtype, progress=progress, source=source, metadata=metadata,
                          write_safetensors=write_safetensors)
    return out


def _write_extraction(out: Path, model: SwAVModel, dataset: Dataset, rows: _SourceRows, names: tuple[str, ...],
                      fingerprint: dict[str, Any], chunk_rows: int, done: int, num_chunks: int, num_rows: int, *,
                      overwrite: bool, batch_size: int, device: torch.device, workers: int,
                      amp_dtype: torch.dtype | None, progress: bool, source: str | None,
                      metadata: dict[str, Any] | None, write_safetensors: bool) -> None:
    if overwrite and out.is_dir():
        _clear_outputs(out)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    marker = {"fingerprint": fingerprint, "chunk_rows": chunk_rows, "num_chunks": num_chunks,
              "completed_chunks": done, "complete": False}
    _atomic_json(out / _MARKER, marker)
    if done < num_chunks:
        logger.info("extracting rows %d..%d of %d (%d-row chunks)", done * chunk_rows, num_rows, num_rows, chunk_rows)
        _run_chunks(model, rows, out, names, marker,
                    batch_size=batch_size, device=device, workers=workers,
                    amp_dtype=amp_dtype, progress=progress)
    _assemble(out, model, dataset, names, marker, num_rows, source, metadata or {}, write_safetensors)


def _sizes_message(shapes: set[tuple[int, ...]]) -> str:
    shown = ", ".join("x".join(str(n) for n in shape[-2:]) for shape in sorted(shapes)[:4])
    return (f"the images come out of the model's test transform in different sizes ({shown}), so they cannot be "
            "batched: it takes small images whole, at the pretraining's crop size when the model file stores one, "
            "and this one stores none. Use the run's model.pt or training checkpoint (they store it), or resize "
            "the images to one size first")


def _collate(items: list[Any]) -> Any:
    """``default_collate``, with images of different sizes named in a :class:`ValueError`."""
    try:
        return torch.utils.data.default_collate(items)
    except RuntimeError as exc:
        if "stack expects each tensor to be equal size" not in str(exc):
            raise
        raise ValueError(_sizes_message({tuple(split_batch(torch.utils.data.default_collate([item]))[0].shape[1:])
                                         for item in items})) from None


def _run_chunks(model: SwAVModel, rows: _SourceRows, out: Path, names: tuple[str, ...],
                marker: dict[str, Any], *, batch_size: int, device: torch.device, workers: int,
                amp_dtype: torch.dtype | None, progress: bool) -> None:
    from swav.metrics import progress_bar

    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", collate_fn=_collate)
    chunk_rows = marker["chunk_rows"]
    # names and "labels": readable rows only; "rows"/"readable": every source row, in order
    buffers: dict[str, list[np.ndarray]] = {name: [] for name in (*names, "labels", "rows", "readable")}
    buffered = 0  # source rows buffered, readable or not: chunk i always covers the same source rows
    was_training = model.training
    model.eval()
    try:
        with progress_bar(total=rows.stop, initial=rows.start, unit="img", desc="extract",
                          enabled=progress) as bar, torch.no_grad():
            for source_rows, readable, batch in loader:
                images, labels = split_batch(batch)
                keep = readable.to(torch.bool)
                if bool(keep.any()):
                    for name, array in _forward(model, images[keep], names, device, amp_dtype).items():
                        buffers[name].append(array)
                    buffers["labels"].append(labels[keep].to(torch.int64).numpy())
                buffers["rows"].append(source_rows.to(torch.int64).numpy())
                buffers["readable"].append(keep.numpy())
                buffered += images.shape[0]
                bar.update(images.shape[0])
                while buffered >= chunk_rows:
                    buffered = _flush(out, buffers, marker, chunk_rows)
        if buffered:
            _flush(out, buffers, marker, buffered)
    finally:
        if was_training:
            model.train()


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _flush(out: Path, buffers: dict[str, list[np.ndarray]], marker: dict[str, Any], rows: int) -> int:
    """Write the first ``rows`` buffered source rows as the next chunk (their readable rows, the
    source row of each, and the unreadable source rows), then advance the marker."""
    index = marker["completed_chunks"]
    source, readable = _concat(buffers["rows"]), _concat(buffers["readable"]).astype(bool)
    kept = int(readable[:rows].sum())
    for name in buffers.keys() - {"rows", "readable"}:
        array = _concat(buffers[name])
        _save_npy(out / "chunks" / f"{name}_{index:06d}.npy", array[:kept])
        buffers[name] = [array[kept:]] if len(array) > kept else []
    _save_npy(out / "chunks" / f"rows_{index:06d}.npy", source[:rows][readable[:rows]])
    _save_npy(out / "chunks" / f"bad_{index:06d}.npy", source[:rows][~readable[:rows]])
    buffers["rows"], buffers["readable"] = [source[rows:]], [readable[rows:]]
    marker["completed_chunks"] = index + 1
    _atomic_json(out / _MARKER, marker)  # only now is the chunk counted as done
    return len(source) - rows


def _assemble(out: Path, model: SwAVModel, dataset: Dataset, names: tuple[str, ...],
              marker: dict[str, Any], num_rows: int, source: str | None,
              metadata: dict[str, Any], write_safetensors: bool) -> None:
    """Concatenate the chunks into the final files (memory-mapped: no full copy in memory)."""
    num_chunks = marker["num_chunks"]

    def parts(name: str, mmap: bool = False) -> list[np.ndarray]:
        return [np.load(out / "chunks" / f"{name}_{i:06d}.npy", mmap_mode="r" if mmap else None)
                for i in range(num_chunks)]

    kept_rows, bad_rows = np.concatenate(parts("rows")), np.concatenate(parts("bad"))
    labels = np.concatenate(parts("labels")).astype(np.int64)
    if len(kept_rows) + len(bad_rows) != num_rows or len(labels) != len(kept_rows):
        raise RuntimeError(f"{out}: chunks hold {len(kept_rows) + len(bad_rows)} rows, expected {num_rows}; "
                           "extract again with --overwrite (Python: overwrite=True)")
    if len(kept_rows) == 0:
        raise ValueError(f"none of the {num_rows} images of the data (--data) could be read; nothing extracted; "
                         "run `swav scan` on it to see why")
    num_kept = len(kept_rows)
    dims: dict[str, int] = {}
    for name in names:
        chunks = [part for part in parts(name, mmap=True) if len(part)]
        dims[name] = int(chunks[0].shape[1])
        target = np.lib.format.open_memmap(out / f"{name}.tmp.npy", mode="w+", dtype=np.float32,
                                           shape=(num_kept, dims[name]))
        row = 0
        for part in chunks:
            target[row: row + len(part)] = part
            row += len(part)
        target.flush()
        del target
        os.replace(out / f"{name}.tmp.npy", out / f"{name}.npy")
    _save_npy(out / "labels.npy", labels)
    all_paths = dataset_paths(dataset, num_rows, source)
    with open(out / "index.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "path", "label"])
        writer.writerows(zip(range(num_kept), (all_paths[r] for r in kept_rows.tolist()), labels.tolist()))
    if len(bad_rows):
        with open(out / BAD_IMAGES_FILE, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.writelines(all_paths[r].replace("\n", "\\n") + "\n" for r in bad_rows.tolist())
        logger.info("%d unreadable images not extracted, listed in %s", len(bad_rows), out / BAD_IMAGES_FILE)
    elif (out / BAD_IMAGES_FILE).exists():
        (out / BAD_IMAGES_FILE).unlink()
    prototype_files = []
    if "embeddings" in names:
        for h, weight in enumerate(model.prototypes.weights()):
            prototype_files.append(f"prototypes_head{h}.npy")
            _save_npy(out / prototype_files[-1], F.normalize(weight.detach().float().cpu(), dim=1).numpy())
    if write_safetensors:
        from safetensors.numpy import save_file

        tensors = {name: np.ascontiguousarray(np.load(out / f"{name}.npy")) for name in names}
        save_file({**tensors, "labels": labels}, str(out / "extracted.safetensors"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out / "extracted.safetensors", 0o666 & ~umask)  # as the other files (safetensors writes 0600)
    meta = {"num_rows": num_kept, "num_source_rows": num_rows, "what": marker["fingerprint"]["what"],
            "dims": dims, "source": marker["fingerprint"]["source"], "prototype_files": prototype_files,
            "safetensors": write_safetensors, "unreadable_rows": bad_rows.tolist(),
            "unreadable_list": BAD_IMAGES_FILE if len(bad_rows) else None, **metadata}
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
        meta.setdefault("classes", list(classes))
    _atomic_json(out / "meta.json", meta)
    marker["complete"] = True
    _atomic_json(out / _MARKER, marker)
    shutil.rmtree(out / "chunks", ignore_errors=True)
    logger.info("wrote %s for %d images to %s", ", ".join(names), num_kept, out)


def extraction_source_rows(meta: Mapping[str, Any]) -> np.ndarray | None:
    """Source row of each extracted row (unreadable images left out), or None when row i of the
    extraction is item i of its data set.

    Example:
        >>> extraction_source_rows({"num_rows": 3, "num_source_rows": 5, "unreadable_rows": [1, 3]}).tolist()
        [0, 2, 4]
    """
    bad = meta.get("unreadable_rows") or []
    if not bad:
        return None
    total = int(meta.get("num_source_rows", int(meta.get("num_rows", 0)) + len(bad)))
    return np.setdiff1d(np.arange(total, dtype=np.int64), np.asarray(bad, dtype=np.int64))


def align_to_extraction(dataset: Dataset, meta: Mapping[str, Any]) -> Dataset:
    """``dataset`` (the one extracted from) seen row for row like the extraction: item i is the
    image of extracted row i, i.e. the rows of unreadable images are left out as there.

    Example:
        >>> list(align_to_extraction(["a", "b", "c"], {"num_rows": 2, "unreadable_rows": [1]}))
        ['a', 'c']
    """
    rows = extraction_source_rows(meta)
    return dataset if rows is None else Subset(dataset, rows.tolist())


def _fix_command(out: Path, meta: Mapping[str, Any] | None) -> str:
    """The ``swav extract ... --overwrite`` command that rewrites the extraction in ``out``."""
    meta = meta if isinstance(meta, Mapping) else {}
    if not (meta.get("checkpoint") and meta.get("data")):
        return f"swav extract ... --output-dir {shlex.quote(os.fspath(out))} --overwrite"
    words = ["swav", "extract", "--checkpoint", str(meta["checkpoint"]), "--data", str(meta["data"])]
    if meta.get("split") and meta["split"] != "train":
        words += ["--split", str(meta["split"])]
    if meta.get("what") in EXTRACT_WHATS and meta["what"] != "both":
        words += ["--what", meta["what"]]
    if meta.get("limit"):
        words += ["--limit", str(meta["limit"])]
    if meta.get("safetensors"):
        words += ["--safetensors"]
    words += ["--output-dir", os.fspath(out), "--overwrite"]
    return " ".join(shlex.quote(w) for w in words)


def _check_complete(out: Path) -> None:
    """:func:`load_extracted`'s checks, plus the optional ``extracted.safetensors`` read whole."""
    data = load_extracted(out)
    if data.meta.get("safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            load_file(str(out / "extracted.safetensors"))
        except (OSError, SafetensorError, ValueError) as exc:
            raise _damaged(out, "extracted.safetensors", f"unreadable: {exc}", data.meta) from exc


def _damaged(out: Path, name: str, detail: str, meta: Mapping[str, Any] | None) -> DamagedExtractionError:
    detail = " ".join(str(detail).split())  # one line
    return DamagedExtractionError(f"extraction file {out / name} is damaged ({detail}); "
                                  f"re-run `{_fix_command(out, meta)}` to write it again")


def _load_array(out: Path, name: str, meta: Mapping[str, Any] | None, *, mmap: bool, ndim: int,
                rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """One ``.npy`` file of the extraction, checked; a clear error naming it if it is damaged."""
    path = out / name
    if not path.is_file():
        raise _damaged(out, name, "missing", meta)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _damaged(out, name, f"unreadable: {exc}", meta) from exc
    if array.ndim != ndim:
        raise _damaged(out, name, f"has shape {array.shape}, expected {ndim} dimensions", meta)
    if rows is not None and array.shape[0] != rows:
        raise _damaged(out, name, f"has {array.shape[0]} rows, meta.json says {rows}", meta)
    if cols is not None and array.shape[1] != cols:
        raise _damaged(out, name, f"has {array.shape[1]} columns, expected {cols}", meta)
    return array


def load_extracted(path: str | os.PathLike) -> ExtractedData:
    """Read a finished extraction folder back (arrays memory-mapped, read-only).

    A missing, truncated or inconsistent file raises :class:`DamagedExtractionError` (a
    ``ValueError``) naming the file and the command that writes the extraction again.

    Example:
        >>> data = load_extracted("feats/")  # doctest: +SKIP
        >>> data.embeddings.shape, len(data.paths), data.prototypes[0].shape  # doctest: +SKIP
        ((2000, 128), 2000, (3000, 128))
    """
    out = Path(path)
    if not out.exists():
        raise FileNotFoundError(f"{out}: no such folder; expected a `swav extract` output folder")
    if not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a `swav extract` output folder")
    if not (out / "meta.json").is_file():
        if not (out / _MARKER).exists():
            raise FileNotFoundError(f"{out}: no meta.json; the folder is not an extraction")
        try:
            complete = json.loads((out / _MARKER).read_text(encoding="utf-8")).get("complete")
        except (ValueError, UnicodeDecodeError, AttributeError):
            complete = False
        if complete:
            raise _damaged(out, "meta.json", "missing", None)
        raise FileNotFoundError(f"{out}: no meta.json; the folder is unfinished (run the extraction again to resume it)")
    try:
        with open(out / "meta.json", encoding="utf-8") as fh:
            meta = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _damaged(out, "meta.json", f"not valid JSON: {exc}", None) from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("num_rows"), int):
        raise _damaged(out, "meta.json", "no num_rows", meta if isinstance(meta, dict) else None)
    num_rows = meta["num_rows"]
    if not (out / "index.csv").is_file():
        raise _damaged(out, "index.csv", "missing", meta)
    try:
        with open(out / "index.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            paths = [row["path"] for row in csv.DictReader(fh)]
    except (KeyError, ValueError, csv.Error) as exc:
        raise _damaged(out, "index.csv", f"not valid: {exc}", meta) from exc
    if len(paths) != num_rows or any(p is None for p in paths):
        raise _damaged(out, "index.csv", f"has {len(paths)} rows, meta.json says {num_rows}", meta)
    labels = _load_array(out, "labels.npy", meta, mmap=False, ndim=1, rows=num_rows)
    try:
        source_rows = extraction_source_rows(meta)
    except (ValueError, TypeError) as exc:
        raise _damaged(out, "meta.json", f"not valid unreadable_rows: {exc}", meta) from exc
    source_rows = np.arange(num_rows, dtype=np.int64) if source_rows is None else source_rows
    if len(source_rows) != num_rows:
        raise _damaged(out, "meta.json", f"lists {len(source_rows)} readable source rows for {num_rows} rows", meta)
    expected = _names(meta["what"]) if meta.get("what") in EXTRACT_WHATS else \
        tuple(n for n in ("features", "embeddings") if (out / f"{n}.npy").exists())
    dims = meta.get("dims") if isinstance(meta.get("dims"), dict) else {}
    arrays = {name: _load_array(out, f"{name}.npy", meta, mmap=True, ndim=2, rows=num_rows, cols=dims.get(name))
              for name in expected}
    embeddings = arrays.get("embeddings")
    prototypes = [_load_array(out, f, meta, mmap=False, ndim=2,
                              cols=embeddings.shape[1] if embeddings is not None else None)
                  for f in meta.get("prototype_files", [])]
    return ExtractedData(labels=labels, paths=paths, features=arrays.get("features"), embeddings=embeddings,
                         prototypes=prototypes, meta=meta, source_rows=source_rows)


def extract_job(
    checkpoint: str | os.PathLike, data: str | os.PathLike, output_dir: str | os.PathLike, *,
    split: str = "train", what: str = "both", batch_size: int = 256, device: str | torch.device = "auto",
    workers: int = 0, amp_dtype: torch.dtype | None = None, limit: int | None = None,
    chunk_rows: int | None = None, write_safetensors: bool = False, overwrite: bool = False,
    strict: bool = True, progress: bool = True, check_model: Callable[[SwAVModel], None] | None = None,
    bit_depth: int | None = None, max_bad_fraction: float | None = None,
) -> Path:
    """What ``swav extract`` does: load any file :func:`swav.load_pretrained` reads, build the
    data set (``--data`` forms of :func:`swav.datasets.build_dataset`) with the evaluation
    transform of the model's spec (SPEC §11 test transform, normalised and sized as the checkpoint's
    pretraining config says: :func:`swav.eval.transforms.transforms_for_checkpoint`), and run
    :func:`extract_to_dir`.

    Example:
        >>> extract_job("run/checkpoint.pt", "fashion-mnist", "feats/", split="test")  # doctest: +SKIP
    """
    from swav.datasets import build_dataset
    from swav.eval.transforms import pretraining_bit_depth, pretraining_max_bad_fraction, transforms_for_checkpoint
    from swav.pretrained import load_pretrained

    check_output_dir(output_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_pretrained(checkpoint, strict=strict).to(device)
    if check_model is not None:  # the caller's own refusal (e.g. swav cluster: untrained prototypes), before any work
        check_model(model)
    spec = model.spec
    # normalised and sized as in pretraining (its stored config), like the evaluation commands
    _, test_transform = transforms_for_checkpoint(checkpoint, spec)
    bit_depth = pretraining_bit_depth(checkpoint, bit_depth)  # 16-bit files read as in pretraining
    # absolute where it is a path (meta.json and index.csv), so that `swav report` run from another folder
    # finds the images again
    expanded = os.path.expanduser(os.fspath(data))
    where = os.path.abspath(expanded) if os.path.exists(expanded) else os.fspath(data)
    dataset = build_dataset(where, split=split, transform=test_transform, channels=spec.in_channels,
                            bit_depth=bit_depth,
                            max_bad_fraction=pretraining_max_bad_fraction(checkpoint, max_bad_fraction))
    metadata = {"checkpoint": os.path.abspath(os.path.expanduser(os.fspath(checkpoint))), "data": where, "split": split,
                "channels": spec.in_channels, "bit_depth": bit_depth, "model_spec": spec.to_dict(), "limit": limit,
                # model tensors that were not in the checkpoint (--partial), initialised at random
                "freshly_initialised": list(getattr(model, "freshly_initialised", []))}
    return extract_to_dir(model, dataset, output_dir, what=what, batch_size=batch_size, chunk_rows=chunk_rows,
                          device=device, workers=workers, amp_dtype=amp_dtype, limit=limit,
                          write_safetensors=write_safetensors,
                          source=f"{os.fspath(data)}:{split}" + (f":bit_depth={bit_depth}" if bit_depth else ""),
                          metadata=metadata, overwrite=overwrite, progress=progress)


def open_source_dataset(meta: dict[str, Any]) -> Dataset | None:
    """The extraction's data set rebuilt without a transform (PIL images, row i of the extraction
    = item i, unreadable images left out as in the extraction: :func:`align_to_extraction`), from
    the ``data``/``split``/``channels`` that :func:`extract_job` stored; None if not recorded.

    Example:
        >>> open_source_dataset({"num_rows": 3}) is None
        True
    """
    if not meta.get("data"):
        return None
    from swav.datasets import build_dataset

    dataset = build_dataset(meta["data"], split=meta.get("split", "train"), channels=meta.get("channels"),
                            bit_depth=meta.get("bit_depth"))
    return align_to_extraction(dataset, meta)

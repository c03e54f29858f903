"""Resumable extraction of features and embeddings for a whole data set (issue 7, SPEC §2).

For every image it stores the pooled backbone feature h (``features``, N x C) and/or the unit
projection z = g(h) / ||g(h)|| (``embeddings``, N x D), the label and the path, plus the unit
prototypes of every head, so that clustering (``swav.cluster``) needs no model afterwards.

Work is written in chunks of rows (``chunks/<name>_<i>.npy``) and a marker ``progress.json``
is replaced atomically after each complete chunk; a re-run with the same model, data and
options continues after the last complete chunk. At the end the chunks are assembled into
``features.npy`` / ``embeddings.npy`` / ``labels.npy`` / ``index.csv`` (row, path, label)
(optionally one ``extracted.safetensors``) and removed.
Legend: N images, C backbone feature dim, D embedding dim, K prototypes.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
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

__all__ = [
    "EXTRACT_WHATS",
    "ExtractedData",
    "dataset_paths",
    "extract_job",
    "extract_to_dir",
    "load_extracted",
    "open_source_dataset",
]

logger = logging.getLogger(__name__)

EXTRACT_WHATS = ("features", "embeddings", "both")
_MARKER = "progress.json"
_FORMAT_VERSION = 1


@dataclass
class ExtractedData:
    """What :func:`load_extracted` reads back; arrays are memory-mapped (read-only)."""

    labels: np.ndarray
    paths: list[str]
    features: np.ndarray | None
    embeddings: np.ndarray | None
    prototypes: list[np.ndarray] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


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


def _start_chunk(out: Path, fingerprint: dict[str, Any], chunk_rows: int, overwrite: bool) -> tuple[int, int, bool]:
    """Read the marker: ``(chunk_rows, completed_chunks, complete)``; refuse foreign work."""
    marker_path = out / _MARKER
    if overwrite and marker_path.exists():
        shutil.rmtree(out / "chunks", ignore_errors=True)
        marker_path.unlink()
    if not marker_path.exists():
        return chunk_rows, 0, False
    with open(marker_path, encoding="utf-8") as fh:
        marker = json.load(fh)
    if marker.get("fingerprint") != fingerprint:
        changed = sorted(k for k in set(fingerprint) | set(marker.get("fingerprint", {}))
                         if fingerprint.get(k) != marker.get("fingerprint", {}).get(k))
        raise ValueError(
            f"output_dir {out} holds an extraction of a different job (differs in {changed}); "
            "use another output directory or overwrite=True (--overwrite) to start again")
    if marker["chunk_rows"] != chunk_rows:
        logger.info("resuming with the chunk size of the first run (%d rows)", marker["chunk_rows"])
    return int(marker["chunk_rows"]), int(marker["completed_chunks"]), bool(marker.get("complete"))


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
    ``metadata`` (e.g. checkpoint and data spec) is stored in ``meta.json``.

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
    num_rows = len(dataset) if limit is None else min(limit, len(dataset))
    if num_rows == 0:
        raise ValueError("dataset: is empty; nothing to extract")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {"format": _FORMAT_VERSION, "num_rows": num_rows, "what": what,
                   "source": source or type(dataset).__name__, "model_sha256": _model_digest(model)}
    chunk_rows, done, complete = _start_chunk(out, fingerprint, chunk_rows or 16 * batch_size, overwrite)
    num_chunks = -(-num_rows // chunk_rows)
    if complete and (out / "meta.json").exists():
        logger.info("%s already holds the complete extraction; nothing to do", out)
        return out
    (out / "chunks").mkdir(exist_ok=True)
    marker = {"fingerprint": fingerprint, "chunk_rows": chunk_rows, "num_chunks": num_chunks,
              "completed_chunks": done, "complete": False}
    _atomic_json(out / _MARKER, marker)
    if done < num_chunks:
        logger.info("extracting rows %d..%d of %d (%d-row chunks)", done * chunk_rows, num_rows, num_rows, chunk_rows)
        _run_chunks(model, Subset(dataset, range(done * chunk_rows, num_rows)), out, names, marker,
                    batch_size=batch_size, device=torch.device(device), workers=workers,
                    amp_dtype=amp_dtype, progress=progress)
    _assemble(out, model, dataset, names, marker, num_rows, source, metadata or {}, write_safetensors)
    return out


def _run_chunks(model: SwAVModel, subset: Subset, out: Path, names: tuple[str, ...],
                marker: dict[str, Any], *, batch_size: int, device: torch.device, workers: int,
                amp_dtype: torch.dtype | None, progress: bool) -> None:
    from tqdm.auto import tqdm

    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    chunk_rows = marker["chunk_rows"]
    buffers: dict[str, list[np.ndarray]] = {name: [] for name in (*names, "labels")}
    buffered = 0
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=subset.indices[-1] + 1, initial=subset.indices[0],
                  unit="img", desc="extract", disable=not progress) as bar, torch.no_grad():
            for batch in loader:
                images, labels = split_batch(batch)
                with autocast:
                    features_BC = model.forward_features(images.to(device, non_blocking=True))
                    outputs = {"features": features_BC}
                    if "embeddings" in names:
                        outputs["embeddings"] = F.normalize(model.projection_head(features_BC).float(), dim=1)
                for name in names:
                    buffers[name].append(outputs[name].float().cpu().numpy())
                buffers["labels"].append(labels.to(torch.int64).numpy())
                buffered += images.shape[0]
                bar.update(images.shape[0])
                while buffered >= chunk_rows:
                    buffered = _flush(out, buffers, marker, chunk_rows)
        if buffered:
            _flush(out, buffers, marker, buffered)
    finally:
        if was_training:
            model.train()


def _flush(out: Path, buffers: dict[str, list[np.ndarray]], marker: dict[str, Any], rows: int) -> int:
    """Write the first ``rows`` buffered rows as the next chunk, then advance the marker."""
    index = marker["completed_chunks"]
    for name, parts in buffers.items():
        array = np.concatenate(parts)
        _save_npy(out / "chunks" / f"{name}_{index:06d}.npy", array[:rows])
        buffers[name] = [array[rows:]] if len(array) > rows else []
    marker["completed_chunks"] = index + 1
    _atomic_json(out / _MARKER, marker)  # only now is the chunk counted as done
    return sum(len(p) for p in buffers["labels"])


def _assemble(out: Path, model: SwAVModel, dataset: Dataset, names: tuple[str, ...],
              marker: dict[str, Any], num_rows: int, source: str | None,
              metadata: dict[str, Any], write_safetensors: bool) -> None:
    """Concatenate the chunks into the final files (memory-mapped: no full copy in memory)."""
    chunks = [out / "chunks" / f"labels_{i:06d}.npy" for i in range(marker["num_chunks"])]
    labels = np.concatenate([np.load(p) for p in chunks])
    if len(labels) != num_rows:
        raise RuntimeError(f"{out}: chunks hold {len(labels)} rows, expected {num_rows}; rerun with overwrite=True")
    dims: dict[str, int] = {}
    for name in names:
        first = np.load(out / "chunks" / f"{name}_000000.npy", mmap_mode="r")
        dims[name] = int(first.shape[1])
        target = np.lib.format.open_memmap(out / f"{name}.tmp.npy", mode="w+", dtype=np.float32,
                                           shape=(num_rows, dims[name]))
        row = 0
        for i in range(marker["num_chunks"]):
            part = np.load(out / "chunks" / f"{name}_{i:06d}.npy", mmap_mode="r")
            target[row: row + len(part)] = part
            row += len(part)
        target.flush()
        del target
        os.replace(out / f"{name}.tmp.npy", out / f"{name}.npy")
    _save_npy(out / "labels.npy", labels)
    paths = dataset_paths(dataset, num_rows, source)
    with open(out / "index.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "path", "label"])
        writer.writerows(zip(range(num_rows), paths, labels.tolist()))
    prototype_files = []
    if "embeddings" in names:
        for h, weight in enumerate(model.prototypes.weights()):
            prototype_files.append(f"prototypes_head{h}.npy")
            _save_npy(out / prototype_files[-1], F.normalize(weight.detach().float().cpu(), dim=1).numpy())
    if write_safetensors:
        from safetensors.numpy import save_file

        tensors = {name: np.ascontiguousarray(np.load(out / f"{name}.npy")) for name in names}
        save_file({**tensors, "labels": labels}, str(out / "extracted.safetensors"))
    meta = {"num_rows": num_rows, "what": marker["fingerprint"]["what"], "dims": dims,
            "source": marker["fingerprint"]["source"], "prototype_files": prototype_files,
            "safetensors": write_safetensors, **metadata}
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
        meta.setdefault("classes", list(classes))
    _atomic_json(out / "meta.json", meta)
    marker["complete"] = True
    _atomic_json(out / _MARKER, marker)
    shutil.rmtree(out / "chunks", ignore_errors=True)
    logger.info("wrote %s for %d images to %s", ", ".join(names), num_rows, out)


def load_extracted(path: str | os.PathLike) -> ExtractedData:
    """Read a finished extraction folder back (arrays memory-mapped, read-only).

    Example:
        >>> data = load_extracted("feats/")  # doctest: +SKIP
        >>> data.embeddings.shape, len(data.paths), data.prototypes[0].shape  # doctest: +SKIP
        ((2000, 128), 2000, (3000, 128))
    """
    out = Path(path)
    if not (out / "meta.json").is_file():
        state = "unfinished (run the extraction again to resume it)" if (out / _MARKER).exists() else "not an extraction"
        raise FileNotFoundError(f"{out}: no meta.json; the folder is {state}")
    with open(out / "meta.json", encoding="utf-8") as fh:
        meta = json.load(fh)
    with open(out / "index.csv", newline="", encoding="utf-8") as fh:
        paths = [row["path"] for row in csv.DictReader(fh)]

    def array(name: str) -> np.ndarray | None:
        return np.load(out / f"{name}.npy", mmap_mode="r") if (out / f"{name}.npy").exists() else None

    return ExtractedData(labels=np.load(out / "labels.npy"), paths=paths, features=array("features"),
                         embeddings=array("embeddings"),
                         prototypes=[np.load(out / f) for f in meta.get("prototype_files", [])], meta=meta)


def extract_job(
    checkpoint: str | os.PathLike, data: str | os.PathLike, output_dir: str | os.PathLike, *,
    split: str = "train", what: str = "both", batch_size: int = 256, device: str | torch.device = "auto",
    workers: int = 0, amp_dtype: torch.dtype | None = None, limit: int | None = None,
    chunk_rows: int | None = None, write_safetensors: bool = False, overwrite: bool = False,
    strict: bool = True, progress: bool = True,
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
    from swav.eval.transforms import transforms_for_checkpoint
    from swav.pretrained import load_pretrained

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_pretrained(checkpoint, strict=strict).to(device)
    spec = model.spec
    # normalised and sized as in pretraining (its stored config), like the evaluation commands
    _, test_transform = transforms_for_checkpoint(checkpoint, spec)
    dataset = build_dataset(data, split=split, transform=test_transform, channels=spec.in_channels)
    metadata = {"checkpoint": str(checkpoint), "data": os.fspath(data), "split": split,
                "channels": spec.in_channels, "model_spec": spec.to_dict(), "limit": limit}
    return extract_to_dir(model, dataset, output_dir, what=what, batch_size=batch_size, chunk_rows=chunk_rows,
                          device=device, workers=workers, amp_dtype=amp_dtype, limit=limit,
                          write_safetensors=write_safetensors, source=f"{os.fspath(data)}:{split}",
                          metadata=metadata, overwrite=overwrite, progress=progress)


def open_source_dataset(meta: dict[str, Any]) -> Dataset | None:
    """The extraction's data set rebuilt without a transform (PIL images, row i = item i), from
    the ``data``/``split``/``channels`` that :func:`extract_job` stored; None if not recorded.

    Example:
        >>> open_source_dataset({"num_rows": 3}) is None
        True
    """
    if not meta.get("data"):
        return None
    from swav.datasets import build_dataset

    return build_dataset(meta["data"], split=meta.get("split", "train"), channels=meta.get("channels"))

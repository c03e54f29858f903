"""Training checkpoints: atomic files, newest-valid selection, RNG state, resume checks (DESIGN, issue 8).

Layout of a run folder's ``checkpoints/``: ``step_XXXXXXXX.pt`` (global step, 8 digits; the newest
``run.keep_checkpoints`` are kept), ``epoch_XXXX.pt`` every ``run.keep_every_epochs`` epochs (never
pruned) and ``final.pt`` at the end, written last: it marks the run complete (the model alone goes to
``<run>/model.pt`` just before). Every file is written to a hidden temporary file in the same folder,
flushed, fsync'ed and renamed over the target (``os.replace``), so a crash never leaves a half-written
file under a real name; leftovers of interrupted writes are removed at the next start.

A checkpoint holds only tensors and plain containers, so it loads with ``torch.load(...,
weights_only=True)`` (see :data:`CHECKPOINT_KEYS`). Loading is done on the CPU. ``torch.load`` does not
check the CRC-32 that ``torch.save`` stores for every record, so a flipped bit in a tensor would load
silently; :func:`load_checkpoint` verifies every record's CRC first. A damaged newest file (zero bytes,
truncated, bad CRC, not a checkpoint) is reported by name and the previous one is used.

Test hook (fault injection, docs/reliability.md): when the environment variable
``SWAV_TEST_PAUSE_SAVE`` is ``NAME:during[:SECONDS]``, writing the checkpoint file called ``NAME``
pauses after its first few KiB reached the temporary file (a test then ``kill -9``s the process in
the middle of a write); ``NAME:after[:SECONDS]`` pauses right after ``NAME`` was renamed into place.
The pause lasts ``SECONDS`` (default 60), then the write goes on normally. Never set it outside tests.

Example:
    >>> import tempfile, torch
    >>> run = tempfile.mkdtemp()
    >>> path = save_checkpoint({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 7,
    ...                         "model": {"w": torch.ones(2)}}, step_checkpoint_path(run, 7))
    >>> found = find_latest_checkpoint(run)
    >>> found[0].name, found[1]["step"]
    ('step_00000007.pt', 7)
"""
from __future__ import annotations

import logging
import os
import random
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swav.safe_load import CorruptCheckpointError, UnsafeCheckpointError, safe_torch_load

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "MODEL_FORMAT", "CHECKPOINT_KEYS", "PAUSE_HOOK_ENV", "CheckpointError",
    "CheckpointSaveError", "capture_rng_state", "restore_rng_state", "save_checkpoint", "checkpoint_dir",
    "renumber_after_resplit",
    "verify_record_checksums", "step_checkpoint_path", "final_checkpoint_path", "list_checkpoints",
    "clean_temp_files", "load_checkpoint", "find_latest_checkpoint", "archive_checkpoint", "prune_checkpoints",
    "save_model_file", "load_model",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "swav-training-checkpoint"
CHECKPOINT_VERSION = 1
MODEL_FORMAT = "swav-model"
#: keys of a training checkpoint (see the README's "Checkpoints & resume")
CHECKPOINT_KEYS = ("format", "version", "model", "model_spec", "optimizer", "scaler", "queues", "rng",
                   "epoch", "batch_in_epoch", "step", "world_size", "finished", "config", "derived",
                   "torch_version")
_STEP_RE = re.compile(r"^step_(\d{8,})\.pt$")
_TMP_MARK = ".tmp."
#: environment variable of the fault-injection test hook (see the module docstring)
PAUSE_HOOK_ENV = "SWAV_TEST_PAUSE_SAVE"
_PAUSE_AFTER_BYTES = 4096


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (none valid, wrong format, incompatible with the config)."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, permissions); the previous files are intact."""


# ------------------------------------------------------------------------------------------ RNG
def capture_rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and python RNG states as tensors/lists (``weights_only``-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    # this process's own GPU only: a resume may see another number of GPUs (one per task under SLURM, a
    # smaller node), and rank r's device need not be GPU r
    cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when CUDA is in use)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        states, current = state["cuda"], torch.cuda.current_device()
        # one state: this process's GPU (this format); several: one per visible GPU (earlier checkpoints)
        own = states[0] if len(states) == 1 else states[current] if current < len(states) else None
        if own is not None:
            torch.cuda.set_rng_state(own)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ---------------------------------------------------------------------------------------- paths
def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(output_dir) / f"step_{step:08d}.pt"


def final_checkpoint_path(output_dir: str | os.PathLike) -> Path:
    return checkpoint_dir(output_dir) / "final.pt"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files, newest first: ``final.pt`` (if present), then step files by decreasing step."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    steps = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if (m := _STEP_RE.match(p.name)) and not p.is_dir()), reverse=True)
    final = final_checkpoint_path(output_dir)
    return ([final] if final.is_file() else []) + [p for _, p in steps]


def clean_temp_files(output_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary files left by interrupted writes; returns what was removed."""
    removed = []
    for folder in (Path(output_dir), checkpoint_dir(output_dir)):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and _TMP_MARK in p.name and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    if removed:
        logger.warning("removed %d leftover temporary file(s) of an interrupted save: %s", len(removed),
                       ", ".join(p.name for p in removed))
    return removed


# ---------------------------------------------------------------------------------- write/read
def _pause_requested(path: Path, phase: str) -> float:
    """Seconds to pause at ``phase`` ('during' or 'after') of writing ``path`` (test hook; 0 = none)."""
    spec = os.environ.get(PAUSE_HOOK_ENV, "")
    name, _, rest = spec.partition(":")
    wanted, _, seconds = rest.partition(":")
    if not spec or name != path.name or wanted != phase:
        return 0.0
    return float(seconds) if seconds else 60.0


def _pause(path: Path, phase: str, seconds: float) -> None:
    logger.warning("test hook %s: pausing %.1f s %s writing %s", PAUSE_HOOK_ENV, seconds, phase, path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)


class _PausingWriter:
    """File wrapper for the test hook: after the first few KiB are on disk, pause once."""

    def __init__(self, fh: Any, path: Path, seconds: float) -> None:
        self.fh, self.path, self.seconds, self.written = fh, path, seconds, 0

    def write(self, data: Any) -> int:
        count = self.fh.write(data)
        self.written += count
        if self.seconds and self.written >= _PAUSE_AFTER_BYTES:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            _pause(self.path, "during", self.seconds)
            self.seconds = 0.0
        return count

    def flush(self) -> None:
        self.fh.flush()


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during (``__cause__`` / ``__context__``), in order."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``obj`` atomically to ``path`` (temp file, fsync, rename); CheckpointSaveError on failure."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{_TMP_MARK}{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            during = _pause_requested(path, "during")
            torch.save(obj, _PausingWriter(fh, path, during) if during else fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        chain = _exception_chain(exc)
        interrupted = next((e for e in chain if isinstance(e, KeyboardInterrupt)), None)
        if interrupted is not None:  # Ctrl-C inside torch's writer comes back as its RuntimeError
            raise KeyboardInterrupt from None
        cause = next((e for e in chain if isinstance(e, OSError) and e.strerror), None)  # e.g. no space left
        reason = cause.strerror if cause is not None else str(exc)
        raise CheckpointSaveError(f"could not write checkpoint {str(path)!r}: {reason}. Previous checkpoints "
                                  "are untouched; free disk space or fix permissions, then resume") from exc
    after = _pause_requested(path, "after")
    if after:
        _pause(path, "after", after)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify_record_checksums(path: str | os.PathLike) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``path`` if a record of this torch zip file fails its CRC-32.

    ``torch.load`` ignores the CRC-32 that ``torch.save`` writes, so without this a single flipped bit
    in a tensor loads silently. Files that are not zip archives are left to ``torch.load`` to judge;
    records written without a checksum (CRC 0, ``torch.serialization.set_crc32_options(False)``) are
    skipped.

    Example:
        >>> import tempfile, torch
        >>> f = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save({"w": torch.ones(1000)}, f)
        >>> verify_record_checksums(f)   # intact: no error
    """
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue
                with archive.open(info) as record:  # zipfile raises BadZipFile on a CRC mismatch at the end
                    while record.read(1 << 22):
                        pass
    except OSError:
        raise  # permissions, I/O errors: not the file's content
    except Exception as exc:  # a damaged archive surfaces as BadZipFile, zlib.error, NotImplementedError, ...
        raise CorruptCheckpointError(f"checkpoint file {str(path)!r} is damaged ({type(exc).__name__}: {exc})") \
            from exc


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint on the CPU with ``weights_only=True`` and check its CRCs and format marker."""
    if Path(path).is_file():
        verify_record_checksums(path)
    obj = safe_torch_load(path, map_location="cpu")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CorruptCheckpointError(f"{str(path)!r} is not a swav training checkpoint (format {found!r}, "
                                     f"expected {CHECKPOINT_FORMAT!r})")
    if int(obj.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {obj['version']}, newer than this swav "
                              f"understands ({CHECKPOINT_VERSION}); upgrade swav")
    return obj


def renumber_after_resplit(output_dir: str | os.PathLike, loaded: str | os.PathLike, step: int) -> list[Path]:
    """After a resume that converted the position to another step numbering (the global batch or the epoch
    length changed), keep the step files from competing with the new ones: the loaded checkpoint is renamed
    to the new step number (its contents convert the same way on a later resume), and step files numbered
    above it, written under the old numbering, are moved into ``checkpoints/superseded/`` (kept, not
    deleted). Without this, a later ``--resume`` would pick an old file with a higher number over the new
    run's checkpoints and throw their steps away. Returns the files moved."""
    loaded, folder = Path(loaded), checkpoint_dir(output_dir)
    aside = folder / "superseded"
    moved = []
    for path in list_checkpoints(output_dir):
        match = _STEP_RE.match(path.name)
        if match is None or path == loaded or int(match.group(1)) <= step:
            continue
        aside.mkdir(exist_ok=True)
        os.replace(path, aside / path.name)
        moved.append(aside / path.name)
    if _STEP_RE.match(loaded.name) and loaded.parent == folder and loaded != step_checkpoint_path(output_dir, step):
        os.replace(loaded, step_checkpoint_path(output_dir, step))
        logger.info("renamed %s to %s: the position it holds is step %d in the new step numbering (it converts the "
                    "same way on a later resume)", loaded.name, step_checkpoint_path(output_dir, step).name, step)
    if moved:
        logger.warning("the step numbering changed with the global batch: %d checkpoint(s) of the old numbering "
                       "above step %d moved to %s (kept; the run continues from step %d)", len(moved), step,
                       aside, step)
    return moved


def find_latest_checkpoint(output_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; damaged ones are named in a WARNING and skipped.

    Returns None when there is no checkpoint at all; raises :class:`CheckpointError` when there are
    checkpoint files but none is readable (never a silent restart from scratch).
    """
    candidates = list_checkpoints(output_dir)
    damaged = []
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except (CorruptCheckpointError, UnsafeCheckpointError, OSError) as exc:
            logger.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, exc)
            damaged.append(path.name)
    if damaged:
        raise CheckpointError(f"no valid checkpoint in {str(checkpoint_dir(output_dir))!r}: none of {damaged} can be "
                              "resumed from (damaged, or not a training checkpoint: the warnings above say which). "
                              "Move them away (or pass --overwrite) to start again from scratch")
    return None


def archive_checkpoint(path: str | os.PathLike, epoch: int) -> Path:
    """Keep ``path`` permanently as ``epoch_XXXX.pt`` beside it (hard link, else a copy), never pruned."""
    import shutil

    path = Path(path)
    target = path.parent / f"epoch_{epoch:04d}.pt"
    tmp = path.parent / f".{target.name}{_TMP_MARK}{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointSaveError(f"could not keep {str(path)!r} as {str(target)!r}: {exc}") from exc
    return target


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest step checkpoints; returns the deleted paths."""
    steps = [p for p in list_checkpoints(output_dir) if _STEP_RE.match(p.name)]
    removed = steps[keep:]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


# ------------------------------------------------------------------------------------- model only
def save_model_file(path: str | os.PathLike, model: torch.nn.Module, model_spec: dict[str, Any], *,
                    config: dict[str, Any] | None = None, step: int = 0, epoch: int = 0) -> Path:
    """Write the unwrapped model's weights and spec (``model.pt``), atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint({"format": MODEL_FORMAT, "version": CHECKPOINT_VERSION, "model": state,
                            "model_spec": dict(model_spec), "config": config or {}, "step": step,
                            "epoch": epoch}, path)


def load_model(path: str | os.PathLike) -> torch.nn.Module:
    """Rebuild a :class:`~swav.model.SwAVModel` from ``model.pt`` or a training checkpoint (strict load).

    Example:
        >>> import tempfile
        >>> from swav.model import ModelSpec, build_model
        >>> spec = ModelSpec("resnet18", small_images=True, in_channels=1, hidden_dim=16, output_dim=8,
        ...                  num_prototypes=5)
        >>> f = save_model_file(tempfile.mkdtemp() + "/model.pt", build_model(spec), spec.to_dict())
        >>> load_model(f).num_prototypes
        (5,)
    """
    from swav.interop import load_state_checked
    from swav.model import ModelSpec, build_model

    if Path(path).is_file():
        verify_record_checksums(path)
    obj = safe_torch_load(path, map_location="cpu")
    if not isinstance(obj, dict) or obj.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise CorruptCheckpointError(f"{str(path)!r} is neither a swav model file nor a training checkpoint")
    spec = ModelSpec.from_dict(dict(obj["model_spec"]))
    model = build_model(spec)
    load_state_checked(model, obj["model"], strict=True, source=str(path))
    return model

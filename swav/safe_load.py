"""Safe reading of checkpoint files: never run code hidden in a pickle (issue 7, SPEC §13).

``torch.load`` unpickles, and a pickle can call any Python function while it is read. Files from
the internet (the official release, model zoos, colleagues) are therefore read with
``weights_only=True`` passed explicitly, whatever the installed torch's default, so that only
tensors and plain containers (dict, list, tuple, str, int, float, bool, None) can come out.
A file that needs anything else is refused *before* any of its code runs, with an
:class:`UnsafeCheckpointError` that says how to convert it if its origin is trusted.
``.safetensors`` files contain no code at all and are read with the safetensors library.

Damaged files (zero bytes, truncated, not a checkpoint) raise :class:`CorruptCheckpointError`
naming the path, so that callers such as checkpoint resumption can fall back to an older file.
A file that is plainly something else (a run's ``config.yaml``, a JSON or text file, an image)
raises its subclass :class:`NotACheckpointError`, which says so instead of suspecting a pickle.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CorruptCheckpointError",
    "NotACheckpointError",
    "UnsafeCheckpointError",
    "convert_trusted_checkpoint",
    "describe_non_checkpoint",
    "is_safetensors_file",
    "load_state_file",
    "read_safetensors_metadata",
    "safe_torch_load",
]

logger = logging.getLogger(__name__)

_SAFETENSORS_SUFFIX = ".safetensors"


class CorruptCheckpointError(ValueError):
    """The file is empty, truncated or not a checkpoint at all."""


class UnsafeCheckpointError(ValueError):
    """The file holds pickled objects other than tensors and plain containers (could run code)."""


class NotACheckpointError(CorruptCheckpointError):
    """The file is no torch, zip, pickle or safetensors file at all (YAML, JSON, text, an image...)."""


# leading bytes of file kinds that are never checkpoints
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG image file"),
    (b"\xff\xd8\xff", "JPEG image file"),
    (b"GIF87a", "GIF image file"),
    (b"GIF89a", "GIF image file"),
    (b"II*\x00", "TIFF image file"),
    (b"MM\x00*", "TIFF image file"),
    (b"\x1f\x8b", "gzip file"),
    (b"%PDF-", "PDF file"),
    (b"\x93NUMPY", "NumPy array file, e.g. features written by `swav extract`"),
)
_TEXT_KINDS = {".yaml": "YAML file", ".yml": "YAML file", ".json": "JSON file", ".jsonl": "JSON lines file",
               ".csv": "CSV text file", ".html": "HTML file", ".py": "Python source file"}
_SNIFF_BYTES = 1 << 20


def _is_pickle_stream(data: bytes, whole_file: bool = True) -> bool:
    """True when ``data`` parses as pickle opcodes up to a STOP (parsed only, nothing is executed), or, when
    ``data`` is only the start of the file, parses without error up to where it was cut."""
    stream = io.BytesIO(data)
    try:
        for opcode, _, _ in pickletools.genops(stream):
            if opcode.name == "STOP":
                return True
    except Exception:  # noqa: BLE001 - a parse failure means "not a pickle", unless the window cut it
        return not whole_file and stream.tell() >= len(data) - 4096
    return not whole_file


def _looks_like_text(data: bytes) -> bool:
    if not data or b"\x00" in data:
        return False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(data) - 3:  # not just a character cut at the end of what was read
            return False
        text = data[: error.start].decode("utf-8")
    return all(ch.isprintable() or ch in "\t\n\r\f\v" for ch in text)


def describe_non_checkpoint(path: str | os.PathLike) -> str | None:
    """What the file is when it is plainly not a checkpoint ("YAML file", "PNG image file", ...), else None.

    Only file kinds that no torch, zip, pickle or safetensors file can be are named: images and a few
    other formats by their leading bytes, and text that does not parse as a (protocol 0) pickle.

    Example:
        >>> import tempfile, pathlib, torch
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "config.yaml").write_text("model:\\n  backbone: resnet50\\n")
        >>> describe_non_checkpoint(d / "config.yaml")
        'YAML file'
        >>> torch.save({"w": torch.ones(1)}, d / "m.pt")
        >>> describe_non_checkpoint(d / "m.pt") is None
        True
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(_SNIFF_BYTES)
    except OSError:
        return None
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP image file"
    if data.startswith(b"BM") and len(data) >= 14 and int.from_bytes(data[2:6], "little") == path.stat().st_size:
        return "BMP image file"
    if data.startswith((b"PK", b"\x80")):  # zip (torch) or binary pickle, however short
        return None
    whole_file = len(data) < _SNIFF_BYTES
    if not _looks_like_text(data) or _is_pickle_stream(data, whole_file):
        return None
    kind = _TEXT_KINDS.get(path.suffix.lower())
    if kind is None and data.lstrip()[:1] in (b"{", b"["):
        kind = "JSON file" if data.rstrip()[-1:] in (b"}", b"]") else None
    return kind or "text file"


def _not_a_checkpoint(path: Path) -> NotACheckpointError | None:
    """The error for a file that is plainly no checkpoint, with a hint towards the run's model.pt."""
    kind = describe_non_checkpoint(path)
    if kind is None:
        return None
    model = path.parent / "model.pt"
    if model.is_file() and model.resolve() != path.resolve():
        hint = f"pass the run's model.pt ({str(model)!r})"
    else:
        hint = ("pass the run's model.pt (or another checkpoint: a training checkpoint, an export, "
                "an official *_pretrain.pth.tar or a .safetensors file)")
    return NotACheckpointError(f"{str(path)!r} is not a checkpoint ({kind}); {hint}")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint path {str(path)!r} is a directory, expected a file")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"checkpoint file {str(path)!r} is empty (0 bytes); it was probably not fully written")


def _unsafe_detail(message: str) -> str:
    """The line of torch's message that names the refused global or opcode."""
    for line in message.splitlines():
        line = line.strip()
        if "Unsupported global" in line or "unsupported GLOBAL" in line or "Unsupported operand" in line:
            return line.split("WeightsUnpickler error:")[-1].strip()
    return message.strip().splitlines()[-1] if message.strip() else "unknown object"


def _unsafe_message(path: Path, detail: str) -> str:
    return (
        f"refusing to load {str(path)!r}: it contains pickled Python objects other than tensors and plain "
        f"containers, and unpickling those can run arbitrary code ({detail}). Nothing from the file was executed. "
        "(A truncated file in the old non-zip torch format can look the same.) If you trust where the file "
        "came from, convert it once into a weights-only file: "
        f"`python -c \"from swav.safe_load import convert_trusted_checkpoint as c; c('{path}', 'converted.pt')\"`, "
        "then load the converted file; or allow just the named class with "
        "torch.serialization.add_safe_globals([...])."
    )


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)`` with clear errors.

    Raises ``FileNotFoundError``, :class:`CorruptCheckpointError` (empty, truncated or not a torch
    file) or :class:`UnsafeCheckpointError` (would need to unpickle arbitrary objects; nothing runs).

    Example:
        >>> import tempfile, torch
        >>> f = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name
        >>> torch.save({"w": torch.ones(2)}, f)
        >>> safe_torch_load(f)["w"].tolist()
        [1.0, 1.0]
    """
    path = Path(path)
    _check_readable(path)
    _check_map_location(map_location, path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        not_checkpoint = _not_a_checkpoint(path)
        if not_checkpoint is not None:
            raise not_checkpoint from None
        message = str(error)
        if "Weights only load failed" in message or "WeightsUnpickler" in message:
            raise UnsafeCheckpointError(_unsafe_message(path, _unsafe_detail(message))) from None
        raise CorruptCheckpointError(f"checkpoint file {str(path)!r} is damaged or not a torch file: {error}") from error
    except (PermissionError, MemoryError):
        raise
    except Exception as error:  # damaged files surface as RuntimeError, EOFError, KeyError, IndexError, OSError...
        not_checkpoint = _not_a_checkpoint(path)
        if not_checkpoint is not None:
            raise not_checkpoint from error
        raise CorruptCheckpointError(
            f"checkpoint file {str(path)!r} is damaged, truncated or not a torch checkpoint "
            f"({type(error).__name__}: {str(error)[:300]})"
        ) from error


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string-to-string metadata of a ``.safetensors`` file (empty dict when it has none).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> f = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False).name
        >>> save_file({"w": torch.ones(2)}, f, metadata={"note": "hi"})
        >>> read_safetensors_metadata(f)
        {'note': 'hi'}
    """
    from safetensors import safe_open

    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own SafetensorError (a Rust exception type)
        not_checkpoint = _not_a_checkpoint(path)
        if not_checkpoint is not None:
            raise not_checkpoint from error
        raise CorruptCheckpointError(f"safetensors file {str(path)!r} is damaged or not a safetensors file: {error}") from error


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """True for a ``.safetensors`` name, or content that starts like one (8-byte header size, then ``{``).

    Example:
        >>> import tempfile, torch
        >>> f = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name
        >>> torch.save({"w": torch.ones(1)}, f)
        >>> is_safetensors_file(f)
        False
    """
    path = Path(path)
    if path.suffix.lower() == _SAFETENSORS_SUFFIX:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def _check_map_location(map_location: Any, path: Path) -> None:
    """A CUDA ``map_location`` on a machine without CUDA, named as such (torch reports a damaged file)."""
    wanted = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else None
    if wanted is not None and wanted.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location={str(map_location)!r} but CUDA is not available here: load {str(path)!r} "
                         "with map_location='cpu'")


def load_state_file(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> Any:
    """Read a checkpoint safely: safetensors files with safetensors, anything else with :func:`safe_torch_load`.

    Safetensors files are recognised by suffix or content (:func:`is_safetensors_file`).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> f = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False).name
        >>> save_file({"w": torch.zeros(3)}, f)
        >>> load_state_file(f)["w"].shape
        torch.Size([3])
    """
    path = Path(path)
    if not is_safetensors_file(path):
        return safe_torch_load(path, map_location=map_location)
    _check_map_location(map_location, Path(path))
    from safetensors.torch import load_file

    _check_readable(path)
    device = "cpu" if map_location is None else str(map_location)
    try:
        return load_file(str(path), device=device)
    except Exception as error:  # SafetensorError is not a subclass of a standard exception
        not_checkpoint = _not_a_checkpoint(path)
        if not_checkpoint is not None:
            raise not_checkpoint from error
        raise CorruptCheckpointError(f"safetensors file {str(path)!r} is damaged, truncated or not a safetensors file: {error}") from error


_DROP = object()  # marker for values that convert_trusted_checkpoint leaves out


def _plain(value: Any, where: str, dropped: list[str]) -> Any:
    """Keep tensors, plain containers and scalars; numpy becomes torch/python; anything else is dropped."""
    if type(value).__module__.startswith("numpy"):  # np.float64 subclasses float but is not allowed
        import numpy as np

        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, np.generic):
            return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                dropped.append(f"{where}[{key!r}] (key of type {type(key).__name__})")
                continue
            kept = _plain(item, f"{where}[{key!r}]", dropped)
            if kept is not _DROP:
                out[key] = kept
        return out
    if isinstance(value, (list, tuple)):
        items = [_plain(item, f"{where}[{i}]", dropped) for i, item in enumerate(value)]
        items = [item for item in items if item is not _DROP]
        return items if isinstance(value, list) else tuple(items)
    dropped.append(f"{where} ({type(value).__module__}.{type(value).__qualname__})")
    return _DROP


def convert_trusted_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Re-save a *trusted* pickle checkpoint so that :func:`safe_torch_load` can read it.

    This loads ``src`` with ``weights_only=False``, which RUNS any code the file contains: call it
    only for files whose origin you trust. Tensors, plain containers and numbers are kept (numpy
    values become tensors/Python numbers); every other object is dropped and listed in a WARNING.
    The result is verified by reading it back with ``weights_only=True``.

    Example:
        >>> import tempfile, torch, numpy as np
        >>> d = tempfile.mkdtemp()
        >>> torch.save({"w": torch.ones(1), "best_acc": np.float64(0.5)}, d + "/old.pt")
        >>> out = convert_trusted_checkpoint(d + "/old.pt", d + "/new.pt")
        >>> safe_torch_load(out)["best_acc"]
        0.5
    """
    src, dst = Path(src), Path(dst)
    _check_readable(src)
    logger.warning("loading %s with weights_only=False: any code inside it runs now (trusted conversion)", src)
    obj = torch.load(src, map_location="cpu", weights_only=False)
    dropped: list[str] = []
    plain = _plain(obj, "checkpoint", dropped)
    if plain is _DROP:
        raise UnsafeCheckpointError(f"{str(src)!r} holds a single {type(obj).__name__} object and nothing convertible")
    if dropped:
        logger.warning("dropped %d non-plain objects while converting %s: %s", len(dropped), src, "; ".join(dropped[:20]))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save(plain, tmp)
    os.replace(tmp, dst)
    safe_torch_load(dst)  # must now be readable the safe way
    return dst

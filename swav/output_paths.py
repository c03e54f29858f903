"""Checks of the places a command will write to, made before any work: one clear line instead of an OS error
(``[Errno 17] File exists``, ``[Errno 30] Read-only file system``) after minutes of computing.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> check_output_folder(folder / "new" / "run", "--output-dir") == folder / "new" / "run"
    True
    >>> (folder / "afile").write_text("x")
    1
    >>> check_output_folder(folder / "afile", "--output-dir")
    Traceback (most recent call last):
    ...
    ValueError: --output-dir '...afile' is an existing file: choose a folder
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["check_output_folder", "check_output_file"]


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def _check_writable_in(folder: Path, option: str, path: Path, what: str) -> None:
    if not folder.is_dir():
        raise ValueError(f"{option} {os.fspath(path)!r}: {os.fspath(folder)!r} is a file, so the {what} cannot be "
                         "created there: choose another path")
    problem = None if os.access(folder, os.W_OK | os.X_OK) else "no permission, or a read-only file system"
    if problem is None:  # permission bits do not tell for root, ACLs or some read-only mounts: try it
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".swav-write-check-"):
                pass
        except OSError as error:
            problem = error.strerror or str(error)
    if problem is not None:
        raise ValueError(f"{option} {os.fspath(path)!r}: cannot write in {os.fspath(folder)!r} ({problem}): "
                         f"choose another {what}")


def check_output_folder(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a folder that exists and is writable or can be created; ValueError naming ``option``
    otherwise. Creates nothing (a temporary file tests that writing works, and is removed)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {os.fspath(path)!r} is an existing file: choose a folder")
    _check_writable_in(_nearest_existing(path), option, path, "folder")
    return path


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a file that can be written (not a folder, in a writable or creatable folder); ValueError
    naming ``option`` otherwise. Creates nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{option} {os.fspath(path)!r} is a folder: give a file name, e.g. "
                         f"{os.fspath(path / 'out')!r}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {os.fspath(path)!r} cannot be overwritten (no permission, or a read-only file "
                         "system): choose another file")
    _check_writable_in(_nearest_existing(path.parent), option, path, "file")
    return path

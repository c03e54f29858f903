"""The ``swav`` command: one program, one subcommand per task (``swav pretrain``, ``swav scan``, ...).

Each subcommand lives in ``swav/cli/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (``func(args) -> int`` exit status). A subcommand module that is not installed
is skipped; one that fails to import (a missing optional dependency) still appears and explains why.
Errors raised by swav itself (``ValueError``, ``OSError``, and swav's own exception classes) are
printed on stderr without a traceback, with exit status 1; anything else is a bug and keeps its
traceback. Usage errors (argparse's own, and :class:`swav.usage.UsageError`: a flag's or ``--set`` value,
flags that exclude each other, a ``--config``/``--subset-file``/``--resume`` path that does not exist) exit
with 2, Ctrl-C with 130. The commands that run a model on a
``--device`` (evaluation, extract, cluster) have it checked before any work (:func:`check_device`).

Example:
    >>> main(["pretrain", "--list-recipes"])  # doctest: +SKIP
    0
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from swav.usage import UsageError

__all__ = ["SUBCOMMAND_MODULES", "build_parser", "check_device", "error_status", "is_user_error", "main"]

SUBCOMMAND_MODULES = ("pretrain", "evaluate", "scan", "shards", "export", "extract", "cluster")
#: subcommands whose ``--device`` is checked before they run (with a ``--checkpoint``: the model runs there)
DEVICE_COMMANDS = ("eval-knn", "eval-linear", "finetune", "extract", "cluster")


def check_device(value: str) -> str:
    """``--device`` as given (lower case): ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that exists here.

    Raises ``ValueError`` with a one-line message for anything else, or for CUDA on a machine without it.

    Example:
        >>> check_device("CPU")
        'cpu'
        >>> check_device("gpu")
        Traceback (most recent call last):
        ...
        ValueError: --device 'gpu' is invalid: use auto, cpu, cuda or cuda:N
    """
    device = str(value).strip().lower()
    if device in ("auto", "cpu"):
        return device
    kind, sep, index = device.partition(":")
    if kind != "cuda" or (sep and not (index.isdigit() and index.isascii())):
        raise UsageError(f"--device {value!r} is invalid: use auto, cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device} but CUDA is not available here; use --device cpu")
    count = torch.cuda.device_count()
    if sep and int(index) >= count:
        raise UsageError(f"--device {device} but this machine has {count} CUDA device(s) "
                         f"(cuda:0 to cuda:{count - 1}); use one of those or --device cuda")
    return device


def _register_broken(subparsers: argparse._SubParsersAction, name: str, error: Exception) -> None:
    """A stand-in subcommand that reports why the real one cannot load."""
    parser = subparsers.add_parser(name, help=f"(unavailable: {error})", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def fail(args: argparse.Namespace) -> int:
        print(f"swav {name}: cannot load this subcommand: {error}", file=sys.stderr)
        return 1
    parser.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    from swav import __version__

    parser = argparse.ArgumentParser(prog="swav", description="SwAV self-supervised pretraining and evaluation. "
                                     "Run `swav pretrain` with no arguments for a short CPU demo on Fashion-MNIST.")
    parser.add_argument("--version", action="version", version=f"swav {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        module_name = f"{__name__}.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            _register_broken(subparsers, name, exc)
            continue
        except ImportError as exc:
            _register_broken(subparsers, name, exc)
            continue
        module.register(subparsers)
    return parser


def is_user_error(exc: BaseException) -> bool:
    """Expected failures that deserve a message, not a traceback: ``ValueError``, ``OSError`` and
    exceptions of swav's own classes (such as :class:`swav.pretrained.NotAStateDictError`)."""
    if isinstance(exc, (ValueError, OSError)):
        return True
    return any(cls.__module__.startswith("swav.") for cls in type(exc).__mro__)


def error_status(exc: BaseException) -> int:
    """The exit status for a user error: 2 for a command line that cannot work as given
    (:class:`swav.usage.UsageError`), 1 for everything else."""
    return 2 if isinstance(exc, UsageError) else 1


def user_message(exc: BaseException) -> str:
    """The error's message; for one re-raised from a data-loader worker (whose text is the worker's whole
    traceback) only its last line, the original error.

    Example:
        >>> user_message(ValueError("Caught ValueError in DataLoader worker process 0.\\nOriginal Traceback "
        ...                         "(most recent call last):\\n  File ...\\nValueError: shard x.tar is truncated\\n"))
        'shard x.tar is truncated'
    """
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, sep, rest = last.partition(": ")
        return rest if sep and all(part.isidentifier() for part in name.split(".")) else last
    return text


def _attach_stderr_logging(args: argparse.Namespace) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("swav")
    root.addHandler(handler)
    root.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    root.propagate = False
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    handler = _attach_stderr_logging(args)
    try:
        if args.command in DEVICE_COMMANDS and getattr(args, "checkpoint", None) and \
                isinstance(getattr(args, "device", None), str):
            args.device = check_device(args.device)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = ""
        if args.command == "pretrain":  # Ctrl-C stops at once (SIGTERM/SIGUSR1 save at the next step instead)
            again = "the command without --overwrite, with --resume" if getattr(args, "overwrite", False) else \
                "the same command (or --resume)"
            hint = (f": the run keeps its last checkpoint; continue with {again}. To stop at the next step with a "
                    "checkpoint of it, send SIGTERM instead (kill PID)")
        print(f"swav: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors get a message, bugs keep their traceback
        if not is_user_error(exc):
            raise
        print(f"swav {args.command}: error: {user_message(exc)}", file=sys.stderr)
        return error_status(exc)
    finally:
        logging.getLogger("swav").removeHandler(handler)
        logging.getLogger("swav").propagate = True
        handler.close()

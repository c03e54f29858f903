"""The ``swav`` command: one program, one subcommand per task (``swav pretrain``, ``swav scan``, ...).

Each subcommand lives in ``swav/cli/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (``func(args) -> int`` exit status). A subcommand module that is not installed
is skipped; one that fails to import (a missing optional dependency) still appears and explains why.
Errors raised by swav itself (``ValueError``, ``OSError``, and swav's own exception classes) are
printed on stderr without a traceback, with exit status 1; anything else is a bug and keeps its
traceback. Usage errors exit with 2, Ctrl-C with 130.

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

__all__ = ["SUBCOMMAND_MODULES", "build_parser", "main"]

SUBCOMMAND_MODULES = ("pretrain", "evaluate", "scan", "shards", "export", "extract", "cluster")


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


def _is_user_error(exc: BaseException) -> bool:
    """Expected failures that deserve a message, not a traceback."""
    if isinstance(exc, (ValueError, OSError)):
        return True
    return any(cls.__module__.startswith("swav.") for cls in type(exc).__mro__)


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
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("swav: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors get a message, bugs keep their traceback
        if not _is_user_error(exc):
            raise
        print(f"swav {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        logging.getLogger("swav").removeHandler(handler)
        logging.getLogger("swav").propagate = True
        handler.close()

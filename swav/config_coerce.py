"""Typed values for the config: YAML and command-line strings -> the field's declared type (SPEC §9 flags).

Booleans are accepted as true/false, on/off, yes/no or 1/0 (any case), as the original flags allow;
numbers also as strings (``1e-6``, which YAML 1.1 reads as a string); lists also as ``"2 6"`` or ``"2,6"``;
``null``/``none`` for optional fields. Anything else raises a ValueError that names the field.
"""
from __future__ import annotations

import os
import types
import typing
from typing import Any

__all__ = ["coerce_value"]

_BOOL_WORDS = {"true": True, "false": False, "on": True, "off": False, "1": True, "0": False,
               "yes": True, "no": False}


def _invalid(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{key}={value!r} is invalid: expected {expected}")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise _invalid(key, value, expected)


#: optional settings whose null is not "automatic" (and which therefore do not take the word auto)
NULL_MEANING = {"data.bit_depth": "full 16-bit"}


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` of field ``key``, or raise ValueError naming it.

    Example:
        >>> coerce_value("off", bool, "run.sync_bn"), coerce_value("1e-6", float, "optim.weight_decay")
        (False, 1e-06)
        >>> coerce_value([2, "6"], tuple[int, ...], "crops.counts"), coerce_value("null", int | None, "x")
        ((2, 6), None)
        >>> coerce_value("auto", bool | None, "data.compile_colour") is None
        True
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        if inner is not str and key not in NULL_MEANING and isinstance(value, str) and value.strip().lower() == "auto":
            return None  # null means "automatic" for every optional setting that is not itself a word
        try:
            return coerce_value(value, inner, key)
        except ValueError as exc:
            raise ValueError(f"{exc} or null ({NULL_MEANING.get(key, 'auto')})") from None
    if origin is tuple:
        item_type = args[0]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(coerce_value(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise _invalid(key, value, "a boolean (true/false, on/off, 1/0)")
    if tp is int:
        _require(not isinstance(value, bool), key, value, "an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, (int, str)):
            try:
                return int(value)
            except ValueError:
                pass
        raise _invalid(key, value, "an integer")
    if tp is float:
        _require(not isinstance(value, bool), key, value, "a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _invalid(key, value, "a number") from None
    if tp is str:
        _require(value is not None, key, value, "a string (a word, name or path), not null (for the automatic "
                 "choice of a setting that has one, such as run.precision, run.check_sync, data.pipeline or "
                 "run.device, write auto)")
        if isinstance(value, os.PathLike):  # data.path, run.output_dir from Python as pathlib.Path
            return os.fspath(value)
        _require(isinstance(value, (str, int, float)), key, value, "a string")
        return str(value)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")  # a bug in this module

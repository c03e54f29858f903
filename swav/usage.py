"""The error class for a command line that cannot work as given: a flag's or ``--set`` value (a number out of
range, a recipe name, a config that does not validate, a CUDA device this machine lacks), flags that exclude
each other, a ``--config``, ``--subset-file`` or ``--resume`` folder that does not exist.

``swav`` prints its message and exits with status 2, as argparse does for the usage errors it finds itself.
Errors of the job itself exit with 1: data that cannot be found or read, a checkpoint that does not fit, an
output folder that holds another run or result. It is a ``ValueError``, so code calling swav's functions
catches it as one.

Example:
    >>> issubclass(UsageError, ValueError)
    True
"""
from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A flag or flag combination that cannot work; the message names the flag and what would be valid."""

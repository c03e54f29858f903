"""The error class for a command line that cannot work as given (a flag's value, flags that exclude each
other, a path given on the command line that does not exist).

``swav`` prints its message and exits with status 2, as argparse does for the usage errors it finds itself;
other errors exit with 1. It is a ``ValueError``, so code calling swav's functions catches it as one.

Example:
    >>> issubclass(UsageError, ValueError)
    True
"""
from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A flag or flag combination that cannot work; the message names the flag and what would be valid."""

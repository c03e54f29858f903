"""``python -m swav ...``: the same program as the ``swav`` command (see :mod:`swav.cli`)."""
from swav.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

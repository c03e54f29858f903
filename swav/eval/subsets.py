"""Labelled subsets for semi-supervised fine-tuning (SPEC §11: 1% / 10% of the labels).

Two ways to pick the labelled images: a seeded, per-class stratified fraction of any data set, or
a subset list in the SimCLR format (one image file name per line, e.g. ``n01440764_10026.JPEG``),
which is what the paper's 1% and 10% ImageNet numbers use.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["class_quota", "read_subset_file", "stratified_fraction"]

logger = logging.getLogger(__name__)


def class_quota(class_size: int, fraction: float) -> int:
    """Images kept from a class of ``class_size``: ``fraction * size`` rounded half up, at least 1.

    Example:
        >>> class_quota(1300, 0.01), class_quota(1250, 0.01), class_quota(7, 0.01)
        (13, 13, 1)
    """
    return min(class_size, max(1, math.floor(fraction * class_size + 0.5)))


def stratified_fraction(labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random ``fraction`` of every class (see :func:`class_quota`).

    Stratifying keeps the class balance of the full set, which matters most at 1%, where a class
    of 1300 images contributes 13. The same ``seed`` always gives the same split.

    Example:
        >>> labels = [0] * 100 + [1] * 50
        >>> idx = stratified_fraction(labels, 0.1, seed=0)
        >>> len(idx), int((idx < 100).sum())
        (15, 10)
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: must be in (0, 1], e.g. 0.01 for 1% of the labels, got {fraction}")
    labels_N = np.asarray(labels)
    if labels_N.ndim != 1 or labels_N.size == 0:
        raise ValueError(f"labels: expected a non-empty 1-D sequence, got shape {labels_N.shape}")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels_N):
        members = np.flatnonzero(labels_N == cls)
        chosen.append(rng.choice(members, size=class_quota(members.size, fraction), replace=False))
    indices = np.sort(np.concatenate(chosen)).astype(np.int64)
    logger.info("labelled subset: %d of %d images (%.2f%%), seed %d", indices.size, labels_N.size, 100 * fraction, seed)
    return indices


def read_subset_file(path: str | os.PathLike, dataset_paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Sorted indices into ``dataset_paths`` of the images listed in the subset file ``path``.

    Each non-empty line names one image, matched by base name (``n01440764_10026.JPEG`` matches
    ``.../train/n01440764/n01440764_10026.JPEG``); a line with directories (``cls/img.jpg``) must
    also match the end of the path. Lines starting with ``#`` are ignored. Names that match no
    image, or several, raise ``ValueError`` listing a few of them.

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        >>> _ = f.write("b_2.JPEG\\n"); f.close()
        >>> read_subset_file(f.name, ["x/a/a_1.JPEG", "x/b/b_2.JPEG"]).tolist()
        [1]
    """
    names = _read_names(Path(path))
    by_basename: dict[str, list[int]] = {}
    normalised = [Path(p).as_posix() for p in dataset_paths]
    for index, p in enumerate(normalised):
        by_basename.setdefault(p.rsplit("/", 1)[-1], []).append(index)
    unmatched: list[str] = []
    ambiguous: list[str] = []
    chosen: set[int] = set()
    for name in names:
        candidates = by_basename.get(name.rsplit("/", 1)[-1], [])
        if "/" in name:
            candidates = [i for i in candidates if ("/" + normalised[i]).endswith("/" + name)]
        if not candidates:
            unmatched.append(name)
        elif len(candidates) > 1:
            ambiguous.append(name)
        else:
            chosen.add(candidates[0])
    if unmatched:
        raise ValueError(
            f"subset file {path}: {len(unmatched)} of {len(names)} names match no image of the data set "
            f"({len(normalised)} images), e.g. {unmatched[:5]}; is it the right subset file and data set?"
        )
    if ambiguous:
        raise ValueError(
            f"subset file {path}: {len(ambiguous)} names match several images, e.g. {ambiguous[:5]}; "
            f"write them with their class folder (class/name.jpg)"
        )
    logger.info("subset file %s: %d images", path, len(chosen))
    return np.array(sorted(chosen), dtype=np.int64)


def _read_names(path: Path) -> list[str]:
    """Non-empty, non-comment lines of ``path``, stripped, duplicates dropped (order kept)."""
    if not path.is_file():
        raise ValueError(f"subset file: {path} does not exist or is not a file")
    names: dict[str, None] = {}
    for line in path.read_text().splitlines():
        name = line.strip().replace("\\", "/").strip("/")
        if name and not name.startswith("#"):
            if name in names:
                logger.warning("subset file %s lists %s more than once", path, name)
            names[name] = None
    if not names:
        raise ValueError(f"subset file: {path} lists no image names")
    return list(names)

"""Datasets for pretraining and evaluation (engine layer; SPEC §7 feeds the multi-crop transform).

Every dataset yields ``(transform(image), label)`` with ``label = -1`` when the data carry no
labels. Images are 8-bit PIL images decoded by :func:`swav.images.load_image`.

* :class:`ImageFolderDataset`: any folder tree of images; a bad file never crashes the run.
* :class:`IDXDataset`: MNIST / Fashion-MNIST IDX files.
* :class:`CIFARDataset`: the CIFAR-10/100 python archives.
* :func:`build_dataset`: one string (path or name) -> dataset, as used by ``--data``.

Bad files: :class:`ImageFolderDataset` replaces an unreadable file by the next readable index
(``index + 1, index + 2, ...``, wrapping around; deterministic), so a batch always has its full
size, and applies the abort rule of :class:`swav.images.BadImageTracker`. A data set whose files
are *all* unreadable aborts at once.
"""

from __future__ import annotations

import gzip
import zlib
import io
import logging
import math
import operator
import os
import pickle
import tarfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from swav.images import BadImageTracker, ImageDecodeError, TooManyBadImagesError, check_bit_depth, load_image

__all__ = [
    "IMAGE_EXTENSIONS", "UNREAD_IMAGE_EXTENSIONS", "warn_unread_formats", "TooManyBadImagesError", "BadImageTracker", "list_image_files",
    "ImageFolderDataset", "IDXDataset", "CIFARDataset", "build_dataset", "build_held_out_dataset", "KNOWN_DATASETS",
    "detect_data_set_folder", "holds_splits",
]

logger = logging.getLogger(__name__)

#: File name endings treated as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm",
)


#: image formats swav does not read, named when a folder holds some (they would be left out silently)
UNREAD_IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".dcm", ".dicom", ".nii", ".svg", ".psd", ".exr", ".hdr",
    ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".raw",
)


def list_image_files(root: str | os.PathLike,
                     extensions: Iterable[str] = IMAGE_EXTENSIONS,
                     skipped: dict[str, int] | None = None) -> list[str]:
    """Sorted paths (relative to ``root``) of all image files below ``root``.

    ``skipped``, when given, receives the number of visible files left out, per lower-case extension
    (``""`` for none).

    Follows directory symlinks but visits each real directory once (no hang on symlink loops),
    skips hidden files and folders (names starting with ``.``) and keeps non-ASCII names.

    Example:
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> _ = open(os.path.join(d, "b.JPG"), "wb"); _ = open(os.path.join(d, ".a.jpg"), "wb")
        >>> list_image_files(d)
        ['b.JPG']
    """
    root = os.fspath(root)
    suffixes = tuple(e.lower() for e in extensions)
    visited: set[str] = set()
    found: list[str] = []

    def on_error(exc: OSError) -> None:
        logger.warning("cannot list %s: %s", exc.filename, exc.strerror or exc)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in visited)
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(suffixes):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
            elif skipped is not None:
                extension = os.path.splitext(name)[1].lower()
                skipped[extension] = skipped.get(extension, 0) + 1
    found.sort()
    return found


def warn_unread_formats(root: str | os.PathLike, skipped: dict[str, int]) -> None:
    """A warning naming the files under ``root`` in image formats swav does not read (see
    :data:`UNREAD_IMAGE_EXTENSIONS`), which are left out; other skipped files (annotations...) at DEBUG."""
    unread = {e: n for e, n in sorted(skipped.items()) if e in UNREAD_IMAGE_EXTENSIONS}
    if unread:
        logger.warning("%d file(s) under %s are images in formats swav does not read and are left out (%s): convert "
                       "them to PNG or JPEG (or TIFF for 16-bit data) to use them", sum(unread.values()), root,
                       ", ".join(f"{e} {n}" for e, n in unread.items()))
    others = {e or "(no extension)": n for e, n in skipped.items() if e not in UNREAD_IMAGE_EXTENSIONS}
    if others:
        logger.debug("files under %s that are not images, left out: %s", root, others)


def _class_folders(root: str) -> list[str]:
    """Sorted non-hidden first-level sub-folders of ``root`` (symlinked folders included)."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


class ImageFolderDataset(Dataset):
    """All images below ``root``; robust to unreadable files (see the module doc).

    Labels: when ``root`` holds sub-folders, each first-level sub-folder is a class (sorted
    names -> 0, 1, ...; nested folders inside a class belong to it; empty class folders are kept
    so that indices match between splits) and images lying directly in ``root`` get label -1.
    Without sub-folders every label is -1 and :attr:`classes` is empty.

    Example:
        >>> import tempfile; from PIL import Image
        >>> d = tempfile.mkdtemp(); os.makedirs(os.path.join(d, "cat"))
        >>> Image.new("RGB", (4, 4)).save(os.path.join(d, "cat", "1.png"))
        >>> ds = ImageFolderDataset(d)
        >>> len(ds), ds.classes, ds[0][1]
        (1, ['cat'], 0)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Any], Any] | None = None,
        channels: int = 3,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        max_bad_fraction: float = 0.01,
        bad_list_path: str | os.PathLike | None = None,
        *,
        min_bad_count: int = 10,
        max_pixels: int | None = None,
        bit_depth: int | None = None,
    ) -> None:
        root = os.path.expanduser(os.fspath(root))
        if not os.path.exists(root):
            raise FileNotFoundError(
                f"ImageFolderDataset: root {root!r} does not exist; expected a folder of images "
                "(optionally one sub-folder per class)")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"ImageFolderDataset: root {root!r} is not a folder; "
                                     "expected a folder of images")
        if channels not in (1, 3):
            raise ValueError(f"ImageFolderDataset: channels must be 1 or 3, got {channels!r}")
        skipped: dict[str, int] = {}
        files = list_image_files(root, extensions, skipped)
        warn_unread_formats(root, skipped)
        if not files:
            raise FileNotFoundError(
                f"ImageFolderDataset: no image files under {root!r} (looked for extensions "
                f"{', '.join(extensions)}; hidden files and folders are skipped)")
        self.root = root
        self.transform = transform
        self.channels = channels
        self.max_pixels = max_pixels
        self.bit_depth = check_bit_depth(bit_depth)
        self.classes = _class_folders(root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for rel in files:
            top, sep, _ = rel.partition(os.sep)
            label = self.class_to_idx.get(top, -1) if sep else -1
            self.samples.append((os.path.join(root, rel), label))
        self.targets = [label for _, label in self.samples]
        empty = set(self.classes) - {self.classes[t] for t in set(self.targets) if t >= 0}
        if empty:
            logger.warning("class folders without images under %s: %s", root, sorted(empty))
        self._known_bad: set[int] = set()
        self.tracker = BadImageTracker(max_bad_fraction, min_bad_count, bad_list_path, total=len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        index = operator.index(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images under {self.root}")
        index %= n
        for offset in range(n):
            i = (index + offset) % n
            if i in self._known_bad:
                continue
            path, label = self.samples[i]
            try:
                image = load_image(path, channels=self.channels, max_pixels=self.max_pixels,
                                   bit_depth=self.bit_depth)
            except ImageDecodeError as exc:
                self._known_bad.add(i)
                self.tracker.record_bad(path, exc.reason)
                continue
            self.tracker.record_ok()
            if offset:
                logger.debug("index %d unreadable, using index %d instead", index, i)
            return (self.transform(image) if self.transform is not None else image), label
        raise TooManyBadImagesError(f"none of the {n} image files under {self.root} can be "
                                    "decoded; run `swav scan` on it to see why")

    @property
    def bad_files(self) -> list[str]:
        """Paths of unreadable files found so far (all workers, when ``bad_list_path`` is set)."""
        return self.tracker.bad_files

    def check_sample(self, indices: Sequence[int] | None = None, count: int = 64) -> tuple[int, int]:
        """Decode up to ``count`` of the files (of ``indices``, default all) spread evenly over them, recording
        nothing, and raise :class:`TooManyBadImagesError` when they show that training would stop for
        unreadable files: when every file was checked, by the tracker's own rule; otherwise when the unreadable
        share of the sample is above ``max_bad_fraction`` with 99% confidence (Wilson's lower bound) and
        the files expected to be unreadable reach the rule's minimum count. Returns (checked, unreadable).

        Training would find the same files as it goes; checking a sample first lets a run refuse such data
        before it writes into (or, with --overwrite, clears) its output folder.
        """
        chosen = list(range(len(self.samples))) if indices is None else [int(i) for i in indices]
        total = len(chosen)
        if total > count:
            chosen = [chosen[(k * total) // count] for k in range(count)]
        bad: dict[str, str] = {}
        for i in chosen:
            path = self.samples[i][0]
            try:
                load_image(path, channels=self.channels, max_pixels=self.max_pixels, bit_depth=self.bit_depth)
            except ImageDecodeError as exc:
                bad[path] = exc.reason
        n, k = len(chosen), len(bad)
        rule = self.tracker
        if n == total:
            trips = k >= rule.min_bad_count and k > rule.max_bad_fraction * total or (k == n > 0)
        else:
            z, share = 2.576, k / n
            centre = (share + z * z / (2 * n)) / (1 + z * z / n)
            margin = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
            trips = centre - margin > rule.max_bad_fraction and share * total >= rule.min_bad_count
        if trips:
            examples = "; ".join(f"{p} ({r})" for p, r in list(bad.items())[:3])
            of = f"the {total}" if n == total else f"a sample of {n} of the {total}"
            raise TooManyBadImagesError(
                f"{k} of {of} image files under {self.root} are unreadable ({k / n:.0%}; data.max_bad_fraction="
                f"{rule.max_bad_fraction}), so training would stop for them (found before training started); "
                f"e.g. {examples}. Run `swav scan` on the data to list them all, then fix or remove them, or raise "
                "data.max_bad_fraction")
        return n, k


_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _idx_file(folder: str, stem: str) -> str | None:
    """The file for ``stem`` in ``folder``: plain or ``.gz``, ``-idx`` or ``.idx`` spelling."""
    for base in (stem, stem.replace("-idx", ".idx")):
        for name in (base, base + ".gz"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def find_idx_folder(path: str | os.PathLike) -> str | None:
    """The folder holding MNIST-style IDX files: ``path``, ``path/raw`` or ``path/*/raw``
    (torchvision's layout), else None."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    candidates = [path, os.path.join(path, "raw")]
    with os.scandir(path) as entries:
        candidates += sorted(os.path.join(e.path, "raw") for e in entries if e.is_dir())
    for folder in candidates:
        if os.path.isdir(folder) and any(_idx_file(folder, s[0]) for s in _IDX_STEMS.values()):
            return folder
    return None


def read_idx(path: str | os.PathLike) -> Any:
    """Read one IDX file (gzipped or not) into a numpy array, checking its header."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise ValueError(f"read_idx: {path} is a damaged gzip file ({error}; truncated download?): "
                             "download it again or delete it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"read_idx: {path} is not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"read_idx: {path} holds {len(raw) - offset} data bytes, header "
                         f"{dims} needs {count * dtype.itemsize} (truncated download?)")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


class IDXDataset(Dataset):
    """MNIST / Fashion-MNIST from IDX files (``train-images-idx3-ubyte[.gz]`` etc.).

    ``data`` is a uint8 tensor (N, 28, 28) and ``targets`` an int64 tensor (N,) for fast
    paths; items are ``(transform(PIL 'L' image), int label)`` (``channels=3`` gives RGB).

    Example:
        >>> ds = IDXDataset("/usr/share/datasets/fashion-mnist", "test")  # doctest: +SKIP
        >>> ds.data.shape, ds[0][1]  # doctest: +SKIP
        (torch.Size([10000, 28, 28]), 9)
    """

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable[[Any], Any] | None = None, *, channels: int = 1) -> None:
        if split not in _IDX_STEMS:
            raise ValueError(f"IDXDataset: split must be 'train' or 'test', got {split!r}")
        if channels not in (1, 3):
            raise ValueError(f"IDXDataset: channels must be 1 or 3, got {channels!r}")
        folder = find_idx_folder(root)
        files = [_idx_file(folder, stem) if folder else None for stem in _IDX_STEMS[split]]
        if None in files:
            raise FileNotFoundError(
                f"IDXDataset: no {split} IDX files under {os.fspath(root)!r}; expected "
                f"{' and '.join(_IDX_STEMS[split])} (optionally .gz)")
        images, labels = read_idx(files[0]), read_idx(files[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"IDXDataset: {files[0]} has shape {images.shape} but {files[1]} "
                             f"has {labels.shape}; expected (N, H, W) images and N labels")
        self.root, self.split, self.transform, self.channels = folder, split, transform, channels
        self.data = torch.from_numpy(images.astype("uint8"))
        self.targets = torch.from_numpy(labels.astype("int64"))
        is_fashion = "fashion" in os.path.abspath(folder).lower()
        self.classes = FASHION_MNIST_CLASSES if is_fashion else [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[index].numpy())
        if self.channels == 3:
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), int(self.targets[index])


_CIFAR_LAYOUT = {  # classes -> (folder, train members, test members, meta member, meta key)
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
         "batches.meta", "label_names"),
    100: ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names"),
}
_PICKLE_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{mod}", name) for core in ("core", "_core")
    for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                      ("numeric", "_frombuffer"))}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays, lists, dicts and strings: loading a CIFAR
    batch cannot run arbitrary code even if the archive was tampered with."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which a "
                                         "CIFAR file never does; refusing to load it")
        if hasattr(np, "_core"):  # numpy >= 2 renamed numpy.core; old files use the old name
            module = module.replace("numpy.core.", "numpy._core.")
        else:
            module = module.replace("numpy._core.", "numpy.core.")
        return super().find_class(module, name)


def find_cifar_source(path: str | os.PathLike) -> tuple[str, int] | None:
    """``(folder or archive, 10|100)`` if ``path`` is / holds a CIFAR python folder or
    ``cifar-10(0)-python.tar.gz``, else None."""
    path = os.fspath(path)
    for classes, (folder, train, test, _, _) in _CIFAR_LAYOUT.items():
        for where in (path, os.path.join(path, folder)):
            if all(os.path.isfile(os.path.join(where, m)) for m in (train[0], test[0])):
                return where, classes
        archive = f"{folder.replace('-batches-py', '-python')}.tar.gz"
        for candidate in (path, os.path.join(path, archive)):
            if os.path.isfile(candidate) and os.path.basename(candidate) == archive:
                return candidate, classes
    return None


class CIFARDataset(Dataset):
    """CIFAR-10/100 from the official python pickle batches (folder or ``.tar.gz``, read in place).

    The batches are pickles, so they are read with a restricted unpickler that only accepts the
    numpy/list/dict objects these files contain, and only from the known member names.
    ``data`` is a uint8 tensor (N, 32, 32, 3), ``targets`` int64 (N,).

    Example:
        >>> ds = CIFARDataset("~/data/cifar-10-batches-py", "test")  # doctest: +SKIP
        >>> ds.data.shape  # doctest: +SKIP
        torch.Size([10000, 32, 32, 3])
    """

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable[[Any], Any] | None = None, num_classes: int = 10, *,
                 channels: int = 3) -> None:
        if num_classes not in _CIFAR_LAYOUT:
            raise ValueError(f"CIFARDataset: num_classes must be 10 or 100, got {num_classes!r}")
        if split not in ("train", "test"):
            raise ValueError(f"CIFARDataset: split must be 'train' or 'test', got {split!r}")
        if channels not in (1, 3):
            raise ValueError(f"CIFARDataset: channels must be 1 or 3, got {channels!r}")
        folder, train, test, meta, meta_key = _CIFAR_LAYOUT[num_classes]
        found = find_cifar_source(os.path.expanduser(os.fspath(root)))
        if found is None or found[1] != num_classes:
            raise FileNotFoundError(f"CIFARDataset: no CIFAR-{num_classes} python files under "
                                    f"{os.fspath(root)!r}; expected {folder}/ or its .tar.gz")
        source = found[0]
        members = self._read_members(source, folder, (train if split == "train" else test) + [meta])
        label_key = "labels" if num_classes == 10 else "fine_labels"
        arrays, labels = [], []
        for member in (train if split == "train" else test):
            batch = self._unpickle(members[member], member)
            arrays.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels += list(batch[label_key])
        self.data = torch.from_numpy(np.concatenate(arrays).transpose(0, 2, 3, 1).copy())
        self.targets = torch.tensor(labels, dtype=torch.int64)
        names = self._unpickle(members[meta], meta).get(meta_key) if meta in members else None
        self.classes = [str(c) for c in names] if names else [str(i) for i in range(num_classes)]
        self.root, self.split, self.transform, self.channels = source, split, transform, channels

    @staticmethod
    def _read_members(source: str, folder: str, names: list[str]) -> dict[str, bytes]:
        """Bytes of the wanted batch files (the archive is read once, nothing is extracted)."""
        if not source.endswith(".tar.gz"):
            found = {}
            for name in names:
                if os.path.isfile(os.path.join(source, name)):
                    with open(os.path.join(source, name), "rb") as fh:
                        found[name] = fh.read()
        else:
            wanted = {f"{folder}/{name}": name for name in names}
            with tarfile.open(source, "r:gz") as tar:
                found = {wanted[m.name]: tar.extractfile(m).read() for m in tar
                         if m.name in wanted and m.isfile()}
        missing = [n for n in names[:-1] if n not in found]  # the last one (meta) is optional
        if missing:
            raise FileNotFoundError(f"CIFARDataset: {source} lacks {', '.join(missing)}")
        return found

    @staticmethod
    def _unpickle(raw: bytes, member: str) -> dict[str, Any]:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
        if not isinstance(batch, dict):
            raise ValueError(f"CIFAR file {member} holds a {type(batch).__name__}, not a dict")
        return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[index].numpy())
        if self.channels == 1:
            image = image.convert("L")
        return (self.transform(image) if self.transform else image), int(self.targets[index])


#: name -> (kind, CIFAR classes or None, folder names looked for under each data root)
KNOWN_DATASETS: dict[str, tuple[str, int | None, tuple[str, ...]]] = {
    "fashion-mnist": ("idx", None, ("fashion-mnist", "FashionMNIST", "fashion_mnist")),
    "mnist": ("idx", None, ("mnist", "MNIST")),
    "cifar10": ("cifar", 10, ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz")),
    "cifar100": ("cifar", 100, ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz")),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar-100": "cifar100"}
_SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val", "validation"),
                  "val": ("val", "validation", "test")}
_TORCHVISION_CLASSES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST",
                        "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _data_roots() -> list[str]:
    """Folders under which named data sets are looked for, in order."""
    roots = [os.path.expanduser(os.environ["SWAV_DATA_ROOT"])] if os.environ.get(
        "SWAV_DATA_ROOT") else []
    return roots + ["/usr/share/datasets", os.path.expanduser("~/.cache/swav")]


_SPLIT_NAMES = frozenset(name for names in _SPLIT_FOLDERS.values() for name in names)
_warned_class_splits: set[str] = set()


def holds_splits(path: str | os.PathLike) -> bool:
    """Whether folder ``path`` is split into ``train``/``val``/``test`` folders: either all its sub-folders have
    split names or at least two do (STL-10's ``train``, ``test`` and ``unlabeled``); files beside them (a stray
    preview image, a README) and folders whose names start with ``_`` or ``.`` (``__MACOSX``) do not count. A
    folder of classes one of which is called ``train`` (PASCAL VOC and COCO have one) is a folder of classes,
    not a split: the whole folder is used, with a warning (once per folder)."""
    try:
        folders = {e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith((".", "_"))}
    except OSError:
        return False
    named = folders & _SPLIT_NAMES
    split = bool(named) and (folders <= _SPLIT_NAMES or len(named) >= 2)
    if not split and named and os.fspath(path) not in _warned_class_splits:
        _warned_class_splits.add(os.fspath(path))
        logger.warning("%s has a sub-folder named %r beside other folders or images: the whole folder is one data "
                       "set and %r one of its classes, not a split; to use that folder alone, pass its path",
                       path, sorted(named)[0], sorted(named)[0])
    return split


def detect_data_set_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` (or its ``train`` split folder) holds a data set in one of the file layouts that
    :func:`build_dataset` recognises (IDX, CIFAR, shards), as opposed to a plain folder of images."""
    candidates = [os.fspath(path)] + [os.path.join(os.fspath(path), sub) for sub in _SPLIT_FOLDERS["train"]]
    return any(os.path.isdir(c) and _detect(c) is not None for c in candidates)


def _detect(path: str) -> tuple[str, Any] | None:
    """('idx', folder) / ('cifar', (source, classes)) / ('shards', path) for a path, else None."""
    idx_folder = find_idx_folder(path)
    if idx_folder is not None:
        return "idx", idx_folder
    cifar = find_cifar_source(path)
    if cifar is not None:
        return "cifar", cifar
    from swav.shards import looks_like_shards  # lazy: webdataset is an optional dependency
    if looks_like_shards(path):
        return "shards", path
    return None


def _build_named(name: str, split: str, transform, channels, download: bool) -> Dataset:
    kind, num_classes, folders = KNOWN_DATASETS[name]
    searched = [os.path.join(root, folder) for root in _data_roots() for folder in folders]
    for where in searched:
        found = _detect(where) if os.path.exists(where) else None
        if found is not None and found[0] == kind and (kind != "cifar" or
                                                       found[1][1] == num_classes):
            return _from_detected(found, split, transform, channels, {})
    if download:
        import torchvision.datasets as tvd  # only needed to download
        target = os.path.join(_data_roots()[-1], folders[0])
        os.makedirs(target, exist_ok=True)
        logger.info("downloading %s to %s with torchvision", name, target)
        getattr(tvd, _TORCHVISION_CLASSES[name])(target, train=(split == "train"), download=True)
        found = _detect(target)
        if found is not None:
            return _from_detected(found, split, transform, channels, {})
    hint = ("install it with `apt-get install dataset-fashion-mnist`, " if name == "fashion-mnist"
            else "set SWAV_DATA_ROOT to the folder holding it, ")
    raise FileNotFoundError(
        f"data set {name!r} not found (looked in {', '.join(searched)}); {hint}pass "
        "--data PATH pointing to its files, or download it once: `swav pretrain ... --set data.download=true`, "
        "`swav pack-shards ... --download`, or download=True in Python (the evaluation, extract and cluster "
        "commands read local files only)")


def _from_detected(found: tuple[str, Any], split: str, transform, channels,
                   options: Mapping[str, Any]) -> Dataset:
    kind, where = found
    if kind in ("idx", "cifar") and split == "val":
        split = "test"  # their files have a train and a test split: the held-out one serves "val"
    if kind == "idx":
        return IDXDataset(where, split, transform, channels=channels or 1)
    if kind == "cifar":
        source, num_classes = where
        return CIFARDataset(source, split, transform, num_classes=num_classes,
                            channels=channels or 3)
    if split != "train":
        raise FileNotFoundError(
            f"build_dataset: shards {where!r} hold one split, so there is no {split!r} split in them (they would be "
            "the training images again); pass the held-out images' own shards or folder: for the evaluation "
            "commands --train-data shards:TRAIN --val-data shards:VAL (or a folder) instead of --data")
    from swav.shards import ShardDataset
    return ShardDataset(where, transform=transform, channels=channels or 3, **options)


def build_held_out_dataset(spec: str | os.PathLike, **kwargs: Any) -> Dataset:
    """The images to evaluate on, given as ``--val-data``: the test split of a data set name, of IDX or CIFAR
    files and of a folder with a ``test``/``val``/``validation`` sub-folder; shards and a folder without
    split sub-folders are taken whole. A folder with only a ``train`` sub-folder is refused (its test split
    is missing). ``kwargs`` go to :func:`build_dataset`."""
    text = os.fspath(spec)
    path = os.path.expanduser(text)
    whole = text.startswith("shards:") or path.endswith(".tar") or ("{" in path and ".tar" in path)
    if os.path.isdir(path) and not whole:
        found = _detect(path)
        whole = found[0] == "shards" if found is not None else not holds_splits(path)
    return build_dataset(spec, split="train" if whole else "test", **kwargs)


def build_dataset(
    spec: str | os.PathLike,
    *,
    split: str = "train",
    transform: Callable[[Any], Any] | None = None,
    channels: int | None = None,
    download: bool = False,
    max_bad_fraction: float = 0.01,
    bad_list_path: str | os.PathLike | None = None,
    shard_options: Mapping[str, Any] | None = None,
    bit_depth: int | None = None,
) -> Dataset:
    """Turn a ``--data`` string into a dataset.

    ``spec`` is one of: ``shards:PATTERN`` (brace pattern, folder or list file of ``.tar``
    shards, see :mod:`swav.shards`); a ``.tar`` shard path or brace pattern; a folder holding
    MNIST-style IDX files, a CIFAR python folder or ``.tar.gz`` archive, a folder of shards or a
    folder of images; or a name from :data:`KNOWN_DATASETS` (looked up under
    ``$SWAV_DATA_ROOT``, ``/usr/share/datasets`` and ``~/.cache/swav``, in a folder named after
    it, e.g. ``fashion-mnist`` or torchvision's ``FashionMNIST``, then downloaded with torchvision
    into ``~/.cache/swav/<name>`` when ``download=True``). For image/shard folders split into
    folders (see :func:`holds_splits`), the one named after the split (``train``;
    ``test``/``val``/``validation``) is used; a folder without splits serves ``split='train'`` only. ``channels=None`` keeps the data's own
    (1 for IDX, 3 otherwise). ``shard_options`` go to :class:`swav.shards.ShardDataset`.
    ``bit_depth``: bits per sample of 16-bit image files (see :func:`swav.images.load_image`; image
    folders and shards).

    Example:
        >>> ds = build_dataset("fashion-mnist", split="test")   # doctest: +SKIP
        >>> len(ds), ds[0][0].mode  # doctest: +SKIP
        (10000, 'L')
    """
    if split not in _SPLIT_FOLDERS:
        raise ValueError(f"build_dataset: split must be one of {sorted(_SPLIT_FOLDERS)}, "
                         f"got {split!r}")
    spec = os.fspath(spec)
    check_bit_depth(bit_depth)
    shard_opts = {"max_bad_fraction": max_bad_fraction, "bad_list_path": bad_list_path, "bit_depth": bit_depth,
                  **(shard_options or {})}
    if spec.startswith("shards:"):
        return _from_detected(("shards", spec[len("shards:"):]), split, transform, channels,
                              shard_opts)
    path = os.path.expanduser(spec)
    if path.endswith(".tar") or ("{" in path and ".tar" in path):
        return _from_detected(("shards", path), split, transform, channels, shard_opts)
    if os.path.exists(path):
        found = _detect(path)
        if found is not None:
            return _from_detected(found, split, transform, channels, shard_opts)
        if os.path.isdir(path):
            for sub in _SPLIT_FOLDERS[split] if holds_splits(path) else ():
                if os.path.isdir(os.path.join(path, sub)):
                    logger.info("using the %r split folder %s", split, os.path.join(path, sub))
                    return build_dataset(os.path.join(path, sub), split="train",
                                         transform=transform, channels=channels,
                                         max_bad_fraction=max_bad_fraction, bad_list_path=bad_list_path,
                                         shard_options=shard_options, bit_depth=bit_depth)
            if split != "train":
                raise FileNotFoundError(
                    f"build_dataset: no {split!r} split under {path!r} (looked for sub-folders "
                    f"{', '.join(_SPLIT_FOLDERS[split])}); pass the split's folder directly: for the evaluation commands "
                    "--train-data TRAIN_FOLDER --val-data VAL_FOLDER instead of --data; for swav extract, cluster and "
                    "pack-shards --data SPLIT_FOLDER with --split train (the default), as a plain folder is one split")
            return ImageFolderDataset(path, transform, channels or 3,
                                      max_bad_fraction=max_bad_fraction,
                                      bad_list_path=bad_list_path, bit_depth=bit_depth)
        raise ValueError(f"build_dataset: {path!r} is a file but not a .tar shard or a CIFAR "
                         "archive; expected a folder, shards or a data set name")
    name = _ALIASES.get(spec.lower(), spec.lower())
    if name in KNOWN_DATASETS:
        return _build_named(name, split, transform, channels, download)
    raise FileNotFoundError(
        f"build_dataset: {spec!r} is neither an existing path ({os.path.abspath(path)} does not "
        f"exist) nor a known data set name ({', '.join(KNOWN_DATASETS)}); expected a folder of "
        "images, IDX or CIFAR files, tar shards (shards:PATTERN) or one of those names")

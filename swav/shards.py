"""WebDataset tar shards: write them once, stream them on many nodes (engine layer).

Reading millions of small files from a network file system is slow; a few hundred tar files
("shards") read sequentially are fast everywhere. :func:`write_shards` packs a folder or a
dataset into ``shard-000000.tar, ...`` plus an index ``shards.json`` (names, sample counts,
classes). Each sample keeps the original encoded bytes (``.jpg``/``.png``/... as found; arrays
from IDX/CIFAR are encoded as PNG), its label (``.cls``, absent when unlabelled) and, for files,
its relative path (``.path.txt``). The tar key is the sample's running number, because
WebDataset splits member names at the first dot and real file names often contain dots.

:class:`ShardDataset` streams them. Splitting rule (every sample exactly once per epoch across
all ranks x workers): the shard list is permuted with a seed derived from ``(seed, epoch)``
(identical on every rank), the first ``start_shard`` shards are skipped (resume at a shard
boundary), rank ``r`` of ``W`` takes shards ``r, r+W, r+2W, ...`` of the rest and data-loader
worker ``w`` of ``n`` takes every n-th of the rank's shards. Each shard therefore goes to exactly
one (rank, worker). Uneven counts are allowed by design: nothing is duplicated or dropped, but
ranks then yield different numbers of samples. Under DDP every rank must run the same number of
steps, so either make the shard count a multiple of ``world_size`` with equal-size shards
(``write_shards(..., num_shards=k * world_size)``, ideally ``k >= workers``) or stop each epoch
after ``min(samples_per_rank())`` samples (those leftovers are then skipped that epoch). A rank
holding fewer shards than workers leaves some workers idle. Inside a worker, samples pass through
a shuffle buffer seeded by ``(seed, epoch, rank, worker)``.

Example:
    >>> import tempfile; from PIL import Image
    >>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> for i in range(4): Image.new("L", (2, 2), i).save(f"{src}/{i}.png")
    >>> paths = write_shards(src, out, max_samples_per_shard=2)
    >>> ds = ShardDataset(out, rank=0, world_size=1, return_key=True)
    >>> sorted(key for _, _, key in ds)
    ['0.png', '1.png', '2.png', '3.png']
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import random
import shutil
from typing import Any, Callable, Iterable, Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from swav.images import BadImageTracker, ImageDecodeError, check_bit_depth, load_image

__all__ = ["write_shards", "ShardDataset", "Skipped", "expand_shards", "looks_like_shards", "INDEX_NAME"]

logger = logging.getLogger(__name__)

INDEX_NAME = "shards.json"


class Skipped:
    """What :class:`ShardDataset` yields, on resume, in place of a sample of the epoch already trained on (see
    ``skip_samples`` of :meth:`ShardDataset.set_epoch`): nothing is read or decoded for it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Skipped()"


SKIPPED = Skipped()
_IMAGE_FIELDS = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff",
                 "ppm", "pgm", "pbm")


def looks_like_shards(path: str | os.PathLike) -> bool:
    """True for a ``.tar`` file, a ``shards.json`` index, or a folder holding either an index
    or only ``.tar`` files."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path.endswith(".tar") or os.path.basename(path) == INDEX_NAME
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, INDEX_NAME)):
        return True
    names = [n for n in os.listdir(path) if not n.startswith(".")]
    return bool(names) and all(n.endswith(".tar") for n in names)


def _read_index(index_path: str) -> tuple[list[str], list[int]]:
    with open(index_path, encoding="utf-8") as fh:
        index = json.load(fh)
    folder = os.path.dirname(index_path)
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{index_path} is not a shard index (no 'shards' list)")
    return ([os.path.join(folder, s["name"]) for s in shards],
            [int(s["num_samples"]) for s in shards])


def expand_shards(spec: str | os.PathLike | Sequence[str]) -> tuple[list[str], list[int] | None]:
    """Shard paths and, when an index knows them, per-shard sample counts.

    ``spec``: a list of paths, a folder (its ``shards.json`` or else its sorted ``*.tar``), a
    ``shards.json`` path, or a brace pattern such as ``data/shard-{000000..000007}.tar``.
    """
    if isinstance(spec, (list, tuple)):
        return [os.fspath(s) for s in spec], None
    spec = os.path.expanduser(os.fspath(spec))
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, INDEX_NAME)):
            return _read_index(os.path.join(spec, INDEX_NAME))
        return sorted(os.path.join(spec, n) for n in os.listdir(spec) if n.endswith(".tar")), None
    if os.path.basename(spec) == INDEX_NAME:
        return _read_index(spec)
    from webdataset.shardlists import expand_urls
    urls = expand_urls(spec)
    index = os.path.join(os.path.dirname(urls[0]), INDEX_NAME) if urls else ""
    if urls and os.path.isfile(index):  # take counts for the selected shards from the index
        names, counts = _read_index(index)
        known = dict(zip(names, counts, strict=True))
        if all(u in known for u in urls):
            return urls, [known[u] for u in urls]
    return urls, None


def _records(source: Any, verify: bool) -> Iterator[tuple[int, str | None, str, bytes, int]]:
    """(index, relative path or None, extension, encoded bytes, label) per sample."""
    import numpy as np
    from PIL import Image

    from swav.datasets import ImageFolderDataset
    if isinstance(source, ImageFolderDataset):
        for index, (path, label) in enumerate(source.samples):
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError as exc:  # a broken symlink, no permission: unreadable, like a corrupt image
                logger.warning("not packing unreadable file %s: %s", path, exc.strerror or exc)
                continue
            if verify:
                try:
                    load_image(data, name=path)
                except ImageDecodeError as exc:
                    logger.warning("not packing unreadable image %s: %s", path, exc.reason)
                    continue
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            yield index, os.path.relpath(path, source.root), ext, data, label
        return
    for i in range(len(source)):
        if hasattr(source, "data") and hasattr(source, "targets"):
            image, label = Image.fromarray(np.asarray(source.data[i])), int(source.targets[i])
        else:
            image, label = source[i]
        if not isinstance(image, Image.Image):
            raise TypeError(f"write_shards: source[{i}] gives {type(image).__name__}; expected "
                            "a PIL image (build the dataset without a transform)")
        buf = io.BytesIO()
        image.save(buf, "PNG")
        yield i, None, "png", buf.getvalue(), int(label)


def write_shards(
    source: Any,
    out_dir: str | os.PathLike,
    *,
    max_samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    num_shards: int | None = None,
    prefix: str = "shard",
    verify: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Pack ``source`` (a folder path, an :class:`~swav.datasets.ImageFolderDataset`, an
    IDX/CIFAR dataset or any dataset of ``(PIL image, label)``) into tar shards in ``out_dir``.

    A new shard starts after ``max_samples_per_shard`` samples or before its tar content (headers
    and data; tar adds up to 10 KiB of end padding) would exceed ``max_bytes``. ``num_shards``
    instead splits the samples into exactly that many shards whose sizes differ by at most one
    (files skipped by ``verify`` make a shard smaller); use a multiple of ``world_size``.
    ``verify`` decodes every file first and leaves out unreadable ones. Each shard is written
    under a temporary name and renamed when complete. Returns the shard paths;
    ``out_dir/shards.json`` records names, counts and classes. A folder that holds shards already is
    refused, unless ``overwrite``: the new shards are then written beside in a hidden folder and replace the
    old ones (every ``<prefix>-*.tar`` and ``shards.json``) only once they are complete, so a failure keeps them.

    Example: see the module docstring.
    """
    if max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard!r}")
    if num_shards is not None and (num_shards < 1 or max_bytes is not None):
        raise ValueError(f"num_shards must be >= 1 and cannot be combined with max_bytes, got "
                         f"num_shards={num_shards!r}, max_bytes={max_bytes!r}")
    from webdataset import TarWriter
    out_dir = os.fspath(out_dir)

    def old_shards() -> list[str]:
        return [name for name in os.listdir(out_dir) if name == INDEX_NAME or (
            name.startswith(f"{prefix}-") and (name.endswith(".tar") or name.endswith(".tar.tmp")))]

    if os.path.isdir(out_dir) and old_shards():
        if not overwrite:
            raise ValueError(f"{out_dir!r} holds shards already (old shards left beside new ones would be read "
                             "together): choose an empty folder, or pass --overwrite (Python: overwrite=True) to "
                             "replace them")
        staging = os.path.join(out_dir, f".new-shards-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            written = write_shards(source, staging, max_samples_per_shard=max_samples_per_shard, max_bytes=max_bytes,
                                   num_shards=num_shards, prefix=prefix, verify=verify)
            for name in old_shards():  # only now: a failure above kept them
                os.remove(os.path.join(out_dir, name))
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("replaced the shards in %s", out_dir)
        return [os.path.join(out_dir, os.path.basename(path)) for path in written]
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(source, (str, os.PathLike)):
        from swav.datasets import ImageFolderDataset
        source = ImageFolderDataset(source)
    if num_shards is not None:  # exactly num_shards near-equal runs of source indices
        total = len(source)
        sizes = [total // num_shards + (i < total % num_shards) for i in range(num_shards)]
        ends = [sum(sizes[:i + 1]) for i in range(num_shards)]
    shards: list[dict[str, Any]] = []
    writer, tmp_path, count, size, group = None, "", 0, 0, -1

    def close() -> None:
        writer.close()
        os.replace(tmp_path, tmp_path[:-len(".tmp")])
        shards.append({"name": os.path.basename(tmp_path[:-len(".tmp")]), "num_samples": count})

    for index, rel, ext, data, label in _records(source, verify):
        sample = {"__key__": f"{index:09d}", ext: data}
        if rel is not None:
            sample["path.txt"] = rel.encode("utf-8", "surrogateescape")
        if label >= 0:
            sample["cls"] = str(label).encode()
        # bytes this sample adds to the tar: a 512-byte header per member, data padded to 512
        sample_bytes = sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k[0] != "_")
        if num_shards is not None:
            new_group = bisect.bisect_right(ends, index)
            full, group = new_group != group, new_group
        else:
            full = count >= max_samples_per_shard or (
                max_bytes is not None and count > 0 and size + sample_bytes > max_bytes)
        if writer is None or full:
            if writer is not None:
                close()
            tmp_path = os.path.join(out_dir, f"{prefix}-{len(shards):06d}.tar.tmp")
            writer, count, size = TarWriter(tmp_path, encoder=False, mtime=0.0), 0, 0
        writer.write(sample)
        size += sample_bytes
        count += 1
    if writer is not None:
        close()
    if not shards:
        where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "root", None)
        raise ValueError(f"nothing to write: every image of {where or 'the source'} was unreadable "
                         "(check it with `swav scan`)")
    index = {"format": "swav-shards", "version": 1, "num_samples": sum(s["num_samples"] for s in
                                                                        shards),
             "classes": list(getattr(source, "classes", [])), "shards": shards}
    with open(os.path.join(out_dir, INDEX_NAME), "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=1)
    logger.info("wrote %d samples into %d shards in %s", index["num_samples"], len(shards),
                out_dir)
    return [os.path.join(out_dir, s["name"]) for s in shards]


def _default_ranks() -> tuple[int, int] | None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


class ShardDataset(IterableDataset):
    """Stream ``(transform(image), label)`` (``label`` -1 when absent) from tar shards.

    Args:
        shards: see :func:`expand_shards`.
        rank, world_size: this process's place; both or neither. When omitted they come from
            ``torch.distributed`` (construct the dataset, or call :meth:`set_epoch`, after
            ``init_process_group``) and default to 0 and 1.
        seed: must be the same on every rank (the shard permutation depends on it).
        shuffle_buffer: samples held per worker for shuffling (0 or 1 = stream order).
        shuffle_shards: permute the shard list each epoch.
        start_shard: shards of the current epoch's permutation to skip (resume at a boundary).
            :meth:`set_epoch` can instead skip an exact number of samples of each worker's stream.
        return_key: yield ``(image, label, relative path)`` instead.
        max_bad_fraction, min_bad_count, bad_list_path, max_pixels, bit_depth: as in
            :class:`swav.images.BadImageTracker` / :func:`swav.images.load_image`; an unreadable
            sample is skipped.

    Epoch state travels to data-loader workers when an iterator is created, so call
    :meth:`set_epoch` before each epoch and do not use ``persistent_workers=True``.

    Example:
        >>> ds = ShardDataset("shards/", seed=0)           # doctest: +SKIP
        >>> ds.set_epoch(3)                                 # doctest: +SKIP
        >>> loader = DataLoader(ds, batch_size=64, num_workers=8)  # doctest: +SKIP
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str],
        *,
        transform: Callable[[Any], Any] | None = None,
        channels: int = 3,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        start_shard: int = 0,
        return_key: bool = False,
        max_bad_fraction: float = 0.01,
        min_bad_count: int = 10,
        bad_list_path: str | os.PathLike | None = None,
        max_pixels: int | None = None,
        bit_depth: int | None = None,
    ) -> None:
        self.urls, self.counts = expand_shards(shards)
        if not self.urls:
            raise FileNotFoundError(f"ShardDataset: no .tar shards found for {shards!r}; expected "
                                    "a folder of shards, a shards.json or a brace pattern")
        missing = [u for u in self.urls if "://" not in u and not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"ShardDataset: {len(missing)} shard(s) missing, e.g. "
                                    f"{missing[0]!r}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"ShardDataset: give both rank and world_size or neither, got "
                             f"rank={rank!r}, world_size={world_size!r}")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"ShardDataset: need 0 <= rank < world_size, got {rank}/{world_size}")
        if channels not in (1, 3):
            raise ValueError(f"ShardDataset: channels must be 1 or 3, got {channels!r}")
        self._explicit = (rank, world_size) if rank is not None else None
        self._ranks = self._explicit or _default_ranks() or (0, 1)
        self.transform, self.channels, self.max_pixels = transform, channels, max_pixels
        self.bit_depth = check_bit_depth(bit_depth)
        self.seed, self.shuffle_buffer, self.shuffle_shards = seed, shuffle_buffer, shuffle_shards
        self.return_key = return_key
        self.tracker = BadImageTracker(max_bad_fraction, min_bad_count, bad_list_path)
        # training sets this: an unreadable sample is replaced by a readable one of the same stream (the one
        # before it, or the first after it), so that a rank's stream keeps the length the index promises and
        # every epoch has its planned steps; otherwise (extraction, scans) it is left out
        self.fill_bad = False
        self.epoch = 0
        self.start_shard = 0
        self.skip_samples: tuple[int, ...] = ()
        self.set_epoch(0, start_shard)

    @property
    def rank(self) -> int:
        return self._ranks[0]

    @property
    def world_size(self) -> int:
        return self._ranks[1]

    def set_epoch(self, epoch: int, start_shard: int = 0, skip_samples: Sequence[int] = ()) -> None:
        """Select the epoch (reseeds shard order and shuffling) and where in it to start.

        ``skip_samples[w]`` (resume inside an epoch, exactly): data-loader worker ``w`` yields :data:`SKIPPED`
        for the first ``skip_samples[w]`` samples of its stream, then the rest of the stream exactly as an
        uninterrupted epoch has it (same samples, same order), reading only the shards that still hold some
        of them. Needs the index (``shards.json``); one entry per worker (one for ``num_workers=0``).
        """
        if not 0 <= start_shard < len(self.urls):
            raise ValueError(f"ShardDataset.set_epoch: start_shard must be in [0, "
                             f"{len(self.urls)}), got {start_shard!r}")
        if any(n < 0 for n in skip_samples):
            raise ValueError(f"ShardDataset.set_epoch: skip_samples must be >= 0, got {list(skip_samples)}")
        if any(skip_samples) and self.counts is None:
            raise ValueError("ShardDataset.set_epoch: skip_samples needs the sample counts of the shards index "
                             f"({INDEX_NAME}); pack the data with `swav pack-shards`")
        self.epoch, self.start_shard = int(epoch), int(start_shard)
        self.skip_samples = tuple(int(n) for n in skip_samples)
        self._ranks = self._explicit or _default_ranks() or self._ranks

    def shard_order(self, epoch: int | None = None) -> list[int]:
        """Indices into :attr:`urls` in the order used for ``epoch`` (same on every rank)."""
        order = list(range(len(self.urls)))
        if self.shuffle_shards:
            random.Random(f"swav-shards-{self.seed}-{self.epoch if epoch is None else epoch}"
                          ).shuffle(order)
        return order

    def rank_shards(self, rank: int | None = None) -> list[str]:
        """Shards this rank (or ``rank``) reads in the current epoch, after ``start_shard``."""
        order = self.shard_order()[self.start_shard:]
        return [self.urls[i] for i in order[self.rank if rank is None else rank::self.world_size]]

    def samples_per_rank(self) -> list[int]:
        """Samples each rank yields this epoch (from the index; needs ``shards.json``)."""
        if self.counts is None:
            raise TypeError("ShardDataset: sample counts unknown (no shards.json index)")
        count = dict(zip(self.urls, self.counts, strict=True))
        return [sum(count[u] for u in self.rank_shards(r)) for r in range(self.world_size)]

    def __len__(self) -> int:
        return self.samples_per_rank()[self.rank]

    def _shuffled(self, samples: Iterable[dict], rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < max(self.shuffle_buffer, 1):
                buffer.append(sample)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _replayed(self, mine: list[str], rng: random.Random, skip: int) -> Iterator[dict | Skipped]:
        """The worker's shuffled stream with its first ``skip`` samples replaced by :data:`SKIPPED`, without
        decoding them: the shuffle buffer's draws depend only on how many samples it holds, so running it on
        sample numbers gives the stream's order, and only shards holding a later sample are read."""
        count = dict(zip(self.urls, self.counts or [], strict=True))
        starts = [0]
        for url in mine:
            starts.append(starts[-1] + count[url])
        order = list(self._shuffled(range(starts[-1]), rng))  # sample numbers in stream order
        skip = min(skip, len(order))

        def shard_of(number: int) -> int:
            return bisect.bisect_right(starts, number) - 1

        def lookback() -> tuple | None:
            """The readable sample nearest before the resume point, which an unreadable sample right after it
            is replaced by (as in the uninterrupted epoch); read again for that rare case only."""
            for number in reversed(order[:skip]):
                sample = self._read_one(mine[shard_of(number)], number - starts[shard_of(number)])
                item = self._decode(sample, record=False) if sample is not None else None
                if item is not None:
                    return item
            return None

        self._lookback = lookback if skip else None
        for _ in range(skip):
            yield SKIPPED
        rest = order[skip:]
        if not rest:
            return
        first_shard = shard_of(min(rest))
        from webdataset.tariterators import tarfile_samples
        samples = iter(tarfile_samples([{"url": url} for url in mine[first_shard:]], handler=_damaged_shard))
        number = starts[first_shard]  # of the next sample read
        wanted, held, missing, misplaced = set(rest), {}, 0, None
        for want in rest:
            while want not in held:
                sample = next(samples, None)
                if sample is None:
                    break
                if misplaced is None and number < starts[-1] and sample.get("__url__") != mine[shard_of(number)]:
                    misplaced = f"sample {number} of this worker's stream, by the index in {mine[shard_of(number)]}, " \
                                f"came from {sample.get('__url__')}"
                if number in wanted:  # samples of the skipped part pass by without being decoded
                    held[number] = sample
                number += 1
            if want in held:
                yield held.pop(want)
            else:
                missing += 1
        for sample in samples:  # the rest (samples trained on before the resume): only counted, for the check
            if misplaced is None and number < starts[-1] and sample.get("__url__") != mine[shard_of(number)]:
                misplaced = f"sample {number} of this worker's stream, by the index in {mine[shard_of(number)]}, " \
                            f"came from {sample.get('__url__')}"
            number += 1
        if misplaced is None and number > starts[-1]:
            misplaced = f"the shards hold {number - starts[-1]} sample(s) more than their index says"
        if missing or misplaced:
            logger.warning("rank %d: the sample counts in %s do not match the shards %s (%s), so this resumed epoch "
                           "is not exactly the interrupted one; pack the data again with `swav pack-shards`",
                           self.rank, INDEX_NAME, mine, misplaced or f"{missing} sample(s) not found")

    @staticmethod
    def _read_one(url: str, position: int) -> dict | None:
        """Sample ``position`` of shard ``url`` (read from the shard's start), or None if it holds fewer."""
        from webdataset.tariterators import tarfile_samples
        for i, sample in enumerate(tarfile_samples([{"url": url}], handler=_damaged_shard)):
            if i == position:
                return sample
        return None

    @staticmethod
    def _key(sample: dict) -> str:
        key = sample.get("path.txt", sample["__key__"])
        return key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key

    def _decode(self, sample: dict, record: bool = True) -> tuple | None:
        key = self._key(sample)
        field = next((k for k in sample if k.rsplit(".", 1)[-1] in _IMAGE_FIELDS), None)
        name = f"{sample.get('__url__')}:{key}"
        try:
            if field is None:
                raise ImageDecodeError(name, "sample has no image field", "not_an_image")
            image = load_image(sample[field], channels=self.channels,
                               max_pixels=self.max_pixels, name=name, bit_depth=self.bit_depth)
        except ImageDecodeError as exc:
            if record:
                self.tracker.record_bad(name, exc.reason)
            return None
        if record:
            self.tracker.record_ok()
        label = int(sample["cls"]) if "cls" in sample else -1
        image = self.transform(image) if self.transform is not None else image
        return (image, label, key) if self.return_key else (image, label)

    def __iter__(self) -> Iterator[tuple]:
        from webdataset.tariterators import tarfile_samples
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is None:  # main process: pick up a process group created after __init__
            self._ranks = self._explicit or _default_ranks() or self._ranks
        mine = self.rank_shards()[worker::workers]
        if not mine:
            logger.warning("rank %d worker %d has no shard to read this epoch (%d shards for "
                           "%d ranks x %d workers)", self.rank, worker, len(self.urls),
                           self.world_size, workers)
            return
        rng = random.Random(f"swav-buffer-{self.seed}-{self.epoch}-{self.rank}-{worker}")
        self._lookback = None  # set by _replayed: the stand-in for an unreadable sample right after the resume point
        if self.skip_samples:
            if len(self.skip_samples) != workers:
                raise ValueError(f"ShardDataset: skip_samples has {len(self.skip_samples)} entries for {workers} "
                                 "data-loader worker(s); give one per worker")
            stream = self._replayed(mine, rng, self.skip_samples[worker])
        else:
            stream = self._shuffled(tarfile_samples([{"url": url} for url in mine], handler=_damaged_shard), rng)
        last, owed = None, []  # owed: keys of unreadable samples met before the first readable one (fill_bad)
        for sample in stream:
            if isinstance(sample, Skipped):
                yield sample
                continue
            item = self._decode(sample)
            if item is None:
                if self.fill_bad and last is None and self._lookback is not None:
                    last, self._lookback = self._lookback(), None
                if self.fill_bad and last is not None:
                    yield self._stand_in(last, self._key(sample))
                elif self.fill_bad:
                    owed.append(self._key(sample))
                continue
            yield item
            for bad_key in owed:
                yield self._stand_in(item, bad_key)
            last, owed = item, []
        if owed:  # nothing readable to stand in: this stream ends short, and so does the rank's epoch
            logger.error("rank %d worker %d: none of the %d samples of its shards %s could be read (listed in "
                         "bad_images.txt), so this epoch lacks them and training stops at its end; check or "
                         "rewrite those shards with `swav pack-shards`", self.rank, worker, len(owed), mine)

    def _stand_in(self, item: tuple, bad_key: str) -> tuple:
        """A readable sample standing in for the unreadable one ``bad_key`` (``fill_bad``). With keys it gets a key
        of its own, ``<key>#stand-in-<bad key>``: training seeds each sample's crops by its key, so the stand-in
        is cropped afresh rather than repeating the crops of the sample it copies (and a resumed epoch gives it
        the same key)."""
        if not self.return_key:
            return item
        image, label, key = item
        return image, label, f"{key}#stand-in-{bad_key}"


class DamagedShardError(ValueError):
    """A shard cannot be read (truncated, not a tar file, missing)."""


def _damaged_shard(error: Exception) -> bool:
    """webdataset's error handler: a shard that cannot be read as a tar file stops the run with its name."""
    if isinstance(error, DamagedShardError):  # already explained (the handler is called again one level up)
        raise error
    url = error.args[-1] if error.args and isinstance(error.args[-1], str) else "a shard"
    if isinstance(error, OSError):  # missing, no permission, I/O error: not the shard's content
        raise DamagedShardError(f"shard {url} cannot be read ({error.strerror or error}): check the path and its "
                                "permissions") from None
    reason = error.args[0] if error.args else type(error).__name__
    raise DamagedShardError(f"shard {url} is truncated or not a tar file ({reason}): write the shards again with "
                            "`swav pack-shards` (into an empty folder), then continue with --resume") from None

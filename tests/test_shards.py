"""Tar shards: writing keeps bytes, reading splits exactly once over ranks x workers."""

from __future__ import annotations

import argparse
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

pytest.importorskip("webdataset")

from swav.cli import shards as shards_cli  # noqa: E402
from swav.datasets import build_dataset  # noqa: E402
from swav.shards import ShardDataset, expand_shards, write_shards  # noqa: E402


def pixel_value(image: Image.Image) -> torch.Tensor:
    return torch.tensor(int(np.asarray(image)[0, 0, 0]))


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """40 tiny images in 4 class folders; image i has pixel value i, names contain dots."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(40):
        folder = root / f"class{i % 4}"
        folder.mkdir(exist_ok=True)
        fmt = "JPEG" if i % 2 else "PNG"
        Image.new("RGB", (4, 4), (i, i, i)).save(folder / f"img.{i:02d}.{fmt.lower()}", fmt,
                                                 **({"quality": 100} if i % 2 else {}))
    return root


@pytest.fixture(scope="module")
def shard_dir(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    paths = write_shards(photo_dir, out, max_samples_per_shard=5)
    assert len(paths) == 8
    return out


def all_keys(photo_dir) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), photo_dir)
                  for d, _, fs in os.walk(photo_dir) for f in fs)


def test_index_and_original_bytes(photo_dir, shard_dir):
    index = json.loads((shard_dir / "shards.json").read_text())
    assert index["num_samples"] == 40 and index["classes"] == [f"class{c}" for c in range(4)]
    assert [s["num_samples"] for s in index["shards"]] == [5] * 8
    with tarfile.open(shard_dir / "shard-000003.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    paths = [v.decode() for k, v in members.items() if k.endswith(".path.txt")]
    assert len(paths) == 5
    for rel in paths:
        key = next(k[: -len(".path.txt")] for k, v in members.items() if v == rel.encode())
        ext = rel.rsplit(".", 1)[1]
        assert members[f"{key}.{ext}"] == (photo_dir / rel).read_bytes()  # stored as-is
        assert members[f"{key}.cls"] == rel[len("class")].encode()


def epoch_keys(shard_dir, epoch: int, world: int, workers: int = 2) -> list[list[str]]:
    """Keys in the order each rank's real DataLoader delivers them."""
    per_rank = []
    for rank in range(world):
        ds = ShardDataset(shard_dir, rank=rank, world_size=world, seed=7, shuffle_buffer=4,
                          return_key=True, transform=pixel_value)
        ds.set_epoch(epoch)
        keys, labels, values = [], [], []
        for value, label, key in DataLoader(ds, batch_size=3, num_workers=workers):
            keys += key
            labels += label.tolist()
            values += value.tolist()
        assert len(keys) == len(ds)
        for key, label, value in zip(keys, labels, values, strict=True):
            assert label == int(key[len("class")])
            assert value == int(key.split(".")[1])  # decoded pixel matches the file
        per_rank.append(keys)
    return per_rank


def test_every_sample_exactly_once_per_epoch_and_epochs_differ(photo_dir, shard_dir):
    epochs = [epoch_keys(shard_dir, epoch, world=2) for epoch in (0, 1)]
    for per_rank in epochs:
        seen = per_rank[0] + per_rank[1]
        assert sorted(seen) == all_keys(photo_dir)  # each once, across 2 ranks x 2 workers
        assert len(per_rank[0]) == len(per_rank[1]) == 20  # 8 shards: balanced
    assert epochs[0][0] != epochs[1][0]  # set_epoch changes the order
    assert epoch_keys(shard_dir, 0, world=2)[0] == epochs[0][0]  # and is deterministic


def test_uneven_shards_still_exactly_once(photo_dir, tmp_path):
    write_shards(photo_dir, tmp_path, num_shards=5)
    urls, counts = expand_shards(tmp_path)
    assert counts == [8] * 5
    ds = ShardDataset(tmp_path, rank=0, world_size=2)
    assert sum(ds.samples_per_rank()) == 40 and sorted(ds.samples_per_rank()) == [16, 24]
    per_rank = epoch_keys(tmp_path, 3, world=2)  # 5 shards over 2 ranks x 2 workers
    assert Counter(per_rank[0] + per_rank[1]) == Counter(all_keys(photo_dir))


def test_resume_at_shard_boundary(shard_dir):
    ds = ShardDataset(shard_dir, rank=0, world_size=1, return_key=True, seed=1)
    ds.set_epoch(2, start_shard=3)
    order = ds.shard_order()
    expected = set()
    for i in order[3:]:
        with tarfile.open(ds.urls[i]) as tar:
            expected |= {tar.extractfile(m).read().decode() for m in tar.getmembers()
                         if m.name.endswith(".path.txt")}
    assert {key for _, _, key in ds} == expected and len(expected) == 25
    ds.set_epoch(3)
    assert len(list(ds)) == 40
    with pytest.raises(ValueError, match="start_shard"):
        ds.set_epoch(0, start_shard=8)


def test_unreadable_samples_are_skipped_or_left_out(photo_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (2, 2)).save(src / name)
    (src / "c.jpg").write_text("not a jpeg")
    write_shards(src, tmp_path / "verified")
    assert json.loads((tmp_path / "verified" / "shards.json").read_text())["num_samples"] == 2
    os.symlink(tmp_path / "gone.jpg", src / "d.jpg")  # a broken link: left out like an unreadable image
    write_shards(src, tmp_path / "verified2")
    assert json.loads((tmp_path / "verified2" / "shards.json").read_text())["num_samples"] == 2
    with pytest.raises(ValueError, match="holds shards already"):  # old shards would be read with the new
        write_shards(src, tmp_path / "verified2")
    os.remove(src / "d.jpg")
    write_shards(src, tmp_path / "raw", verify=False)
    ds = ShardDataset(tmp_path / "raw", rank=0, world_size=1, max_bad_fraction=1.0)
    assert len(list(ds)) == 2 and len(ds.tracker.bad) == 1
    assert [label for _, label in ds] == [-1, -1]


def test_patterns_specs_and_errors(shard_dir, tmp_path):
    pattern = str(shard_dir / "shard-{000000..000003}.tar")
    urls, counts = expand_shards(pattern)
    assert len(urls) == 4 and counts == [5] * 4
    ds = build_dataset("shards:" + pattern, shard_options={"rank": 0, "world_size": 1})
    assert isinstance(ds, ShardDataset) and len(list(ds)) == 20
    assert isinstance(build_dataset(str(shard_dir)), ShardDataset)
    single = build_dataset(str(shard_dir / "shard-000000.tar"))
    assert len(list(single)) == 5 == len(single)  # count taken from the folder's index
    lone = tmp_path / "lone.tar"
    lone.write_bytes((shard_dir / "shard-000001.tar").read_bytes())
    without_index = build_dataset(str(lone))
    assert len(list(without_index)) == 5
    with pytest.raises(TypeError, match="counts unknown"):
        len(without_index)
    with pytest.raises(FileNotFoundError, match="missing"):
        ShardDataset(str(tmp_path / "x-{0..1}.tar"))
    with pytest.raises(ValueError, match="both rank and world_size"):
        ShardDataset(shard_dir, rank=1)
    with pytest.raises(ValueError, match="num_shards"):
        write_shards(shard_dir, tmp_path / "o", num_shards=2, max_bytes=10)
    cut = tmp_path / "cut"
    cut.mkdir()
    whole = (shard_dir / "shard-000002.tar").read_bytes()
    (cut / "shard-000000.tar").write_bytes(whole[:700])  # a copy that stopped in the first member's header
    with pytest.raises(ValueError, match=r"shard .*shard-000000.tar is truncated or not a tar file.*pack-shards"):
        list(build_dataset(str(cut / "shard-000000.tar")))
    # read by a data-loader worker, the command line still prints the one line, not the worker's traceback
    from swav.cli import user_message
    with pytest.raises(ValueError) as info:
        list(DataLoader(build_dataset(str(cut / "shard-000000.tar")), batch_size=None, num_workers=1))
    assert user_message(info.value).startswith("shard ") and "\n" not in user_message(info.value)
    assert user_message(info.value).count("truncated or not a tar file") == 1  # explained once, not nested


def test_max_bytes_starts_new_shards(photo_dir, tmp_path):
    write_shards(photo_dir, tmp_path, max_samples_per_shard=100, max_bytes=6000)
    index = json.loads((tmp_path / "shards.json").read_text())
    assert len(index["shards"]) > 1 and index["num_samples"] == 40
    for shard in index["shards"]:
        with tarfile.open(tmp_path / shard["name"]) as tar:
            members = tar.getmembers()
        content = sum(512 + -(-m.size // 512) * 512 for m in members)  # headers + padded data
        assert content <= 6000 and len(members) == 3 * shard["num_samples"]


def test_idx_like_source_and_cli(tmp_path):
    class Arrays:  # the fast-path attributes IDXDataset / CIFARDataset expose
        data = torch.arange(6 * 3 * 3, dtype=torch.uint8).reshape(6, 3, 3)
        targets = torch.tensor([0, 1, 2, 3, 4, 5])
        classes = [str(i) for i in range(6)]

        def __len__(self):
            return 6

    write_shards(Arrays(), tmp_path / "arr", num_shards=2)
    ds = ShardDataset(tmp_path / "arr", rank=0, world_size=1, channels=1, return_key=True,
                      shuffle_shards=False, shuffle_buffer=0)
    items = sorted(ds, key=lambda item: item[1])
    assert [label for _, label, _ in items] == list(range(6))
    np.testing.assert_array_equal(np.asarray(items[4][0]), Arrays.data[4].numpy())

    src, pack = _small_pngs_and_cli(tmp_path, 3)
    assert pack(src, tmp_path / "out", "--samples-per-shard", "2") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["shard-000000.tar", "shard-000001.tar",
                                                    "shards.json"]
    assert pack(tmp_path / "nope", tmp_path / "o2") == 1  # the data cannot be found: an error of the job


def _small_pngs_and_cli(tmp_path, n: int):
    """A folder of ``n`` tiny PNGs and ``pack(src, out, *flags)`` running `swav pack-shards`."""
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(n):
        Image.new("RGB", (2, 2), (i, 0, 0)).save(src / f"{i}.png")
    parser = argparse.ArgumentParser()
    shards_cli.register(parser.add_subparsers())

    def pack(source, out, *flags):
        args = parser.parse_args(["pack-shards", str(source), str(out), *flags])
        return args.func(args)

    return src, pack


def test_pack_shards_overwrite_replaces_only_once_the_new_shards_are_complete(tmp_path, capsys):
    src, pack_cli = _small_pngs_and_cli(tmp_path, 5)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")

    def pack(*extra):
        return pack_cli(src, out, *extra)

    assert pack("--samples-per-shard", "1") == 0 and len(list(out.glob("shard-*.tar"))) == 5
    assert pack("--samples-per-shard", "2") == 1  # shards there already: refused, nothing changed
    assert "--overwrite" in capsys.readouterr().err and len(list(out.glob("shard-*.tar"))) == 5
    assert pack("--samples-per-shard", "2", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shard-000000.tar", "shard-000001.tar",
                                                     "shard-000002.tar", "shards.json"]
    assert sorted(key for _, _, key in ShardDataset(out, return_key=True)) == [f"{i}.png" for i in range(5)]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for p in src.iterdir():  # a source whose every image is unreadable: the replacement fails ...
        p.write_bytes(b"not an image")
    assert pack("--overwrite") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # ... and the old shards are kept


def test_shards_have_no_held_out_split_but_serve_whole_as_val_data(shard_dir):
    """Shards hold one split: asking them for the test split (an evaluation's --data) is refused rather than
    answered with the training images; as --val-data (the held-out images themselves) they are used whole."""
    from swav.datasets import build_dataset, build_held_out_dataset

    with pytest.raises(FileNotFoundError, match="hold one split.*--val-data shards:VAL"):
        build_dataset(f"shards:{shard_dir}", split="test")
    assert isinstance(build_held_out_dataset(f"shards:{shard_dir}"), ShardDataset)
    assert isinstance(build_held_out_dataset(str(shard_dir)), ShardDataset)

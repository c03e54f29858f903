"""Datasets: folder walking, bad-file policy, IDX, CIFAR and build_dataset (all data built here)."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from swav.datasets import (CIFARDataset, IDXDataset, ImageFolderDataset, TooManyBadImagesError,
                           build_dataset, list_image_files, read_idx)

FASHION = "/usr/share/datasets/fashion-mnist"


def save_png(path, value: int, size=(4, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def make_tree(root):
    """Two classes (one nested), a root-level image, hidden entries, non-ASCII names, a loop."""
    save_png(root / "cat" / "1.png", 10)
    save_png(root / "cat" / "deep" / "er" / "2.png", 20)
    save_png(root / "dog" / "été 猫.png", 30)
    save_png(root / "loose.png", 40)
    save_png(root / ".hidden" / "3.png", 50)
    save_png(root / "dog" / ".secret.png", 60)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    os.symlink(root / "cat", root / "cat" / "deep" / "loop")  # loop back up the tree
    os.symlink(root, root / "dog" / "root_again")
    return ["cat/1.png", "cat/deep/er/2.png", "dog/été 猫.png", "loose.png"]


def test_walk_skips_hidden_handles_loops_and_unicode(tmp_path):
    expected = make_tree(tmp_path)
    assert list_image_files(tmp_path) == sorted(expected)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog", "empty_class"]
    assert [os.path.relpath(p, tmp_path) for p, _ in ds.samples] == sorted(expected)
    assert ds.targets == [0, 0, 1, -1]  # nested stays in its class; root-level file is -1
    values = [ds[i][0].getpixel((0, 0))[0] for i in range(len(ds))]
    assert values == [10, 20, 30, 40]


def test_flat_folder_is_unlabelled_and_transform_applies(tmp_path):
    for i in range(3):
        save_png(tmp_path / f"{i}.png", i)
    ds = ImageFolderDataset(tmp_path, transform=lambda im: np.asarray(im).shape, channels=1)
    assert ds.classes == [] and [ds[i] for i in range(3)] == [((3, 4), -1)] * 3
    assert ds[-1] == ds[2]
    with pytest.raises(IndexError):
        ds[3]


def test_wrong_or_empty_root_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".h.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ImageFolderDataset(tmp_path)
    save_png(tmp_path / "a.png", 1)
    with pytest.raises(NotADirectoryError):
        ImageFolderDataset(tmp_path / "a.png")
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(tmp_path, channels=2)


def make_bad_folder(root, good: int, bad_kinds: list[str]):
    """good PNGs named g00.. with pixel value = index and bad files b00.. in between."""
    for i in range(good):
        save_png(root / f"g{i:02d}.png", i)
    for j, kind in enumerate(bad_kinds):
        path = root / f"g{j:02d}_bad.jpg"  # sorts right after g{j}
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("hello")
        else:
            buf = Image.new("RGB", (64, 64), (1, 2, 3))
            buf.save(path, "JPEG")
            path.write_bytes(path.read_bytes()[:200])


def test_bad_files_are_skipped_counted_listed(tmp_path):
    make_bad_folder(tmp_path, 10, ["empty", "text", "truncated"])
    bad_list = tmp_path / "out" / "bad.txt"
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=0.5, bad_list_path=bad_list)
    assert len(ds) == 13
    names = [os.path.basename(p) for p, _ in ds.samples]
    values = [ds[i][0].getpixel((0, 0))[0] for i in range(len(ds))]
    # a bad index is replaced by the next readable one: g00_bad -> g01 etc.
    expected = [int(names[i + (1 if "bad" in names[i] else 0)][1:3]) for i in range(13)]
    assert values == expected
    bad = sorted(os.path.basename(p) for p in ds.bad_files)
    assert bad == ["g00_bad.jpg", "g01_bad.jpg", "g02_bad.jpg"]
    assert len(ds.tracker.bad) == 3
    assert sorted(os.path.basename(p) for p in bad_list.read_text().splitlines()) == bad
    assert ds[1][0].getpixel((0, 0))[0] == 1  # a known-bad index is not decoded again
    assert ds.tracker.attempted == 13 + 3 + 1


def test_bad_files_from_dataloader_workers_reach_main_process(tmp_path):
    make_bad_folder(tmp_path, 6, ["empty", "text"])
    bad_list = tmp_path / "bad.txt"
    ds = ImageFolderDataset(tmp_path, transform=lambda im: torch.tensor(np.asarray(im)[0, 0, 0]),
                            max_bad_fraction=1.0, bad_list_path=bad_list)
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    values = torch.cat([x for x, _ in loader]).tolist()
    assert values == [0, 1, 1, 2, 2, 3, 4, 5]
    assert sorted(os.path.basename(p) for p in ds.bad_files) == ["g00_bad.jpg", "g01_bad.jpg"]
    assert ds.tracker.bad == {}  # the main process itself decoded nothing


def test_one_bad_of_three_does_not_abort(tmp_path):
    make_bad_folder(tmp_path, 2, ["empty"])
    ds = ImageFolderDataset(tmp_path)  # defaults: 1% but at least 10 bad files
    assert [ds[i][1] for i in range(3)] == [-1, -1, -1]
    assert len(ds.bad_files) == 1


def test_too_many_bad_files_abort(tmp_path):
    make_bad_folder(tmp_path, 14, ["empty", "text", "truncated"] * 4)
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=0.2)
    with pytest.raises(TooManyBadImagesError, match="max_bad_fraction=0.2"):
        for i in range(len(ds)):
            ds[i]
    assert len(ds.tracker.bad) == 10  # tripped as soon as the 10th bad file was met


def test_all_files_bad_aborts_even_below_min_count(tmp_path):
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"")
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=1.0)
    with pytest.raises(TooManyBadImagesError, match="none of the 2"):
        ds[0]


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout
    suffix = ".gz" if gz else ""
    write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    ds = IDXDataset(tmp_path, "test")
    assert ds.data.dtype == torch.uint8 and ds.data.shape == (5, 28, 28)
    np.testing.assert_array_equal(ds.data.numpy(), images)
    assert ds.targets.tolist() == [3, 1, 4, 1, 5] and ds.targets.dtype == torch.int64
    image, label = ds[2]
    assert image.mode == "L" and label == 4
    np.testing.assert_array_equal(np.asarray(image), images[2])
    assert IDXDataset(tmp_path, "test", channels=3)[0][0].mode == "RGB"
    assert ds.classes[0] == "T-shirt/top"
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        IDXDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        IDXDataset(tmp_path, "validation")


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(b"GIF89a....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "y")
    whole = gzip.compress(b"\x00\x00\x08\x01" + (4000).to_bytes(4, "big") + os.urandom(4000))
    (tmp_path / "z.gz").write_bytes(whole[: len(whole) // 2])  # a download cut in half
    with pytest.raises(ValueError, match="damaged gzip file .*truncated download"):
        read_idx(tmp_path / "z.gz")


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist_by_name():
    ds = build_dataset("fashion-mnist", split="test")
    assert isinstance(ds, IDXDataset) and ds.data.shape == (10000, 28, 28)
    assert sorted(set(ds.targets.tolist())) == list(range(10))
    assert torch.bincount(ds.targets).tolist() == [1000] * 10  # balanced test set


def cifar_batches(rng, n: int, key: str) -> dict:
    return {"batch_label": "testing", "data": rng.integers(0, 256, (n, 3072), np.uint8),
            key: rng.integers(0, 10, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]}


def make_cifar10(root, rng):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batches(rng, 3, "labels")
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    meta = {"label_names": ["airplane", "automobile"] + [f"c{i}" for i in range(8)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, batches


def test_cifar10_folder_and_archive(tmp_path):
    folder, batches = make_cifar10(tmp_path / "data", np.random.default_rng(0))
    ds = CIFARDataset(tmp_path / "data", "train")
    assert ds.data.shape == (15, 32, 32, 3) and ds.classes[:2] == ["airplane", "automobile"]
    flat = batches["data_batch_2"]["data"][1]  # item 4 overall; naive CHW -> HWC indexing
    y, x = 7, 30
    assert tuple(ds.data[4, y, x].tolist()) == (flat[y * 32 + x], flat[1024 + y * 32 + x],
                                                flat[2048 + y * 32 + x])
    image, label = ds[4]
    assert image.mode == "RGB" and label == batches["data_batch_2"]["labels"][1]
    assert image.getpixel((x, y)) == tuple(ds.data[4, y, x].tolist())
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_tar = build_dataset(str(archive), split="test")
    assert isinstance(from_tar, CIFARDataset) and len(from_tar) == 3
    assert torch.equal(from_tar.data, CIFARDataset(folder, "test").data)
    assert from_tar[0][0].size == (32, 32)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        (folder / split).write_bytes(pickle.dumps(cifar_batches(rng, 2, "fine_labels")))
    ds = build_dataset(str(tmp_path), split="test", channels=1)
    assert isinstance(ds, CIFARDataset) and ds[0][0].mode == "L" and len(ds.classes) == 100
    with pytest.raises(FileNotFoundError, match="CIFAR-10 "):
        CIFARDataset(tmp_path, num_classes=10)


class Boom:
    def __reduce__(self):
        return (os.system, ("echo hacked > /dev/null",))


def test_cifar_unpickler_refuses_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": Boom(), "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        CIFARDataset(folder)


def test_build_dataset_detects_kinds_and_splits(tmp_path):
    save_png(tmp_path / "imgs" / "train" / "a" / "1.png", 1)
    save_png(tmp_path / "imgs" / "val" / "a" / "2.png", 2)
    train = build_dataset(str(tmp_path / "imgs"))
    val = build_dataset(str(tmp_path / "imgs"), split="test")
    assert isinstance(train, ImageFolderDataset) and train.root.endswith("train")
    assert val.root.endswith("val") and val[0][1] == 0
    save_png(tmp_path / "flat" / "x.png", 3)
    assert len(build_dataset(tmp_path / "flat")) == 1
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        build_dataset(str(tmp_path / "flat"), split="test")
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        build_dataset(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="split"):
        build_dataset(str(tmp_path / "flat"), split="dev")
    from swav.datasets import build_held_out_dataset
    assert build_held_out_dataset(tmp_path / "imgs").root.endswith("val")  # --val-data: the held-out split
    assert len(build_held_out_dataset(tmp_path / "flat")) == 1  # a folder without split folders: whole
    save_png(tmp_path / "only_train" / "train" / "a" / "1.png", 1)
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        build_held_out_dataset(tmp_path / "only_train")  # never its training split


def test_idx_files_serve_val_as_their_test_split(tmp_path):
    """``swav extract/cluster --split val`` on IDX files reads the held-out files (it used to be refused)."""
    for stem, n in (("train", 3), ("t10k", 2)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", np.zeros((n, 28, 28), np.uint8), True)
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", np.arange(n), True)
    assert len(build_dataset(tmp_path, split="val")) == len(build_dataset(tmp_path, split="test")) == 2


def test_named_dataset_lookup_and_missing_message(tmp_path, monkeypatch):
    monkeypatch.setenv("SWAV_DATA_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    images = np.zeros((2, 28, 28), np.uint8)
    mnist = tmp_path / "root" / "mnist"
    write_idx(mnist / "train-images-idx3-ubyte.gz", images, True)
    write_idx(mnist / "train-labels-idx1-ubyte.gz", np.array([7, 8]), True)
    fashion = tmp_path / "root" / "FashionMNIST" / "raw"  # torchvision's layout and name
    write_idx(fashion / "train-images-idx3-ubyte", images + 1, False)
    write_idx(fashion / "train-labels-idx1-ubyte", np.array([1, 2]), False)
    ds = build_dataset("MNIST")
    assert isinstance(ds, IDXDataset) and ds.targets.tolist() == [7, 8]
    assert ds.classes[0] == "0"
    ds = build_dataset("fashion_mnist")
    assert ds.targets.tolist() == [1, 2] and ds.classes[0] == "T-shirt/top"
    cifar100 = tmp_path / "root" / "cifar-100-python"
    cifar100.mkdir()
    for split in ("train", "test"):
        (cifar100 / split).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="cifar10.*SWAV_DATA_ROOT.*--data PATH"):
        build_dataset("cifar-10")  # a CIFAR-100 folder does not count


@pytest.mark.skipif(os.path.isdir(FASHION), reason="Fashion-MNIST is installed system-wide")
def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SWAV_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion-mnist")


def test_bad_files_in_a_row_are_judged_against_the_whole_folder(tmp_path):
    # 12 unreadable files in one sub-folder among 400 good ones (2.9%): a run allowing 10% must not stop, even
    # though the substitution walks the whole run of bad files on the first request that meets them
    for folder, count in (("a_good", 200), ("c_good", 200)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            save_png(tmp_path / folder / f"{i}.png", i % 256)
    (tmp_path / "b_bad").mkdir()
    for i in range(12):
        (tmp_path / "b_bad" / f"{i}.jpg").write_bytes(b"")
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=0.1)
    for i in range(len(ds)):
        ds[i]
    assert len(ds.tracker.bad) == 12
    strict = ImageFolderDataset(tmp_path, max_bad_fraction=0.02)  # 12 > 2% of 412: stops, naming the folder size
    with pytest.raises(TooManyBadImagesError, match="out of 412 image files"):
        for i in range(len(strict)):
            strict[i]


def test_bad_files_of_all_processes_count_together_against_the_files_used(tmp_path):
    # two data-loader workers each meet half of the bad files: with the shared list the rule sees them all
    from swav.images import BadImageTracker
    shared = tmp_path / "bad_images.txt"
    a = BadImageTracker(0.02, 10, shared, total=500)
    b = BadImageTracker(0.02, 10, shared, total=500)
    for i in range(6):
        a.record_bad(f"a{i}.jpg", "empty")
    for i in range(4):
        b.record_bad(f"b{i}.jpg", "empty")  # 10 distinct of 500: not above 2%
    with pytest.raises(TooManyBadImagesError, match="11 unreadable images out of 500 image files"):
        b.record_bad("b4.jpg", "empty")
    # a single process without a list: its own bad files against the files (exact)
    alone = BadImageTracker(0.02, 10, None, total=500)
    for i in range(10):
        alone.record_bad(f"c{i}.jpg", "empty")
    with pytest.raises(TooManyBadImagesError, match="11 unreadable images out of 500 image files"):
        alone.record_bad("c10.jpg", "empty")


def test_data_limit_sets_the_number_of_files_the_rule_counts_against(tmp_path):
    from swav.config import with_values
    from swav.config import Config
    from swav.train import _build_dataset
    make_bad_folder(tmp_path / "data", 30, ["empty"])
    config = with_values(Config(), {"data.path": str(tmp_path / "data"), "data.limit": 12})
    dataset = _build_dataset(config, tmp_path / "run", None)
    assert len(dataset) == 12 and dataset.dataset.tracker.total == 12


def test_a_worker_without_a_shared_list_never_stops_on_bad_files_in_a_row(tmp_path):
    # evaluation and extraction read folders in order, with workers and no run folder (no shared list): bad
    # files met in a row must not look like a high fraction of the few files read so far
    for i in range(200):
        save_png(tmp_path / f"a{i:03d}.png", i % 256)
    for i in range(12):
        (tmp_path / f"b{i:02d}.png").write_bytes(b"")
    for i in range(200):
        save_png(tmp_path / f"c{i:03d}.png", i % 256)
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=0.05)
    seen = sum(len(labels) for _, labels in DataLoader(ds, batch_size=32, num_workers=2, collate_fn=lambda b: (None, [x[1] for x in b])))
    assert seen == 412


def test_a_resumed_run_does_not_count_the_bad_files_of_earlier_runs(tmp_path):
    from swav.images import BadImageTracker
    shared = tmp_path / "bad_images.txt"
    shared.write_text("".join(f"old{i}.jpg\n" for i in range(15)))  # fixed since the first run
    tracker = BadImageTracker(0.05, 10, shared, total=100)
    for i in range(3):
        tracker.record_bad(f"new{i}.jpg", "empty")  # 3 of 100: no stop
    assert len(tracker.bad_files) == 18  # the list itself still names them all (the run's report)


def test_a_class_folder_named_train_is_a_class_not_a_split(tmp_path, caplog):
    """PASCAL VOC and COCO have a class "train": a folder of bus/, car/ and train/ is one data set of 3 classes
    (it used to be taken for a split folder and train on the "train" class alone)."""
    import logging

    from swav.datasets import holds_splits

    for name in ("bus", "car", "train"):
        for i in range(2):
            save_png(tmp_path / "vehicles" / name / f"{i}.png", i)
    with caplog.at_level(logging.WARNING, logger="swav"):
        data = build_dataset(tmp_path / "vehicles")
    assert len(data) == 6 and data.classes == ["bus", "car", "train"]
    assert "'train' one of its classes" in caplog.text
    for layout, splits in ((("train", "val"), True), (("train",), True), (("train", "test", "unlabeled"), True),
                           (("bus", "train"), False)):
        root = tmp_path / "_".join(layout)
        for name in layout:
            save_png(root / name / "a" / "0.png", 1)
        assert holds_splits(root) == splits, layout
    save_png(tmp_path / "train_val" / "preview.png", 2)  # a stray image beside the split folders: still splits
    (tmp_path / "train_val" / "__MACOSX").mkdir()  # an archive tool's folder does not count either
    assert holds_splits(tmp_path / "train_val")
    assert build_dataset(tmp_path / "train_val").root.endswith("train")

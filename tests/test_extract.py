"""Tests of swav.extract and ``swav extract``: values equal a direct forward pass, resume continues
after the last complete chunk and ends with what an uninterrupted run writes."""
from __future__ import annotations

import argparse
import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from swav.datasets import ImageFolderDataset
from swav.extract import extract_to_dir, load_extracted
from swav.model import SwAVModel

FASHION = "/usr/share/datasets/fashion-mnist"


class _Images(Dataset):
    """Random labelled images; counts accesses and can fail at one index (a crash mid-run)."""

    def __init__(self, n: int = 37, fail_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 6, 6, generator=g)
        self.y = torch.arange(n) % 3
        self.fail_at = fail_at
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise RuntimeError(f"simulated crash at {i}")
        self.seen.append(i)
        return self.x[i], int(self.y[i])


def _model(seed: int = 0) -> SwAVModel:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SwAVModel(backbone, feature_dim=8, hidden_dim=16, output_dim=5, num_prototypes=7)
    model.train()  # BatchNorm: running stats differ from batch stats, so eval mode matters
    with torch.no_grad():
        model(torch.randn(16, 3, 6, 6) * 3 + 1)
    return model


def test_extract_matches_direct_forward_in_eval_mode(tmp_path):
    model, data = _model(), _Images()
    out = extract_to_dir(model, data, tmp_path / "x", batch_size=5, chunk_rows=8, progress=False)
    assert model.training, "extraction must restore the model's mode"
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(data.x)
        embs = model.forward_embeddings(data.x)
    got = load_extracted(out)
    np.testing.assert_allclose(got.features, feats.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.embeddings, embs.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.labels, data.y.numpy())
    np.testing.assert_allclose(got.prototypes[0], F.normalize(model.prototypes.weight.detach(), dim=1).numpy(), rtol=1e-6)
    assert got.paths == [f"_Images#{i}" for i in range(37)]
    with open(out / "index.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["row", "path", "label"] and rows[5] == ["4", "_Images#4", "1"]
    assert not (out / "chunks").exists()
    assert json.loads((out / "progress.json").read_text())["complete"] is True


@pytest.mark.parametrize("damage", ["embeddings.npy", "meta.json", "extracted.safetensors"])
def test_a_complete_but_damaged_extraction_is_written_again(tmp_path, caplog, damage):
    """Running the same extraction again over a complete folder whose files were damaged since (truncated or
    missing) extracts it again instead of saying "nothing to do" and failing later."""
    model, data = _model(), _Images()
    kwargs = {"batch_size": 5, "chunk_rows": 8, "progress": False, "write_safetensors": True}
    out = extract_to_dir(model, data, tmp_path / "x", **kwargs)
    good = load_extracted(out).embeddings.copy()
    path = out / damage
    if damage == "meta.json":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="swav.extract"):
        extract_to_dir(model, data, out, **kwargs)
    assert f"held a complete extraction, but extraction file {path} is damaged" in caplog.text
    assert "extracting it again" in caplog.text
    np.testing.assert_allclose(load_extracted(out).embeddings, good, rtol=1e-6, atol=1e-7)
    from safetensors.numpy import load_file
    assert set(load_file(str(out / "extracted.safetensors"))) >= {"embeddings", "labels"}
    caplog.clear()
    with caplog.at_level("INFO", logger="swav.extract"):
        extract_to_dir(model, data, out, **kwargs)  # intact now: nothing to do
    assert "already holds the complete extraction; nothing to do" in caplog.text


def test_resume_continues_after_last_complete_chunk(tmp_path):
    model = _model()
    crashing = _Images(fail_at=21)  # batches of 4, chunks of 8 rows: chunks 0-1 complete, then crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_to_dir(model, crashing, tmp_path / "r", batch_size=4, chunk_rows=8, progress=False)
    marker = json.loads((tmp_path / "r" / "progress.json").read_text())
    assert marker["completed_chunks"] == 2 and not marker["complete"]
    assert not (tmp_path / "r" / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        load_extracted(tmp_path / "r")

    resumed = _Images()
    extract_to_dir(model, resumed, tmp_path / "r", batch_size=4, chunk_rows=8, progress=False)
    assert min(resumed.seen) == 16 and sorted(resumed.seen) == list(range(16, 37))
    extract_to_dir(model, _Images(), tmp_path / "fresh", batch_size=4, chunk_rows=8, progress=False)
    a, b = load_extracted(tmp_path / "r"), load_extracted(tmp_path / "fresh")
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.labels, b.labels)

    again = _Images()  # complete: a third run does no work
    extract_to_dir(model, again, tmp_path / "r", batch_size=4, chunk_rows=8, progress=False)
    assert again.seen == []


class _CrashWhileAssembling(_Images):
    """Fails once every row was read: in the final assembly of the chunks (a kill or a full disk there)."""

    calls_after_last_row = 0

    @property
    def samples(self):  # asked once per row read, then by the assembly (for file names)
        if len(set(self.seen)) == len(self.x):
            self.calls_after_last_row += 1
            if self.calls_after_last_row > 1:
                raise RuntimeError("simulated crash while assembling")
        return None


def test_resume_after_a_crash_while_assembling(tmp_path):
    model = _model()
    with pytest.raises(RuntimeError, match="while assembling"):
        extract_to_dir(model, _CrashWhileAssembling(32), tmp_path / "r", batch_size=4, chunk_rows=8, progress=False,
                   source="imgs")
    marker = json.loads((tmp_path / "r" / "progress.json").read_text())
    assert marker["completed_chunks"] == marker["num_chunks"] == 4 and not marker["complete"]
    resumed = _Images(32)  # every chunk is there: no row is read again, the files are assembled
    extract_to_dir(model, resumed, tmp_path / "r", batch_size=4, chunk_rows=8, progress=False,
                   source="imgs")
    assert resumed.seen == []
    extract_to_dir(model, _Images(32), tmp_path / "fresh", batch_size=4, chunk_rows=8, progress=False,
                   source="imgs")
    np.testing.assert_array_equal(load_extracted(tmp_path / "r").embeddings,
                                  load_extracted(tmp_path / "fresh").embeddings)


def test_resume_refuses_another_model_unless_overwrite(tmp_path):
    with pytest.raises(RuntimeError):
        extract_to_dir(_model(0), _Images(fail_at=30), tmp_path, batch_size=4, chunk_rows=8, progress=False)
    with pytest.raises(ValueError, match=r"differs in the model's weights\); .*Choose another --output-dir, or "
                                         r"pass --overwrite \(Python: overwrite=True\)"):
        extract_to_dir(_model(1), _Images(), tmp_path, batch_size=4, chunk_rows=8, progress=False)
    data = _Images()
    extract_to_dir(_model(1), data, tmp_path, batch_size=4, chunk_rows=8, overwrite=True, progress=False)
    assert sorted(data.seen) == list(range(37))


def test_features_only_limit_and_bad_arguments(tmp_path):
    out = extract_to_dir(_model(), _Images(), tmp_path, what="features", limit=10, batch_size=3, progress=False)
    got = load_extracted(out)
    assert got.features.shape == (10, 8) and got.embeddings is None and got.prototypes == []
    with pytest.raises(ValueError, match="what must be one of"):
        extract_to_dir(_model(), _Images(), tmp_path / "a", what="logits")
    with pytest.raises(ValueError, match="batch_size"):
        extract_to_dir(_model(), _Images(), tmp_path / "b", batch_size=0)


def test_image_folder_paths_labels_and_safetensors(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    to_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
    data = ImageFolderDataset(tmp_path / "imgs", transform=to_tensor)
    out = extract_to_dir(_model(), data, tmp_path / "o", batch_size=4, write_safetensors=True, progress=False)
    got = load_extracted(out)
    assert [os.path.relpath(p, tmp_path / "imgs") for p in got.paths] == \
        [os.path.join(c, f"{i}.png") for c in ("cat", "dog") for i in range(3)]
    assert got.labels.tolist() == [0, 0, 0, 1, 1, 1] and got.meta["classes"] == ["cat", "dog"]
    stored = load_file(str(out / "extracted.safetensors"))
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "extracted.safetensors").stat().st_mode & 0o777 == (out / "features.npy").stat().st_mode & 0o777 \
        == 0o666 & ~umask
    np.testing.assert_array_equal(stored["features"], got.features)
    np.testing.assert_array_equal(stored["embeddings"], got.embeddings)
    np.testing.assert_array_equal(stored["labels"], got.labels)


def _run_cli(argv: list[str]) -> int:
    from swav.cli.extract import register

    parser = argparse.ArgumentParser(prog="swav")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST IDX files not installed")
def test_cli_extract_fashion_mnist_equals_model(tmp_path, capsys):
    from swav.datasets import IDXDataset
    from swav.eval.transforms import transforms_for_spec
    from swav.export import export_full
    from swav.model import ModelSpec, build_model

    spec = ModelSpec("resnet-compact-s2-8", small_images=True, in_channels=1, hidden_dim=16, output_dim=8,
                     num_prototypes=10)
    model = build_model(spec)
    checkpoint = export_full(model, tmp_path / "model.pt")
    argv = ["extract", "--checkpoint", str(checkpoint), "--data", FASHION, "--split", "test", "--limit", "40",
            "--what", "embeddings", "--batch-size", "16", "--workers", "0", "--device", "cpu",
            "--output-dir", str(tmp_path / "feats"), "--no-progress"]
    assert _run_cli(argv) == 0
    assert "embeddings (40, 8)" in capsys.readouterr().out
    got = load_extracted(tmp_path / "feats")
    assert got.features is None and got.meta["split"] == "test" and got.meta["channels"] == 1
    test = IDXDataset(FASHION, "test", transforms_for_spec(spec)[1])
    x = torch.stack([test[i][0] for i in range(40)])
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(got.embeddings, model.forward_embeddings(x).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got.labels, test.targets[:40].numpy())
    assert _run_cli(argv[:-3] + ["--output-dir", str(tmp_path / "bad"), "--batch-size", "0"]) == 2  # usage error


# --- unreadable images, validation before overwrite, damaged folders, --output-dir a file ---------

_BAD = (os.path.join("cat", "3.png"), os.path.join("dog", "9.png"))  # dog/9.png is the last file: wraps to row 0


def _image_folder(root, size: int = 6, bad=_BAD):
    """26 random PNGs in cat/ and dog/; the files in ``bad`` are unreadable (truncated, not an image)."""
    rng = np.random.default_rng(3)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(13):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    for k, rel in enumerate(bad):
        whole = (root / rel).read_bytes()
        (root / rel).write_bytes(whole[:40] if k % 2 == 0 else b"not an image")
    return root


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def _folder_digest(folder) -> dict:
    import hashlib

    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_left_out_and_rows_stay_aligned(tmp_path, workers):
    from swav.extract import open_source_dataset
    from swav.images import load_image

    root = _image_folder(tmp_path / "imgs")
    model = _model()
    out = extract_to_dir(model, ImageFolderDataset(root, transform=_to_tensor), tmp_path / "x", batch_size=4,
                         chunk_rows=8, workers=workers, progress=False)
    got = load_extracted(out)
    good = [os.path.join(c, f"{i}.png") for c in ("cat", "dog") for i in sorted(range(13), key=str)
            if os.path.join(c, f"{i}.png") not in _BAD]
    assert [os.path.relpath(p, root) for p in got.paths] == good
    assert got.features.shape == (24, 8) and got.embeddings.shape == (24, 5) and got.labels.shape == (24,)
    # row i holds the features and label of the file named in index.csv row i, not of a stand-in
    model.eval()
    with torch.no_grad():
        x = torch.stack([_to_tensor(load_image(p)) for p in got.paths])
        np.testing.assert_allclose(got.features, model.forward_features(x).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.embeddings, model.forward_embeddings(x).numpy(), rtol=1e-5, atol=1e-6)
    assert got.labels.tolist() == [0 if p.startswith("cat") else 1 for p in good]
    with open(out / "index.csv", newline="") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == got.paths
    listed = (out / "bad_images.txt").read_text().splitlines()
    assert sorted(os.path.relpath(p, root) for p in listed) == sorted(_BAD)
    source = {os.path.relpath(p, root): i for i, (p, _) in enumerate(ImageFolderDataset(root).samples)}
    assert got.meta["unreadable_rows"] == sorted(source[b] for b in _BAD) and got.meta["num_source_rows"] == 26
    assert [os.path.relpath(ImageFolderDataset(root).samples[r][0], root) for r in got.source_rows] == good
    # the source data set reopened for the report / k-means baseline is aligned with the rows too
    reopened = open_source_dataset({**got.meta, "data": str(root), "split": "train", "channels": 3})
    assert len(reopened) == 24
    assert all(np.array_equal(np.asarray(reopened[i][0]), np.asarray(load_image(got.paths[i]))) for i in (0, 5, 23))


class _CrashingFolder(ImageFolderDataset):
    """An image folder data set (real files) that crashes at one row: an interrupted run."""

    def __init__(self, root, fail_at: int) -> None:
        super().__init__(root, transform=_to_tensor)
        self.fail_at = fail_at

    def __getitem__(self, index):
        if index == self.fail_at:
            raise RuntimeError(f"simulated crash at {index}")
        return super().__getitem__(index)


def test_resume_with_unreadable_images_equals_uninterrupted_run(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    model = _model()
    options = {"batch_size": 4, "chunk_rows": 8, "source": "imgs", "progress": False}
    with pytest.raises(RuntimeError, match="simulated crash"):  # chunks 0-1 (rows 0-15, cat/3.png among them) done
        extract_to_dir(model, _CrashingFolder(root, 18), tmp_path / "r", **options)
    assert json.loads((tmp_path / "r" / "progress.json").read_text())["completed_chunks"] == 2
    extract_to_dir(model, ImageFolderDataset(root, transform=_to_tensor), tmp_path / "r", **options)
    extract_to_dir(model, ImageFolderDataset(root, transform=_to_tensor), tmp_path / "fresh", **options)
    a, b = load_extracted(tmp_path / "r"), load_extracted(tmp_path / "fresh")
    assert a.paths == b.paths and len(a.paths) == 24
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (tmp_path / "r" / "bad_images.txt").read_text() == (tmp_path / "fresh" / "bad_images.txt").read_text()


def test_unusable_data_or_model_leaves_an_earlier_extraction_untouched(tmp_path):
    from swav.images import TooManyBadImagesError

    model = _model()
    out = extract_to_dir(model, ImageFolderDataset(_image_folder(tmp_path / "imgs"), transform=_to_tensor),
                         tmp_path / "x", batch_size=4, progress=False)
    before = _folder_digest(out)
    all_bad = _image_folder(tmp_path / "bad", bad=[os.path.join(c, f"{i}.png") for c in ("cat", "dog") for i in range(13)])
    with pytest.raises(TooManyBadImagesError):
        extract_to_dir(model, ImageFolderDataset(all_bad, transform=_to_tensor), out, overwrite=True, progress=False)
    assert _folder_digest(out) == before
    grey = lambda im: _to_tensor(im)[:1]  # 1-channel images for a 3-channel model
    with pytest.raises(ValueError, match="model cannot process"):
        extract_to_dir(model, ImageFolderDataset(tmp_path / "imgs", transform=grey), out, overwrite=True, progress=False)
    assert _folder_digest(out) == before
    assert load_extracted(out).features.shape == (24, 8)


def _checkpoint(tmp_path):
    from swav.export import export_full
    from swav.model import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec("resnet-compact-8", small_images=True, hidden_dim=16, output_dim=8, num_prototypes=6)
    return export_full(build_model(spec), tmp_path / "model.pt")


def test_cli_extract_unreadable_images_overwrite_validation_and_file_output_dir(tmp_path, capsys):
    from swav.eval.transforms import transforms_for_checkpoint
    from swav.images import load_image
    from swav.pretrained import load_pretrained

    checkpoint = _checkpoint(tmp_path)
    root = _image_folder(tmp_path / "imgs", size=12)
    out = tmp_path / "feats"
    common = ["--checkpoint", str(checkpoint), "--workers", "0", "--device", "cpu", "--batch-size", "5",
              "--chunk-rows", "10", "--no-progress"]
    assert _run_cli(["extract", *common, "--data", str(root), "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert "for 24 images" in captured.out
    assert f"2 unreadable images not extracted, listed in {out / 'bad_images.txt'}" in captured.err
    got = load_extracted(out)
    assert sorted(os.path.relpath(p, root) for p in (out / "bad_images.txt").read_text().splitlines()) == sorted(_BAD)
    model = load_pretrained(checkpoint).eval()
    transform = transforms_for_checkpoint(checkpoint, model.spec)[1]
    with torch.no_grad():
        x = torch.stack([transform(load_image(p)) for p in got.paths])
        np.testing.assert_allclose(got.embeddings, model.forward_embeddings(x).numpy(), rtol=1e-4, atol=1e-5)

    # a data set that cannot be read must not cost the complete extraction, even with --overwrite
    before = _folder_digest(out)
    all_bad = _image_folder(tmp_path / "allbad", size=12,
                            bad=[os.path.join(c, f"{i}.png") for c in ("cat", "dog") for i in range(13)])
    assert _run_cli(["extract", *common, "--data", str(all_bad), "--output-dir", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "unreadable images out of" in err and "--max-bad-fraction F" in err  # the option these commands have
    assert _folder_digest(out) == before and load_extracted(out).embeddings.shape == (24, 8)
    # 12 unreadable of 36: above the default 1% (and 10 files), within --max-bad-fraction 0.5: left out
    many_bad = _image_folder(tmp_path / "manybad", size=12, bad=[os.path.join("cat", f"{i}.png") for i in range(12)])
    for extra in range(10):
        Image.new("RGB", (12, 12), (extra * 20, 0, 0)).save(many_bad / "dog" / f"extra{extra}.png")
    assert _run_cli(["extract", *common, "--data", str(many_bad), "--output-dir", str(tmp_path / "m1")]) == 1
    assert "unreadable images out of" in capsys.readouterr().err
    assert _run_cli(["extract", *common, "--data", str(many_bad), "--output-dir", str(tmp_path / "m2"),
                     "--max-bad-fraction", "0.5"]) == 0
    assert load_extracted(tmp_path / "m2").embeddings.shape[0] == 24
    assert "12 unreadable images not extracted" in capsys.readouterr().err

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert _run_cli(["extract", *common, "--data", str(root), "--output-dir", str(afile)]) == 1
    assert capsys.readouterr().err.strip() == \
        f"swav extract: error: --output-dir {str(afile)!r} is an existing file: choose a folder"
    assert afile.read_text() == "keep me"


def test_a_small_image_model_extracts_a_folder_of_mixed_sizes(tmp_path, monkeypatch):
    """Small-image models (Fashion-MNIST, CIFAR) take images whole; a folder of photos of other sizes is
    resized and centre-cropped to the pretraining's crop size (or --crop-size) so that it can be batched."""
    from PIL import Image

    from swav.checkpoint import save_model_file
    from swav.eval.transforms import transforms_for_checkpoint
    from swav.extract import extract_job
    from swav.model import ModelSpec, build_model

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (64, 64), (20, 50), (32, 32), (300, 200)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    spec = ModelSpec("resnet-compact-8", small_images=True, hidden_dim=0, output_dim=8, num_prototypes=5)
    checkpoint = save_model_file(tmp_path / "model.pt", build_model(spec), spec.to_dict(),
                                 config={"crops": {"sizes": [32, 16]}})
    out = extract_job(checkpoint, folder, tmp_path / "feats", batch_size=8, device="cpu", progress=False)
    assert np.load(out / "features.npy").shape[0] == 5
    # a relative --data is recorded as an absolute path: `swav report` run elsewhere finds the images
    monkeypatch.chdir(tmp_path)
    again = extract_job(checkpoint, folder.name, "feats-relative", batch_size=8, device="cpu", progress=False)
    assert json.loads((again / "meta.json").read_text())["data"] == str(folder.resolve())
    with open(again / "index.csv", encoding="utf-8") as fh:  # and so are the image paths
        assert sorted(row["path"] for row in csv.DictReader(fh)) == sorted(str(p) for p in folder.resolve().iterdir())
    # `swav report` run from another folder finds every image, with or without --data
    from swav.extract import load_extracted
    from swav.report import _image_loader
    meta = load_extracted(again).meta
    monkeypatch.chdir(tmp_path.parent)
    paths = [str(folder.resolve() / f"{i}.png") for i in range(5)]
    for given in (None, ImageFolderDataset(folder)):
        load = _image_loader(meta, given)
        assert all(load(row, path) is not None for row, path in enumerate(paths))
    _, test = transforms_for_checkpoint(checkpoint, spec)
    assert tuple(test(Image.open(folder / "4.png")).shape) == (3, 32, 32)
    assert tuple(test(Image.open(folder / "3.png")).shape) == (3, 32, 32)
    _, test = transforms_for_checkpoint(checkpoint, spec, crop_size=24)  # --crop-size
    assert tuple(test(Image.open(folder / "0.png")).shape) == (3, 24, 24)


def test_the_fix_command_for_a_damaged_extraction_keeps_its_options(tmp_path):
    from swav.extract import _fix_command

    meta = {"checkpoint": "m.pt", "data": "imgs", "split": "val", "what": "features", "limit": 50,
            "safetensors": True}
    assert _fix_command(tmp_path, meta) == (f"swav extract --checkpoint m.pt --data imgs --split val --what features "
                                            f"--limit 50 --safetensors --output-dir {tmp_path} --overwrite")


def _folder(root, names, size=(6, 6)):
    rng = np.random.default_rng(0)
    for name in names:
        (root / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)


def test_a_resume_or_rerun_with_other_images_or_transform_is_refused(tmp_path):
    """The resume check covered the row count and the --data string only: files renamed between a crash and
    the resume gave rows of other images' features; a finished folder said "nothing to do" for a changed
    folder or another normalisation. Now the listing, the transform and the precision must match."""
    _folder(tmp_path / "imgs", [f"{c}/{i}.png" for c in ("a", "b") for i in range(6)])
    model = _model()
    data = ImageFolderDataset(tmp_path / "imgs", transform=_to_tensor)
    extract_to_dir(model, data, tmp_path / "o", batch_size=4, chunk_rows=4, progress=False, source="imgs")
    os.rename(tmp_path / "imgs" / "a" / "0.png", tmp_path / "imgs" / "b" / "9.png")  # same count, other order
    renamed = ImageFolderDataset(tmp_path / "imgs", transform=_to_tensor)
    with pytest.raises(ValueError, match="differs in the images \\(files added, removed or renamed since\\)"):
        extract_to_dir(model, renamed, tmp_path / "o", batch_size=4, progress=False, source="imgs")
    out = extract_to_dir(model, renamed, tmp_path / "o", batch_size=4, progress=False, source="imgs", overwrite=True)
    assert extract_to_dir(model, ImageFolderDataset(tmp_path / "imgs", transform=_to_tensor), out, batch_size=4,
                          progress=False, source="imgs") == out  # the same job again (a fresh listing): done

    class Scaled:  # another normalisation, as another checkpoint file's Normalize would give
        def __call__(self, im):
            return _to_tensor(im) * 2

        def __repr__(self):
            return "Scaled(2)"
    with pytest.raises(ValueError, match="differs in the image transform"):
        extract_to_dir(model, ImageFolderDataset(tmp_path / "imgs", transform=Scaled()), out, batch_size=4,
                       progress=False, source="imgs")
    assert [os.path.relpath(p, tmp_path / "imgs") for p in load_extracted(out).paths][-1] == os.path.join("b", "9.png")
    with pytest.raises(ValueError, match="differs in the precision"):
        extract_to_dir(model, renamed, out, batch_size=4, progress=False, source="imgs", amp_dtype=torch.bfloat16)
    assert not (out / "extracted.safetensors").exists()  # asked for on a complete folder: written, not skipped
    extract_to_dir(model, renamed, out, batch_size=4, progress=False, source="imgs", write_safetensors=True)
    assert (out / "extracted.safetensors").is_file() and load_extracted(out).meta["safetensors"] is True


def test_file_names_that_are_not_utf8_are_kept(tmp_path):
    root = tmp_path / "imgs"
    _folder(root, ["a/ok.png"])
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    Image.new("RGB", (6, 6)).save(root / "a" / name)
    data = ImageFolderDataset(root, transform=_to_tensor)
    out = extract_to_dir(_model(), data, tmp_path / "o", batch_size=4, progress=False)
    assert sorted(os.path.basename(p) for p in load_extracted(out).paths) == sorted([name, "ok.png"])


def test_images_of_several_sizes_that_cannot_be_batched_are_named_first(tmp_path):
    """A small-image model whose file stores no crop size takes images whole: sizes that differ are refused
    before an earlier extraction in the folder is cleared (it was, and a stack traceback followed)."""
    _folder(tmp_path / "same", ["a/0.png", "a/1.png"])
    model = _model()
    out = extract_to_dir(model, ImageFolderDataset(tmp_path / "same", transform=_to_tensor), tmp_path / "o",
                         batch_size=4, progress=False)
    _folder(tmp_path / "mixed", ["a/0.png"], size=(6, 6))
    _folder(tmp_path / "mixed", ["a/1.png"], size=(8, 7))
    with pytest.raises(ValueError, match="different sizes \\(6x6, 8x7\\).*stores none"):
        extract_to_dir(model, ImageFolderDataset(tmp_path / "mixed", transform=_to_tensor), out, batch_size=4,
                       progress=False, overwrite=True)
    assert load_extracted(out).features.shape[0] == 2  # the earlier extraction is intact


def test_a_second_process_extracting_into_the_same_folder_is_refused(tmp_path):
    import subprocess
    import sys

    from swav.run_folder import RunLockedError

    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from swav.run_folder import RunLock; "
                               f"lock = RunLock({str(out)!r}); lock.acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"another process \\(pid {holder.pid} on .*, training\\) is using"):
            extract_to_dir(_model(), _Images(), out, batch_size=4, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert extract_to_dir(_model(), _Images(), out, batch_size=4, progress=False) == out  # free again

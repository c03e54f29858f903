"""``data.bit_depth``: 12-bit data stored in 16-bit image files is scaled 0..4095 -> 0..255 in training, and
evaluation, extraction and the report read the images as the model was trained on them."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from swav.datasets import build_dataset
from swav.eval.transforms import pretraining_bit_depth
from swav.extract import extract_job, load_extracted, open_source_dataset
from swav.shards import ShardDataset, write_shards
from swav.train import train
from tests.train_helpers import tiny_config


@pytest.fixture(scope="module")
def twelve_bit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 4096, (20, 20), dtype=np.uint16)).save(folder / f"slice{i:02d}.png")
    return folder


def test_folders_and_shards_scale_by_the_bit_depth(twelve_bit_folder, tmp_path):
    raw = np.asarray(Image.open(twelve_bit_folder / "slice00.png")).astype(np.int64)
    expected = (raw * 255 + 2047) // 4095
    folder = build_dataset(twelve_bit_folder, channels=1, bit_depth=12)
    assert np.array_equal(np.asarray(folder[0][0]), expected)
    assert np.asarray(build_dataset(twelve_bit_folder, channels=1)[0][0]).max() <= 16  # full 16-bit: nearly black
    write_shards(twelve_bit_folder, tmp_path / "shards", num_shards=2)
    shards = ShardDataset(tmp_path / "shards", rank=0, world_size=1, channels=1, return_key=True, bit_depth=12)
    images = {key: np.asarray(image) for image, _, key in shards}
    assert np.array_equal(images["slice00.png"], expected)
    with pytest.raises(ValueError, match="data.bit_depth"):
        build_dataset(twelve_bit_folder, bit_depth=20)


def test_a_run_with_a_bit_depth_is_extracted_the_same_way(twelve_bit_folder, tmp_path):
    cfg = tiny_config(tmp_path / "run", twelve_bit_folder, **{
        "data.bit_depth": 12, "data.channels": 1, "model.backbone": "resnet-compact-s2-8", "model.small_images": True,
        "optim.epochs": 1})
    assert train(cfg).status == "complete"
    model = tmp_path / "run" / "model.pt"
    assert pretraining_bit_depth(model) == 12 and pretraining_bit_depth(model, 16) == 16
    out = extract_job(model, twelve_bit_folder, tmp_path / "x12", workers=0, progress=False)
    full = extract_job(model, twelve_bit_folder, tmp_path / "x16", workers=0, progress=False, bit_depth=16)
    got, other = load_extracted(out), load_extracted(full)
    assert got.meta["bit_depth"] == 12 and other.meta["bit_depth"] == 16
    assert not np.allclose(got.embeddings, other.embeddings)  # the images differ: 12-bit scaling is applied
    source = open_source_dataset(got.meta)  # what `swav report` shows: the images as trained on
    assert np.asarray(source[0][0]).max() > 200


def test_scan_reports_the_bit_depth_of_16_bit_files(twelve_bit_folder, tmp_path, capsys):
    from swav.cli import main
    from swav.scan import format_report, scan_folder

    report = scan_folder(twelve_bit_folder)
    assert report.high_bit_files == 16 and 3500 < report.high_bit_max <= 4095 and report.suggested_bit_depth == 12
    assert "--set data.bit_depth=12" in format_report(report)
    Image.fromarray(np.full((4, 4), 60000, np.uint16)).save(tmp_path / "full.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.jpg")
    full = scan_folder(tmp_path)
    assert full.high_bit_files == 1 and full.suggested_bit_depth is None and "(full 16-bit range)" in format_report(full)
    assert main(["scan", str(twelve_bit_folder)]) == 0
    assert "16-bit files: 16, values up to" in capsys.readouterr().out


def test_a_data_set_object_must_agree_with_the_config(twelve_bit_folder, tmp_path):
    from swav.datasets import ImageFolderDataset
    from tests.train_helpers import tiny_model

    cfg = tiny_config(tmp_path / "run", **{"optim.epochs": 1})
    with pytest.raises(ValueError, match="set data.bit_depth=12 in the config"):
        train(cfg, dataset=ImageFolderDataset(twelve_bit_folder, bit_depth=12), model_builder=tiny_model)
    assert not (tmp_path / "run").exists()


def _with_exif_orientation(png: bytes, orientation: int) -> bytes:
    """``png`` with an eXIf chunk holding ``orientation`` (OpenCV writes none)."""
    import struct
    import zlib

    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()[6:]  # the TIFF structure, without the "Exif\0\0" marker
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_colour_files_are_read_at_full_precision(tmp_path, suffix, caplog):
    """Pillow decodes 48-bit PNG/TIFF to 8-bit RGB keeping the high bytes (12-bit data: at most 15 of 255, and
    data.bit_depth had no effect). They are read with OpenCV and scaled like 16-bit grey files."""
    import logging

    cv2 = pytest.importorskip("cv2")
    from swav.images import load_image

    rgb = np.random.default_rng(0).integers(0, 4096, (6, 5, 3)).astype(np.uint16)
    path = tmp_path / f"c{suffix}"
    cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    twelve = np.asarray(load_image(path, bit_depth=12)).astype(int)
    assert np.array_equal(twelve, (rgb.astype(int) * 255 + 2047) // 4095)
    with caplog.at_level(logging.WARNING, logger="swav"):
        full = np.asarray(load_image(path)).astype(int)
    assert np.array_equal(full, (rgb.astype(int) * 255 + 32767) // 65535)
    from swav.scan import scan_folder
    report = scan_folder(tmp_path)
    assert (report.high_bit_files, report.suggested_bit_depth) == (1, 12)  # scan names the setting for them too
    if suffix == ".png":
        rotated = tmp_path / "rotated.png"
        rotated.write_bytes(_with_exif_orientation(path.read_bytes(), 6))
        turned = load_image(rotated, bit_depth=12)
        assert turned.size == (6, 5)  # 5 wide x 6 high, turned by 90 degrees
        assert np.array_equal(np.asarray(turned), np.rot90(twelve.astype(np.uint8), k=-1))

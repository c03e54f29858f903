"""`swav scan`: counts, reasons, sizes, report text, JSON and exit codes."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from PIL import Image

from swav.cli import scan as scan_cli
from swav.scan import format_report, scan_folder


def build(root):
    """3 good images (sizes 4x3, 10x8, 1x1) and 4 bad files of known kinds, one hidden file."""
    (root / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (4, 3)).save(root / "a" / "x.png")
    Image.new("L", (10, 8)).save(root / "a" / "b" / "ünï.jpg")
    Image.new("RGBA", (1, 1)).save(root / "one.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "a" / "text.jpeg").write_text("just text")
    Image.new("RGB", (300, 200), (9, 9, 9)).save(root / "cut.jpg", quality=95)
    (root / "cut.jpg").write_bytes((root / "cut.jpg").read_bytes()[:1500])
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # signature only
    Image.new("RGB", (2, 2)).save(root / ".hidden.png")
    return root


@pytest.mark.parametrize("workers", [1, 3])
def test_scan_counts_reasons_and_sizes(tmp_path, workers):
    report = scan_folder(build(tmp_path), workers=workers)
    assert (report.total, report.ok, len(report.bad)) == (7, 3, 4)
    by_path = {os.path.relpath(b.path, tmp_path): b.kind for b in report.bad}
    assert by_path["empty.jpg"] == "empty"
    assert by_path[os.path.join("a", "text.jpeg")] == "not_an_image"
    assert by_path["cut.jpg"] == "truncated"
    assert set(by_path) == {"empty.jpg", os.path.join("a", "text.jpeg"), "cut.jpg", "bomb.png"}
    assert [b.path for b in report.bad] == sorted(b.path for b in report.bad)
    assert sum(report.bad_by_kind.values()) == 4
    stats = report.size_stats()
    assert stats["width"] == {"min": 1, "median": 4, "max": 10, "mean": 5.0}
    assert stats["height"]["max"] == 8 and report.bad_fraction == pytest.approx(4 / 7)


def test_report_text_and_dict(tmp_path):
    report = scan_folder(build(tmp_path), workers=1)
    text = format_report(report, max_listed=2)
    assert "7 image files" in text and "readable:   3" in text and "unreadable: 4" in text
    assert "empty 1" in text and "... and 2 more" in text
    data = report.to_dict()
    assert json.loads(json.dumps(data))["bad_count"] == 4
    assert data["bad_by_kind"]["truncated"] == 1


def test_scan_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    empty = scan_folder(tmp_path)
    assert empty.total == 0 and "no image files" in format_report(empty)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="swav")
    scan_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_exit_codes_and_outputs(tmp_path, capsys):
    data = build(tmp_path / "data")
    out_json, bad_list = tmp_path / "r.json", tmp_path / "lists" / "bad.txt"
    code = run_cli(["scan", str(data), "--json", str(out_json), "--bad-list", str(bad_list),
                    "--workers", "2"])
    assert code == 1  # 4/7 unreadable > 0.01
    assert "unreadable: 4" in capsys.readouterr().out
    assert json.loads(out_json.read_text(encoding="utf-8"))["total"] == 7
    assert len(bad_list.read_text(encoding="utf-8").splitlines()) == 4
    assert run_cli(["scan", str(data), "--max-bad-fraction", "0.6", "--channels", "1"]) == 0
    assert run_cli(["scan", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "void").mkdir()
    assert run_cli(["scan", str(tmp_path / "void")]) == 2


def test_images_in_formats_not_read_are_named_not_left_out_silently(tmp_path, caplog):
    """An iPhone export holds HEIC files beside JPEGs: they are counted by extension (scan) and named in a
    warning (training), rather than the data set silently shrinking to the JPEGs."""
    import logging

    from PIL import Image

    from swav.datasets import ImageFolderDataset
    from swav.scan import format_report, scan_folder

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "1.jpg")
    for i in range(3):
        (tmp_path / "a" / f"IMG_{i}.HEIC").write_bytes(b"\x00" * 16)
    (tmp_path / "a" / "labels.csv").write_text("x")
    report = scan_folder(tmp_path)
    assert report.total == 1 and report.to_dict()["skipped_by_extension"] == {".csv": 1, ".heic": 3}
    text = format_report(report)
    assert "images in formats swav does not read, left out: .heic 3" in text and "not images: 1 (.csv 1)" in text
    with caplog.at_level(logging.WARNING, logger="swav"):
        assert len(ImageFolderDataset(str(tmp_path))) == 1
    assert "3 file(s) under" in caplog.text and "(.heic 3)" in caplog.text and ".csv" not in caplog.text

"""Output paths are checked before any work: a file where a folder is wanted, a folder where a file is wanted,
a read-only place (issue: bad input gets a clear error and loses nothing)."""
from __future__ import annotations

import pytest
from PIL import Image

from swav.cli import main
from swav.output_paths import check_output_file, check_output_folder


def test_checks_name_the_option_and_the_problem(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"--output-dir '.*afile' is an existing file: choose a folder"):
        check_output_folder(afile, "--output-dir")
    with pytest.raises(ValueError, match=r"'.*afile' is a file, so the folder cannot be created"):
        check_output_folder(afile / "run", "--output-dir")
    with pytest.raises(ValueError, match=r"--output '.*' is a folder: give a file name"):
        check_output_file(tmp_path, "--output")
    assert check_output_folder(tmp_path / "a" / "b", "--output-dir") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # nothing created
    assert check_output_file(tmp_path / "new" / "r.html", "--output") == tmp_path / "new" / "r.html"


def test_commands_refuse_bad_output_paths_before_working(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(photos / f"{i}.png")
    cases = [(["pretrain", "--data", str(photos), "--output-dir", str(afile)], "is an existing file"),
             (["pack-shards", str(photos), str(afile)], "is an existing file"),
             (["scan", str(photos), "--json", str(tmp_path)], "is a folder: give a file name"),
             (["report", "--run-dir", str(tmp_path), "--output", str(tmp_path)], "is a folder: give a file name"),
             (["report", "--cluster-dir", str(tmp_path / "none"), "--output", str(tmp_path / "r.html")],
              "is not the output of `swav cluster`"),
             (["report", "--output", str(tmp_path / "r.html")], "--cluster-dir, --run-dir, --features-dir"),
             (["export", "--checkpoint", str(afile), "--output", str(tmp_path)], "is a folder: give a file name")]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code in (1, 2) and message in err and "Traceback" not in err, (argv, err)
    assert afile.read_text() == "keep me"

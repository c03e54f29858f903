"""Tests of swav.curves, swav.report and ``swav report``: the HTML is one well-formed file without
external resources, its grids show each cluster's highest-scoring images, and every image decodes
in a headless Chromium."""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swav.curves import curve_series, plot_training_curves, read_metrics

FASHION = "/usr/share/datasets/fashion-mnist"
# the project's sample photos live in shared/ beside the checkout (CI copies it there)
PHOTOS = next((str(p) for p in (Path(__file__).resolve().parents[2] / "shared" / "data" / "photos-500x375",
                                Path("/work/shared/data/photos-500x375")) if p.is_dir()), "")
XHTML = "{http://www.w3.org/1999/xhtml}"


def _engine_records(steps: int = 30, k: int = 10) -> list[dict]:
    """Records shaped like swav.train's metrics.jsonl, plus k-NN evaluations every 10 steps."""
    records = []
    for s in range(1, steps + 1):
        records.append({"kind": "step", "step": s, "epoch": s // 10, "loss": math.log(k) - s / 20,
                        "lr": 0.1 * min(1, s / 5), "images_per_s": 500.0, "prototypes_in_use": min(k, s),
                        "ln_k": math.log(k), "eta_s": 1.0})
        if s % 10 == 0:
            records.append({"kind": "epoch", "step": s, "epoch": s // 10, "loss_mean": 1.0})
            records.append({"kind": "eval", "step": s, "knn_top1": 50.0 + s})
    return records


def _write_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 99, "lo')
    return folder


def test_curves_from_engine_records(tmp_path):
    records = read_metrics(_write_run(tmp_path / "run", _engine_records()))
    assert len(records) == 36  # the torn last line is dropped
    series = curve_series(records)
    assert series["loss"][0][:3] == [1.0, 2.0, 3.0] and series["ln_k"][1][0] == pytest.approx(math.log(10))
    assert series["knn"] == ([10.0, 20.0, 30.0], [60.0, 70.0, 80.0])
    assert len(series["prototypes_in_use"][1]) == 30 and "loss_mean" not in series
    pngs = plot_training_curves(tmp_path / "run", tmp_path / "png")
    assert sorted(pngs) == ["knn", "loss", "lr", "prototypes_in_use"]
    for name, data in pngs.items():
        assert Image.open(io.BytesIO(data)).size == (500, 320)
        assert (tmp_path / "png" / f"{name}.png").read_bytes() == data
    # ln K is derived from the prototype count when only that was logged
    assert curve_series([{"step": 1, "loss": 2.0, "num_prototypes": 3000}])["ln_k"][1] == [pytest.approx(8.00637, abs=1e-5)]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path / "nowhere")


def _run_cli(argv: list[str]) -> int:
    from swav.cli.cluster import register

    parser = argparse.ArgumentParser(prog="swav")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _parse(path: Path) -> ET.Element:
    """Parse as XML: a strict well-formedness check (unclosed tags or bad escapes fail)."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    return ET.fromstring(text[len("<!DOCTYPE html>"):])


def _check_self_contained(path: Path, root: ET.Element) -> list[ET.Element]:
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text.replace("http://www.w3.org", "")), "external URL"
    assert "url(" not in text and "@import" not in text
    assert not [e for e in root.iter() if e.tag in ("script", "link", "iframe", "object", "embed")]
    for element in root.iter():
        for attr in ("href", "src", "srcset", "action"):
            value = element.get(attr)
            assert value is None or value.startswith("data:image/png;base64,"), (element.tag, attr, value[:80])
    images = [e for e in root.iter("img")]
    for img in images:
        png = base64.b64decode(img.get("src").split(",", 1)[1], validate=True)
        Image.open(io.BytesIO(png)).verify()
    return images


def _chromium_widths(path: Path, tmp_path: Path) -> tuple[int, int, list[int]]:
    """Open a copy of the report in headless Chromium; a script (added only to the copy) records how
    many images decoded and their natural widths into the DOM, which --dump-dom prints."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium)")
    probe = ("<script>window.addEventListener('load', function () {var n = 0, w = [];"
             "for (var i = 0; i < document.images.length; i++) {var im = document.images[i];"
             "if (im.complete && im.naturalWidth > 0) n++; w.push(im.naturalWidth);}"
             "var d = document.createElement('div'); d.id = 'img-check'; d.setAttribute('data-ok', n);"
             "d.setAttribute('data-total', document.images.length); d.setAttribute('data-widths', w.join(' '));"
             "document.body.appendChild(d);});</script>")
    copy = tmp_path / "probe.html"
    copy.write_text(path.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    result = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                             "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}",
                             "--dump-dom", copy.resolve().as_uri()],
                            capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r'id="img-check" data-ok="(\d+)" data-total="(\d+)" data-widths="([\d ]*)"', result.stdout)
    assert found, f"no probe result from Chromium: {result.stderr[-2000:]}"
    return int(found.group(1)), int(found.group(2)), [int(w) for w in found.group(3).split()]


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST IDX files not installed")
def test_report_on_fashion_mnist_renders_in_chromium(tmp_path, caplog):
    from swav.export import export_full
    from swav.model import ModelSpec, build_model

    model = build_model(ModelSpec("resnet-compact-s2-8", small_images=True, in_channels=1, hidden_dim=16,
                                  output_dim=8, num_prototypes=10))
    export_full(model, tmp_path / "model.pt")
    assert _run_cli(["cluster", "--checkpoint", str(tmp_path / "model.pt"), "--data", FASHION, "--split", "test",
                     "--limit", "300", "--workers", "0", "--device", "cpu", "--no-progress",
                     "--assignment", "equipartition", "--output-dir", str(tmp_path / "cl")]) == 0
    run = _write_run(tmp_path / "run", _engine_records())
    out = tmp_path / "report" / "report.html"
    assert _run_cli(["report", "--cluster-dir", str(tmp_path / "cl"), "--run-dir", str(run), "--output", str(out),
                     "--top-clusters", "4", "--images-per-cluster", "6", "--map-points", "120"]) == 0
    # the clusters' model.pt lies outside the run folder: the report says it may mix two models
    assert "which is not in the run folder" in caplog.text
    root = _parse(out)
    images = _check_self_contained(out, root)
    alts = [img.get("alt") for img in images]
    assert {"cluster sizes", "loss", "lr", "prototypes_in_use", "knn", "embedding map"} <= set(alts)

    # each grid shows the cluster's highest-scoring images, best first (ties: any order)
    with open(tmp_path / "cl" / "clusters.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    metrics = json.loads((tmp_path / "cl" / "cluster_metrics.json").read_text())
    grids = [div for div in root.iter("div") if div.get("class") == "cluster"]
    assert len(grids) == min(4, metrics["num_effective_clusters"])
    sizes = []
    for grid in grids:
        thumbs = [img for img in grid.iter("img")]
        rows = [int(img.get("alt").split()[1]) for img in thumbs]
        merged = {table[r]["merged_cluster"] for r in rows}
        assert len(merged) == 1
        cluster = merged.pop()
        members = [r for r in table if r["merged_cluster"] == cluster]
        sizes.append(len(members))
        best = sorted((float(r["score"]) for r in members), reverse=True)[:6]
        assert [float(table[r]["score"]) for r in rows] == pytest.approx(best, abs=1e-6)
        assert len(thumbs) == min(6, len(members))
        assert all(Image.open(io.BytesIO(base64.b64decode(t.get("src").split(",", 1)[1]))).size == (64, 64) for t in thumbs)
    assert sizes == sorted(sizes, reverse=True)
    assert "T-shirt/top" in out.read_text() or "Trouser" in out.read_text()  # class names from the data set

    ok, total, widths = _chromium_widths(out, tmp_path)
    expected = [Image.open(io.BytesIO(base64.b64decode(i.get("src").split(",", 1)[1]))).size[0] for i in images]
    assert total == len(images) and ok == total and widths == expected


@pytest.mark.skipif(not os.path.isdir(PHOTOS), reason="sample photos not available")
def test_report_on_unlabelled_photo_folder_loads_images_from_paths(tmp_path):
    from torch import nn

    from swav.cluster import cluster_extracted
    from swav.datasets import ImageFolderDataset
    from swav.extract import extract_to_dir
    from swav.model import SwAVModel
    from swav.report import build_report

    def small_tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.resize((16, 12)), dtype=np.float32) / 255).permute(2, 0, 1)

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SwAVModel(backbone, 8, hidden_dim=0, output_dim=6, num_prototypes=5)
    data = ImageFolderDataset(PHOTOS, transform=small_tensor)
    extract_to_dir(model, data, tmp_path / "x", batch_size=16, progress=False)  # no data spec recorded
    metrics = cluster_extracted(tmp_path / "x", tmp_path / "cl")
    assert metrics["prototypes"] is None  # no labels, no label metrics
    out = build_report(tmp_path / "r.html", cluster_dir=tmp_path / "cl", images_per_cluster=3, map_points=40,
                       thumb_size=48)
    root = _parse(out)
    images = _check_self_contained(out, root)
    thumbs = [img for img in images if img.get("alt").startswith("row ")]
    assert thumbs and all(PHOTOS in img.get("title") for img in thumbs)
    assert {Image.open(io.BytesIO(base64.b64decode(t.get("src").split(",", 1)[1]))).size for t in thumbs} == {(48, 36)}
    assert "coloured by cluster" in out.read_text()


def test_report_arguments_are_checked(tmp_path):
    from swav.report import build_report, embedding_map

    with pytest.raises(ValueError, match="at least one of"):
        build_report(tmp_path / "r.html")
    with pytest.raises(ValueError, match="map_method"):
        build_report(tmp_path / "r.html", run_dir=tmp_path, map_method="pca")
    with pytest.raises(ValueError, match="top_clusters"):
        build_report(tmp_path / "r.html", run_dir=tmp_path, top_clusters=0)
    with pytest.raises(ValueError, match="n >= 5"):
        embedding_map(np.zeros((3, 4)))
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="umap-learn"):
            embedding_map(np.zeros((10, 4)), method="umap")
    # --run-dir must be a run folder: a checkpoint, a folder without metrics.jsonl or a wrong path is named as such
    run = _write_run(tmp_path / "run", _engine_records(12))
    (tmp_path / "model.pt").write_bytes(b"\x80\x02not json")
    for wrong, kind, what in ((tmp_path / "model.pt", ValueError, "is not a metrics .jsonl file"),
                              (tmp_path / "empty", ValueError, "holds no metrics.jsonl"),
                              (tmp_path / "nowhere", FileNotFoundError, "does not exist")):
        if wrong.name == "empty":
            wrong.mkdir()
        with pytest.raises(kind, match=f"{what}.*--run-dir RUN_FOLDER"):
            build_report(tmp_path / "r.html", run_dir=wrong)
    # the metrics file itself is accepted too
    assert build_report(tmp_path / "file.html", run_dir=run / "metrics.jsonl").is_file()
    # a report of training curves alone is valid too
    out = build_report(tmp_path / "curves.html", run_dir=run)
    assert len(_check_self_contained(out, _parse(out))) == 4


def test_report_warns_when_clusters_and_curves_come_from_different_models(tmp_path, caplog):
    from swav.report import _warn_if_another_model

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="swav.report"):
        _warn_if_another_model({"checkpoint": str(run / "model.pt")}, run)
        _warn_if_another_model({"checkpoint": str(run / "checkpoints" / "final.pt")}, run)
        _warn_if_another_model({"checkpoint": str(run / "model.pt")}, None)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="swav.report"):
        _warn_if_another_model({"checkpoint": str(tmp_path / "other" / "model.pt")}, run)
    assert "not in the run folder" in caplog.text and "mixes two models' results" in caplog.text


def test_a_clustering_of_another_extraction_is_refused(tmp_path):
    """--features-dir of another extraction than the clustering's: a KeyError traceback, or a map coloured by
    another data set's clusters with no images."""
    from torch.utils.data import TensorDataset

    from swav.cluster import cluster_extracted
    from swav.export import export_full
    from swav.extract import extract_to_dir
    from swav.model import ModelSpec, build_model
    from swav.report import build_report

    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet-compact-8", small_images=True, hidden_dim=16, output_dim=8,
                                  num_prototypes=6)).eval()
    export_full(model, tmp_path / "m.pt")
    ten = TensorDataset(torch.rand(10, 3, 12, 12), torch.arange(10) % 2)
    twelve = TensorDataset(torch.rand(12, 3, 12, 12), torch.arange(12) % 2)
    a = extract_to_dir(model, ten, tmp_path / "a", batch_size=4, progress=False)
    b = extract_to_dir(model, twelve, tmp_path / "b", batch_size=4, progress=False)
    cluster_extracted(a, tmp_path / "c")
    with pytest.raises(ValueError, match="clusters another extraction than --features-dir .*10 rows against 12"):
        build_report(tmp_path / "r.html", cluster_dir=tmp_path / "c", extract_dir=b, map_method="none")
    assert build_report(tmp_path / "r.html", cluster_dir=tmp_path / "c", map_method="none").is_file()
    assert np.load(a / "labels.npy").shape == (10,)


def test_a_moved_extraction_is_named_with_the_option_that_finds_it(tmp_path):
    import shutil

    from torch.utils.data import TensorDataset

    from swav.cluster import cluster_extracted
    from swav.extract import extract_to_dir
    from swav.model import ModelSpec, build_model
    from swav.report import build_report

    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet-compact-8", small_images=True, hidden_dim=16, output_dim=8,
                                  num_prototypes=6)).eval()
    data = TensorDataset(torch.rand(10, 3, 12, 12), torch.arange(10) % 2)
    folder = extract_to_dir(model, data, tmp_path / "feats", batch_size=4, progress=False)
    cluster_extracted(folder, tmp_path / "c")
    shutil.move(folder, tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="is not there any more .*pass its new place with --features-dir"):
        build_report(tmp_path / "r.html", cluster_dir=tmp_path / "c", map_method="none")
    assert build_report(tmp_path / "r.html", cluster_dir=tmp_path / "c", extract_dir=tmp_path / "moved",
                        map_method="none").is_file()

"""Tests of swav.cluster and ``swav cluster``: assignments against naive references and the core
Sinkhorn, merging against scipy's connected components, metrics against hand values, and a
briefly trained model clustering Fashion-MNIST far better than the same model untrained."""
from __future__ import annotations

import argparse
import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swav.cluster import assign_clusters, clustering_metrics, equipartition_log_weights, kmeans_baseline, merge_prototypes
from swav.sinkhorn import sinkhorn_knopp

FASHION = "/usr/share/datasets/fashion-mnist"


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def test_argmax_assignment_matches_naive_loop():
    z, c = _unit(40, 6, 0), _unit(9, 6, 1) * 3.0  # prototypes not unit: scores must still be cosines
    got = assign_clusters(z, c, method="argmax", chunk_rows=7)
    for i in range(40):
        cosines = [float(z[i] @ c[k] / c[k].norm()) for k in range(9)]
        assert got.clusters[i] == int(np.argmax(cosines))
        assert got.scores[i] == pytest.approx(max(cosines), abs=1e-6)


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_chunked_equipartition_equals_core_sinkhorn(iterations):
    z, c = _unit(203, 5, 2), _unit(11, 5, 3)
    reference = sinkhorn_knopp(z @ c.t(), epsilon=0.05, iterations=iterations, distributed=False)
    log_u = equipartition_log_weights(z, c, epsilon=0.05, iterations=iterations, chunk_rows=17)
    codes = torch.softmax((z @ c.t()) / 0.05 + log_u, dim=1)
    torch.testing.assert_close(codes, reference, rtol=1e-9, atol=1e-12)
    chunked = assign_clusters(z, c, method="equipartition", iterations=iterations, chunk_rows=17)
    dense = assign_clusters(z, c, method="equipartition", iterations=iterations)  # one Sinkhorn call
    np.testing.assert_array_equal(chunked.clusters, reference.argmax(1).numpy())
    np.testing.assert_array_equal(dense.clusters, chunked.clusters)
    np.testing.assert_allclose(chunked.scores, (z @ c.t()).gather(1, torch.as_tensor(chunked.clusters)[:, None])[:, 0])


def test_equipartition_spreads_what_argmax_lumps_together():
    c = torch.eye(6, dtype=torch.float64)
    z = F.normalize(torch.tensor([[1.0, 0, 0, 0, 0, 0]], dtype=torch.float64) + 0.3 * _unit(600, 6, 4), dim=1)
    lumped = np.bincount(assign_clusters(z, c).clusters, minlength=6)
    spread = np.bincount(assign_clusters(z, c, method="equipartition", iterations=50, chunk_rows=64).clusters,
                         minlength=6)
    assert lumped.max() > 400
    assert spread.min() >= 60 and spread.max() <= 140  # about 100 each


def test_merge_prototypes_union_find_equals_connected_components():
    from scipy.sparse.csgraph import connected_components

    base = _unit(20, 8, 5)
    noise = 0.02 * _unit(20, 8, 6)
    c = torch.cat([base, F.normalize(base[:6] + noise[:6], dim=1), F.normalize(base[:3] + 2 * noise[6:9], dim=1)])
    sizes = np.ones(len(c), dtype=np.int64)
    sizes[[4, 12, 21]] = 0  # unused prototypes
    got = merge_prototypes(c, sizes, threshold=0.999)
    used = np.flatnonzero(sizes)
    cos = (c[used] @ c[used].t()).numpy()
    count, comp = connected_components(cos > 0.999, directed=False)
    assert got.num_effective == count and got.num_empty == 3 and got.num_merged == len(used) - count
    assert (got.groups[[4, 12, 21]] == -1).all()
    for a in range(len(used)):
        for b in range(len(used)):
            assert (got.groups[used[a]] == got.groups[used[b]]) == (comp[a] == comp[b])
    assert all(got.groups[k] == min(used[comp == comp[i]]) for i, k in enumerate(used))


def test_merge_is_transitive():
    angle = np.deg2rad(6.0)  # neighbours 6 degrees apart (cos 0.9945), ends 12 degrees (cos 0.978)
    c = torch.tensor([[np.cos(a), np.sin(a)] for a in (0.0, angle, 2 * angle, np.pi / 2)])
    got = merge_prototypes(c, [1, 1, 1, 1], threshold=0.99)
    assert got.groups.tolist() == [0, 0, 0, 3] and got.num_effective == 2 and got.num_merged == 2


def test_clustering_metrics_hand_values():
    labels = [0, 0, 0, 1, 1, 2, -1]
    clusters = [5, 5, 7, 7, 7, 7, 9]
    m = clustering_metrics(labels, clusters)
    assert m["purity"] == pytest.approx((2 + 2) / 6) and m["num_labelled"] == 6 and m["num_clusters"] == 2
    same = clustering_metrics([0, 0, 1, 1, 2], [4, 4, 0, 0, 9])  # a relabelling of the classes
    assert same["nmi"] == pytest.approx(1.0) and same["ari"] == pytest.approx(1.0) and same["purity"] == 1.0
    assert clustering_metrics([-1, -1], [0, 1]) is None
    with pytest.raises(ValueError, match="same length"):
        clustering_metrics([0, 1], [0])


def test_kmeans_baseline_separates_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 10)) * 10
    truth = np.repeat(np.arange(4), 30)
    x = centres[truth] + rng.normal(size=(120, 10))
    assert clustering_metrics(truth, kmeans_baseline(x, 4))["nmi"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans_baseline(x, 0)


def test_bad_arguments_are_named():
    z, c = _unit(5, 3, 0), _unit(4, 3, 1)
    with pytest.raises(ValueError, match="method must be one of"):
        assign_clusters(z, c, method="kmeans")
    with pytest.raises(ValueError, match="share D"):
        assign_clusters(z, _unit(4, 2, 1))
    with pytest.raises(ValueError, match="iterations"):
        equipartition_log_weights(z, c, iterations=0)


# --- end to end: a briefly trained model against the same model untrained -------------------------

def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Cheap batched views for 28 px grey images: random scale/shift/flip, contrast, brightness."""
    b = x.shape[0]
    scale = torch.empty(b).uniform_(0.7, 1.0, generator=g)
    flip = (torch.rand(b, generator=g) < 0.5).float() * 2 - 1
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = torch.empty(b, 2).uniform_(-0.2, 0.2, generator=g)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, align_corners=False, padding_mode="border")
    return out * torch.empty(b, 1, 1, 1).uniform_(0.6, 1.4, generator=g) + torch.empty(b, 1, 1, 1).uniform_(
        -0.4, 0.4, generator=g)


def _train(model: torch.nn.Module, images: torch.Tensor, steps: int) -> None:
    """A short SwAV run (SPEC §2-§4: normalise prototypes, two views, swapped prediction, prototypes
    frozen for the first steps) on normalised images."""
    from swav.loss import swav_loss

    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
    model.train()
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (128,), generator=g)]
        model.normalize_prototypes()
        loss = swav_loss(model([_augment(batch, g), _augment(batch, g)]).scores, num_crops=2)
        optimizer.zero_grad()
        loss.backward()
        if step < 20:
            model.prototypes.weight.grad = None
        optimizer.step()
    model.normalize_prototypes()
    assert loss.item() < 3.0, f"training did not progress (loss {loss.item():.3f}, ln K = {np.log(30):.3f})"


def _run_cli(argv: list[str]) -> int:
    from swav.cli.cluster import register

    parser = argparse.ArgumentParser(prog="swav")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST IDX files not installed")
def test_trained_model_clusters_fashion_mnist_far_better_than_untrained(tmp_path):
    from swav.datasets import IDXDataset
    from swav.eval.transforms import transforms_for_spec
    from swav.export import export_full
    from swav.model import ModelSpec, build_model

    spec = ModelSpec("resnet-compact-s2-8", small_images=True, in_channels=1, hidden_dim=128, output_dim=32,
                     num_prototypes=30)
    torch.manual_seed(0)
    untrained = build_model(spec)
    export_full(untrained, tmp_path / "untrained.pt")
    test = IDXDataset(FASHION, "test", transforms_for_spec(spec)[1])
    images = torch.stack([test[i][0] for i in range(2000)])  # the same normalisation as extraction
    _train(untrained, images, steps=100)
    export_full(untrained, tmp_path / "trained.pt")

    results = {}
    for name in ("untrained", "trained"):
        extra = ["--kmeans-baseline", "raw"] if name == "trained" else []
        common = ["--no-progress", *extra]
        assert _run_cli(["cluster", "--checkpoint", str(tmp_path / f"{name}.pt"), "--data", FASHION,
                         "--split", "test", "--limit", "2000", "--workers", "0", "--device", "cpu",
                         "--batch-size", "500", "--output-dir", str(tmp_path / f"{name}-argmax"), *common]) == 0
        # the second assignment reuses the extraction written by the first
        assert _run_cli(["cluster", "--features-dir", str(tmp_path / f"{name}-argmax" / "extract"),
                         "--assignment", "equipartition", "--output-dir", str(tmp_path / f"{name}-equipartition")]) == 0
        for assignment in ("argmax", "equipartition"):
            results[name, assignment] = json.loads((tmp_path / f"{name}-{assignment}" / "cluster_metrics.json").read_text())
    for assignment in ("argmax", "equipartition"):
        trained, untrained_m = results["trained", assignment], results["untrained", assignment]
        assert trained["prototypes"]["nmi"] > untrained_m["prototypes"]["nmi"] + 0.15, (assignment, trained, untrained_m)
        assert trained["prototypes"]["nmi"] > 0.35
    best = results["trained", "argmax"]
    assert best["num_images"] == 2000 and best["kmeans_raw"]["num_clusters"] == best["num_effective_clusters"]
    assert 0.3 < best["kmeans_raw"]["nmi"] < 0.8  # raw-pixel k-means is a real, not a trivial, baseline

    # the tables agree with the metrics: recompute from clusters.csv
    folder = tmp_path / "trained-argmax"
    with open(folder / "clusters.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["row", "path", "label", "cluster", "merged_cluster", "score"]
    labels = np.array([int(r["label"]) for r in rows])
    clusters = np.array([int(r["cluster"]) for r in rows])
    np.testing.assert_array_equal(labels, test.targets[:2000].numpy())
    assert clustering_metrics(labels, clusters)["nmi"] == pytest.approx(best["prototypes"]["nmi"])
    with open(folder / "cluster_sizes.csv", newline="") as fh:
        sizes = [(int(r["cluster"]), int(r["size"])) for r in csv.DictReader(fh)]
    assert sum(s for _, s in sizes) == 2000 and [s for _, s in sizes] == sorted((s for _, s in sizes), reverse=True)
    assert dict(sizes) == {k: int((clusters == k).sum()) for k in range(30)}
    assert best["num_used"] == int((np.bincount(clusters, minlength=30) > 0).sum())


# --- damaged extraction folders, --output-dir a file, extractions that left unreadable images out --

def _small_extraction(tmp_path):
    """A real extraction of 26 random PNGs (two of them unreadable) with a tiny model, written as
    `swav extract` does (the checkpoint and data are recorded in meta.json)."""
    from PIL import Image

    from swav.export import export_full
    from swav.extract import extract_job
    from swav.model import ModelSpec, build_model

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(13):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "cat" / "3.png").write_bytes((tmp_path / "imgs" / "cat" / "3.png").read_bytes()[:40])
    (tmp_path / "imgs" / "dog" / "9.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    spec = ModelSpec("resnet-compact-8", small_images=True, hidden_dim=16, output_dim=8, num_prototypes=6)
    checkpoint = export_full(build_model(spec), tmp_path / "model.pt")
    folder = extract_job(checkpoint, tmp_path / "imgs", tmp_path / "feats", batch_size=8, device="cpu", progress=False)
    return checkpoint, folder


def _damage(folder, how: str) -> str:
    """Damage one file of an extraction folder the way a full disk / killed copy does; its name."""
    if how == "truncated header":
        (folder / "embeddings.npy").write_bytes((folder / "embeddings.npy").read_bytes()[:90])
        return "embeddings.npy"
    if how == "truncated data":
        (folder / "embeddings.npy").write_bytes((folder / "embeddings.npy").read_bytes()[:300])
        return "embeddings.npy"
    if how == "corrupt meta":
        (folder / "meta.json").write_text('{"num_rows": 2')
        return "meta.json"
    if how == "missing prototypes":
        (folder / "prototypes_head0.npy").unlink()
        return "prototypes_head0.npy"
    if how == "missing index":
        (folder / "index.csv").unlink()
        return "index.csv"
    if how == "short labels":
        np.save(folder / "labels.npy", np.zeros(5, dtype=np.int64))
        return "labels.npy"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated header", "truncated data", "corrupt meta", "missing prototypes",
                                 "missing index", "short labels"])
def test_cli_cluster_names_the_damaged_extraction_file_and_the_fix(tmp_path, capsys, how):
    checkpoint, folder = _small_extraction(tmp_path)
    name = _damage(folder, how)
    assert _run_cli(["cluster", "--features-dir", str(folder), "--output-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert err.startswith(f"swav cluster: error: extraction file {folder / name} is damaged (")
    if how == "corrupt meta":  # the command is unknown: meta.json holds it
        assert err.endswith(f"re-run `swav extract ... --output-dir {folder} --overwrite` to write it again")
    else:
        assert err.endswith(f"re-run `swav extract --checkpoint {checkpoint} --data {tmp_path / 'imgs'} "
                            f"--output-dir {folder} --overwrite` to write it again")
    assert not (tmp_path / "c" / "clusters.csv").exists()


def test_cli_cluster_output_dir_that_is_a_file(tmp_path, capsys):
    checkpoint, folder = _small_extraction(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    message = f"swav cluster: error: --output-dir {str(afile)!r} is an existing file: choose a folder"
    assert _run_cli(["cluster", "--features-dir", str(folder), "--output-dir", str(afile)]) == 1
    assert capsys.readouterr().err.strip() == message
    assert _run_cli(["cluster", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "imgs"), "--workers", "0",
                     "--device", "cpu", "--no-progress", "--output-dir", str(afile)]) == 1
    assert capsys.readouterr().err.strip() == message
    assert afile.read_text() == "keep me"
    # an extraction and a model to extract with: which one was meant is unclear, so neither is used
    assert _run_cli(["cluster", "--features-dir", str(folder), "--checkpoint", str(checkpoint), "--output-dir",
                     str(tmp_path / "both")]) == 2
    assert "--features-dir (cluster an extraction) excludes --checkpoint and --data" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()
    assert _run_cli(["cluster", "--features-dir", str(folder), "--limit", "3", "--output-dir",
                     str(tmp_path / "limited")]) == 0
    assert "--limit apply to extracting (--checkpoint and --data) and are ignored" in capsys.readouterr().err


def test_cluster_of_extraction_that_left_out_unreadable_images_stays_aligned(tmp_path, capsys):
    from swav.images import load_image

    _, folder = _small_extraction(tmp_path)
    assert _run_cli(["cluster", "--features-dir", str(folder), "--output-dir", str(tmp_path / "c"),
                     "--kmeans-baseline", "raw"]) == 0
    captured = capsys.readouterr()
    assert f"2 unreadable images not extracted nor clustered, listed in {folder.resolve() / 'bad_images.txt'}" in captured.err
    metrics = json.loads((tmp_path / "c" / "cluster_metrics.json").read_text())
    assert metrics["num_images"] == 24 and metrics["num_unreadable"] == 2 and metrics["kmeans_raw"]["num_clusters"] >= 1
    with open(tmp_path / "c" / "clusters.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    paths = [r["path"] for r in rows]
    assert len(paths) == 24 and not {os.path.join("cat", "3.png"), os.path.join("dog", "9.png")} & \
        {os.path.relpath(p, tmp_path / "imgs") for p in paths}
    assert all(int(r["label"]) == (0 if os.path.relpath(r["path"], tmp_path / "imgs").startswith("cat") else 1)
               for r in rows)
    # the k-means baseline read the pixels of the same images as the rows (not of stand-ins)
    from swav.cluster import raw_pixels
    from swav.extract import load_extracted, open_source_dataset

    data = load_extracted(folder)
    pixels = raw_pixels(open_source_dataset(data.meta), 24)
    np.testing.assert_array_equal(pixels, np.stack([np.asarray(load_image(p), np.float32).reshape(-1) / 255
                                                    for p in paths]))
    # the report's thumbnails from a data set given by the caller (Python API) are the rows' images too
    from swav.datasets import build_dataset
    from swav.report import _image_loader

    loader = _image_loader(data.meta, build_dataset(str(tmp_path / "imgs")))
    for r in rows:
        np.testing.assert_array_equal(np.asarray(loader(int(r["row"]), r["path"])), np.asarray(load_image(r["path"])))
    # the folder changed since the extraction (an image added in front, one removed): images are found by
    # their path, never shown under another image's name; the removed one has no thumbnail
    from PIL import Image
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "imgs" / "cat" / "0000-added.png")
    removed = rows[5]["path"]
    os.remove(removed)
    for loader in (_image_loader(data.meta, build_dataset(str(tmp_path / "imgs"))), _image_loader(data.meta, None)):
        for r in rows:
            got = loader(int(r["row"]), r["path"])
            if r["path"] == removed:
                assert got is None
            else:
                np.testing.assert_array_equal(np.asarray(got), np.asarray(load_image(r["path"])))


def test_cluster_refuses_prototypes_that_the_checkpoint_did_not_hold(tmp_path, capsys):
    from swav.extract import extract_job

    checkpoint, _ = _small_extraction(tmp_path)
    saved = torch.load(checkpoint, weights_only=False)
    state = saved["model"] if "model" in saved else saved["state_dict"]
    del state["prototypes.weight"]
    partial = tmp_path / "no_prototypes.pt"
    torch.save(saved, partial)
    folder = extract_job(partial, tmp_path / "imgs", tmp_path / "feats2", batch_size=8, device="cpu",
                         progress=False, strict=False)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["freshly_initialised"] == ["prototypes.weight"]
    assert _run_cli(["cluster", "--features-dir", str(folder), "--output-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "were not in the checkpoint" in err and "prototypes.weight" in err
    assert not (tmp_path / "c" / "clusters.csv").exists()
    # from a checkpoint and images, the refusal comes before the extraction (which can take hours)
    assert _run_cli(["cluster", "--checkpoint", str(partial), "--partial", "--data", str(tmp_path / "imgs"),
                     "--output-dir", str(tmp_path / "c2"), "--device", "cpu", "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "were not in the checkpoint" in err and not (tmp_path / "c2" / "extract").exists()
    # a complete checkpoint records that nothing was initialised at random
    assert json.loads((tmp_path / "feats" / "meta.json").read_text())["freshly_initialised"] == []


def test_cluster_and_report_keep_earlier_results_without_overwrite(tmp_path, capsys):
    checkpoint, folder = _small_extraction(tmp_path)
    out = tmp_path / "c"
    assert _run_cli(["cluster", "--features-dir", str(folder), "--output-dir", str(out)]) == 0
    first = (out / "clusters.csv").read_bytes()
    capsys.readouterr()
    assert _run_cli(["cluster", "--features-dir", str(folder), "--output-dir", str(out),
                     "--assignment", "equipartition"]) == 1
    err = capsys.readouterr().err
    assert "already holds a clustering" in err and "--overwrite" in err and (out / "clusters.csv").read_bytes() == first
    assert _run_cli(["cluster", "--features-dir", str(folder), "--output-dir", str(out), "--assignment",
                     "equipartition", "--overwrite"]) == 0
    page = tmp_path / "r.html"
    page.write_text("an earlier report")
    assert _run_cli(["report", "--cluster-dir", str(out), "--output", str(page), "--map", "none"]) == 1
    assert "--overwrite" in capsys.readouterr().err and page.read_text() == "an earlier report"


def test_a_failed_rerun_leaves_the_earlier_clustering_whole_and_large_images_are_shrunk(tmp_path, caplog):
    """--overwrite with a k-means baseline that fails (images of different sizes): the tables used to be rewritten
    before the failure, beside the old metrics. Photos larger than 64 x 64 are clustered by k-means at 32 x 32
    (full-resolution pixels held gigabytes)."""
    import logging

    from PIL import Image

    from swav.cluster import cluster_extracted, raw_pixels

    _, folder = _small_extraction(tmp_path)
    first = cluster_extracted(folder, tmp_path / "c", method="equipartition")
    before = {name: (tmp_path / "c" / name).read_bytes() for name in ("clusters.csv", "cluster_sizes.csv",
                                                                        "cluster_metrics.json")}
    Image.new("RGB", (20, 15)).save(tmp_path / "imgs" / "cat" / "0.png")  # another size than the others
    with pytest.raises(ValueError, match="--kmeans-size"):
        cluster_extracted(folder, tmp_path / "c", method="argmax", kmeans="raw")
    assert {name: (tmp_path / "c" / name).read_bytes() for name in before} == before
    assert first["method"] == "equipartition"
    photos = [(Image.new("RGB", (500, 375), (i, 0, 0)), 0) for i in range(3)]
    with caplog.at_level(logging.INFO, logger="swav"):
        assert raw_pixels(photos, 3).shape == (3, 32 * 32 * 3)
    assert "resized to 32 x 32" in caplog.text
    with pytest.raises(ValueError, match="--kmeans-size\\) must be >= 1"):
        raw_pixels(photos, 3, size=0)


def test_equipartition_needs_a_sinkhorn_round():
    """0 iterations balance nothing: the clusters would be argmax's, recorded as equipartition."""
    with pytest.raises(ValueError, match="--sinkhorn-iterations\\) must be >= 1 for equipartition"):
        assign_clusters(_unit(10, 4, 0), _unit(3, 4, 1), method="equipartition", iterations=0)


def test_nmi_and_ari_take_their_textbook_values_off_perfect_agreement() -> None:
    """Two true classes of 3 images against three clusters of 2: NMI with the arithmetic-mean normalisation,
    ARI = (index - expected) / (max - expected)."""
    import math

    metrics = clustering_metrics([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2])
    mutual, h_labels, h_clusters = 2 / 3 * math.log(2), math.log(2), math.log(3)
    assert metrics["nmi"] == pytest.approx(mutual / ((h_labels + h_clusters) / 2))
    assert metrics["ari"] == pytest.approx((2 - 1.2) / (4.5 - 1.2))

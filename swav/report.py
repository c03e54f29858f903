"""A single self-contained HTML report of a run and its clustering (issue 7).

What it shows, to judge by eye whether SwAV learned something: the clustering summary and
metrics (``swav cluster``), the sizes of the effective clusters, for each of the largest
clusters a grid of its most typical images (highest cosine to its prototype, SPEC §2), training
curves (``swav.curves``) and a 2-D map (t-SNE, or UMAP when installed and asked for) of a
subsample of the embeddings, coloured by label or cluster.

Every image is inlined as a base64 ``data:`` URI: the file has no external resource and no
script, and it is well-formed XML (polyglot HTML5) so that it can be checked mechanically.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAP_METHODS", "build_report", "embedding_map", "render_map_png"]

logger = logging.getLogger(__name__)

MAP_METHODS = ("tsne", "umap", "none")
_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}.grid{display:flex;flex-wrap:wrap;gap:4px}
.grid img{image-rendering:pixelated;border:1px solid #ddd}.note{color:#777;font-size:.9em}
.cluster{margin-bottom:1.2em}.plots img{margin:4px;border:1px solid #eee}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, title: str = "", width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return (f'<img src="{_data_uri(png)}" alt="{html.escape(alt)}" '
            f'title="{html.escape(title or alt)}"{size} />')


def _thumbnail_png(image: Any, size: int) -> bytes:
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image, got {type(image).__name__}; build the data set "
                         "without a transform")
    thumb = image.convert("RGB") if image.mode not in ("L", "RGB") else image.copy()
    scale = size / max(thumb.size)
    thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                         Image.NEAREST if scale > 1 else Image.BILINEAR)
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return buffer.getvalue()


def embedding_map(vectors: np.ndarray, *, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates of ``vectors`` (n, d) by t-SNE (scikit-learn) or UMAP (umap-learn).

    Example:
        >>> embedding_map(np.random.default_rng(0).normal(size=(40, 5))).shape
        (40, 2)
    """
    if method not in ("tsne", "umap"):
        raise ValueError(f"method must be 'tsne' or 'umap', got {method!r}")
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) < 5:
        raise ValueError(f"vectors must be (n >= 5, d), got shape {x.shape}")
    if method == "umap":
        try:
            import umap
        except ImportError as exc:
            raise ImportError("method='umap' needs the optional package umap-learn "
                              "(pip install umap-learn); use the t-SNE map instead (--map tsne; Python: method='tsne')") from exc
        return np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(x))
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(x) - 1) / 3))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)


def render_map_png(coords: np.ndarray, colours: Sequence[int], names: dict[int, str], title: str) -> bytes:
    """Scatter plot PNG of 2-D ``coords`` coloured by integer ``colours`` (legend for <= 20).

    Example:
        >>> png = render_map_png(np.zeros((4, 2)), [0, 0, 1, 1], {0: "cat", 1: "dog"}, "map")
        >>> png[:4]
        b'\\x89PNG'
    """
    from swav.curves import _figure_png

    colours = np.asarray(colours)
    counts = Counter(colours.tolist())
    # few groups: stable order by id; many: the 20 largest get colours, the rest grey
    values = sorted(counts) if len(counts) <= 20 else [v for v, _ in counts.most_common()]

    def draw(ax: Any) -> None:
        import matplotlib

        cmap = matplotlib.colormaps["tab10" if len(values) <= 10 else "tab20"]
        for i, value in enumerate(values):
            keep = colours == value
            colour = cmap(i % 20) if i < 20 else (0.6, 0.6, 0.6, 1.0)
            ax.scatter(coords[keep, 0], coords[keep, 1], s=6, color=colour, alpha=0.8,
                       label=names.get(value, str(value)) if i < 20 else None, linewidths=0)
        if len(values) <= 20:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])

    return _figure_png(draw, size=(7.0, 5.0))


def _read_table(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return [{"row": int(r["row"]), "path": r["path"], "label": int(r["label"]),
                 "cluster": int(r["cluster"]), "merged_cluster": int(r["merged_cluster"]),
                 "score": float(r["score"])} for r in csv.DictReader(fh)]


def _image_loader(meta: dict[str, Any], dataset: Any) -> Callable[[int, str], Any]:
    """(row, path) -> PIL image: from ``dataset``, else the data set recorded by the extraction, else the
    row's path when it is a file (None when there is no image). A data set of files is looked up by the
    row's path (absolute, or relative to the data root when the folder moved), never by position alone:
    images added, removed or renamed since the extraction would otherwise show under other images' names."""
    aligned = None
    if dataset is None:
        from swav.extract import open_source_dataset

        try:
            dataset = aligned = open_source_dataset(meta)  # row for row like the extraction already
        except (FileNotFoundError, ValueError) as exc:
            logger.warning("cannot open the images of %s (%s); trying the paths", meta.get("data"), exc)
    if dataset is not None:
        base = getattr(dataset, "dataset", dataset)  # under an alignment Subset: the folder's own listing
        samples = getattr(base, "samples", None)
        if isinstance(samples, (list, tuple)) and samples and isinstance(samples[0], (list, tuple)):
            return _loader_by_path(base, samples, meta)
        if aligned is None:  # the caller's data set (no file paths): skip the rows the extraction left out
            from swav.extract import align_to_extraction

            aligned = align_to_extraction(dataset, meta)
        size = len(aligned)
        return lambda row, path: aligned[row][0] if row < size else None

    def from_path(row: int, path: str) -> Any:
        from swav.images import ImageDecodeError, load_image

        try:
            return load_image(path, channels=3, bit_depth=meta.get("bit_depth")) if os.path.isfile(path) else None
        except ImageDecodeError as exc:
            logger.warning("skipping unreadable image %s: %s", path, exc)
            return None

    return from_path


def _loader_by_path(dataset: Any, samples: Any, meta: dict[str, Any]) -> Callable[[int, str], Any]:
    root = getattr(dataset, "root", None)
    recorded_root = meta.get("data")
    exact = {os.path.realpath(os.fspath(sample[0])): i for i, sample in enumerate(samples)}
    relative = {os.path.relpath(os.fspath(sample[0]), os.fspath(root)): i for i, sample in enumerate(samples)} \
        if root is not None else {}
    missing: list[str] = []

    def load(row: int, path: str) -> Any:
        index = exact.get(os.path.realpath(path))
        if index is None and recorded_root and relative:
            index = relative.get(os.path.relpath(path, os.fspath(recorded_root)))
        if index is None:
            if not missing:
                logger.warning("%s of the clustering is not in the image data given (changed since the extraction?); "
                               "images missing there are shown without a thumbnail", path)
            missing.append(path)
            return None
        return dataset[index][0]

    return load


def _metrics_html(metrics: dict[str, Any]) -> str:
    summary = [("assignment", metrics.get("method")), ("images", metrics.get("num_images")),
               ("prototypes", metrics.get("num_prototypes")), ("prototypes used", metrics.get("num_used")),
               ("empty prototypes", metrics.get("num_empty")),
               (f"duplicates merged (cosine > {metrics.get('merge_threshold')})", metrics.get("num_merged_duplicates")),
               ("effective clusters", metrics.get("num_effective_clusters")),
               ("largest cluster fraction", metrics.get("largest_cluster_fraction"))]
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in summary if v is not None)
    out = f"<table>{rows}</table>"
    scored = [(name, metrics[key]) for key, name in (("prototypes", "prototype argmax"),
              ("merged", "merged clusters"), ("kmeans_raw", "k-means on raw pixels"))
              if isinstance(metrics.get(key), dict) and "nmi" in metrics[key]]
    if scored:
        out += "<table><tr><th>clustering</th><th>clusters</th><th>NMI</th><th>ARI</th><th>purity</th></tr>"
        out += "".join(f"<tr><th>{html.escape(name)}</th><td>{m.get('num_clusters', '')}</td>"
                       f"<td>{m['nmi']:.4f}</td><td>{m['ari']:.4f}</td><td>{m['purity']:.4f}</td></tr>"
                       for name, m in scored) + "</table>"
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _sizes_png(sizes: Sequence[int]) -> bytes:
    from swav.curves import _figure_png

    def draw(ax: Any) -> None:
        ax.bar(np.arange(len(sizes)), sizes, width=1.0, color="tab:blue")
        ax.set_title(f"sizes of the {len(sizes)} effective clusters (sorted)")
        ax.set_xlabel("cluster rank")
        ax.set_ylabel("images")

    return _figure_png(draw, size=(7.0, 3.0))


def _clusters_html(table: list[dict[str, Any]], loader: Callable[[int, str], Any] | None,
                   class_names: dict[int, str], top_clusters: int, per_cluster: int, thumb: int) -> str:
    groups: dict[int, list[dict[str, Any]]] = {}
    for record in table:
        groups.setdefault(record["merged_cluster"], []).append(record)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    parts = [_img(_sizes_png([len(v) for _, v in ordered]), "cluster sizes")]
    total = len(table)
    for cluster, members in ordered[:top_clusters]:
        prototypes = sorted({m["cluster"] for m in members})
        labels = Counter(m["label"] for m in members if m["label"] >= 0).most_common(3)
        label_text = ", ".join(f"{class_names.get(y, y)} {n / len(members):.0%}" for y, n in labels)
        heading = (f"cluster {cluster}: {len(members)} images ({len(members) / total:.1%}), "
                   f"prototypes {', '.join(map(str, prototypes[:8]))}{' ...' if len(prototypes) > 8 else ''}"
                   + (f"; labels: {label_text}" if label_text else ""))
        cells = []
        for m in sorted(members, key=lambda m: -m["score"])[:per_cluster]:
            image = loader(m["row"], m["path"]) if loader else None
            if image is None:
                continue
            label = class_names.get(m["label"], str(m["label"])) if m["label"] >= 0 else "-"
            cells.append(_img(_thumbnail_png(image, thumb), f"row {m['row']}",
                              f"row {m['row']}, score {m['score']:.3f}, label {label}, {m['path']}"))
        body = "".join(cells) if cells else '<p class="note">images not available</p>'
        parts.append(f'<div class="cluster"><h3>{html.escape(heading)}</h3><div class="grid">{body}</div></div>')
    return "".join(parts)


def _map_html(data: Any, table: list[dict[str, Any]] | None, class_names: dict[int, str], method: str,
              points: int, color_by: str, seed: int) -> str:
    vectors = data.embeddings if data.embeddings is not None else data.features
    if vectors is None or len(vectors) < 5:
        return '<p class="note">too few embeddings for a map</p>'
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), size=min(points, len(vectors)), replace=False))
    coords = embedding_map(np.asarray(vectors[rows]), method=method, seed=seed)
    if color_by == "auto":
        color_by = "label" if (data.labels >= 0).any() or table is None else "cluster"
    if color_by == "label" and not (data.labels >= 0).any():
        logger.warning("color_by='label', but the images have no labels: the map has one colour; colour by "
                       "cluster (--color-by cluster) with a clustering, or use labelled data (class folders)")
    if color_by == "label":
        colours, names = data.labels[rows], class_names
    elif table is not None:
        merged = {record["row"]: record["merged_cluster"] for record in table}
        colours, names = np.array([merged[int(r)] for r in rows]), {}
    else:
        raise ValueError("color_by='cluster' needs a clustering (cluster_dir)")
    title = f"{method.upper() if method == 'umap' else 't-SNE'} of {len(rows)} embeddings, coloured by {color_by}"
    return _img(render_map_png(coords, colours, names, title), "embedding map", title)


def _check_same_rows(table: list[dict[str, Any]], data: Any, cluster_dir: Any, extract_dir: Any) -> None:
    """The clustering must be of this extraction: the same number of rows and the same image in each."""
    paths = [record.get("path") for record in table]
    if len(paths) != len(data.paths) or any(a != b for a, b in zip(paths, data.paths)):
        raise ValueError(f"--cluster-dir {os.fspath(cluster_dir)!r} clusters another extraction than --features-dir "
                         f"{os.fspath(extract_dir)!r} ({len(paths)} rows against {len(data.paths)}"
                         + ("" if len(paths) != len(data.paths) else ", other images in the same rows")
                         + "): leave out --features-dir (the clustering names its own), or cluster this extraction "
                         "with `swav cluster --features-dir DIR`")


def _warn_if_another_model(meta: dict, run_dir: str | os.PathLike | None) -> None:
    """A warning when the extraction's checkpoint lies outside ``run_dir``: the clusters and the map would then
    describe another model than the training curves (allowed: the report says what it shows, not why)."""
    checkpoint = meta.get("checkpoint")
    if run_dir is None or not checkpoint:
        return
    run, model = Path(run_dir).resolve(), Path(checkpoint).expanduser().resolve()
    if run not in model.parents:
        logger.warning("the features/clusters come from %s, which is not in the run folder %s: if that is another "
                       "model than the run's (not an export or a copy of it), the report mixes two models' results",
                       model, run)


def build_report(
    output: str | os.PathLike, *, cluster_dir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None, extract_dir: str | os.PathLike | None = None,
    dataset: Any = None, top_clusters: int = 12, images_per_cluster: int = 16, thumb_size: int = 64,
    map_method: str = "tsne", map_points: int = 2000, color_by: str = "auto", seed: int = 0,
    title: str = "SwAV report",
) -> Path:
    """Write the HTML report to ``output`` and return its path.

    ``cluster_dir`` is the output of :func:`swav.cluster.cluster_extracted` (its metrics name
    the extraction folder, used for the map and the images); ``run_dir`` a training run folder
    with ``metrics.jsonl``; ``extract_dir`` alone gives the map without clusters. ``dataset``
    (the data set the extraction read, built without a transform) overrides where the images come from;
    the rows of images the extraction left out as unreadable are skipped in it here.

    Example:
        >>> build_report("report.html", cluster_dir="clusters/", run_dir="runs/fmnist")  # doctest: +SKIP
    """
    if map_method not in MAP_METHODS:
        raise ValueError(f"map_method must be one of {MAP_METHODS}, got {map_method!r}")
    if color_by not in ("auto", "label", "cluster"):
        raise ValueError(f"color_by must be 'auto', 'label' or 'cluster', got {color_by!r}")
    if cluster_dir is None and run_dir is None and extract_dir is None:
        raise ValueError("nothing to report: give at least one of --cluster-dir, --run-dir, --features-dir "
                         "(Python: cluster_dir, run_dir, extract_dir)")
    from swav.output_paths import check_output_file

    check_output_file(output, "--output")
    for name, value in (("top_clusters", top_clusters), ("images_per_cluster", images_per_cluster),
                        ("thumb_size", thumb_size), ("map_points", map_points)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if run_dir is not None:  # checked before any slow work
        run = Path(run_dir)
        if not ((run.is_dir() and (run / "metrics.jsonl").is_file()) or (run.is_file() and run.suffix == ".jsonl")):
            what = ("is not a metrics .jsonl file" if run.is_file() else "holds no metrics.jsonl" if run.is_dir()
                    else "does not exist")
            raise (FileNotFoundError if not run.exists() else ValueError)(
                f"run_dir {str(run)!r} {what}: expected a training run folder holding metrics.jsonl, i.e. the "
                "--output-dir of `swav pretrain`, or that metrics.jsonl (command line: --run-dir RUN_FOLDER; "
                "Python: run_dir=...)")
    sections = []
    metrics, table = None, None
    if cluster_dir is not None:
        if not (Path(cluster_dir) / "cluster_metrics.json").is_file():
            raise FileNotFoundError(f"--cluster-dir {os.fspath(cluster_dir)!r} is not the output of `swav cluster` "
                                    "(no cluster_metrics.json): run `swav cluster` first or fix the path")
        with open(Path(cluster_dir) / "cluster_metrics.json", encoding="utf-8") as fh:
            metrics = json.load(fh)
        table = _read_table(Path(cluster_dir) / "clusters.csv")
        recorded = metrics.get("extract_dir")
        if extract_dir is None and recorded and not Path(recorded).is_dir():
            raise FileNotFoundError(f"the extraction that --cluster-dir {os.fspath(cluster_dir)!r} clusters, "
                                    f"{recorded!r}, is not there any more (moved or deleted?): pass its new place "
                                    "with --features-dir (Python: extract_dir=...)")
        extract_dir = extract_dir or recorded
    data = None
    if extract_dir is not None:
        from swav.extract import load_extracted

        data = load_extracted(extract_dir)
        if table is not None:
            _check_same_rows(table, data, cluster_dir, extract_dir)
    class_names = {i: str(n) for i, n in enumerate((data.meta.get("classes") if data else None) or [])}
    _warn_if_another_model(data.meta if data else {}, run_dir if run_dir is None or Path(run_dir).is_dir()
                           else Path(run_dir).parent)
    if metrics is not None and table is not None:
        loader = _image_loader(data.meta if data else {}, dataset)
        sections.append(("Clustering", _metrics_html(metrics)))
        sections.append(("Largest clusters: most typical images",
                         _clusters_html(table, loader, class_names, top_clusters, images_per_cluster, thumb_size)))
    if run_dir is not None:
        from swav.curves import plot_training_curves


        pngs = plot_training_curves(run_dir)
        body = "".join(_img(png, name) for name, png in pngs.items()) or '<p class="note">no curves logged</p>'
        sections.append(("Training curves", f'<div class="plots">{body}</div>'))
    if data is not None and map_method != "none":
        sections.append(("Embedding map", _map_html(data, table, class_names, map_method, map_points, color_by, seed)))
    body = "".join(f"<h2>{html.escape(name)}</h2>{content}" for name, content in sections)
    document = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8" />'
                f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
                f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    logger.info("wrote report %s (%.1f MB)", out, len(document) / 1e6)
    return out

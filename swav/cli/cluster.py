"""``swav cluster`` and ``swav report``: the prototypes as a clustering, and a picture of it (issue 7).

Examples::

    swav cluster --checkpoint run/checkpoint.pt --data fashion-mnist --split test \\
        --output-dir clusters/ --assignment equipartition --kmeans-baseline raw
    swav cluster --features-dir feats/ --output-dir clusters/        # reuse a `swav extract` folder
    swav report --cluster-dir clusters/ --run-dir run/ --output report.html
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swav.cli.extract import add_extract_arguments, job_kwargs
from swav.usage import UsageError

__all__ = ["register", "run_cluster", "run_report"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cluster`` and ``report`` subcommands (``func=run_cluster`` / ``run_report``).

    Example:
        >>> parser = argparse.ArgumentParser(prog="swav")
        >>> register(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["report", "--cluster-dir", "c", "--output", "r.html"]).map
        'tsne'
    """
    cluster = subparsers.add_parser(
        "cluster", help="assign every image to a prototype; sizes, NMI/ARI/purity",
        description="Assign every image to a prototype (argmax of its scores or whole-set Sinkhorn "
                    "equipartition) and write clusters.csv (row, path, label, cluster, merged_cluster, "
                    "score), cluster_sizes.csv and cluster_metrics.json (NMI, ARI and purity when labels "
                    "exist; unused and near-duplicate prototypes merged). Give --features-dir (a `swav "
                    "extract` folder with embeddings) or --checkpoint and --data (extracted first into "
                    "<output-dir>/extract, resumable).")
    add_extract_arguments(cluster, required=False)
    cluster.add_argument("--features-dir", help="an existing `swav extract` folder holding embeddings")
    cluster.add_argument("--output-dir", required=True, help="folder for the tables and metrics")
    cluster.add_argument("--assignment", choices=("argmax", "equipartition"), default="argmax",
                         help="argmax of scores (default) or argmax of whole-set equipartitioned codes")
    cluster.add_argument("--epsilon", type=float, default=0.05, help="Sinkhorn epsilon (default: 0.05)")
    cluster.add_argument("--sinkhorn-iterations", type=int, default=3, help="default: 3")
    cluster.add_argument("--head", type=int, default=0, help="prototype head for multi-head models (default: 0)")
    cluster.add_argument("--merge-threshold", type=float, default=0.99,
                         help="merge used prototypes whose cosine exceeds this (default: 0.99)")
    cluster.add_argument("--kmeans-baseline", choices=("none", "raw"), default="none",
                         help="raw: also k-means on raw pixels with the effective number of clusters")
    cluster.add_argument("--kmeans-size", type=int,
                         help="resize images to SIZE x SIZE pixels for the k-means baseline (needed when sizes differ)")
    cluster.add_argument("--seed", type=int, default=0, help="k-means seed (default: 0)")
    cluster.set_defaults(func=run_cluster)

    report = subparsers.add_parser(
        "report", help="self-contained HTML report: typical images per cluster, curves, embedding map",
        description="Write one HTML file (all images inlined, no external resources) with the clustering "
                    "metrics, a grid of the most typical images of each of the largest clusters, the "
                    "training curves of a run folder (metrics.jsonl) and a 2-D map of the embeddings.")
    report.add_argument("--cluster-dir", help="output of `swav cluster`")
    report.add_argument("--run-dir", help="training run folder holding metrics.jsonl")
    report.add_argument("--features-dir", help="a `swav extract` folder (default: the one the clustering used)")
    report.add_argument("--output", required=True, help="HTML file to write")
    report.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    report.add_argument("--data", help="where the images come from (default: as recorded at extraction)")
    report.add_argument("--split", default=None, choices=("train", "test", "val"), help="split for --data")
    report.add_argument("--top-clusters", type=int, default=12, help="largest clusters shown (default: 12)")
    report.add_argument("--images-per-cluster", type=int, default=16, help="default: 16")
    report.add_argument("--thumb-size", type=int, default=64, help="thumbnail size in pixels (default: 64)")
    report.add_argument("--map", choices=("tsne", "umap", "none"), default="tsne",
                        help="2-D map of the embeddings (umap needs umap-learn; default: tsne)")
    report.add_argument("--map-points", type=int, default=2000, help="subsample size for the map (default: 2000)")
    report.add_argument("--color-by", choices=("auto", "label", "cluster"), default="auto",
                        help="map colours (default: labels when present)")
    report.add_argument("--seed", type=int, default=0, help="default: 0")
    report.add_argument("--title", default="SwAV report", help="page title")
    report.set_defaults(func=run_report)


def run_cluster(args: argparse.Namespace) -> int:
    """Extract if needed, cluster, print the summary; 0 on success, 1 on a user error."""
    from swav.cluster import cluster_extracted
    from swav.extract import check_output_dir, extract_job
    from swav.images import TooManyBadImagesError

    try:
        if args.features_dir and (args.checkpoint or args.data):
            raise UsageError("--features-dir (cluster an extraction) excludes --checkpoint and --data (extract first): "
                             "give one or the other")
        check_output_dir(args.output_dir, "--output-dir")
        earlier = [name for name in ("clusters.csv", "cluster_sizes.csv", "cluster_metrics.json")
                   if (Path(args.output_dir) / name).exists()]
        if earlier and not args.overwrite:
            again = Path(args.output_dir) / "extract"
            raise FileExistsError(
                f"--output-dir {args.output_dir!r} already holds a clustering ({', '.join(earlier)}): choose another "
                "--output-dir, or pass --overwrite to replace it" + (
                    f" (with --checkpoint and --data, --overwrite also extracts again; to cluster the finished "
                    f"extraction again instead: --features-dir {str(again)!r} --overwrite)"
                    if (again / "meta.json").exists() else ""))
        if args.features_dir:
            features_dir = args.features_dir
            given = [flag for flag, value in (("--bit-depth", args.bit_depth), ("--limit", args.limit),
                                              ("--chunk-rows", args.chunk_rows)) if value is not None]
            if given:  # they shape an extraction, and --features-dir clusters a finished one
                print(f"swav cluster: warning: {', '.join(given)} apply to extracting (--checkpoint and --data) and "
                      f"are ignored with --features-dir, which clusters {features_dir!r} as it was extracted",
                      file=sys.stderr)
        elif args.checkpoint and args.data:
            from swav.cluster import refuse_untrained_model
            features_dir = extract_job(args.checkpoint, args.data, Path(args.output_dir) / "extract",
                                       what="embeddings", **job_kwargs(args),  # checked before hours of extraction
                                       check_model=lambda model: refuse_untrained_model(model, args.checkpoint))
        else:
            raise UsageError("give --features-dir, or both --checkpoint and --data")
        metrics = cluster_extracted(features_dir, args.output_dir, method=args.assignment, epsilon=args.epsilon,
                                    iterations=args.sinkhorn_iterations, head=args.head,
                                    merge_threshold=args.merge_threshold, kmeans=args.kmeans_baseline,
                                    kmeans_size=args.kmeans_size, seed=args.seed)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError,
            TooManyBadImagesError) as error:
        from swav.cli import error_status, user_message
        print(f"swav cluster: error: {user_message(error)}", file=sys.stderr)
        return error_status(error)
    if metrics.get("num_unreadable"):
        print(f"swav cluster: warning: {metrics['num_unreadable']} unreadable images not extracted nor clustered, "
              f"listed in {metrics['unreadable_list']}", file=sys.stderr)
    print(f"{metrics['num_images']} images: {metrics['num_used']} of {metrics['num_prototypes']} prototypes used, "
          f"{metrics['num_effective_clusters']} effective clusters ({metrics['num_merged_duplicates']} duplicates merged)")
    for key, name in (("prototypes", "prototypes"), ("merged", "merged"), ("kmeans_raw", "k-means raw")):
        scores = metrics.get(key)
        if scores and "nmi" in scores:
            print(f"  {name:12s} NMI {scores['nmi']:.4f}  ARI {scores['ari']:.4f}  purity {scores['purity']:.4f}")
    print(f"wrote {Path(args.output_dir) / 'clusters.csv'} and {Path(args.output_dir) / 'cluster_metrics.json'}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Write the HTML report; 0 on success, 1 on a user error."""
    from swav.report import build_report

    try:
        if Path(args.output).is_file() and not args.overwrite:
            raise FileExistsError(f"--output {args.output!r} already exists: choose another file name, or pass "
                                  "--overwrite to replace it")
        dataset = None
        if args.data:
            from swav.datasets import build_dataset

            meta = _recorded_meta(args)  # build_report skips the rows the extraction left out
            dataset = build_dataset(args.data, split=args.split or "train", channels=meta.get("channels"),
                                    bit_depth=meta.get("bit_depth"))
        out = build_report(args.output, cluster_dir=args.cluster_dir, run_dir=args.run_dir,
                           extract_dir=args.features_dir, dataset=dataset, top_clusters=args.top_clusters,
                           images_per_cluster=args.images_per_cluster, thumb_size=args.thumb_size,
                           map_method=args.map, map_points=args.map_points, color_by=args.color_by,
                           seed=args.seed, title=args.title)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as error:
        from swav.cli import user_message
        print(f"swav report: error: {user_message(error)}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _recorded_meta(args: argparse.Namespace) -> dict:
    """``meta.json`` of the extraction behind ``--cluster-dir``/``--features-dir`` ({} if none)."""
    folder = args.features_dir
    if folder is None and args.cluster_dir:
        metrics_file = Path(args.cluster_dir) / "cluster_metrics.json"
        if metrics_file.is_file():
            folder = json.loads(metrics_file.read_text(encoding="utf-8")).get("extract_dir")
    meta_file = Path(folder) / "meta.json" if folder else None
    if meta_file is not None and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return {}  # a damaged extraction is reported when build_report reads it
        return meta if isinstance(meta, dict) else {}
    return {}

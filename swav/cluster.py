"""Clustering a whole image set with the learned prototypes (SPEC §2-§3; issue 7).

The prototypes are cluster centres: every image goes to one prototype, either by the argmax of
its scores (cosine between the unit embedding and the unit prototype) or by the argmax of its
*equipartitioned* code, i.e. Sinkhorn-Knopp (SPEC §3) run over the whole set instead of one
batch. The whole-set Sinkhorn is exact in chunks: the transport plan is ``diag(u) P diag(v)``
with ``P = exp(S / eps)``, each row pass needs a K-vector and each column pass only its own rows,
so ``N x K`` scores never have to be held at once.

Legend: N images, K prototypes, D embedding dim.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from swav.sinkhorn import sinkhorn_knopp

__all__ = [
    "ASSIGNMENT_METHODS",
    "ClusterAssignment",
    "PrototypeMerge",
    "assign_clusters",
    "cluster_extracted",
    "clustering_metrics",
    "equipartition_log_weights",
    "kmeans_baseline",
    "merge_prototypes",
    "raw_pixels",
]

logger = logging.getLogger(__name__)

ASSIGNMENT_METHODS = ("argmax", "equipartition")
#: all-at-once Sinkhorn when N * K stays below this (float64: 256 MiB)
_MAX_DENSE_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class ClusterAssignment:
    """``clusters`` (N,) prototype index per image; ``scores`` (N,) cosine to that prototype."""

    clusters: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class PrototypeMerge:
    """Which prototypes form one effective cluster.

    ``groups[k]`` is the smallest prototype index of k's group, or -1 when k is never used.
    """

    groups: np.ndarray
    num_empty: int
    num_merged: int
    num_effective: int


def _chunks(n: int, chunk_rows: int) -> list[slice]:
    return [slice(s, min(s + chunk_rows, n)) for s in range(0, n, chunk_rows)]


def _prepare(embeddings: Any, prototypes: Any, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # np.array copies: memory-mapped (read-only) arrays become writable tensors
    z_ND = embeddings if isinstance(embeddings, torch.Tensor) else torch.from_numpy(np.array(embeddings, np.float64))
    c_KD = prototypes if isinstance(prototypes, torch.Tensor) else torch.from_numpy(np.array(prototypes, np.float64))
    if z_ND.dim() != 2 or c_KD.dim() != 2 or z_ND.shape[1] != c_KD.shape[1]:
        raise ValueError(
            f"embeddings (N x D) and prototypes (K x D) must share D; got shapes {tuple(z_ND.shape)} "
            f"and {tuple(c_KD.shape)}")
    if z_ND.shape[0] == 0:
        raise ValueError("embeddings: got 0 rows; nothing to cluster")
    # unit rows on both sides: scores are cosines, as in training (SPEC §2)
    z_ND = F.normalize(z_ND.detach().to(device, torch.float64), dim=1)
    c_KD = F.normalize(c_KD.detach().to(device, torch.float64), dim=1)
    return z_ND, c_KD


def equipartition_log_weights(
    embeddings: Any, prototypes: Any, *, epsilon: float = 0.05, iterations: int = 3,
    chunk_rows: int = 65536, device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Log prototype weights ``log u`` (K,) of whole-set Sinkhorn, computed chunk by chunk.

    After the last column normalisation the code of image b is ``softmax_k(s_bk / eps + log u_k)``
    (SPEC §3: the column scaling only renormalises each code), so ``u`` is all that is needed.

    Example:
        >>> z, c = torch.randn(50, 4), torch.randn(6, 4)
        >>> equipartition_log_weights(z, c, chunk_rows=7).shape
        torch.Size([6])
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1 for whole-set equipartition, got {iterations}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    z_ND, c_KD = _prepare(embeddings, prototypes, device)
    n, k = z_ND.shape[0], c_KD.shape[0]
    log_v_N = torch.zeros(n, dtype=torch.float64, device=z_ND.device)  # any constant start works
    log_u_K = torch.zeros(k, dtype=torch.float64, device=z_ND.device)
    for _ in range(iterations):
        # rows: every prototype gets mass 1/K (sum over the whole set, chunk by chunk)
        acc_K = torch.full((k,), -math.inf, dtype=torch.float64, device=z_ND.device)
        for part in _chunks(n, chunk_rows):
            logits = (z_ND[part] @ c_KD.t()) / epsilon + log_v_N[part, None]
            acc_K = torch.logaddexp(acc_K, torch.logsumexp(logits, dim=0))
        log_u_K = -math.log(k) - acc_K
        # columns: every image gets mass 1/N (local to each chunk)
        for part in _chunks(n, chunk_rows):
            logits = (z_ND[part] @ c_KD.t()) / epsilon + log_u_K
            log_v_N[part] = -math.log(n) - torch.logsumexp(logits, dim=1)
    return log_u_K


def assign_clusters(
    embeddings: Any, prototypes: Any, *, method: str = "argmax", epsilon: float = 0.05,
    iterations: int = 3, chunk_rows: int | None = None, device: str | torch.device = "cpu",
) -> ClusterAssignment:
    """Assign every embedding to one prototype (``argmax`` of scores or ``equipartition`` codes).

    ``chunk_rows=None`` runs Sinkhorn on all scores at once when ``N x K`` fits in 256 MiB and in
    chunks of rows otherwise; both give the same codes.

    Example:
        >>> z, c = torch.eye(3), torch.eye(3)[[2, 0, 1]]
        >>> assign_clusters(z, c).clusters.tolist()
        [1, 2, 0]
    """
    if method not in ASSIGNMENT_METHODS:
        raise ValueError(f"method must be one of {ASSIGNMENT_METHODS}, got {method!r}")
    if method == "equipartition" and iterations < 1:  # 0 rounds balance nothing: that would be argmax
        raise ValueError(f"iterations (--sinkhorn-iterations) must be >= 1 for equipartition, got {iterations}")
    z_ND, c_KD = _prepare(embeddings, prototypes, device)
    n, k = z_ND.shape[0], c_KD.shape[0]
    if chunk_rows is None:
        chunk_rows = n if n * k <= _MAX_DENSE_ELEMENTS else max(1, _MAX_DENSE_ELEMENTS // k)
    bias_K = torch.zeros(k, dtype=torch.float64, device=z_ND.device)
    if method == "equipartition":
        if chunk_rows >= n:
            codes_NK = sinkhorn_knopp(z_ND @ c_KD.t(), epsilon, iterations, log_domain=True, distributed=False)
            clusters = codes_NK.argmax(dim=1)
            scores = (z_ND * c_KD[clusters]).sum(dim=1)
            return ClusterAssignment(clusters.cpu().numpy().astype(np.int64), scores.float().cpu().numpy())
        bias_K = epsilon * equipartition_log_weights(
            z_ND, c_KD, epsilon=epsilon, iterations=iterations, chunk_rows=chunk_rows, device=device)
    clusters, scores = [], []
    for part in _chunks(n, chunk_rows):
        s_nK = z_ND[part] @ c_KD.t()
        best = (s_nK + bias_K).argmax(dim=1)  # argmax of softmax(s/eps + log u) = argmax(s + eps log u)
        clusters.append(best)
        scores.append(s_nK.gather(1, best[:, None])[:, 0])
    return ClusterAssignment(torch.cat(clusters).cpu().numpy().astype(np.int64),
                             torch.cat(scores).float().cpu().numpy())


def merge_prototypes(prototypes: Any, sizes: Sequence[int], *, threshold: float = 0.99,
                     chunk_rows: int = 2048) -> PrototypeMerge:
    """Group used prototypes whose cosine exceeds ``threshold`` (union-find); drop unused ones.

    Duplicated prototypes split one real cluster in two; unused ones are not clusters at all, so
    the effective number of clusters is the number of groups.

    Example:
        >>> c = torch.tensor([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0]])
        >>> m = merge_prototypes(c, [5, 3, 0])
        >>> m.groups.tolist(), m.num_effective
        ([0, 0, -1], 1)
    """
    c_KD = F.normalize(torch.as_tensor(np.asarray(prototypes), dtype=torch.float64), dim=1)
    sizes_K = np.asarray(sizes, dtype=np.int64)
    if sizes_K.shape != (c_KD.shape[0],):
        raise ValueError(f"sizes must have one entry per prototype ({c_KD.shape[0]}), got shape {sizes_K.shape}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")
    used = np.flatnonzero(sizes_K > 0)
    parent = {int(i): int(i) for i in used}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    cu = c_KD[torch.as_tensor(used, dtype=torch.long)]
    for part in _chunks(len(used), chunk_rows):
        rows, cols = torch.nonzero(torch.triu(cu[part] @ cu.t() > threshold, diagonal=part.start + 1),
                                   as_tuple=True)
        for a, b in zip((rows + part.start).tolist(), cols.tolist()):
            ra, rb = find(int(used[a])), find(int(used[b]))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups = np.full(c_KD.shape[0], -1, dtype=np.int64)
    for i in used:
        groups[i] = find(int(i))
    num_effective = len(set(groups[used].tolist()))
    return PrototypeMerge(groups, int(len(sizes_K) - len(used)), int(len(used) - num_effective), num_effective)


def clustering_metrics(labels: Any, clusters: Any) -> dict[str, float] | None:
    """NMI and ARI (scikit-learn) and purity of a clustering against labels; rows with label < 0
    are ignored; None when no row is labelled.

    Example:
        >>> clustering_metrics([0, 0, 1, 1], [5, 5, 5, 7])["purity"]
        0.75
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    y, c = np.asarray(labels).reshape(-1), np.asarray(clusters).reshape(-1)
    if y.shape != c.shape:
        raise ValueError(f"labels and clusters must have the same length, got {y.shape} and {c.shape}")
    keep = y >= 0
    if not keep.any():
        return None
    y, c = y[keep], c[keep]
    _, c_idx = np.unique(c, return_inverse=True)
    _, y_idx = np.unique(y, return_inverse=True)
    table = np.zeros((c_idx.max() + 1, y_idx.max() + 1), dtype=np.int64)
    np.add.at(table, (c_idx, y_idx), 1)
    return {"nmi": float(normalized_mutual_info_score(y, c)), "ari": float(adjusted_rand_score(y, c)),
            "purity": float(table.max(axis=1).sum() / len(y)), "num_labelled": len(y),
            "num_clusters": int(table.shape[0])}


def raw_pixels(dataset: Any, num_rows: int, *, size: int | None = None) -> np.ndarray:
    """(N, P) float32 pixels in [0, 1] of the first ``num_rows`` images, for the k-means baseline.

    Images of different sizes must be resized to a common ``size`` x ``size``. Without ``size``, images larger
    than 64 x 64 pixels are resized to 32 x 32 (k-means on full-resolution photos would hold gigabytes of
    pixels for a few thousand images, and raw-pixel k-means is a baseline, not a method that needs detail).

    Example:
        >>> from PIL import Image
        >>> raw_pixels([(Image.new("L", (3, 2), 255), 0)], 1).tolist()
        [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    """
    from PIL import Image

    if size is not None and size < 1:
        raise ValueError(f"size (--kmeans-size) must be >= 1 pixel, got {size}")
    rows = []
    for i in range(num_rows):
        image = dataset[i][0]
        if not isinstance(image, Image.Image):
            raise TypeError(f"dataset[{i}] gave a {type(image).__name__}; raw pixels need a data set "
                             "built without a transform (PIL images)")
        if size is None and i == 0 and image.width * image.height > 64 * 64:
            size = 32
            logger.info("k-means baseline: images resized to 32 x 32 pixels (they are larger than 64 x 64; "
                        "--kmeans-size sets the size)")
        if size is not None:
            image = image.resize((size, size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32).reshape(-1) / 255.0
        if rows and array.shape != rows[0].shape:
            raise ValueError(f"image {i} has {array.size} values, image 0 has {rows[0].size}; "
                             "pass size=... (--kmeans-size) to resize all images to one size")
        rows.append(array)
    return np.stack(rows)


def kmeans_baseline(pixels: np.ndarray, num_clusters: int, *, seed: int = 0) -> np.ndarray:
    """k-means cluster ids (N,) of raw vectors (scikit-learn; mini-batch above 20,000 rows).

    Example:
        >>> ids = kmeans_baseline(np.array([[0.0], [0.1], [5.0], [5.1]]), 2)
        >>> bool(ids[0] == ids[1] != ids[2] == ids[3])
        True
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if not 1 <= num_clusters <= len(pixels):
        raise ValueError(f"num_clusters must be in [1, {len(pixels)}], got {num_clusters}")
    if len(pixels) > 20000:
        algo = MiniBatchKMeans(num_clusters, random_state=seed, n_init=3, batch_size=4096)
    else:
        algo = KMeans(num_clusters, random_state=seed, n_init=3)
    return algo.fit_predict(pixels).astype(np.int64)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _refuse_untrained(freshly_initialised: list[str], checkpoint: object, where: str = "") -> None:
    untrained = [name for name in freshly_initialised if name.startswith(("prototypes.", "projection_head."))]
    if untrained:
        raise ValueError(f"{where}the prototypes or projection head were not in the checkpoint {checkpoint!r} (a "
                         f"backbone-only file, or loaded with --partial; initialised at random: "
                         f"{', '.join(untrained[:4])}{' ...' if len(untrained) > 4 else ''}), so the clusters would "
                         "be random directions; cluster with a checkpoint that holds them (a training checkpoint, "
                         "model.pt or a full export, not --backbone-only)")


def refuse_untrained_model(model: torch.nn.Module, checkpoint: str | os.PathLike) -> None:
    """Refuse a model whose prototypes or projection head were not in ``checkpoint`` (they started at random):
    ``extract_job(..., check_model=...)`` calls it right after loading, before any extraction."""
    _refuse_untrained(list(getattr(model, "freshly_initialised", [])), os.fspath(checkpoint))


def cluster_extracted(
    extract_dir: str | os.PathLike, output_dir: str | os.PathLike, *, method: str = "argmax",
    epsilon: float = 0.05, iterations: int = 3, head: int = 0, merge_threshold: float = 0.99,
    kmeans: str | None = None, dataset: Any = None, kmeans_size: int | None = None, seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Cluster the output of :func:`swav.extract.extract_to_dir` and write the tables.

    Writes ``clusters.csv`` (row, path, label, cluster, merged_cluster, score; also
    ``clusters.parquet`` when pyarrow is installed), ``cluster_sizes.csv`` and
    ``cluster_metrics.json`` (summary, merge counts, NMI/ARI/purity when labels exist and, with
    ``kmeans="raw"``, k-means on the raw pixels of ``dataset`` with as many clusters as remain
    after merging). Returns the metrics dict.

    ``dataset`` is the data set the extraction was made from (item i = source row i); rows of
    unreadable images, which the extraction left out, are skipped (and listed in the metrics:
    ``num_unreadable``, ``unreadable_list``). A damaged extraction folder raises
    :class:`swav.extract.DamagedExtractionError` naming the file; an ``output_dir`` that is a
    file raises ValueError before any work.

    Example:
        >>> cluster_extracted("feats/", "clusters/", method="equipartition")  # doctest: +SKIP
    """
    from swav.extract import (
        align_to_extraction,
        check_output_dir,
        load_extracted,
        open_source_dataset,
    )

    if kmeans not in (None, "none", "raw"):
        raise ValueError(f"kmeans must be None, 'none' or 'raw', got {kmeans!r}")
    out = check_output_dir(output_dir)
    data = load_extracted(extract_dir)
    if data.embeddings is None or not data.prototypes:
        raise ValueError(f"extract_dir {extract_dir}: holds no embeddings/prototypes; extract with "
                         "--what embeddings or --what both")
    _refuse_untrained(data.meta.get("freshly_initialised") or [], data.meta.get("checkpoint"),
                      f"extract_dir {extract_dir}: ")
    if not 0 <= head < len(data.prototypes):
        raise ValueError(f"head must be in [0, {len(data.prototypes) - 1}], got {head}")
    prototypes = data.prototypes[head]
    result = assign_clusters(data.embeddings, prototypes, method=method, epsilon=epsilon,
                             iterations=iterations, device=device)
    sizes = np.bincount(result.clusters, minlength=len(prototypes))
    merge = merge_prototypes(prototypes, sizes, threshold=merge_threshold)
    merged = merge.groups[result.clusters]
    baseline_metrics = None
    if kmeans == "raw":  # computed before anything is written: its failure leaves an earlier clustering whole
        # row i of the extraction = item i of the aligned data set (unreadable images left out)
        dataset = align_to_extraction(dataset, data.meta) if dataset is not None else open_source_dataset(data.meta)
        if dataset is None:
            raise ValueError("kmeans='raw' needs the data set (built without a transform) for its pixels; "
                             "pass dataset=... (the extraction does not record where its images came from)")
        if not (np.asarray(data.labels) >= 0).any():
            logger.warning("the images have no labels: the k-means baseline has nothing to be compared with, so it "
                           "is left out (it needs a labelled data set, e.g. class folders)")
        else:
            size = kmeans_size
            if size is None and len(result.clusters):  # the size raw_pixels chooses, recorded
                first = dataset[0][0]
                size = 32 if getattr(first, "width", 0) * getattr(first, "height", 0) > 64 * 64 else None
            pixels = raw_pixels(dataset, len(result.clusters), size=size)
            baseline = kmeans_baseline(pixels, merge.num_effective, seed=seed)
            baseline_metrics = {"num_clusters": merge.num_effective, "pixel_size": size,
                                **(clustering_metrics(data.labels, baseline) or {})}
    if not (np.asarray(data.labels) >= 0).any():
        logger.info("the images have no labels: no NMI, ARI or purity (they compare the clusters with labels)")
    out.mkdir(parents=True, exist_ok=True)
    # the metrics are written last: a folder never pairs old metrics with new tables
    (out / "cluster_metrics.json").unlink(missing_ok=True)
    header = ["row", "path", "label", "cluster", "merged_cluster", "score"]
    columns = [np.arange(len(result.clusters)), data.paths, data.labels,
               result.clusters, merged, result.scores]
    _write_csv(out / "clusters.csv", header,
               [(r, p, int(y), int(c), int(m), f"{s:.6f}") for r, p, y, c, m, s in zip(*columns)])
    _write_parquet(out / "clusters.parquet", header, columns)
    _write_csv(out / "cluster_sizes.csv", ["cluster", "size", "merged_cluster"],
               sorted(((k, int(sizes[k]), int(merge.groups[k])) for k in range(len(sizes))),
                      key=lambda row: -row[1]))
    metrics: dict[str, Any] = {
        "extract_dir": str(Path(extract_dir).resolve()), "method": method, "epsilon": epsilon,
        "sinkhorn_iterations": iterations, "head": head, "num_images": len(result.clusters),
        "num_prototypes": len(prototypes), "num_used": int(len(prototypes) - merge.num_empty),
        "num_empty": merge.num_empty, "merge_threshold": merge_threshold,
        "num_merged_duplicates": merge.num_merged, "num_effective_clusters": merge.num_effective,
        "largest_cluster_fraction": float(sizes.max() / sizes.sum()),
        "prototypes": clustering_metrics(data.labels, result.clusters),
        "merged": clustering_metrics(data.labels, merged),
        "num_unreadable": len(data.meta.get("unreadable_rows") or []),
        "unreadable_list": (str(Path(extract_dir).resolve() / data.meta["unreadable_list"])
                            if data.meta.get("unreadable_list") else None),
    }
    if baseline_metrics is not None:
        metrics["kmeans_raw"] = baseline_metrics
    with open(out / "cluster_metrics.json", "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2)
    logger.info("%d images -> %d prototypes used, %d effective clusters (%d duplicates merged)",
                metrics["num_images"], metrics["num_used"], merge.num_effective, merge.num_merged)
    return metrics


def _write_parquet(path: Path, header: Sequence[str], columns: Sequence[Any]) -> None:
    """Parquet copy of the table when pyarrow is installed (optional dependency)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        logger.debug("pyarrow not installed: no %s", path.name)
        return
    pq.write_table(pa.table({name: list(col) if name == "path" else np.asarray(col)
                             for name, col in zip(header, columns)}), path)

"""Re-split the per-rank queues of a checkpoint over a different number of ranks (SPEC §5, issue 5).

Sinkhorn sees the queue rows of *all* ranks together (its sums are all-reduced), so what matters for
the codes is the global multiset of queued embeddings, not which rank holds a row. When a run
resumes on another world size, the saved queues are merged newest first (row ``j`` of every rank is
as old as row ``j`` of every other rank: all ranks push the same number of rows per step) and dealt
out round-robin to the new ranks, ``length`` rows each. Rows beyond ``world_size * length`` (the
oldest) are dropped; if fewer rows were saved, the new queues are partly filled and the engine waits
until they are full before using them, as at the start of the queue. Every rank gets the same number of
rows (the up to ``world_size - 1`` oldest rows that would make the fill uneven are dropped too), so all
ranks' queues become full at the same step and Sinkhorn never mixes ranks with and without queue rows.

Legend: A assignment crops, L rows per rank, D embedding dim; row 0 is the newest.

Example:
    >>> import torch
    >>> q = lambda rows: {"embeddings": torch.tensor(rows, dtype=torch.float32)[None, :, None],
    ...                   "filled": torch.tensor(len(rows))}
    >>> merged = resplit_queues([q([0, 2, 4, 6]), q([1, 3, 5, 7])], world_size=1, length=8)
    >>> merged[0]["embeddings"].flatten().tolist(), int(merged[0]["filled"])
    ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 8)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["merge_queue_rows", "resplit_queues"]


def merge_queue_rows(saved: Sequence[Mapping[str, torch.Tensor] | None]) -> torch.Tensor | None:
    """The valid rows of all saved queues, newest first: ``A x N x D`` (None when nothing was saved).

    Rows of equal age are ordered by rank (row 0 of rank 0, row 0 of rank 1, ..., row 1 of rank 0, ...).
    """
    parts = [(q["embeddings"], int(q["filled"])) for q in saved if q is not None]
    if not parts:
        return None
    shapes = {(e.shape[0], e.shape[2]) for e, _ in parts}
    if len(shapes) != 1:
        raise ValueError(f"saved queues have different (assignment crops, dim) shapes {sorted(shapes)}: "
                         "expected the same on every rank")
    rows, ages = [], []
    for rank, (embeddings, filled) in enumerate(parts):
        filled = min(filled, embeddings.shape[1])
        rows.append(embeddings[:, :filled])
        ages.append(torch.arange(filled) * len(parts) + rank)  # age-major, rank-minor position
    order = torch.argsort(torch.cat(ages))
    return torch.cat(rows, dim=1)[:, order]


def resplit_queues(saved: Sequence[Mapping[str, torch.Tensor] | None], *, world_size: int,
                   length: int) -> list[dict[str, torch.Tensor] | None]:
    """New per-rank queue states (``embeddings`` A x length x D, ``filled``) for ``world_size`` ranks.

    Returns ``[None] * world_size`` when no rank had a queue. See the module docstring.
    """
    if world_size < 1 or length < 1:
        raise ValueError(f"world_size={world_size}, length={length} are invalid: expected integers >= 1")
    merged = merge_queue_rows(saved)
    if merged is None:
        return [None] * world_size
    even = min(merged.shape[1] // world_size, length) * world_size
    merged = merged[:, :even]  # drop the oldest rows that no longer fit or would fill the ranks unevenly
    out: list[dict[str, torch.Tensor] | None] = []
    for rank in range(world_size):
        mine = merged[:, rank::world_size]
        embeddings = torch.zeros(merged.shape[0], length, merged.shape[2], dtype=merged.dtype)
        embeddings[:, :mine.shape[1]] = mine
        out.append({"embeddings": embeddings, "filled": torch.tensor(mine.shape[1], dtype=torch.long)})
    return out

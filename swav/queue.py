"""Per-rank FIFO queue of recent assignment-crop embeddings (SPEC §5).

Legend: A assignment crops, L rows per rank, D embedding dim. Row 0 is the newest.
The queue is training state: it lives in buffers so ``state_dict`` round-trips it, and it
records how many rows hold real data, so "full" never relies on a non-zero test.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["EmbeddingQueue"]


class EmbeddingQueue(nn.Module):
    """FIFO buffer of shape ``A x L x D``; newest embeddings enter at the front.

    Example:
        >>> import torch
        >>> q = EmbeddingQueue(num_assign_crops=2, length=6, dim=4)
        >>> q.push(torch.randn(2, 3, 4)); q.is_full
        False
        >>> q.push(torch.randn(2, 3, 4)); q.is_full
        True
    """

    def __init__(self, num_assign_crops: int, length: int, dim: int) -> None:
        super().__init__()
        for name, value in (("num_assign_crops", num_assign_crops), ("length", length), ("dim", dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.register_buffer("embeddings", torch.zeros(num_assign_crops, length, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        # host-side mirror of ``filled`` so that checking fullness never syncs with a GPU
        self._filled = 0
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_counter())

    def _sync_counter(self) -> None:
        self._filled = int(self.filled)

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    @property
    def is_full(self) -> bool:
        return self._filled >= self.length

    @torch.no_grad()
    def push(self, z_ABD: torch.Tensor) -> None:
        """Insert a batch (newest first), dropping the oldest rows."""
        if z_ABD.dim() != 3 or z_ABD.shape[0] != self.embeddings.shape[0] or z_ABD.shape[2] != self.embeddings.shape[2]:
            raise ValueError(
                f"push expects A x B x D = {self.embeddings.shape[0]} x B x {self.embeddings.shape[2]}, "
                f"got {tuple(z_ABD.shape)}"
            )
        batch = z_ABD.shape[1]
        if batch >= self.length:
            self.embeddings.copy_(z_ABD[:, : self.length].to(self.embeddings.dtype))
        else:
            self.embeddings[:, batch:] = self.embeddings[:, :-batch].clone()
            self.embeddings[:, :batch] = z_ABD.to(self.embeddings.dtype)
        self._filled = min(self.length, self._filled + batch)
        self.filled.fill_(self._filled)

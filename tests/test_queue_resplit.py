"""Resume on another world size (issue 5): the queue is re-split from its global contents, the position
is converted by samples seen, and training continues. Unit tests of swav.queue_resplit against a naive
loop, then a real 2-process run resumed by 1 process."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from swav.checkpoint import list_checkpoints, load_checkpoint
from swav.derived import derive_values
from swav.lars import LARS
from swav.model import ModelSpec
from swav.queue_resplit import merge_queue_rows, resplit_queues
from swav.train import train
from swav.train_state import restore_training_state
from swav.train_step import SwAVStep
from tests.distributed_helpers import run_distributed
from tests.train_helpers import InMemoryImages, tiny_config, tiny_model


def _state(rows: torch.Tensor, filled: int | None = None) -> dict:
    return {"embeddings": rows, "filled": torch.tensor(rows.shape[1] if filled is None else filled)}


def _naive_merge(saved: list[dict]) -> list[torch.Tensor]:
    """Newest first: row 0 of every rank (by rank), then row 1 of every rank, ... (valid rows only)."""
    rows = []
    for j in range(max(s["embeddings"].shape[1] for s in saved)):
        for s in saved:
            if j < int(s["filled"]):
                rows.append(s["embeddings"][:, j])
    return rows


def test_merge_interleaves_ranks_by_age():
    saved = [_state(torch.randn(2, 6, 3)), _state(torch.randn(2, 6, 3), filled=4), _state(torch.randn(2, 6, 3))]
    merged = merge_queue_rows(saved)
    assert torch.equal(merged, torch.stack(_naive_merge(saved), dim=1))
    assert merge_queue_rows([None, None]) is None


def test_two_ranks_to_one_and_back():
    saved = [_state(torch.randn(2, 8, 4)), _state(torch.randn(2, 8, 4))]
    (one,) = resplit_queues(saved, world_size=1, length=16)
    assert int(one["filled"]) == 16 and torch.equal(one["embeddings"], torch.stack(_naive_merge(saved), dim=1))
    back = resplit_queues([one], world_size=2, length=8)
    for new, old in zip(back, saved, strict=True):  # dealing round-robin undoes the interleaving
        assert torch.equal(new["embeddings"], old["embeddings"]) and int(new["filled"]) == 8


def test_partial_and_shrinking_queues():
    saved = [_state(torch.randn(1, 4, 2), filled=3), _state(torch.randn(1, 4, 2), filled=3)]
    grown = resplit_queues(saved, world_size=1, length=10)[0]
    assert int(grown["filled"]) == 6 and torch.equal(grown["embeddings"][:, 6:], torch.zeros(1, 4, 2))
    shrunk = resplit_queues(saved, world_size=2, length=2)
    naive = _naive_merge(saved)[:4]  # the 4 newest rows survive, dealt round-robin
    assert torch.equal(shrunk[0]["embeddings"], torch.stack(naive[0::2], dim=1))
    assert torch.equal(shrunk[1]["embeddings"], torch.stack(naive[1::2], dim=1))
    assert resplit_queues([None, None], world_size=3, length=4) == [None, None, None]
    with pytest.raises(ValueError, match="world_size"):
        resplit_queues(saved, world_size=0, length=4)


def test_every_new_rank_gets_the_same_number_of_rows():
    """2 ranks x 4 filled rows re-split over 3 ranks: 8 rows do not deal evenly, so the 2 oldest are dropped and
    every rank holds 2. Uneven fills ([3, 3, 2]) would make the ranks' queues full at different steps, and
    Sinkhorn would then mix ranks that add queue rows with ranks that do not."""
    saved = [_state(torch.randn(1, 4, 2)), _state(torch.randn(1, 4, 2))]
    split = resplit_queues(saved, world_size=3, length=6)
    assert [int(q["filled"]) for q in split] == [2, 2, 2]
    naive = _naive_merge(saved)[:6]  # the 6 newest rows, dealt round-robin
    for rank, queue in enumerate(split):
        assert torch.equal(queue["embeddings"][:, :2], torch.stack(naive[rank::3], dim=1))
        assert not queue["embeddings"][:, 2:].any()
    assert [int(q["filled"]) for q in resplit_queues(saved, world_size=3, length=2)] == [2, 2, 2]


# 24 images, batch 4 per device: 3 steps per epoch on 2 ranks, 6 on 1; global queue 16 (8 per rank)
VALUES = {"data.pipeline": "tensor", "swav.queue_length": 16, "swav.queue_start_epoch": 0, "optim.epochs": 2}


def _two_ranks_stop_at_step_4(rank: int, world_size: int, root: str):
    result = train(tiny_config(root, **VALUES, **{"run.max_steps": 4}), dataset=InMemoryImages(24),
                   model_builder=tiny_model)
    return result.status, result.step


@pytest.mark.distributed
def test_resume_on_one_process_from_two(tmp_path, caplog):
    assert run_distributed(_two_ranks_stop_at_step_4, 2, str(tmp_path)) == [("max_steps", 4)] * 2
    saved = load_checkpoint(list_checkpoints(tmp_path)[0])
    assert saved["world_size"] == 2 and (saved["epoch"], saved["batch_in_epoch"]) == (1, 1)
    assert all(int(q["filled"]) == 8 for q in saved["queues"])

    # what the resumed rank starts from: restore into a fresh 1-process step and look at its queue
    cfg = tiny_config(tmp_path, **VALUES)
    spec = ModelSpec(**{**saved["model_spec"], "num_prototypes": tuple(saved["model_spec"]["num_prototypes"])})
    raw = tiny_model(spec)
    raw.spec = spec
    derived = derive_values(cfg, world_size=1, dataset_size=24, device="cpu", precision="fp32", pipeline="tensor")
    step_fn = SwAVStep(raw, raw, LARS(raw.parameters(), lr=0.0), config=cfg, lr_schedule=np.zeros(12),
                       queue_length_per_rank=derived.queue_length_per_rank, precision="fp32",
                       device=torch.device("cpu"), rank=0)
    with caplog.at_level(logging.WARNING, logger="swav"):
        progress = restore_training_state(saved, step_fn, config=cfg, derived=derived, rank=0, path="ckpt")
    assert (progress.epoch, progress.batch_in_epoch, progress.step) == (1, 2, 8)  # 8 samples of epoch 1 seen
    assert step_fn.queue is not None and step_fn.queue.is_full
    assert torch.equal(step_fn.queue.embeddings, torch.stack(_naive_merge(saved["queues"]), dim=1))
    assert "re-split" in caplog.text and "continuing at epoch 1, batch 2 (step 8)" in caplog.text
    # without a queue the change of world size is said too (nothing to re-split)
    caplog.clear()
    no_queue = {**saved, "queues": [None, None]}
    with caplog.at_level(logging.WARNING, logger="swav"):
        restore_training_state(no_queue, step_fn, config=cfg, derived=derived, rank=0, path="ckpt")
    assert "written by 2 ranks, this run has 1 (no queue to re-split" in caplog.text

    # and the real command path: resume at world size 1 and finish the run
    done = train(cfg, dataset=InMemoryImages(24), model_builder=tiny_model, resume=True)
    assert (done.status, done.step, done.epoch) == ("complete", 12, 2)
    final = load_checkpoint(list_checkpoints(tmp_path)[0])
    assert final["world_size"] == 1 and len(final["queues"]) == 1 and final["queues"][0]["embeddings"].shape[1] == 16

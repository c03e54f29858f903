"""The training engine under a real 2-process gloo group: it runs, checkpoints every rank's queue and RNG,
resumes bit-identically at the same world size, and a NaN on one rank stops both (issues 5 and 8).
The heavier equivalence tests (2 processes vs 1 process) live with the distributed work."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swav.checkpoint import list_checkpoints, load_checkpoint
from swav.health import NonFiniteError
from swav.train import train
from tests.distributed_helpers import run_distributed
from tests.train_helpers import InMemoryImages, assert_same_state, tiny_config, tiny_model

# 24 images / 2 ranks / batch 4 = 3 steps per epoch; queue of 16 global = 8 per rank = 2 local batches
VALUES = {"data.pipeline": "tensor", "swav.queue_length": 16, "swav.queue_start_epoch": 0,
          "swav.freeze_prototypes_steps": 2, "optim.epochs": 2}


def _straight_and_resumed(rank: int, world_size: int, root: str):
    data = InMemoryImages(24)
    done = train(tiny_config(f"{root}/straight", **VALUES), dataset=data, model_builder=tiny_model)
    first = train(tiny_config(f"{root}/split", **VALUES, **{"run.max_steps": 4}), dataset=data,
                  model_builder=tiny_model)
    second = train(tiny_config(f"{root}/split", **VALUES), dataset=data, model_builder=tiny_model, resume=True)
    return done.status, done.step, first.status, first.step, second.status, second.step


def _nan_on_rank_one(rank: int, world_size: int, root: str, check_sync: str = "step"):
    values = {**VALUES, "debug.inject_nan_step": 3, "debug.inject_nan_rank": 1, "run.check_sync": check_sync}
    try:
        train(tiny_config(f"{root}/nan", **values), dataset=InMemoryImages(24), model_builder=tiny_model)
    except NonFiniteError as exc:
        return exc.step, str(exc)
    return None


@pytest.mark.distributed
def test_two_ranks_train_checkpoint_and_resume_identically(tmp_path):
    results = run_distributed(_straight_and_resumed, 2, str(tmp_path))
    assert results[0] == results[1] == ("complete", 6, "max_steps", 4, "complete", 6)
    straight = load_checkpoint(list_checkpoints(tmp_path / "straight")[0])
    assert straight["world_size"] == 2 and len(straight["queues"]) == len(straight["rng"]) == 2
    q0, q1 = (q["embeddings"] for q in straight["queues"])
    assert q0.shape == (2, 8, 8) and not torch.equal(q0, q1)  # each rank queues its own images
    assert_same_state(straight, load_checkpoint(list_checkpoints(tmp_path / "split")[0]))
    assert torch.equal(straight["queues"][1]["embeddings"],
                       load_checkpoint(list_checkpoints(tmp_path / "split")[0])["queues"][1]["embeddings"])


@pytest.mark.distributed
@pytest.mark.parametrize("check_sync", ["step", "deferred"])
def test_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, check_sync):
    results = run_distributed(_nan_on_rank_one, 2, str(tmp_path), check_sync)
    assert results[0] is not None and results[1] is not None
    assert results[0][0] == results[1][0] == 3
    assert "loss per rank" in results[0][1] and "nan" in results[0][1]
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == []  # nothing written after the NaN


def _folder_with_bad_files(rank: int, world_size: int, root: str):
    values = {"data.pipeline": "batched", "data.max_bad_fraction": 0.5, "optim.epochs": 3}
    result = train(tiny_config(f"{root}/run", f"{root}/photos", **values), model_builder=tiny_model)
    return result.status, result.step


@pytest.mark.distributed
def test_two_ranks_list_each_bad_file_once_after_both_stopped(tmp_path):
    """Both ranks append the bad files they meet (each epoch reshuffles which rank meets which); rank 0 rewrites
    the list without duplicates only after the barrier that follows every rank's last batch."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(22):
        Image.new("RGB", (20, 16), (11 * i, 40, 200 - 5 * i)).save(photos / f"img{i:02d}.png")
    (photos / "broken1.jpg").write_bytes(b"")
    (photos / "broken2.png").write_text("not an image")
    results = run_distributed(_folder_with_bad_files, 2, str(tmp_path))
    assert results[0] == results[1] == ("complete", 9)  # 24 files / 2 ranks / batch 4 = 3 steps x 3 epochs
    listed = (tmp_path / "run" / "bad_images.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(Path(p).name for p in listed) == ["broken1.jpg", "broken2.png"]


def _prototypes_seen_by_each_rank(rank: int, world_size: int) -> tuple[int, int]:
    from swav.health import prototypes_in_use, prototypes_in_use_globally

    codes = torch.zeros(2, 4, 10)
    codes[:, :, rank * 3:rank * 3 + 3] = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(rank))
    return prototypes_in_use(codes), prototypes_in_use_globally(codes)


@pytest.mark.distributed
def test_prototypes_in_use_counts_every_ranks_codes():
    # rank 0's codes pick among prototypes 0-2, rank 1's among 3-5: the logged count covers the global batch
    results = run_distributed(_prototypes_seen_by_each_rank, 2)
    (local0, global0), (local1, global1) = results
    assert global0 == global1 == local0 + local1 and 2 <= local0 <= 3 and 2 <= local1 <= 3


STALE = {"data.pipeline": "tensor", "optim.epochs": 2, "run.checkpoint_every_steps": 1, "run.keep_checkpoints": 10}


def _resume_with_another_view(rank: int, world_size: int, root: str, view: str):
    """Rank 1 resumes with ``view``: "missing" = its folder lacks the newest checkpoint (a folder not shared, or
    a file not there yet); "stale" = its listing lags behind although the newest file is readable."""
    import shutil

    import swav.train as engine
    from swav.checkpoint import find_latest_checkpoint

    out = f"{root}/run"
    if rank == 1 and view == "missing":
        out = f"{root}/view"
        if not Path(out).exists():
            shutil.copytree(f"{root}/run", out)
            Path(out, "checkpoints", "step_00000004.pt").unlink()
    if rank == 1 and view == "stale":
        engine.find_latest_checkpoint = lambda folder: find_latest_checkpoint(folder) if not list_checkpoints(
            folder) else (list_checkpoints(folder)[1], load_checkpoint(list_checkpoints(folder)[1]))
    try:
        result = train(tiny_config(out, **STALE), dataset=InMemoryImages(24), model_builder=tiny_model, resume=True)
        return "ok", result.status, result.step
    except Exception as exc:  # noqa: BLE001 - the test compares both ranks' errors
        return "error", type(exc).__name__, str(exc)
    finally:
        engine.find_latest_checkpoint = find_latest_checkpoint


def _first_four_steps(rank: int, world_size: int, root: str):
    return train(tiny_config(f"{root}/run", **STALE, **{"run.max_steps": 4}), dataset=InMemoryImages(24),
                 model_builder=tiny_model).step


@pytest.mark.distributed
def test_every_rank_resumes_from_rank_zeros_checkpoint(tmp_path):
    """Ranks that list different newest checkpoints (a stale network-file-system listing, a folder not shared)
    never train apart: rank 0's file is loaded by all, or every rank stops with one error before training."""
    straight = tmp_path / "straight"
    straight.mkdir()
    run_distributed(_first_four_steps, 2, str(straight))
    assert run_distributed(_resume_with_another_view, 2, str(straight), "none")[0][:2] == ("ok", "complete")
    root = str(tmp_path)
    assert run_distributed(_first_four_steps, 2, root) == [4, 4]
    before = sorted(p.name for p in list_checkpoints(tmp_path / "run"))
    missing = run_distributed(_resume_with_another_view, 2, root, "missing")
    assert [m[:2] for m in missing] == [("error", "CheckpointError")] * 2 and missing[0][2] == missing[1][2]
    assert "rank 1 cannot read rank 0's newest checkpoint" in missing[0][2] and "shared by every node" in missing[0][2]
    assert sorted(p.name for p in list_checkpoints(tmp_path / "run")) == before  # nothing trained or written
    stale = run_distributed(_resume_with_another_view, 2, root, "stale")
    assert stale == [("ok", "complete", 6)] * 2
    assert_same_state(load_checkpoint(list_checkpoints(tmp_path / "run")[0]),
                      load_checkpoint(list_checkpoints(straight / "run")[0]))


def _error_and_stop_lines(run) -> tuple[str, str, list[str]] | None:
    """``run()``'s error (type name, message) and the "rank N of M stopped:" lines logged meanwhile; None if
    it raised nothing."""
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("swav").addHandler(handler)
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - the tests compare both ranks' errors
        return type(exc).__name__, str(exc), [r for r in records if "stopped:" in r]
    finally:
        logging.getLogger("swav").removeHandler(handler)
    return None


def _model_file_blocked(rank: int, world_size: int, root: str):
    return _error_and_stop_lines(lambda: train(
        tiny_config(f"{root}/run", **{"data.pipeline": "tensor", "optim.epochs": 1}), dataset=InMemoryImages(24),
        model_builder=tiny_model, resume=True))


@pytest.mark.distributed
def test_a_write_only_rank_zero_does_fails_on_every_rank_with_rank_zeros_reason(tmp_path):
    """model.pt (written by rank 0 alone) cannot be written: every rank stops with the reason at once, rather
    than the other ranks waiting at the next collective and being named as the rank that stopped."""
    (tmp_path / "run" / "model.pt").mkdir(parents=True)  # a folder where the file should go
    first, second = run_distributed(_model_file_blocked, 2, str(tmp_path))
    assert first is not None and second is not None
    assert second[0] == "CheckpointSaveError" and second[1].startswith(f"rank 0 could not write {tmp_path / 'run'}")
    assert first[0] != "CheckpointSaveError" or "rank 0 could not" not in first[1]  # rank 0 keeps its own error
    assert "--resume" in second[1] and [p.name for p in list_checkpoints(tmp_path / "run")] == []
    # an agreed failure: no rank says the others will stop only at their next collective
    assert first[2] == second[2] == []


def _turns(rank: int, world_size: int, root: str, fail_rank: int):
    import time

    from swav.dist_setup import DistContext
    from swav.train import OtherRankFailedError, _in_turn

    ctx = DistContext(rank, world_size, rank % 2, torch.device("cpu"), "gloo", False)  # 2 "nodes" of 2 ranks

    def download():
        if rank == fail_rank:
            raise FileNotFoundError("no network")
        Path(root, f"start{rank}").write_text(str(time.time()))
        time.sleep(0.3)
        Path(root, f"end{rank}").write_text(str(time.time()))
        return rank
    try:
        return "ok", _in_turn(ctx, "prepare the data set", download)
    except OtherRankFailedError as exc:
        return "other", str(exc)
    except FileNotFoundError as exc:
        return "own", str(exc)


@pytest.mark.distributed
def test_a_download_is_done_by_rank_zero_first_then_one_process_per_node_then_the_rest(tmp_path):
    results = run_distributed(_turns, 4, str(tmp_path), -1)
    assert results == [("ok", r) for r in range(4)]
    start = {r: float((tmp_path / f"start{r}").read_text()) for r in range(4)}
    end = {r: float((tmp_path / f"end{r}").read_text()) for r in range(4)}
    assert end[0] <= start[2] and end[0] <= start[1] and end[0] <= start[3]  # rank 0 alone first
    assert max(end[0], end[2]) <= min(start[1], start[3])  # then local rank 0 of the other node (rank 2)
    failed = run_distributed(_turns, 4, str(tmp_path / "x"), 0)
    assert failed[0] == ("own", "no network")
    assert all(f == ("other", "could not prepare the data set (rank 0: FileNotFoundError: no network); every rank "
                              "stops") for f in failed[1:])


def _prune_fails_on_rank_zero(rank: int, world_size: int, root: str):
    import swav.train as engine

    if rank == 0:
        def prune(*args, **kwargs):
            raise OSError("Input/output error (simulated)")
        engine.prune_checkpoints = prune
    return _error_and_stop_lines(lambda: train(
        tiny_config(f"{root}/run", **{"data.pipeline": "tensor", "run.checkpoint_every_steps": 1}),
        dataset=InMemoryImages(24), model_builder=tiny_model))


@pytest.mark.distributed
def test_rank_zeros_own_failure_in_an_agreed_write_is_not_announced_as_a_wait(tmp_path):
    """An OSError of rank 0's pruning: rank 0 raises it, rank 1 a CheckpointSaveError naming it, and neither logs
    that the other ranks stop only at their next collective (they have stopped already)."""
    first, second = run_distributed(_prune_fails_on_rank_zero, 2, str(tmp_path))
    assert first[0] == "OSError" and second[0] == "CheckpointSaveError"
    assert "rank 0 could not remove old step checkpoints (OSError: Input/output error (simulated))" in second[1]
    assert first[2] == second[2] == []

"""Training from WebDataset shards (issue 5): every image exactly once per epoch across 2 ranks x 2 workers,
equal steps on every rank, exact resume inside an epoch, and the engine trains from ``shards:DIR``.

The exactly-once checks run at the level of the loader the engine builds (``build_train_loader`` on a
``ShardDataset``), which records the keys of each batch; rank and world size are given explicitly, so
no process group is needed there. The end-to-end run uses a real 2-process gloo group.
"""
from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swav.shards import ShardDataset, write_shards
from swav.train import train
from swav.train_data import build_train_loader
from swav.train_shards import guaranteed_samples_per_rank, resume_skips, sample_index
from tests.distributed_helpers import run_distributed
from tests.train_helpers import assert_same_state, final_state, tiny_config, tiny_model

N = 24
B = 4


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"img.{i:03d}.png")
    return folder


def _pack(images, out, **kwargs):
    write_shards(images, out, **kwargs)
    return out


def _epoch_keys(shards, cfg, epoch: int, world: int = 2, start_batch: int = 0, crops_out: list | None = None,
                **shard_options) -> list[list[list[str]]]:
    """Per rank, the keys of every batch the engine's loader yields in ``epoch`` (and their crops into
    ``crops_out``, per rank)."""
    out = []
    for rank in range(world):
        ds = ShardDataset(shards, rank=rank, world_size=world, seed=cfg.run.seed, return_key=True, **shard_options)
        loader = build_train_loader(cfg, ds, pipeline="batched", rank=rank, world_size=world,
                                    device=torch.device("cpu"))
        loader.set_epoch(epoch, start_batch)
        batches, rank_crops = [], []
        for crops in loader:
            assert [tuple(c.shape) for c in crops] == [(B, 3, 12, 12)] * 2 + [(B, 3, 8, 8)] * 2
            assert all(c.dtype == torch.float32 for c in crops)
            batches.append(list(loader.batch_keys))
            rank_crops.append([c.clone() for c in crops])
        assert len(batches) == len(loader)
        out.append(batches)
        if crops_out is not None:
            crops_out.append(rank_crops)
    return out


def test_every_image_once_per_epoch_across_two_ranks_and_two_workers(images, tmp_path):
    shards = _pack(images, tmp_path / "shards", num_shards=4)  # 4 x 6 images: 2 shards per rank, 1 per worker
    cfg = tiny_config(tmp_path / "run", **{"data.workers": 2, "data.pipeline": "batched"})
    everything = sorted(p.name for p in images.iterdir())
    orders = []
    for epoch in (0, 1):
        per_rank = _epoch_keys(shards, cfg, epoch)
        assert [len(r) for r in per_rank] == [3, 3]  # the same number of steps on both ranks
        seen = [k for rank in per_rank for batch in rank for k in batch]
        assert Counter(seen) == Counter(everything)  # every image exactly once
        orders.append(per_rank)
    assert orders[0] != orders[1]  # a new order every epoch (shard permutation and shuffle buffer)
    assert _epoch_keys(shards, cfg, 1) == orders[1]  # reproducible


def test_uneven_shards_keep_ranks_in_step_and_never_repeat(images, tmp_path, caplog):
    shards = _pack(images, tmp_path / "shards", max_samples_per_shard=5)  # 5, 5, 5, 5, 4 images
    counts = [s["num_samples"] for s in json.loads((shards / "shards.json").read_text())["shards"]]
    assert guaranteed_samples_per_rank(counts, 2) == 9  # the 2 smallest shards: 4 + 5
    cfg = tiny_config(tmp_path / "run", **{"data.workers": 2, "data.pipeline": "batched"})
    with caplog.at_level("WARNING", logger="swav.train_shards"):
        _epoch_keys(shards, cfg, 0)
    assert caplog.text.count("each epoch trains on 16 of the 24 images in the shards (67%)") == 1  # rank 0 says it
    assert "--num-shards 4" in caplog.text
    for epoch in range(3):
        per_rank = _epoch_keys(shards, cfg, epoch)
        assert [len(r) for r in per_rank] == [2, 2]  # 9 // 4 on every rank, whichever shards it holds
        seen = [k for rank in per_rank for batch in rank for k in batch]
        assert len(seen) == len(set(seen)) == 16


@pytest.mark.parametrize("workers,pack", [(2, {"max_samples_per_shard": 3}), (2, {"max_samples_per_shard": 5}),
                                          (3, {"max_samples_per_shard": 5}), (0, {"num_shards": 5})])
def test_resume_inside_an_epoch_is_exact(images, tmp_path, workers, pack, caplog):
    """Resumed at every batch of the epoch, the rest of it holds the same batches (keys and crops) as an
    uninterrupted epoch: uneven worker streams (some end before others, short last worker batches), a
    shuffle buffer of 4 mixing samples of neighbouring shards, 2 ranks."""
    shards = _pack(images, tmp_path / "shards", **pack)
    cfg = tiny_config(tmp_path / "run", **{"data.workers": workers, "data.pipeline": "batched"})
    full_crops: list = []
    full = _epoch_keys(shards, cfg, 1, crops_out=full_crops, shuffle_buffer=4)
    steps = len(full[0])
    assert steps >= 2 and len(full[1]) == steps
    for start in range(1, steps):
        crops: list = []
        with caplog.at_level("WARNING", logger="swav.shards"):
            resumed = _epoch_keys(shards, cfg, 1, start_batch=start, crops_out=crops, shuffle_buffer=4)
        assert resumed == [rank[start:] for rank in full]
        assert "do not match" not in caplog.text  # the index is right: no false alarm
        for rank in range(2):
            for got, want in zip(crops[rank], full_crops[rank][start:], strict=True):
                assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_with_unreadable_samples_at_the_resume_point(images, tmp_path, workers):
    """Stand-ins for unreadable samples (training fills them in): one right after a resume point copies the
    readable sample before it, read again, as in the uninterrupted epoch."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(images.iterdir())[:18]:
        (folder / path.name).write_bytes(path.read_bytes())
    for i in range(6):  # every 4th file of the packed order is unreadable
        (folder / f"img.{3 * i + 1:03d}.png.bad.png").write_bytes(b"not an image")
    shards = _pack(folder, tmp_path / "shards", max_samples_per_shard=5, verify=False)
    cfg = tiny_config(tmp_path / "run", **{"data.workers": workers, "data.pipeline": "batched"})
    options = {"shuffle_buffer": 2, "max_bad_fraction": 1.0}
    full = _epoch_keys(shards, cfg, 1, world=1, **options)
    assert sum("#stand-in-" in key for batch in full[0] for key in batch) >= 4
    for start in range(1, len(full[0])):
        assert _epoch_keys(shards, cfg, 1, world=1, start_batch=start, **options) == [full[0][start:]]


def test_a_wrong_index_is_named_on_resume(images, tmp_path, caplog):
    shards = _pack(images, tmp_path / "shards", max_samples_per_shard=6)
    index = json.loads((shards / "shards.json").read_text())
    index["shards"][0]["num_samples"] = 5  # one sample more in the shard than the index says
    (shards / "shards.json").write_text(json.dumps(index))
    ds = ShardDataset(shards, rank=0, world_size=1, seed=3, return_key=True)
    ds.set_epoch(0, skip_samples=[4])
    with caplog.at_level("WARNING", logger="swav.shards"):
        list(ds)
    assert "the sample counts in shards.json do not match the shards" in caplog.text


def test_resume_skips_and_skipped_samples_are_not_read(images, tmp_path, caplog):
    # the main stream: w0 4, w1 4, w0 4, w1 1, w0 1 (streams of 9 and 5, batch 4)
    assert [resume_skips([9, 5], 4, done) for done in (0, 3, 4, 8, 11, 12, 13, 14)] == \
        [[0, 0], [0, 0], [4, 0], [4, 4], [4, 4], [8, 4], [8, 5], [9, 5]]
    assert resume_skips([0, 6], 4, 5) == [0, 4]  # a worker without shards has no batch
    shards = _pack(images, tmp_path / "shards", max_samples_per_shard=4)  # 6 shards of 4
    ds = ShardDataset(shards, rank=0, world_size=1, seed=3, return_key=True, shuffle_buffer=2)
    whole = [key for _, _, key in ds]
    first = ds.rank_shards()[0]
    ds.set_epoch(0, skip_samples=[8])
    rest = list(ds)
    assert all(item is rest[0] for item in rest[:8]) and repr(rest[0]) == "Skipped()"
    assert [key for _, _, key in rest[8:]] == whole[8:]
    for seed in range(6):  # a buffer larger than the stream: the samples read last may be ones already trained on
        big = ShardDataset(shards, rank=0, world_size=1, seed=seed, return_key=True)
        order = [key for _, _, key in big]
        big.set_epoch(0, skip_samples=[8])
        with caplog.at_level("WARNING", logger="swav.shards"):
            assert [key for _, _, key in list(big)[8:]] == order[8:]
        assert "do not match" not in caplog.text  # the index is right: no false alarm
    in_first = {key for _, _, key in ShardDataset([first], return_key=True)}
    assert in_first <= set(whole[:8])  # the buffer of 2 passed the first shard on within the first 8 samples
    Path(first).write_bytes(b"")  # so it is not read at all: damaged now, it would stop the stream
    assert [key for _, _, key in list(ds)[8:]] == whole[8:]
    assert sample_index("000123") == 123 and sample_index("a/b.png") == sample_index("a/b.png") > 0


def _train_from_shards(rank: int, world_size: int, root: str, shards: str):
    # run_distributed starts its ranks with "spawn", which child processes inherit: each epoch's data-loader
    # workers would then re-import torch (~15 s each here). Ranks started by torchrun fork their workers.
    multiprocessing.set_start_method("fork", force=True)
    values = {"data.path": f"shards:{shards}", "data.workers": 2, "data.pipeline": "auto", "optim.epochs": 2,
              "swav.queue_length": 16, "swav.queue_start_epoch": 0}
    straight = train(tiny_config(f"{root}/straight", **values), model_builder=tiny_model)
    first = train(tiny_config(f"{root}/split", **values, **{"run.max_steps": 4}), model_builder=tiny_model)
    second = train(tiny_config(f"{root}/split", **values), model_builder=tiny_model, resume=True)
    return [(r.status, r.step) for r in (straight, first, second)]


@pytest.mark.distributed
def test_two_ranks_train_and_resume_from_shards(images, tmp_path):
    shards = _pack(images, tmp_path / "shards", num_shards=4)
    results = run_distributed(_train_from_shards, 2, str(tmp_path), str(shards))
    assert results[0] == results[1] == [("complete", 6), ("max_steps", 4), ("complete", 6)]
    # stopped at step 4, inside the second epoch (3 steps each): the resumed run ends bit-identical
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "split"))
    derived = json.loads((tmp_path / "straight" / "derived.json").read_text())
    assert (derived["dataset_size"], derived["samples_per_rank"], derived["steps_per_epoch"]) == (24, 12, 3)
    assert derived["pipeline"] == "batched"


def test_unreadable_samples_in_shards_keep_every_epoch_full_length(images, tmp_path):
    # shards written without verification (or by another tool) may hold unreadable samples: training replaces
    # each by a readable one of the same stream, so every epoch still has its planned batches
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(images.iterdir())[:14]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "img.900.png").write_bytes(b"")
    (folder / "img.901.png").write_text("<html>not an image</html>")
    shards = _pack(folder, tmp_path / "shards", num_shards=2, verify=False)
    values = {"data.path": f"shards:{shards}", "data.workers": 0, "optim.epochs": 2, "data.max_bad_fraction": 0.5}
    result = train(tiny_config(tmp_path / "run", **values), model_builder=tiny_model)
    assert result.status == "complete" and result.step == 2 * (16 // B)
    listed = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert sorted(name.rsplit(":", 1)[1] for name in listed) == ["img.900.png", "img.901.png"]
    # outside training (extraction, scans) the stream leaves them out
    plain = ShardDataset(shards, rank=0, world_size=1, return_key=True, max_bad_fraction=0.5)
    assert len(list(plain)) == 14
    # in training each stand-in has a key of its own, so its crops (seeded by the key) are not a repeat
    filled = ShardDataset(shards, rank=0, world_size=1, return_key=True, max_bad_fraction=0.5)
    filled.fill_bad = True
    keys = [key for _, _, key in filled]
    stand_ins = [key for key in keys if "#stand-in-" in key]
    assert len(keys) == len(set(keys)) == 16 and len(stand_ins) == 2
    assert all(key.split("#")[0] in keys for key in stand_ins)
    assert len({sample_index(key) for key in keys}) == 16


def test_a_stream_with_nothing_readable_says_so(tmp_path, caplog):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"img.{i}.png").write_bytes(b"not a png")
    shards = _pack(folder, tmp_path / "shards", num_shards=1, verify=False)
    stream = ShardDataset(shards, rank=0, world_size=1, return_key=True, max_bad_fraction=1.0)
    stream.fill_bad = True
    with caplog.at_level("ERROR", logger="swav.shards"):
        assert list(stream) == []
    assert "none of the 3 samples of its shards" in caplog.text and "pack-shards" in caplog.text


def test_a_resume_with_other_workers_says_the_epoch_is_not_exact(images, tmp_path, caplog):
    shards = _pack(images, tmp_path / "shards", num_shards=4)
    values = {"data.path": f"shards:{shards}", "data.workers": 2, "optim.epochs": 1}
    out = tmp_path / "run"
    assert train(tiny_config(out, **values, **{"run.max_steps": 3}), model_builder=tiny_model).status == "max_steps"
    with caplog.at_level("WARNING", logger="swav.train"):
        result = train(tiny_config(out, **{**values, "data.workers": 0}), model_builder=tiny_model, resume=True)
    assert result.status == "complete"
    assert "with 1 data-loader worker(s) x 1 process(es); the checkpoint was written with 2 x 1" in caplog.text
    assert "Resume with data.workers=2 on 1 process(es)" in caplog.text

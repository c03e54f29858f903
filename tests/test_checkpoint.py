"""Checkpoint files: atomic writes, newest-valid selection, pruning, RNG round trip, model files (issue 8)."""
from __future__ import annotations

import errno
import logging
import random

import numpy as np
import pytest
import torch

import swav.checkpoint as ckpt_module
from swav.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, CheckpointSaveError,
                             archive_checkpoint, capture_rng_state, clean_temp_files, final_checkpoint_path,
                             find_latest_checkpoint, list_checkpoints, load_checkpoint, load_model, prune_checkpoints,
                             restore_rng_state, save_checkpoint, save_model_file, step_checkpoint_path)
from swav.model import ModelSpec, build_model
from swav.run_folder import RunExistsError, check_run_folder, clear_run, holds_run


def state(step: int) -> dict:
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
            "model": {"w": torch.full((3,), float(step))}, "rng": [capture_rng_state()]}


def test_save_is_atomic_and_loads_weights_only(tmp_path):
    path = save_checkpoint(state(3), step_checkpoint_path(tmp_path, 3))
    assert path.name == "step_00000003.pt" and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    loaded = torch.load(path, weights_only=True)  # only tensors and plain containers inside
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.full((3,), 3.0))
    assert load_checkpoint(path)["step"] == 3


def test_newest_valid_checkpoint_with_fallback(tmp_path, caplog):
    for step in (2, 4, 6):
        save_checkpoint(state(step), step_checkpoint_path(tmp_path, step))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006.pt", "step_00000004.pt", "step_00000002.pt"]
    assert find_latest_checkpoint(tmp_path)[1]["step"] == 6
    newest = step_checkpoint_path(tmp_path, 6)
    newest.write_bytes(newest.read_bytes()[:-200])  # truncated
    with caplog.at_level(logging.WARNING):
        path, loaded = find_latest_checkpoint(tmp_path)
    assert loaded["step"] == 4 and "step_00000006.pt" in caplog.text and "falling back" in caplog.text
    step_checkpoint_path(tmp_path, 4).write_bytes(b"")  # zero bytes
    step_checkpoint_path(tmp_path, 2).write_text("not a checkpoint")  # garbage
    with pytest.raises(CheckpointError, match=r"no valid checkpoint.*step_00000006.pt.*step_00000002.pt"):
        find_latest_checkpoint(tmp_path)
    assert find_latest_checkpoint(tmp_path / "empty") is None  # no checkpoints: nothing to resume


def test_final_checkpoint_comes_first_and_other_formats_are_refused(tmp_path):
    save_checkpoint(state(9), step_checkpoint_path(tmp_path, 9))
    save_checkpoint({**state(10), "finished": True}, final_checkpoint_path(tmp_path))
    assert find_latest_checkpoint(tmp_path)[0].name == "final.pt"
    torch.save({"state_dict": {}}, step_checkpoint_path(tmp_path, 11))  # e.g. an official checkpoint
    with pytest.raises(Exception, match="not a swav training checkpoint"):
        load_checkpoint(step_checkpoint_path(tmp_path, 11))


def test_failed_write_names_the_path_and_keeps_the_previous_file(tmp_path, monkeypatch):
    save_checkpoint(state(1), step_checkpoint_path(tmp_path, 1))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt_module.os, "fsync", disk_full)
    target = step_checkpoint_path(tmp_path, 2)
    with pytest.raises(CheckpointSaveError, match=rf"{target}.*No space left on device"):
        save_checkpoint(state(2), target)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001.pt"]  # no temp file left
    assert find_latest_checkpoint(tmp_path)[1]["step"] == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointSaveError, match="could not write checkpoint"):
        save_checkpoint(state(3), blocker / "checkpoints" / "step.pt")


def test_leftover_temp_files_are_ignored_and_cleaned(tmp_path):
    save_checkpoint(state(1), step_checkpoint_path(tmp_path, 1))
    leftover = tmp_path / "checkpoints" / ".step_00000002.pt.tmp.4242"
    leftover.write_bytes(b"half a checkpoint")
    (tmp_path / ".model.pt.tmp.7").write_bytes(b"x")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001.pt"]
    removed = clean_temp_files(tmp_path)
    assert {p.name for p in removed} == {leftover.name, ".model.pt.tmp.7"} and not leftover.exists()


def test_prune_and_archive(tmp_path):
    for step in range(1, 7):
        save_checkpoint(state(step), step_checkpoint_path(tmp_path, step))
    kept_forever = archive_checkpoint(step_checkpoint_path(tmp_path, 2), epoch=1)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step_00000004.pt", "step_00000003.pt", "step_00000002.pt",
                                         "step_00000001.pt"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006.pt", "step_00000005.pt"]
    assert kept_forever.name == "epoch_0001.pt" and torch.load(kept_forever, weights_only=True)["step"] == 2


def test_rng_state_round_trip():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    saved = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(saved)
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and first[3] == second[3]


def test_model_file_round_trip_and_strict_load(tmp_path):
    spec = ModelSpec("resnet18", small_images=True, in_channels=1, hidden_dim=8, output_dim=4, num_prototypes=5)
    model = build_model(spec)
    path = save_model_file(tmp_path / "model.pt", model, spec.to_dict(), step=7)
    again = load_model(path)
    assert again.spec == spec
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    data = torch.load(path, weights_only=True)
    data["model"].pop("prototypes.weight")
    torch.save(data, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="prototypes.weight"):
        load_model(tmp_path / "partial.pt")


def test_run_folder_protection(tmp_path):
    check_run_folder(tmp_path, resume=False, overwrite=False)  # empty: fine
    (tmp_path / "config.yaml").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert holds_run(tmp_path)
    with pytest.raises(RunExistsError, match="holds a run .*that saved no checkpoint.*nothing trained there would be "
                                             "lost: pass --overwrite"):  # a start that failed: say it is safe
        check_run_folder(tmp_path, resume=False, overwrite=False)
    save_checkpoint(state(1), step_checkpoint_path(tmp_path, 1))
    with pytest.raises(RunExistsError, match="already holds a run.*--resume.*--overwrite"):
        check_run_folder(tmp_path, resume=False, overwrite=False)
    check_run_folder(tmp_path, resume=True, overwrite=False)
    with pytest.raises(ValueError, match="exclude each other"):
        check_run_folder(tmp_path, resume=True, overwrite=True)
    assert sorted(clear_run(tmp_path)) == ["checkpoints", "config.yaml"]
    assert not holds_run(tmp_path) and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_write_error_names_the_system_cause_and_ctrl_c_stays_an_interrupt(tmp_path, monkeypatch):
    """torch's writer wraps what goes wrong inside it in its own RuntimeError: a full disk read "[enforce fail
    at inline_container.cc] unexpected pos", and Ctrl-C became a disk error with exit status 1."""
    import errno

    import swav.checkpoint as ckpt_module

    def full_disk(obj, fh):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2963968") from exc
    monkeypatch.setattr(ckpt_module.torch, "save", full_disk)
    with pytest.raises(CheckpointSaveError, match="No space left on device\\. Previous checkpoints are untouched"):
        save_checkpoint(state(1), step_checkpoint_path(tmp_path, 1))

    def interrupted(obj, fh):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10") from exc
    monkeypatch.setattr(ckpt_module.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state(1), step_checkpoint_path(tmp_path, 2))
    assert not any(p.name.startswith(".step") for p in (tmp_path / "checkpoints").iterdir())  # no leftover


def test_rng_round_trip_keeps_numpys_cached_gaussian() -> None:
    """numpy's legacy generator draws Gaussians in pairs and caches the second: the saved state must hold it."""
    np.random.seed(3)
    np.random.randn()
    saved = capture_rng_state()
    expected = np.random.randn()
    np.random.seed(99)
    restore_rng_state(saved)
    assert np.random.randn() == expected

"""Fault injection against the real ``swav pretrain`` (issue 8): kill -9 between and during checkpoint writes,
SIGTERM/SIGUSR1 on one and two ranks, write errors, damaged checkpoints, another model, NaN/Inf, bad images.

Runs that must be killed, signalled or limited are real subprocesses (``python -m swav pretrain``); the
relaunches ("the same command again") run the CLI entry point in this process. Every run trains the same
tiny network on 64 generated 16 x 16 images (IDX files, 8 steps per epoch, 2 epochs, a queue from epoch 1,
a checkpoint every step), so any run that was interrupted and continued must end with exactly the
parameters, optimiser state and queue of the uninterrupted reference run (all runs use one thread).
Every subprocess has a timeout.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import swav.checkpoint as checkpoint_module
from swav.checkpoint import (PAUSE_HOOK_ENV, CheckpointSaveError, list_checkpoints, load_checkpoint,
                             step_checkpoint_path)
from swav.config import load_config_file, with_values
from swav.health import NonFiniteError, swapped_prediction_terms
from swav.loss import swav_loss
from swav.preemption import ignore_stop_signals
from swav.train import train
from swav.train_step import SwAVStep
from tests.distributed_helpers import free_port
from tests.reliability_helpers import (BASE, TIMEOUT, Reference, argv, assert_matches_reference, children,
                                       finish, flip_one_byte_of_a_tensor, interrupted_copy, launch,
                                       make_image_folder, metric_steps, poisonable_model, rank_env, run_cli,
                                       snapshot, tiny_spec, wait_until, write_idx_data)
from tests.train_helpers import tiny_config


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory) -> Path:
    return write_idx_data(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="module")
def reference(idx_data, tmp_path_factory):
    """The uninterrupted run every continued run must match; started in the background on first use."""
    ref = Reference(idx_data, tmp_path_factory.mktemp("reference") / "run")
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


# ------------------------------------------------------------------------ 1, 10: kill -9, another run
def test_kill9_between_checkpoints_then_the_same_command_resumes_by_itself(tmp_path, idx_data, reference, capsys):
    out = tmp_path / "run"
    proc = launch(argv(idx_data, out), tmp_path / "killed.log", {PAUSE_HOOK_ENV: "step_00000005.pt:after"})
    # paused: checkpoint 5 is on disk and the hook has logged its pause (the log line follows the rename, so
    # a snapshot taken between the two would see train.log grow)
    wait_until(lambda: step_checkpoint_path(out, 5).is_file() and "pausing" in (out / "train.log").read_text(),
               proc, tmp_path / "killed.log", "the pause after checkpoint 5")
    before = snapshot(out)
    code, text = run_cli(capsys, argv(idx_data, out))  # started twice by mistake while it still runs
    assert code == 1 and f"another process (pid {proc.pid} on " in text and ", training) is using" in text
    assert "continuing it" not in text  # the lock is checked before anything is said about the run
    assert snapshot(out) == before
    proc.kill()  # SIGKILL: no handler, no cleanup
    assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == [f"step_{s:08d}.pt" for s in range(5, 0, -1)]

    # item 10: a different command may not touch this run
    code, text = run_cli(capsys, argv(idx_data, out, "--seed", "4"))
    assert code == 1 and "already holds a run of another config (run.seed: folder 31, this command 4)" in text
    assert "--resume" in text and "--overwrite" in text and "Traceback" not in text
    assert snapshot(out) == before

    code, text = run_cli(capsys, argv(idx_data, out))  # the same command again, no flag
    assert code == 0, text
    assert "holds an unfinished run of this same config" in text
    assert "holds an unfinished run of this same config: continuing it" in (out / "train.log").read_text()
    assert f"resumed from {step_checkpoint_path(out, 5)} at step 5" in text
    assert_matches_reference(out, reference)


# ------------------------------------------------------------------------------ 2: kill -9 mid-write
def test_kill9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, idx_data, reference, capsys):
    """Killed while ``final.pt`` (the file that marks the run complete) is half written: the run is not
    complete, ``step_00000015.pt`` is used, the last step is redone and the leftover is removed."""
    out = tmp_path / "run"
    folder = out / "checkpoints"
    proc = launch(argv(idx_data, out), tmp_path / "killed.log", {PAUSE_HOOK_ENV: "final.pt:during"})

    def half_written():
        return [p for p in folder.glob(".final.pt.tmp.*") if p.stat().st_size >= 4096] if folder.is_dir() else []
    wait_until(half_written, proc, tmp_path / "killed.log", "a half-written final.pt")
    proc.kill()
    assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
    leftover = half_written()[0]
    reference.final()
    assert leftover.stat().st_size < (reference.out / "checkpoints" / "final.pt").stat().st_size  # only a part
    assert not (out / "checkpoints" / "final.pt").exists() and (out / "model.pt").is_file()  # model.pt comes first
    assert [p.name for p in list_checkpoints(out)][0] == "step_00000015.pt"  # the temp file is never a candidate
    assert load_checkpoint(step_checkpoint_path(out, 15))["step"] == 15  # intact

    code, text = run_cli(capsys, argv(idx_data, out))
    assert code == 0, text
    assert "removed 1 leftover temporary file" in text and leftover.name in text and not leftover.exists()
    assert f"resumed from {step_checkpoint_path(out, 15)} at step 15" in text
    assert not list(folder.glob(".*"))
    assert_matches_reference(out, reference)
    model = checkpoint_module.load_model(out / "model.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.final()["model"][key]), key


def test_a_flipped_bit_is_detected_or_harmless(tmp_path):
    """``torch.load`` does not check the CRC-32 of its records; ``load_checkpoint`` does. Over 300 random
    single-bit flips of a small checkpoint, every load either fails as damaged or returns the saved values."""
    saved = {"format": checkpoint_module.CHECKPOINT_FORMAT, "version": 1, "step": 3,
             "model": {"w": torch.randn(300), "b": torch.randn(7)}, "config": {"crops": {"sizes": [12, 8]}}}
    path = checkpoint_module.save_checkpoint(saved, tmp_path / "ok.pt")
    raw = path.read_bytes()
    rng = np.random.default_rng(0)
    damaged = tmp_path / "damaged.pt"
    outcomes = {"detected": 0, "harmless": 0}
    for position, bit in zip(rng.integers(0, len(raw), 300), rng.integers(0, 8, 300)):
        data = bytearray(raw)
        data[position] ^= 1 << int(bit)
        damaged.write_bytes(bytes(data))
        try:
            loaded = load_checkpoint(damaged)
        except checkpoint_module.CorruptCheckpointError:
            outcomes["detected"] += 1
            continue
        assert loaded["step"] == 3 and loaded["config"] == saved["config"], position
        assert all(torch.equal(loaded["model"][k], v) for k, v in saved["model"].items()), position
        outcomes["harmless"] += 1
    assert outcomes["detected"] > 150  # most bits matter (about 80 % here); the rest are unused header bits


# ---------------------------------------------------------------------------------- 3: preemption
SIGNAL_ARGS = ["--set", "run.checkpoint_every_steps=2", "--set", "run.checkpoint_every_epochs=0"]


def test_sigterm_saves_at_the_next_step_exits_nonzero_and_a_relaunch_continues(tmp_path, idx_data, reference,
                                                                              capsys):
    out = tmp_path / "run"
    log = tmp_path / "preempted.log"
    # pause 2 s after checkpoint 2, so that the signal arrives at a known point: between steps 2 and 3
    proc = launch(argv(idx_data, out, *SIGNAL_ARGS), log, {PAUSE_HOOK_ENV: "step_00000002.pt:after:2"})
    wait_until(step_checkpoint_path(out, 2).is_file, proc, log, "checkpoint 2")
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc, log)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "received SIGTERM" in text and "stopped by a signal at step 3" in text
    # step 3 is not a checkpoint step (every 2): it was saved because of the signal
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003.pt", "step_00000002.pt"]
    assert load_checkpoint(step_checkpoint_path(out, 3))["step"] == 3

    code, text = run_cli(capsys, argv(idx_data, out, *SIGNAL_ARGS))  # the job is requeued: same command
    assert code == 0, text
    assert f"resumed from {step_checkpoint_path(out, 3)} at step 3" in text
    assert_matches_reference(out, reference)


@pytest.mark.distributed
def test_sigusr1_to_one_of_two_ranks_stops_both_at_the_same_step(tmp_path, idx_data):
    """Two real processes (the environment torchrun gives them, gloo): only rank 1 gets the signal."""
    out = tmp_path / "run"
    args = argv(idx_data, out, *SIGNAL_ARGS)  # 64 images / 2 ranks / batch 8: 4 steps per epoch, 8 in all
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    procs = [launch(args, logs[r], rank_env(r, port, "step_00000002.pt:after:2")) for r in (0, 1)]
    wait_until(step_checkpoint_path(out, 2).is_file, procs[0], logs[0], "checkpoint 2")
    procs[1].send_signal(signal.SIGUSR1)  # rank 1 is waiting for rank 0 inside a collective
    results = [finish(p, log) for p, log in zip(procs, logs)]
    for code, text in results:
        assert code == 128 + signal.SIGUSR1, text[-3000:]
        assert "stopping at step 3 (preempted)" in text
    # rank 0 reports how the run stopped, once for all ranks
    assert ["stopped by a signal at step 3" in text for _, text in results] == [True, False]
    assert "received SIGUSR1" in results[1][1] and "received SIGUSR1" not in results[0][1]
    saved = load_checkpoint(step_checkpoint_path(out, 3))
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2 and saved["step"] == 3
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003.pt", "step_00000002.pt"]

    port = free_port()  # relaunch both ranks with the same command
    logs = [tmp_path / f"rank{r}-relaunched.log" for r in (0, 1)]
    procs = [launch(args, logs[r], rank_env(r, port)) for r in (0, 1)]
    results = [finish(p, log) for p, log in zip(procs, logs)]
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    final = load_checkpoint(out / "checkpoints" / "final.pt")
    assert final["finished"] and final["step"] == 8 and final["world_size"] == 2
    assert metric_steps(out) == list(range(1, 9))


def _worker_body() -> None:
    ignore_stop_signals()
    time.sleep(60)


def test_workers_ignore_stop_signals_from_others_but_obey_their_parent():
    """A data-loader worker survives a SIGTERM/SIGUSR1 sent to the whole job (here by a `kill` process) but
    ends on its parent's terminate(), which multiprocessing uses at exit (it used to hang there)."""
    worker = multiprocessing.get_context("fork").Process(target=_worker_body, daemon=True)
    worker.start()
    try:
        time.sleep(0.5)  # let it install the handlers
        for name in ("TERM", "USR1"):
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True, timeout=TIMEOUT)
        time.sleep(0.5)
        assert worker.is_alive()
        worker.terminate()  # SIGTERM from the parent
        worker.join(timeout=10)
        assert not worker.is_alive() and worker.exitcode == 128 + signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()


# ------------------------------------------------------------------------------ 4: write errors
def test_a_failing_write_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, idx_data, reference, capsys):
    """A real kernel write error: the file-size limit (EFBIG) lets the small checkpoints of epoch 1 through
    and stops the first one that also holds the queue (step 9), like a disk that fills up."""
    ref = reference.out / "checkpoints"
    reference.final()
    small, large = (ref / "step_00000008.pt").stat().st_size, (ref / "step_00000009.pt").stat().st_size
    assert large > small  # the queue starts with epoch 1 (step 9)
    limit = (small + large) // 2
    out = tmp_path / "run"
    log = tmp_path / "full.log"
    proc = launch(argv(idx_data, out), log,
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    code, text = finish(proc, log)
    target = step_checkpoint_path(out, 9)
    assert code == 1 and f"could not write checkpoint '{target}': File too large" in text, text[-3000:]
    assert "Previous checkpoints are untouched" in text and "Traceback" not in text
    assert not target.exists() and not list((out / "checkpoints").glob(".*"))  # no temp file left
    assert load_checkpoint(step_checkpoint_path(out, 8))["step"] == 8

    code, text = run_cli(capsys, argv(idx_data, out))  # space freed: the same command continues
    assert code == 0, text
    assert_matches_reference(out, reference)


def test_permission_denied_while_saving_names_the_path(tmp_path, idx_data, monkeypatch):
    """Permission errors take the same path. Tests run as root, where a read-only folder does not stop
    writes, so as root the rename is made to fail with EACCES; as another user the folder is read-only."""
    cfg = tiny_config(tmp_path, **{"data.path": str(idx_data), "run.checkpoint_every_steps": 1,
                                   "run.max_steps": 3, "data.channels": 1})
    folder = tmp_path / "checkpoints"
    train(cfg, model_builder=poisonable_model)
    real_replace = os.replace

    def refuse(src, dst):
        if Path(dst).name == "step_00000004.pt":
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real_replace(src, dst)
    if os.geteuid() == 0:
        monkeypatch.setattr(checkpoint_module.os, "replace", refuse)
    else:
        folder.chmod(0o500)
    try:
        with pytest.raises(CheckpointSaveError) as info:
            train(with_values(cfg, {"run.max_steps": 5}), model_builder=poisonable_model, resume=True)
    finally:
        folder.chmod(0o755)
    assert f"'{step_checkpoint_path(tmp_path, 4)}': Permission denied" in str(info.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000002.pt",
                                                            "step_00000001.pt"]
    assert not list(folder.glob(".*")) and load_checkpoint(step_checkpoint_path(tmp_path, 3))["step"] == 3


# ------------------------------------------------------------------------- 5, 6: damaged, other model
def test_damaged_newest_checkpoints_fall_back_to_the_previous_valid_one(tmp_path, idx_data, reference, capsys):
    out = interrupted_copy(reference, tmp_path / "run", last_step=8)
    step_checkpoint_path(out, 8).write_bytes(b"")  # zero bytes
    seventh = step_checkpoint_path(out, 7)
    seventh.write_bytes(seventh.read_bytes()[: seventh.stat().st_size // 2])  # truncated
    flip_one_byte_of_a_tensor(step_checkpoint_path(out, 6))  # loads fine with torch.load, wrong values
    code, text = run_cli(capsys, argv(idx_data, out))
    assert code == 0, text
    for step, why in ((8, "empty (0 bytes)"), (7, "damaged"), (6, "Bad CRC-32")):
        assert f"checkpoint {step_checkpoint_path(out, step)} is unusable" in text and why in text
    assert text.count("falling back to the previous one") == 3
    assert f"resumed from {step_checkpoint_path(out, 5)} at step 5" in text
    assert_matches_reference(out, reference)

    broken = interrupted_copy(reference, tmp_path / "broken", last_step=2)
    for step in (1, 2):
        step_checkpoint_path(broken, step).write_bytes(b"\0" * 100)
    before = snapshot(broken)
    code, text = run_cli(capsys, argv(idx_data, broken))
    assert code == 1 and "no valid checkpoint" in text and "step_00000001.pt" in text  # never a silent restart
    assert snapshot(broken) == before


def test_another_model_is_refused_with_the_differences_unless_partial(tmp_path, idx_data, reference, capsys,
                                                                      caplog):
    out = interrupted_copy(reference, tmp_path / "run", last_step=8)
    before = snapshot(out)
    other = ["--resume", "--nmb_prototypes", "12", "--size_crops", "12", "10", "--arch", "resnet-compact-6"]
    code, text = run_cli(capsys, argv(idx_data, out, *other))
    assert code == 1 and "refusing to resume" in text, text
    for line in ("model.backbone: checkpoint resnet-compact-4, config resnet-compact-6",
                 "model.num_prototypes: checkpoint [10], config [12]",
                 "crops.sizes: checkpoint [12, 8], config [12, 10]"):
        assert line in text
    assert snapshot(out) == before  # nothing changed

    config = with_values(load_config_file(out / "config.yaml"), {"model.num_prototypes": 12, "run.max_steps": 9,
                                                                 "run.output_dir": str(out)})
    with caplog.at_level("WARNING"):
        result = train(config, resume=True, partial=True)  # only the prototype count differs
    assert result.step == 9  # continued from step 8, not from scratch
    assert "PARTIAL resume" in caplog.text and "model.num_prototypes: checkpoint [10], config [12]" in caplog.text
    assert "freshly initialised: prototypes.weight" in caplog.text and "optimiser state does not fit" in caplog.text
    saved = load_checkpoint(step_checkpoint_path(out, 8))
    now = load_checkpoint(step_checkpoint_path(out, 9))
    assert now["model"]["prototypes.weight"].shape == (12, 8)
    for key, value in saved["model"].items():  # every other weight was loaded, then trained one step
        if key != "prototypes.weight" and "running" not in key and value.is_floating_point() and value.norm() > 0:
            assert (now["model"][key] - value).norm() < 0.2 * value.norm(), key


# ------------------------------------------------------------------------------------------ 9: NaN/Inf
def test_nan_loss_stops_before_the_optimiser_step_and_the_run_resumes(tmp_path, idx_data, reference, capsys):
    out = tmp_path / "run"
    code, text = run_cli(capsys, argv(idx_data, out, "--set", "debug.inject_nan_step=3"))
    assert code == 1 and "training stopped in step 3: loss = nan" in text
    assert "loss terms l(0,1) = " in text and "l(1,3) = " in text  # the terms themselves were finite
    assert "non-finite gradients in 34 parameter(s): backbone.conv1.weight" in text
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002.pt", "step_00000001.pt"]
    code, text = run_cli(capsys, argv(idx_data, out, "--resume"))  # debug.* is not taken over on --resume
    assert code == 0, text
    assert_matches_reference(out, reference)


def test_non_finite_weights_are_never_saved_even_without_the_nan_check(tmp_path, idx_data, capsys):
    # run.nan_check=false lets the NaN step through: the update makes the weights NaN; the run must stop at the
    # next save, with every file on disk finite and no model.pt
    out = tmp_path / "run"
    code, text = run_cli(capsys, argv(idx_data, out, "--set", "debug.inject_nan_step=3", "--set",
                                      "run.nan_check=false"))
    assert code == 1, text
    assert "training stopped after step 3:" in text and "hold NaN/Inf (backbone." in text
    assert "step_00000002.pt; resume from it with a lower learning rate" in text
    assert "run.nan_check=false: losses and gradients were not checked" in text
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002.pt", "step_00000001.pt"]
    assert not (out / "model.pt").exists()
    for path in list_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values()
                   if t.is_floating_point()), path


def test_non_finite_buffers_are_named(tmp_path):
    from swav.health import nonfinite_state_names
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    model.register_buffer("mask", torch.full((2, 2), float("-inf")))  # a constant buffer of a custom model
    assert nonfinite_state_names(model) == []
    model[1].running_var[1] = float("inf")
    model[0].weight.data[0, 0] = float("nan")
    assert nonfinite_state_names(model) == ["0.weight", "1.running_var"]
    model[0].weight.data[0, 0] = 3e30  # finite: its squared norm overflows, but it is not reported
    model[1].running_var[1] = 1.0
    assert nonfinite_state_names(model) == []


@pytest.mark.parametrize("check_sync", ["step", "deferred"])
def test_inf_gradients_with_a_finite_loss_name_exactly_the_parameters_hit(tmp_path, idx_data, check_sync):
    cfg = tiny_config(tmp_path, **{"data.path": str(idx_data), "data.channels": 1, "run.checkpoint_every_steps": 1,
                                   "run.check_sync": check_sync})
    # the check that the network takes every crop size makes calls 1 and 2 (one blank crop per size), then two
    # backbone passes per step (12 and 8 px crops): calls 7 and 8 are step 3
    with pytest.raises(NonFiniteError) as info:
        train(cfg, model_builder=lambda spec: poisonable_model(spec, lambda call: call > 6))
    error = info.value
    assert error.step == 3 and np.isfinite(error.loss) and error.parameter_names == ["backbone.0.weight",
                                                                                     "backbone.0.bias"]
    assert "l(0,1)" in error.terms and all(np.isfinite(v) for v in error.terms.values())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000001.pt"]


def test_loss_terms_average_to_the_loss_and_count_non_finite_entries():
    scores = [torch.randn(4 * 5, 7), torch.randn(4 * 5, 3)]  # two heads, V=4, B=5
    loss, codes = swav_loss(scores, 4, (0, 2), 0.1, 0.05, 3, return_codes=True)
    terms = swapped_prediction_terms(scores, codes, num_crops=4, crops_for_assign=(0, 2), temperature=0.1)
    assert len(terms) == 2 * 2 * 3 and "head 1 l(2,3)" in terms and "head 0 l(0,0)" not in terms
    assert abs(float(np.mean(list(terms.values()))) - loss.item()) < 1e-5  # SPEC §4: the loss is their mean
    scores[1][6, 0] = float("inf")  # crop 1 (rows 5..9) of head 1
    codes[1][0, 2, 1] = float("nan")
    terms = swapped_prediction_terms(scores, codes, num_crops=4, crops_for_assign=(0, 2), temperature=0.1)
    assert terms["head 1 non-finite scores(1)"] == 1 and terms["head 1 non-finite codes(0)"] == 1
    assert not any(k.startswith("head 0 non-finite") for k in terms)


def test_fp16_scaler_skips_beyond_the_bound_stop_the_run():
    """fp16 autocast and the GradScaler both work on the CPU in this torch, so the real step runs here; the
    engine itself only uses fp16 on GPUs, hence SwAVStep directly."""
    cfg = tiny_config("unused", **{"run.max_scaler_skips": 3, "crops.counts": [2], "crops.sizes": [8],
                                   "crops.min_scales": [0.3], "crops.max_scales": [1.0]})
    poisoned_steps = {1, 2, 4, 5, 6, 7, 8}  # 2 skips, a good step (resets the count), then 4 skips > 3
    model = poisonable_model(tiny_spec(), lambda call: call in poisoned_steps)
    step = SwAVStep(model, model, torch.optim.SGD(model.parameters(), lr=0.1), config=cfg,
                    lr_schedule=np.full(10, 0.1), queue_length_per_rank=0, precision="fp16",
                    device=torch.device("cpu"), rank=0)
    assert step.scaler.is_enabled()
    step.scaler = torch.amp.GradScaler("cpu", init_scale=64.0)  # start low: unpoisoned fp16 steps do not overflow
    crops = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    weights = []
    for i in range(6):
        weights.append(model.backbone[0].weight.detach().clone())
        output = step(crops, step=i)
        assert output.skipped == (i + 1 in poisoned_steps)
    weights.append(model.backbone[0].weight.detach().clone())
    assert torch.equal(weights[0], weights[2]) and not torch.equal(weights[2], weights[3])  # only step 3 updated
    assert torch.equal(weights[3], weights[6])
    with pytest.raises(NonFiniteError, match=r"step 7.*skipped 4 consecutive steps \(run.max_scaler_skips=3\)"):
        step(crops, step=6)
    assert torch.equal(model.backbone[0].weight, weights[3])


# ------------------------------------------------------------------------------------------ 8: images
def test_bad_images_are_skipped_counted_listed_and_scanned(tmp_path, capsys):
    """Also: a SIGTERM to the whole process group (as ``scancel`` sends it) while data-loader workers run."""
    root = tmp_path / "photos"
    good, bad = make_image_folder(root)
    assert len(good) == 48 and len(bad) == 8
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(root), "--output-dir", str(out), *BASE, "--epochs", "1", "--workers", "2",
            "--queue_length", "0", "--set", "data.channels=3", "--set", "data.max_bad_fraction=0.5"]
    log = tmp_path / "images.log"
    proc = launch(args, log, {PAUSE_HOOK_ENV: "step_00000003.pt:after:2"}, start_new_session=True)
    wait_until(step_checkpoint_path(out, 3).is_file, proc, log, "checkpoint 3")
    workers = children(proc.pid)
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and both workers get it
    code, text = finish(proc, log)
    assert code == 128 + signal.SIGTERM and "stopped by a signal at step 4" in text, text[-3000:]
    assert "DataLoader worker" not in text and not any(Path(f"/proc/{w}").exists() for w in workers)

    log = tmp_path / "images-relaunched.log"
    code, text = finish(launch(args, log), log)  # the same command continues
    assert code == 0, text[-3000:]
    listed = (out / "bad_images.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(listed) == sorted(bad)  # each once (workers append what they meet; the run deduplicates at its end)
    # the resumed run counts the files it met itself, apart from the list's total with the interrupted run's
    assert re.search(r"\d unreadable image files skipped in this run; \S+ lists 8 with earlier runs'", text), text
    assert (out / "model.pt").is_file()

    code, text = run_cli(capsys, ["scan", str(root), "--json", str(tmp_path / "scan.json")])
    report = json.loads((tmp_path / "scan.json").read_text(encoding="utf-8"))
    assert code == 1 and report["total"] == 56 and report["ok"] == 48  # hidden files and the loop not counted
    assert sorted(b["path"] for b in report["bad"]) == sorted(bad)
    assert report["bad_by_kind"] == {"empty": 2, "not_an_image": 2, "too_large": 1, "truncated": 2, "unreadable": 1}

    for extra in range(4):  # 12 unreadable of 60: above data.max_bad_fraction=0.1
        (root / "broken" / f"more{extra}.jpg").write_bytes(b"")
    log = tmp_path / "abort.log"  # one worker process sees all of them and raises there
    abort = ["pretrain", "--data", str(root), "--output-dir", str(tmp_path / "abort"), *BASE, "--epochs", "1",
             "--workers", "1", "--queue_length", "0", "--set", "data.channels=3", "--set", "data.max_bad_fraction=0.1",
             "--set", "data.check_files=0"]  # the abort while training (the start's check would refuse the data)
    code, text = finish(launch(abort, log), log)  # and the main process exits: it used to hang here
    assert code == 1 and "unreadable images out of" in text and "max_bad_fraction=0.1" in text, text[-3000:]
    assert "swav scan" in text
    # two workers: the one that stops the run, and one that the main process must stop before it exits (not
    # leave to the interpreter's exit, which printed a second traceback about a killed worker)
    abort2 = [a if a != str(tmp_path / "abort") else str(tmp_path / "abort2") for a in abort]
    abort2[abort2.index("--workers") + 1] = "2"
    for attempt in range(3):  # the race it had was lost about half the time
        log = tmp_path / f"abort2-{attempt}.log"
        code, text = finish(launch(abort2, log), log)
        assert code == 1 and "unreadable images out of" in text, text[-3000:]
        assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
        listed = (tmp_path / "abort2" / "bad_images.txt").read_text(encoding="utf-8").splitlines()
        assert len(listed) == len(set(listed))  # written by the workers, deduplicated after they stopped


def test_partial_resume_of_a_file_missing_a_tensor_says_so(tmp_path, caplog):
    from swav.config import config_to_dict
    from swav.model import ModelSpec, build_model
    from swav.run_folder import partial_resume_checkpoint
    from tests.train_helpers import tiny_config

    config = tiny_config(tmp_path)
    model = build_model(ModelSpec("resnet-compact-4", small_images=True, hidden_dim=16, output_dim=8,
                                  num_prototypes=10))
    state = {k: v for k, v in model.state_dict().items() if k != "prototypes.weight"}
    ckpt = {"model": state, "config": config_to_dict(config), "model_spec": model.spec.to_dict(), "optimizer": {}}
    with caplog.at_level("WARNING"):
        partial_resume_checkpoint(ckpt, config, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "(the file's model tensors do not match the model's)" in caplog.text
    assert "different model or crops" not in caplog.text and "freshly initialised: prototypes.weight" in caplog.text


def test_the_bad_image_list_is_deduplicated_at_the_end_of_a_run(tmp_path):
    from swav.run_folder import count_bad_images
    (tmp_path / "bad_images.txt").write_text("a.jpg\nb.png\na.jpg\nb.png\nc.gif\n")  # two workers, two epochs
    assert count_bad_images(tmp_path) == 3 and len((tmp_path / "bad_images.txt").read_text().splitlines()) == 5
    assert count_bad_images(tmp_path, deduplicate=True) == 3
    assert (tmp_path / "bad_images.txt").read_text() == "a.jpg\nb.png\nc.gif\n"

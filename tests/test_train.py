"""The training engine on CPU with a tiny network: resume is bit-identical, the schedule and the
prototype freezing follow SPEC §6/§9, NaN stops the run before anything is saved, the run folder is
protected, and preemption saves a checkpoint (issues 3 and 8)."""
from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from swav.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, step_checkpoint_path
from swav.config import config_to_dict, load_config_file, with_values
from swav.health import NonFiniteError
from swav.run_folder import RunExistsError
from swav.train import train
from swav.train_state import ResumeMismatchError
from swav.model import SwAVModel
from tests.train_helpers import InMemoryImages, assert_same_state, final_state, tiny_config, tiny_model


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(20):
        sub = root / ["a", "a/nested", "b"][i % 3]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (14, 12, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (13, 15), dtype=np.uint8)).save(root / "b" / "gray.png")
    return root  # 21 images


VARIANTS = {
    # queue of two batches from epoch 0 (full from step 2), stop at an epoch boundary, per-image PIL crops
    "queue": ({"swav.queue_length": 8, "swav.queue_start_epoch": 0, "data.pipeline": "pil",
               "run.channels_last": True}, 5, 7),
    # prototypes frozen for 5 steps, stop inside the freeze and mid-epoch, batched augmentation
    "frozen": ({"swav.freeze_prototypes_steps": 5, "data.pipeline": "batched"}, 3, 6),
    # queue started at epoch 1 (step 6), stop mid-epoch while it is half full, in-memory tensor pipeline
    "mid_epoch": ({"swav.queue_length": 8, "swav.queue_start_epoch": 1, "data.pipeline": "tensor"}, 6, 9),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resume_is_bit_identical(tmp_path, image_folder, variant, caplog):
    values, stop, total = VARIANTS[variant]
    dataset = InMemoryImages(20) if values["data.pipeline"] == "tensor" else None
    data = None if dataset is not None else image_folder
    with caplog.at_level("INFO", logger="swav"):
        straight = train(tiny_config(tmp_path / "straight", data, **values, **{"run.max_steps": total}),
                         dataset=dataset, model_builder=tiny_model)
    if variant == "queue":  # started at epoch 0, full after 2 steps: the log says when it enters the codes
        assert "used in the codes once full, after 2 steps" in caplog.text
        assert "queue full: its 8 embeddings per rank now enter the codes" in caplog.text
    if variant == "frozen":  # a CPU and three channels: the OpenCV colour stage where the opencv extra is installed
        from swav.opencv_colour import available
        assert f"batched pipeline (colour stage: {'opencv' if available() else 'grouped'}" in caplog.text
    assert straight.status == "max_steps" and straight.step == total
    first = train(tiny_config(tmp_path / "split", data, **values, **{"run.max_steps": stop}),
                  dataset=dataset, model_builder=tiny_model)
    assert first.status == "max_steps" and first.step == stop
    second = train(tiny_config(tmp_path / "split", data, **values, **{"run.max_steps": total}),
                   dataset=dataset, model_builder=tiny_model, resume=True)
    assert second.step == total
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "split"))
    # the metrics of the resumed run read like one run: every step exactly once, same losses
    recs = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("straight", "split")]
    steps = [[(r["step"], r["loss"]) for r in rs if r["kind"] == "step"] for rs in recs]
    assert steps[0] == steps[1] and [s for s, _ in steps[0]] == list(range(1, total + 1))


def official_lr(base, final, epochs, steps_per_epoch, warmup_epochs, start_warmup):
    """SPEC §9 written out the slow way: linear warm-up, then cosine, one value per step."""
    warmup = round(warmup_epochs * steps_per_epoch)  # a fractional warm-up (the default recipe's 0.2) to the nearest step
    total = epochs * steps_per_epoch
    lrs = []
    for t in range(total):
        if t < warmup:
            lrs.append(start_warmup + (base - start_warmup) * t / (warmup - 1))
        else:
            u = t - warmup
            lrs.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * u / (total - warmup))))
    return lrs


def test_lr_schedule_applied_every_step(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, **{"optim.warmup_epochs": 1, "optim.start_warmup": 0.05,
                                                 "optim.base_lr": 0.3, "optim.final_lr": 0.003, "optim.epochs": 2})
    result = train(cfg, model_builder=tiny_model)
    assert result.status == "complete" and result.step == 10  # 21 images // 4 = 5 steps x 2 epochs
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in logged if r["kind"] == "step"]
    assert np.allclose(lrs, official_lr(0.3, 0.003, 2, 5, 1, 0.05), rtol=1e-12, atol=1e-15)
    assert lrs[0] == 0.05 and abs(lrs[4] - 0.3) < 1e-12


def test_prototypes_frozen_for_exactly_n_steps(tmp_path, image_folder):
    freeze = 4
    cfg = tiny_config(tmp_path, image_folder, **{"swav.freeze_prototypes_steps": freeze, "run.max_steps": 7,
                                                 "run.checkpoint_every_steps": 1, "run.keep_checkpoints": 10})
    train(cfg, model_builder=tiny_model)
    protos = {s: load_checkpoint(step_checkpoint_path(tmp_path, s))["model"]["prototypes.weight"]
              for s in range(1, 8)}
    head = {s: load_checkpoint(step_checkpoint_path(tmp_path, s))["model"]["projection_head.0.weight"]
            for s in (1, 2)}
    assert not torch.equal(head[1], head[2])  # the rest of the network trains meanwhile
    for s in range(2, freeze + 1):  # steps 0..freeze-1 leave the (re-normalised) prototypes alone
        assert (protos[s] - protos[1]).abs().max() < 1e-7, s
    # step `freeze` is the first update (LARS: about lr x 0.001 x ||p||, i.e. ~4e-4 here)
    assert (protos[freeze + 1] - protos[freeze]).abs().max() > 1e-4
    assert torch.allclose(protos[1].norm(dim=1), torch.ones(10), atol=1e-5)


@pytest.mark.parametrize("check_sync", ["step", "deferred"])
def test_nan_stops_before_the_optimiser_step(tmp_path, image_folder, check_sync):
    cfg = tiny_config(tmp_path, image_folder, **{"debug.inject_nan_step": 5, "run.checkpoint_every_steps": 2,
                                                  "run.check_sync": check_sync})
    with pytest.raises(NonFiniteError) as info:
        train(cfg, model_builder=tiny_model)
    message = str(info.value)
    assert "in step 5" in message and "nan" in message.lower() and "backbone.0.weight" in message
    assert info.value.step == 5 and "prototypes.weight" in info.value.parameter_names
    files = [p.name for p in list_checkpoints(tmp_path)]
    assert files == ["step_00000004.pt", "step_00000002.pt"]  # nothing saved after the NaN
    last = load_checkpoint(tmp_path / "checkpoints" / "step_00000004.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    # the run resumes from the last good checkpoint (without the injected fault)
    cfg = with_values(cfg, {"debug.inject_nan_step": -1, "run.max_steps": 6})
    assert train(cfg, model_builder=tiny_model, resume=True).step == 6


def test_run_folder_lifecycle(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, **{"optim.epochs": 1})
    assert train(cfg, model_builder=tiny_model).status == "complete"
    for name in ("config.yaml", "derived.json", "metrics.jsonl", "train.log", "model.pt", "checkpoints/final.pt"):
        assert (tmp_path / name).is_file(), name
    assert load_config_file(tmp_path / "config.yaml") == cfg
    derived = json.loads((tmp_path / "derived.json").read_text())
    assert derived["steps_per_epoch"] == 5 and derived["global_batch_size"] == 4
    ckpt = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["config"] == config_to_dict(cfg) and ckpt["model_spec"]["num_prototypes"] == [10]
    assert not any(k.startswith("module.") for k in ckpt["model"])
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "epoch", "loss", "lr", "images_per_s", "prototypes_in_use", "ln_k", "time"} <= set(record)
    assert 1 <= record["prototypes_in_use"] <= 10 and abs(record["ln_k"] - math.log(10)) < 1e-12
    with pytest.raises(RunExistsError, match="--resume"):
        train(cfg, model_builder=tiny_model)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = train(cfg, model_builder=tiny_model, resume=True)
    assert again.status == "already_complete" and again.exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
    # --overwrite with a bad data path, a batch larger than the data or an unknown backbone: the error comes
    # before the old run is removed, so nothing saved is lost
    def saved() -> dict:  # the run's files (the lock file is touched by every attempt)
        return {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != ".swav.lock"}

    for bad in ({"data.path": str(tmp_path / "no-such-folder")}, {"optim.batch_size_per_device": 1000}):
        with pytest.raises((FileNotFoundError, ValueError)):
            train(with_values(cfg, bad), model_builder=tiny_model, overwrite=True)
        assert saved() == {p: t for p, t in before.items() if p.name != ".swav.lock"}
    with pytest.raises(ValueError, match="backbone"):
        train(with_values(cfg, {"model.backbone": "resnet5O"}), overwrite=True)
    assert saved() == {p: t for p, t in before.items() if p.name != ".swav.lock"}
    # ... nor with a k-NN monitor that needs labelled data this folder does not have, nor with a network that
    # cannot take the crops (checked by one forward per crop size before anything is written)
    with pytest.raises(ValueError, match="run.knn_every_epochs"):
        train(with_values(cfg, {"run.knn_every_epochs": 1}), model_builder=tiny_model, overwrite=True)
    assert saved() == {p: t for p, t in before.items() if p.name != ".swav.lock"}
    for precision in ("fp32", "bf16"):  # bf16 on a CPU runs its gradient check first, also through the network
        with pytest.raises(ValueError, match=r"fails on a 8x8 crop \(crops.sizes=\[12, 8\], data.channels=3\): needs 12"):
            train(with_values(cfg, {"run.precision": precision}), model_builder=_only_takes_12_pixels, overwrite=True)
        assert saved() == {p: t for p, t in before.items() if p.name != ".swav.lock"}
    assert train(cfg, model_builder=tiny_model, overwrite=True).status == "complete"


class _FixedSize(torch.nn.Module):  # as torchvision's vision transformers take only their own image size
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        assert x.shape[-1] == 12, "needs 12 px"
        return self.inner(x)


def _only_takes_12_pixels(spec):
    model = tiny_model(spec)
    model.backbone = _FixedSize(model.backbone)
    return model


def test_a_failed_first_start_leaves_no_config_that_refuses_the_corrected_command(tmp_path, image_folder):
    cfg = tiny_config(tmp_path / "run", image_folder, **{"optim.epochs": 1})
    with pytest.raises(ValueError, match="run.knn_every_epochs"):
        train(with_values(cfg, {"run.knn_every_epochs": 1}), model_builder=tiny_model)
    with pytest.raises(FileNotFoundError):
        train(with_values(cfg, {"data.path": str(tmp_path / "no-such-folder")}), model_builder=tiny_model)
    assert not (tmp_path / "run").exists()  # no config.yaml, lock file or log of a run that never started
    # a run that appears in the folder while this start loads its data and model (another process) is
    # left alone: the folder is checked again once the lock is held
    def another_run_appears(spec):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.yaml").write_text("theirs")
        return tiny_model(spec)

    with pytest.raises(RunExistsError, match="received a run from another process"):
        train(cfg, model_builder=another_run_appears)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".swav.lock", "config.yaml"]
    assert (tmp_path / "run" / "config.yaml").read_text() == "theirs"
    (tmp_path / "run" / "config.yaml").unlink()
    assert train(cfg, model_builder=tiny_model).status == "complete"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "derived values" in log and "training" in log  # the lines logged before the folder was written
    assert f"environment: torch {torch.__version__}" in log and " CPU " in log  # what the run ran on
    assert "no-such-folder" not in log and "knn" not in log  # nothing of the failed attempts
    # limits of one invocation are not part of "the same run": the plain command continues a limited one
    other = tmp_path / "limited"
    limited = tiny_config(other, image_folder, **{"optim.epochs": 2, "run.max_steps": 3})
    assert train(limited, model_builder=tiny_model).status == "max_steps"
    assert train(with_values(limited, {"run.max_steps": 0}), model_builder=tiny_model).status == "complete"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_engine_trains_bf16_channels_last_and_fp32_contiguous_by_default(tmp_path, precision, caplog):
    """run.channels_last null: the model is trained (and saved) channels-last in bf16, contiguous in fp32 on a CPU."""
    config = tiny_config(tmp_path, **{"run.precision": precision, "optim.epochs": 1})
    with caplog.at_level("INFO", logger="swav"):
        train(config, dataset=InMemoryImages(), model_builder=tiny_model)
    assert (f"{precision}, channels-last," in caplog.text) is (precision == "bf16")
    weight = final_state(tmp_path)["model"]["backbone.0.weight"]
    layout = torch.channels_last if precision == "bf16" else torch.contiguous_format
    assert weight.is_contiguous(memory_format=layout) and not weight.is_contiguous(
        memory_format=torch.contiguous_format if precision == "bf16" else torch.channels_last)


def view_model(spec):
    """A user's network that flattens with .view(): it cannot take channels-last maps."""
    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(spec.in_channels, 2, 3, padding=1)

        def forward(self, x):
            y = nn.functional.adaptive_avg_pool2d(self.conv(x), 2)
            return y.view(y.size(0), -1)
    return SwAVModel(Trunk(), 8, spec.hidden_dim, spec.output_dim, spec.num_prototypes, spec.head_batch_norm)


def test_a_network_that_cannot_take_channels_last_trains_contiguous_or_is_named(tmp_path, caplog):
    """run.channels_last null: the engine falls back to the contiguous layout with a warning; true: a clear error
    before anything is written. An older folder's false is the same run as today's null."""
    config = tiny_config(tmp_path, **{"run.precision": "bf16", "optim.epochs": 1})
    with caplog.at_level("INFO", logger="swav"):
        result = train(config, dataset=InMemoryImages(), model_builder=view_model)
    assert result.status == "complete" and "fails on channels-last crops" in caplog.text
    assert "bf16, channels-last" not in caplog.text  # the log line names the layout trained in
    assert final_state(tmp_path)["model"]["backbone.conv.weight"].is_contiguous()
    forced = tiny_config(tmp_path / "forced", **{"run.precision": "bf16", "run.channels_last": True})
    with pytest.raises(ValueError, match="run.channels_last=true, but this network fails on channels-last crops"):
        train(forced, dataset=InMemoryImages(), model_builder=view_model)
    assert not (tmp_path / "forced" / "config.yaml").exists()
    from swav.run_folder import run_differences
    old = config_to_dict(with_values(config, {"run.channels_last": False}))
    assert run_differences(old, config) == []


def dropout_model(spec):
    """tiny_model with a Dropout: its masks come from torch's global random state, which a resume restores."""
    trunk = nn.Sequential(nn.Conv2d(spec.in_channels, 6, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return SwAVModel(trunk, 8, spec.hidden_dim, spec.output_dim, spec.num_prototypes, spec.head_batch_norm)


@pytest.mark.parametrize("pipeline", ["tensor", "pil", "batched", "device"])
def test_resume_is_bit_identical_for_a_model_that_draws_random_numbers(tmp_path, image_folder, pipeline):
    """A resumed run opens a data-loader iterator mid-epoch that the straight run did not: it must not draw from
    the global random state the model's dropout masks come from."""
    dataset = InMemoryImages(20) if pipeline == "tensor" else None
    data = None if pipeline == "tensor" else image_folder
    values = {"data.pipeline": pipeline, "optim.epochs": 2}

    def run(out, steps, resume=False):
        train(tiny_config(out, data, **values, **{"run.max_steps": steps}), dataset=dataset,
              model_builder=dropout_model, resume=resume)
    run(tmp_path / "straight", 8)
    run(tmp_path / "split", 3)  # mid-epoch (5 batches of 4 per epoch)
    run(tmp_path / "split", 8, resume=True)
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "split"))


def test_resume_refuses_a_different_model(tmp_path, image_folder):
    train(tiny_config(tmp_path, image_folder, **{"run.max_steps": 2}), model_builder=tiny_model)
    other = tiny_config(tmp_path, image_folder, **{"model.num_prototypes": 12, "crops.sizes": [12, 6]})
    with pytest.raises(ResumeMismatchError) as info:
        train(other, model_builder=tiny_model, resume=True)
    assert "model.num_prototypes: checkpoint [10], config [12]" in str(info.value)
    assert "crops.sizes: checkpoint [12, 8], config [12, 6]" in str(info.value)


def test_damaged_latest_checkpoint_falls_back(tmp_path, image_folder, caplog):
    values = {"run.checkpoint_every_steps": 2, "swav.queue_length": 8, "swav.queue_start_epoch": 0}
    train(tiny_config(tmp_path / "a", image_folder, **values, **{"run.max_steps": 6}), model_builder=tiny_model)
    train(tiny_config(tmp_path / "b", image_folder, **values, **{"run.max_steps": 6}), model_builder=tiny_model)
    newest = step_checkpoint_path(tmp_path / "b", 6)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated by a crash
    (tmp_path / "b" / "checkpoints" / ".step_00000008.pt.tmp.123").write_bytes(b"half")  # interrupted write
    with caplog.at_level("WARNING"):
        result = train(tiny_config(tmp_path / "b", image_folder, **values, **{"run.max_steps": 6}),
                       model_builder=tiny_model, resume=True)
    assert "step_00000006.pt" in caplog.text and "falling back" in caplog.text
    assert not (tmp_path / "b" / "checkpoints" / ".step_00000008.pt.tmp.123").exists()
    assert result.step == 6  # redid steps 5 and 6 from step 4 ...
    assert_same_state(final_state(tmp_path / "a"), final_state(tmp_path / "b"))  # ... identically
    for path in list_checkpoints(tmp_path / "b"):
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        train(tiny_config(tmp_path / "b", image_folder, **values), model_builder=tiny_model, resume=True)


class SignalAt(InMemoryImages):
    """Sends SIGUSR1 to this process when sample ``index`` is read (as a cluster scheduler would)."""

    def __init__(self, index: int) -> None:
        super().__init__(20)
        self.index = index

    def __getitem__(self, i):
        if i == self.index:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().__getitem__(i)


@pytest.mark.parametrize("check_sync", ["step", "deferred"])
def test_preemption_signal_saves_and_exits_nonzero(tmp_path, check_sync):
    dataset = SignalAt(index=7)
    cfg = tiny_config(tmp_path, **{"data.pipeline": "pil", "run.checkpoint_every_epochs": 0,
                                   "run.check_sync": check_sync})
    result = train(cfg, dataset=dataset, model_builder=tiny_model)
    assert result.status == "preempted" and result.signal == signal.SIGUSR1 and result.exit_code == 128 + 10
    assert result.checkpoint == step_checkpoint_path(tmp_path, result.step) and result.checkpoint.is_file()
    assert 1 <= result.step <= (5 if check_sync == "step" else 6)  # deferred: flags read one step later
    cfg = with_values(cfg, {"run.max_steps": result.step + 1})
    assert train(cfg, dataset=InMemoryImages(20), model_builder=tiny_model, resume=True).step == result.step + 1


@pytest.mark.parametrize("check_sync,stop_step", [("step", 1), ("deferred", 2)])
def test_time_budget_stops_and_saves(tmp_path, image_folder, check_sync, stop_step):
    cfg = tiny_config(tmp_path, image_folder, **{"run.time_budget_minutes": 1e-6, "run.checkpoint_every_epochs": 0,
                                                  "run.check_sync": check_sync})
    result = train(cfg, model_builder=tiny_model)
    assert (result.status, result.step, result.exit_code) == ("time_budget", stop_step, 0)
    assert result.checkpoint == step_checkpoint_path(tmp_path, stop_step)
    assert load_checkpoint(result.checkpoint)["step"] == stop_step


def test_resume_with_another_global_batch_keeps_the_new_checkpoints_ahead(tmp_path, image_folder):
    """A resume that changes the global batch renumbers the steps: the old numbering's higher step files must not
    be picked by the next resume over the new run's checkpoints (which would throw the new steps away)."""
    from swav.checkpoint import find_latest_checkpoint

    first = tiny_config(tmp_path, image_folder, **{"run.checkpoint_every_steps": 1, "run.max_steps": 5})
    train(first, model_builder=tiny_model)  # 20 images, batch 4: steps 1-5 = epoch 0; step files 3, 4, 5 kept
    bigger = with_values(first, {"optim.batch_size_per_device": 8, "run.max_steps": 4})
    assert train(bigger, model_builder=tiny_model, resume=True).step == 4  # resumed at step 2 (epoch 1, batch 0)
    path, ckpt = find_latest_checkpoint(tmp_path)
    assert path.name == "step_00000004.pt" and ckpt["step"] == 4 and ckpt["derived"]["global_batch_size"] == 8
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "superseded").iterdir()) == ["step_00000003.pt",
                                                                                       "step_00000004.pt"]
    assert train(with_values(bigger, {"run.max_steps": 0}), model_builder=tiny_model, resume=True).step == 6
    # metrics.jsonl keeps the first run's records (none was redone: step 5 was the checkpoint), renumbered into the
    # new numbering (old step s of epoch e at batch b -> e * 2 + min(b * 4 // 8, 1)), then the new run's steps
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [(r.get("step_before_renumbering"), r["step"]) for r in records if "loss" in r and "epoch_loss" not in r]
    assert steps == [(1, 0), (2, 1), (3, 1), (4, 1), (5, 2), (None, 3), (None, 4), (None, 5), (None, 6)], steps


def test_an_error_is_noted_in_train_log(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, **{"optim.epochs": 1, "debug.inject_error_step": 2})
    with pytest.raises(RuntimeError):
        train(cfg, model_builder=tiny_model)
    log = (tmp_path / "train.log").read_text()
    assert "stopped by an error: InjectedFailure" in log


class _Unlabelled(torch.utils.data.Dataset):
    """A user's own data set: bare uint8 C x H x W images (no labels), and an unrelated ``.data`` tensor."""

    def __init__(self, n: int = 16, stray_data: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=g)
        if stray_data:  # e.g. a cache of something else: not what the items hold
            self.data = torch.zeros(n, 12, 12, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i]


def test_a_users_own_data_set_is_read_through_its_items(tmp_path):
    from swav.train_data import CropDataset, image_of, in_memory_images, resolve_pipeline

    plain, stray = _Unlabelled(), _Unlabelled(stray_data=True)
    # bare images are images, not (image, label) tuples whose first element would be the red channel
    assert torch.equal(image_of(plain[3], 3), plain.images[3])
    with pytest.raises(TypeError, match="data set item 0 is dict: expected an image"):
        CropDataset({0: {"img": 1}}, None)[(0, 0)]
    # a .data tensor that is not what the items hold is not trained on in their place
    assert in_memory_images(stray, 3) is None and resolve_pipeline("auto", stray, 3) == "batched"
    assert resolve_pipeline("auto", InMemoryImages(8), 3) == "tensor"  # one that is, is

    class ToTensorItems(InMemoryImages):  # torchvision's MNIST(transform=ToTensor()): floats in [0, 1]
        def __getitem__(self, i: int):
            return self.data[i][None].float() / 255, int(self.targets[i])

    assert resolve_pipeline("auto", ToTensorItems(8), 3) == "tensor"
    cfg = tiny_config(tmp_path / "run", **{"optim.epochs": 1})
    assert train(cfg, dataset=stray, model_builder=tiny_model).status == "complete"
    derived = json.loads((tmp_path / "run" / "derived.json").read_text())
    assert derived["pipeline"] == "batched"


def test_data_the_run_would_stop_on_is_refused_before_the_folder_changes(tmp_path, image_folder):
    """A sample of the image files is decoded before the run writes anything: unreadable data is refused while a
    complete run in the folder (with --overwrite) is still there, and a new folder is never created."""
    import shutil

    from swav.datasets import ImageFolderDataset, TooManyBadImagesError

    done = tiny_config(tmp_path / "run", image_folder, **{"optim.epochs": 1})
    train(done, model_builder=tiny_model)
    before = sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(12):
        (broken / f"{i}.jpg").write_bytes(bytes(range(i, i + 40)))  # not images
    with pytest.raises(TooManyBadImagesError, match="12 of the 12 image files .* are unreadable"):
        train(with_values(done, {"data.path": str(broken)}), model_builder=tiny_model, overwrite=True)
    assert sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*")) == before
    assert (tmp_path / "run" / "model.pt").is_file()

    mixed = tmp_path / "mixed"  # 21 readable + 12 unreadable: the run would stop at its 10th (rule: >= 10, > 1%)
    shutil.copytree(image_folder, mixed)
    for i in range(12):
        (mixed / "b" / f"zero{i}.png").write_bytes(b"")
    with pytest.raises(TooManyBadImagesError, match="12 of the 33 image files"):
        train(tiny_config(tmp_path / "new", mixed), model_builder=tiny_model)
    assert not (tmp_path / "new").exists()
    # a large folder with a few unreadable files passes the sampled check (they are skipped while training)
    assert ImageFolderDataset(str(mixed), max_bad_fraction=0.5).check_sample(count=8)[0] == 8
    assert train(with_values(tiny_config(tmp_path / "lenient", mixed), {"data.max_bad_fraction": 0.5,
                                                                         "optim.epochs": 1}),
                 model_builder=tiny_model).status == "complete"


def test_a_sampled_check_refuses_only_with_confidence(tmp_path):
    """Wilson's 99% lower bound: 1 unreadable in a sample of 64 from 1000 files (about 1.6%) is no proof of more
    than 1%; 10 of 64 is."""
    from swav.datasets import ImageFolderDataset, TooManyBadImagesError

    def folder(name, bad_every):
        root = tmp_path / name / "a"
        root.mkdir(parents=True)
        for i in range(256):
            path = root / f"{i:04d}.png"
            if i % bad_every == 0:
                path.write_bytes(b"")
            else:
                Image.new("L", (4, 4), i % 200).save(path)
        return ImageFolderDataset(str(tmp_path / name))

    assert folder("few", 128).check_sample() == (64, 2)  # 2 bad of 256, both sampled: 3.1%, lower bound 0.6%
    lenient = folder("lenient", 1)  # every file unreadable, but data.max_bad_fraction=1 allows any share
    lenient.tracker.max_bad_fraction = 1.0
    assert lenient.check_sample() == (64, 64)
    with pytest.raises(TooManyBadImagesError, match="of a sample of 64 of the 256 image files"):
        folder("many", 4).check_sample()  # 64 bad of 256: 16 of the sample


def test_a_second_resume_after_a_renumbering_one_converts_nothing_again(tmp_path, image_folder):
    """The resume that renumbers the steps rewrites the checkpoint it renamed into the new numbering: a run that
    stops before its next checkpoint and is resumed again must not renumber the metrics (or the position) twice."""
    first = tiny_config(tmp_path, image_folder, **{"run.checkpoint_every_steps": 1, "run.max_steps": 3,
                                                    "optim.batch_size_per_device": 8})
    train(first, model_builder=tiny_model)  # 21 images, batch 8: 2 steps per epoch; step 3 = epoch 1, batch 1
    smaller = with_values(first, {"optim.batch_size_per_device": 4, "run.max_steps": 0, "debug.inject_error_step": 8})
    with pytest.raises(RuntimeError, match="inject"):
        train(smaller, model_builder=tiny_model, resume=True)  # resumed at step 7 (epoch 1, batch 2), fails in 8
    assert load_checkpoint(step_checkpoint_path(tmp_path, 7))["derived"]["global_batch_size"] == 4

    def steps():
        records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        return [(r.get("step_before_renumbering"), r["step"]) for r in records if "loss" in r and "epoch_loss" not in r]
    assert steps() == [(1, 2), (2, 5), (3, 7)]
    result = train(with_values(smaller, {"debug.inject_error_step": -1}), model_builder=tiny_model, resume=True)
    assert (result.status, result.step) == ("complete", 15)
    assert steps()[:3] == [(1, 2), (2, 5), (3, 7)] and [s for _, s in steps()[3:]] == list(range(8, 16))


def test_a_resume_with_other_optimiser_settings_trains_with_them(tmp_path, image_folder):
    """optim.weight_decay / momentum changed on resume were announced but the checkpoint's optimiser groups kept
    the old values; switching LARS on or off is refused before the folder's config.yaml changes."""
    first = tiny_config(tmp_path, image_folder, **{"run.max_steps": 3, "optim.lars": False})
    train(first, model_builder=tiny_model)
    changed = with_values(first, {"run.max_steps": 4, "optim.weight_decay": 0.1, "optim.momentum": 0.5})
    train(changed, model_builder=tiny_model, resume=True)
    group = load_checkpoint(list_checkpoints(tmp_path)[0])["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], group["momentum"]) == (0.1, 0.5)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ResumeMismatchError, match="optim.lars"):
        train(with_values(changed, {"optim.lars": True, "run.max_steps": 5}), model_builder=tiny_model, resume=True)
    assert (tmp_path / "config.yaml").read_text() == before


def test_a_complete_run_asked_for_more_epochs_is_refused_not_nothing_to_do(tmp_path, image_folder):
    done = tiny_config(tmp_path, image_folder, **{"optim.epochs": 1})
    train(done, model_builder=tiny_model)
    assert train(done, model_builder=tiny_model, resume=True).status == "already_complete"  # the same config
    with pytest.raises(RunExistsError, match="is complete .*another config \\(optim.epochs: checkpoint 1, config 2\\)"):
        train(with_values(done, {"optim.epochs": 2}), model_builder=tiny_model, resume=True)
    with pytest.raises(RunExistsError, match="complete run of another config .*cannot be continued"):
        train(with_values(done, {"optim.epochs": 2}), model_builder=tiny_model)


def test_tensorboard_drops_the_steps_a_resume_trains_again(tmp_path, image_folder):
    """An interrupted run logged steps after its last checkpoint; the resume trains them again: TensorBoard
    keeps each step once, as metrics.jsonl does."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path, image_folder, **{"run.tensorboard": True, "run.checkpoint_every_steps": 2,
                                                     "run.checkpoint_every_epochs": 0, "optim.epochs": 1})
    with pytest.raises(RuntimeError, match="inject"):
        train(with_values(config, {"debug.inject_error_step": 4}), model_builder=tiny_model)  # steps 1-3 logged
    train(config, model_builder=tiny_model, resume=True)  # from the checkpoint of step 2: steps 3-5 again
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5], steps


def test_a_resume_with_a_smaller_batch_continues_at_the_rounded_down_batch(tmp_path, caplog):
    first = tiny_config(tmp_path, None, **{"run.max_steps": 2, "data.pipeline": "tensor"})
    train(first, dataset=InMemoryImages(20), model_builder=tiny_model)  # 8 images of epoch 0 seen
    smaller = with_values(first, {"optim.batch_size_per_device": 3, "run.max_steps": 3})
    with caplog.at_level("WARNING", logger="swav"):
        result = train(smaller, dataset=InMemoryImages(20), model_builder=tiny_model, resume=True)
    assert "continuing at epoch 0, batch 2 (step 2)" in caplog.text  # 8 // 3 = 2 whole batches of 3
    assert "about 2 images of this epoch are trained on a second time" in caplog.text
    assert result.step == 3


def test_resume_restores_the_gradient_scaler(tmp_path):
    """fp16's loss scale (grown or cut by the steps so far) comes back with the checkpoint."""
    from swav.derived import derive_values
    from swav.train_state import Progress, restore_training_state, save_training_state
    from swav.train_step import SwAVStep
    from tests.reliability_helpers import poisonable_model, tiny_spec

    cfg = tiny_config(tmp_path, **{"crops.counts": [2], "crops.sizes": [8], "crops.min_scales": [0.3],
                                   "crops.max_scales": [1.0]})
    derived = derive_values(cfg, world_size=1, dataset_size=20, device="cpu", precision="fp16", pipeline="tensor")

    def make_step():
        model = poisonable_model(tiny_spec())
        return SwAVStep(model, model, torch.optim.SGD(model.parameters(), lr=0.1), config=cfg,
                        lr_schedule=np.full(10, 0.1), queue_length_per_rank=0, precision="fp16",
                        device=torch.device("cpu"), rank=0)
    saved = make_step()
    saved.scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    saved([torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)], step=0)  # initialises the scaler's state
    path = save_training_state(tmp_path / "c.pt", saved, Progress(0, 1, 1), config=cfg, derived=derived, rank=0)
    fresh = make_step()
    restore_training_state(load_checkpoint(path), fresh, config=cfg, derived=derived, rank=0, path=str(path))
    assert fresh.scaler.get_scale() == saved.scaler.get_scale() != 65536.0

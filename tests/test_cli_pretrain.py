"""``swav pretrain`` end to end on CPU: a tiny image folder, a Fashion-MNIST slice, resume, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swav.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--arch", "resnet18", "--nmb_crops", "2", "2", "--size_crops", "16", "8", "--min_scale_crops", "0.3", "0.1",
        "--max_scale_crops", "1", "0.3", "--nmb_prototypes", "10", "--feat_dim", "8", "--hidden_mlp", "16",
        "--warmup_epochs", "0", "--base_lr", "0.5", "--set", "run.precision=fp32", "--set", "run.log_every_steps=1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """19 RGB images in nested class folders plus one grayscale image and one unreadable file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(19):
        sub = root / ["cats", "cats/indoor", "dogs"][i % 3]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(sub / f"{i}.jpg")
    Image.fromarray(rng.integers(0, 256, (22, 18), dtype=np.uint8)).save(root / "dogs" / "gray.png")
    (root / "dogs" / "notes.jpg").write_text("not an image")
    return root


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_image_folder_run_resume_and_complete(tmp_path, folder, capsys):
    out = tmp_path / "run"
    base = ["pretrain", "--data", str(folder), "--output-dir", str(out), "--epochs", "2", "--batch-size", "8",
            "--workers", "0", "--seed", "3", *TINY]
    code, stdout, _ = run_cli(capsys, *base, "--set", "run.max_steps=2")
    assert code == 0 and "stopped at step 2 (max_steps)" in stdout
    code, stdout, _ = run_cli(capsys, *base, "--set", "run.max_steps=2")  # the limit is reached already
    assert code == 0 and "stopped at step 2 (max_steps); no new checkpoint" in stdout and "None" not in stdout
    code, _, err = run_cli(capsys, *base, "--seed", "4")  # another run (a limit like run.max_steps is not)
    assert code == 1 and "already holds a run" in err and "--resume" in err and "Traceback" not in err
    # the README's bare form continues with the run's own config.yaml, not as the Fashion-MNIST demo (whose
    # k-NN summary refused an image folder); worker processes do not change the data
    code, stdout, err = run_cli(capsys, "pretrain", "--output-dir", str(out), "--resume", "--set", "data.workers=2")
    assert code == 0 and "error" not in err and "k-NN" not in stdout
    assert code == 0
    for name in ("config.yaml", "derived.json", "metrics.jsonl", "train.log", "model.pt", "checkpoints/final.pt"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]  # 20 images // 8 = 2 per epoch
    final = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
    assert final["step"] == 4 and final["finished"] and final["model_spec"]["backbone"] == "resnet18"
    assert final["config"]["run"]["seed"] == 3 and final["config"]["data"]["workers"] == 2
    assert "training complete" in (out / "train.log").read_text()
    assert (out / "bad_images.txt").read_text().strip().endswith("notes.jpg")  # skipped, counted, listed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, stdout, _ = run_cli(capsys, *base, "--resume")
    assert code == 0 and "already complete" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST IDX files not installed")
def test_fashion_mnist_slice_with_knn_summary(tmp_path, capsys):
    out = tmp_path / "fm"
    code, stdout, err = run_cli(capsys, "pretrain", "--data", "fashion-mnist", "--output-dir", str(out), "--epochs",
                                "1", "--batch-size", "32", "--set", "data.limit=128", "--set", "run.precision=fp32",
                                "--knn-test-limit", "200")
    assert code == 0, err
    config = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    from swav.recipes import recipe_dict
    assert config["data"]["channels"] == 1  # the CPU recipe
    assert config["model"]["num_prototypes"] == [recipe_dict("fashion_mnist_cpu")["model"]["num_prototypes"]]
    derived = json.loads((out / "derived.json").read_text())
    assert derived["pipeline"] == "tensor" and derived["total_steps"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 20 and summary["temperature"] == 0.07
    assert (summary["train_samples"], summary["test_samples"]) == (128, 200)
    assert set(summary["knn_top1"]) == {"swav", "untrained", "raw_pixels"}
    assert all(10.0 <= v <= 100.0 for v in summary["knn_top1"].values())  # 10 classes: better than chance
    assert "What was learned" in stdout and "raw pixels" in stdout


@pytest.mark.parametrize("argv,message,status", [
    # errors of the job (exit status 1): the data cannot be found
    (["--data", "/no/such/folder", "--epochs", "10"], "/no/such/folder", 1),
    # usage errors (exit status 2): a flag, --set value, recipe or config that cannot work as given
    (["--set", "optim.base_lrr=0.1"], "did you mean 'optim.base_lr'", 2),
    (["--nmb_crops", "2", "6", "--size_crops", "224"], "crops.sizes=[224] has 1 entries but crops.counts=[2, 6]", 2),
    (["--recipe", "swav_100epochs"], "Did you mean swav_100ep", 2),
    (["--epochs", "0"], "optim.epochs=0 is invalid", 2),
    (["--set", "run.device=cuda:99"], "--device cuda:99 but", 2),
    (["--resume"], "holds no run (no config.yaml or checkpoints): check the path", 2),
    (["--config", "/no/such.yaml"], "--config '/no/such.yaml' does not exist", 2),
    (["--partial", "--data", "fashion-mnist"], "--partial applies with --resume only", 2),
    (["--resume", "--overwrite", "--data", "fashion-mnist"], "--resume and --overwrite exclude each other", 2),
    (["--use_fp16", "maybe"], "--use_fp16='maybe' is invalid", 2),
])
def test_user_errors_are_one_clear_line(tmp_path, capsys, argv, message, status):
    code, _, err = run_cli(capsys, "pretrain", "--output-dir", str(tmp_path / "o"), *argv)
    assert code == status and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_demo_on_a_folder_of_photos_says_what_it_needs(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30)).save(photos / f"{i}.jpg")
    code, _, err = run_cli(capsys, "demo", "--data", str(photos), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "swav demo runs the Fashion-MNIST recipe" in err and "holds none" in err
    assert "swav pretrain --data PATH" in err and not (tmp_path / "o").exists()
    # the layouts it runs on pass: IDX files in the folder, in its train/ folder, torchvision's raw/ layout
    from swav.datasets import detect_data_set_folder
    fashion = Path("/usr/share/datasets/fashion-mnist")
    if fashion.is_dir():
        for layout in ("flat", "train", "torchvision"):
            where = {"flat": tmp_path / "idx", "train": tmp_path / "split" / "train",
                     "torchvision": tmp_path / "tv" / "FashionMNIST" / "raw"}[layout]
            where.mkdir(parents=True)
            for f in fashion.iterdir():
                (where / f.name).symlink_to(f)
            root = {"flat": tmp_path / "idx", "train": tmp_path / "split", "torchvision": tmp_path / "tv"}[layout]
            assert detect_data_set_folder(root), layout
    assert not detect_data_set_folder(photos)


def test_usage_errors_and_module_entry_point(capsys):
    assert main(["pretrain", "--epochs"]) == 2  # argparse: missing value
    assert main([]) == 2
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "swav", "pretrain", "--list-recipes"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "swav_800ep" in proc.stdout and "fashion_mnist_cpu" in proc.stdout


def test_set_is_applied_with_the_flags_before_validation(capsys):
    """Precedence defaults < recipe < --config < flags < --set, validated once: a --set fixes what a flag alone
    makes inconsistent (2 epochs with the defaults' 10 warm-up epochs)."""
    code, stdout, err = run_cli(capsys, "pretrain", "--data", "/some/folder", "--epochs", "2", "--set",
                                "optim.warmup_epochs=0", "--print-config")
    assert code == 0 and "warmup_epochs: 0.0" in stdout and "epochs: 2" in stdout
    code, stdout, _ = run_cli(capsys, "pretrain", "--data", "/some/folder", "--nmb_crops", "2", "2", "--set",
                              "crops.sizes=[32,16]", "--set", "crops.min_scales=[0.3,0.1]", "--set",
                              "crops.max_scales=[1,0.3]", "--print-config")
    assert code == 0 and "- 32" in stdout
    code, _, err = run_cli(capsys, "pretrain", "--data", "/some/folder", "--epochs", "2", "--print-config")
    assert code == 2 and "optim.warmup_epochs" in err  # still validated (a usage error)


def test_a_partial_config_file_is_validated_with_the_flags_after_it(tmp_path, capsys):
    """A --config file that needs a later flag or --set to make sense (epochs 5 against the recipe's 10 warm-up
    epochs; two crop resolutions with one size) is validated together with them, not on its own."""
    (tmp_path / "epochs.yaml").write_text("optim: {epochs: 5}\n")
    (tmp_path / "crops.yaml").write_text("crops: {counts: [2, 6]}\n")
    for fix in (["--warmup_epochs", "1"], ["--set", "optim.warmup_epochs=1"]):
        code, stdout, err = run_cli(capsys, "pretrain", "--recipe", "cifar10", "--config", str(tmp_path / "epochs.yaml"),
                                    *fix, "--print-config")
        assert code == 0 and "epochs: 5" in stdout and "warmup_epochs: 1.0" in stdout, err
    code, stdout, err = run_cli(capsys, "pretrain", "--data", "/some/folder", "--config", str(tmp_path / "crops.yaml"),
                                "--size_crops", "224", "96", "--min_scale_crops", "0.14", "0.05", "--max_scale_crops",
                                "1", "0.14", "--print-config")
    assert code == 0 and "- 96" in stdout, err
    code, _, err = run_cli(capsys, "pretrain", "--recipe", "cifar10", "--config", str(tmp_path / "epochs.yaml"),
                           "--print-config")  # still validated, and the message says where the values came from
    assert code == 2 and "optim.warmup_epochs" in err and "--config " + str(tmp_path / "epochs.yaml") in err
    (tmp_path / "typo.yaml").write_text("optim: {epochz: 5}\n")
    code, _, err = run_cli(capsys, "pretrain", "--data", "/x", "--config", str(tmp_path / "typo.yaml"), "--print-config")
    assert code == 2 and "typo.yaml: unknown config key 'optim.epochz'" in err
    # an error of the command line alone does not point at the file
    code, _, err = run_cli(capsys, "pretrain", "--data", "/x", "--config", str(tmp_path / "crops.yaml"), "--set",
                           "optim.epochz=3", "--print-config")
    assert code == 2 and "unknown config key 'optim.epochz'" in err and "--config" not in err
    # the demo keeps its own folder unless the command line names one: not the file's run.output_dir
    (tmp_path / "elsewhere.yaml").write_text("run: {output_dir: elsewhere}\n")
    code, stdout, _ = run_cli(capsys, "demo", "--config", str(tmp_path / "elsewhere.yaml"), "--print-config")
    assert code == 0 and "output_dir: swav-demo" in stdout


def test_resume_with_an_unexpanded_home_output_dir_uses_the_runs_config(tmp_path, monkeypatch):
    """`--output-dir=~/run` reaches the program with the ~ (the shell expands it only after a space)."""
    from swav.cli import build_parser
    from swav.cli.pretrain import resolve_config
    from swav.config import Config, save_config, with_values

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").mkdir()
    save_config(with_values(Config(), {"data.path": "/data/photos", "optim.epochs": 17}), tmp_path / "run" / "config.yaml")
    config, demo = resolve_config(build_parser().parse_args(["pretrain", "--output-dir=~/run", "--resume"]))
    assert not demo and config.data.path == "/data/photos" and config.optim.epochs == 17
    assert config.run.output_dir == str(tmp_path / "run")


def test_resume_without_config_yaml_uses_the_checkpoints_config(tmp_path, caplog):
    """A run folder whose config.yaml was deleted: --resume continues with the config its checkpoint stores
    (it used to be compared with the default job's recipe and refused)."""
    import logging

    from swav.cli import build_parser
    from swav.cli.pretrain import resolve_config
    from swav.train import train
    from tests.train_helpers import InMemoryImages, tiny_config, tiny_model

    run = tmp_path / "run"
    train(tiny_config(run, **{"data.pipeline": "tensor", "run.max_steps": 2, "optim.epochs": 2}),
          dataset=InMemoryImages(16), model_builder=tiny_model)
    for damage in ("empty", "missing"):  # an empty (or cut) file is no config of defaults either
        if damage == "empty":
            (run / "config.yaml").write_text("")
        else:
            (run / "config.yaml").unlink()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="swav"):
            config, demo = resolve_config(build_parser().parse_args(["pretrain", "--output-dir", str(run),
                                                                     "--resume"]))
        assert not demo and (config.model.hidden_dim, config.optim.epochs, config.crops.sizes) == (16, 2, (12, 8))
        assert "config.yaml is missing or unreadable: continuing with the config stored in" in caplog.text


def test_a_summary_asked_for_on_unlabelled_data_is_refused_before_training(tmp_path, folder, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(folder), "--output-dir", str(out), "--epochs", "1",
                           "--workers", "0", *TINY, "--summary")
    assert code == 1 and "--no-summary" in err and "run.knn_every_epochs" in err and "Traceback" not in err
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()

"""End-to-end tests of ``swav eval-knn``, ``swav eval-linear`` and ``swav finetune`` (SPEC §11).

Each runs the real command line in-process on a tiny data set (an IDX slice of 8 x 8 images or a
generated image folder) with a tiny checkpoint written by :func:`swav.export.export_full`.
"""

import argparse
import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from swav.cli.evaluate import register
from swav.export import export_full
from swav.model import ModelSpec, build_model


def _main(argv):
    """``swav.cli.main`` when the package's entry point exists, else a parser with our commands."""
    try:
        from swav.cli import main
    except ImportError:
        parser = argparse.ArgumentParser(prog="swav")
        register(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return args.func(args)
    return main(argv)


def _write_idx(path, array):
    dtype_code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def _class_images(labels, size, rng, channels):
    """Images whose brightness pattern depends on the label, so classes are learnable."""
    base = rng.integers(0, 60, size=(len(labels), size, size, channels))
    for i, label in enumerate(labels):
        base[i, : size // 2 if label % 2 else size, :, :] += 120 + 40 * (label // 2)
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-idx")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("t10k", 12)):
        labels = (np.arange(n) % 4).astype(np.uint8)
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", _class_images(labels, 8, rng, 1)[..., 0])
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="module")
def gray_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec("resnet18", small_images=True, in_channels=1, hidden_dim=16, output_dim=8, num_prototypes=(10,))
    return export_full(build_model(spec), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _common(checkpoint, out, *extra):
    return [
        "--checkpoint",
        str(checkpoint),
        "--output-dir",
        str(out),
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--overwrite",  # these tests run several evaluations into one folder
        *extra,
    ]


def test_eval_knn_end_to_end(idx_data, gray_checkpoint, tmp_path, capsys):
    code = _main(["eval-knn", *_common(gray_checkpoint, tmp_path, "--data", str(idx_data), "--k", "3", "5")])
    assert code == 0
    result = json.loads((tmp_path / "eval-knn.json").read_text())
    assert (result["num_train"], result["num_test"], result["num_classes"]) == (24, 12, 10)  # IDX: 10 classes
    assert [r["k"] for r in result["results"]] == [3, 5]
    for r in result["results"]:
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0
        assert r["top1"] * 12 / 100 == pytest.approx(round(r["top1"] * 12 / 100))  # whole images
    assert result["model_spec"]["in_channels"] == 1
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_eval_linear_end_to_end(idx_data, gray_checkpoint, tmp_path, mode):
    before = torch.load(gray_checkpoint, weights_only=True)["model"]
    argv = [
        "eval-linear",
        *_common(gray_checkpoint, tmp_path, "--data", str(idx_data), "--mode", mode, "--epochs", "2"),
    ]
    assert _main(argv) == 0
    result = json.loads((tmp_path / "eval-linear.json").read_text())
    assert result["mode"] == mode
    # the protocol's settings are recorded, so that a non-official run can be told from an official one
    assert (result["epochs"], result["lr"], result["final_lr"], result["weight_decay"], result["standardize"]) == (
        2, 0.3, 0.0, 1e-6, False)
    assert len(result["history"]) == 2
    assert result["history"][0]["lr"] == pytest.approx(0.3)
    assert result["history"][1]["lr"] == pytest.approx(0.15)  # per-epoch cosine over 2 epochs
    assert result["top1_best"] >= result["top1_last"]
    assert 0 <= result["top1_last"] <= result["top5_last"] <= 100
    after = torch.load(gray_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the file is only read


def test_finetune_label_fraction_end_to_end(idx_data, gray_checkpoint, tmp_path):
    argv = [
        "finetune",
        *_common(gray_checkpoint, tmp_path, "--data", str(idx_data), "--label-fraction", "0.5", "--epochs", "2"),
    ]
    assert _main(argv) == 0
    result = json.loads((tmp_path / "finetune.json").read_text())
    assert result["num_train"] == 12  # half of each of the 4 classes of 6
    assert result["label_fraction"] == pytest.approx(0.5)
    assert (result["trunk_lr"], result["head_lr"]) == (0.01, 0.2)  # the 10% recipe for large fractions
    assert result["milestones"] == [1]  # 12 and 16 of 20 scaled to 2 epochs: only the decay that happens
    assert len(result["history"]) == 2


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-folder")
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("val", 3)):
        for label, name in enumerate(("n01440764", "n01443537")):
            (root / split / name).mkdir(parents=True)
            images = _class_images([label] * n, 8, rng, 3)
            for i in range(n):
                Image.fromarray(images[i]).save(root / split / name / f"{name}_{i}.png")
    return root


def test_finetune_subset_file_end_to_end(folder_data, tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("resnet18", small_images=True, in_channels=3, hidden_dim=0, output_dim=8, num_prototypes=(5,))
    checkpoint = export_full(build_model(spec), tmp_path / "rgb.pt")
    subset = tmp_path / "subset.txt"
    subset.write_text("n01440764_0.png\nn01440764_3.png\nn01443537_5.png\n")
    argv = [
        "finetune",
        *_common(
            checkpoint,
            tmp_path,
            "--train-data",
            str(folder_data / "train"),
            "--val-data",
            str(folder_data / "val"),
            "--subset-file",
            str(subset),
            "--epochs",
            "1",
        ),
    ]
    assert _main(argv) == 0
    result = json.loads((tmp_path / "finetune.json").read_text())
    assert (result["num_train"], result["num_test"], result["num_classes"]) == (3, 6, 2)
    assert result["label_fraction"] == pytest.approx(3 / 12)


def test_subset_file_with_unknown_names_fails_cleanly(folder_data, tmp_path, capsys):
    torch.manual_seed(0)
    spec = ModelSpec("resnet18", small_images=True, hidden_dim=0, output_dim=8, num_prototypes=(5,))
    checkpoint = export_full(build_model(spec), tmp_path / "rgb.pt")
    subset = tmp_path / "subset.txt"
    subset.write_text("n01440764_0.png\nnot_there.JPEG\n")
    argv = ["finetune", *_common(checkpoint, tmp_path, "--data", str(folder_data), "--subset-file", str(subset))]
    assert _main(argv) == 1
    assert "not_there.JPEG" in capsys.readouterr().err
    assert not (tmp_path / "finetune.json").exists()


def test_normalisation_comes_from_the_training_config(idx_data, tmp_path):
    from swav.checkpoint import save_model_file

    torch.manual_seed(0)
    spec = ModelSpec("resnet18", small_images=True, in_channels=1, hidden_dim=0, output_dim=8, num_prototypes=(5,))
    checkpoint = save_model_file(
        tmp_path / "trained.pt", build_model(spec), spec.to_dict(), config={"data": {"mean": [0.3], "std": [0.4]}}
    )
    assert _main(["eval-knn", *_common(checkpoint, tmp_path, "--data", str(idx_data), "--k", "3")]) == 0
    result = json.loads((tmp_path / "eval-knn.json").read_text())
    assert result["normalization"] == {"mean": [0.3], "std": [0.4]}
    assert result["freshly_initialised"] == []
    # a file without the prototypes, loaded with --partial: the result says what was not trained
    saved = torch.load(checkpoint, weights_only=False)
    del saved["model"]["prototypes.weight"]
    torch.save(saved, tmp_path / "partial.pt")
    assert _main(["eval-knn", *_common(tmp_path / "partial.pt", tmp_path, "--data", str(idx_data), "--k", "3",
                                       "--partial")]) == 0
    assert json.loads((tmp_path / "eval-knn.json").read_text())["freshly_initialised"] == ["prototypes.weight"]
    argv = ["eval-knn", *_common(checkpoint, tmp_path, "--data", str(idx_data), "--mean", "0.5", "--std", "0.5")]
    assert _main(argv) == 0
    assert json.loads((tmp_path / "eval-knn.json").read_text())["normalization"] == {"mean": [0.5], "std": [0.5]}
    # one of the two given: the other still comes from the checkpoint
    argv = ["eval-knn", *_common(checkpoint, tmp_path, "--data", str(idx_data), "--mean", "0.2")]
    assert _main(argv) == 0
    assert json.loads((tmp_path / "eval-knn.json").read_text())["normalization"] == {"mean": [0.2], "std": [0.4]}


def test_test_images_are_sized_like_pretraining(idx_data, tmp_path):
    """A model pretrained on small crops (28 px Fashion-MNIST, here 8 px) is evaluated on whole images at that
    size, not blown up to 224 px; --crop-size/--resize-size override; without a training config: 224 / 256."""
    from swav.checkpoint import save_model_file
    from swav.eval.transforms import transforms_for_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec("resnet-compact-s2-8", in_channels=1, hidden_dim=0, output_dim=8, num_prototypes=(5,))
    model = build_model(spec)
    trained = save_model_file(tmp_path / "trained.pt", model, spec.to_dict(),
                              config={"crops": {"sizes": [8, 4]}, "data": {"mean": [0.3], "std": [0.4]}})
    assert _main(["eval-knn", *_common(trained, tmp_path, "--data", str(idx_data), "--k", "3")]) == 0
    result = json.loads((tmp_path / "eval-knn.json").read_text())
    assert result["test_image_sizes"] == {"resize": 8, "crop": 8}
    assert _main(["eval-knn", *_common(trained, tmp_path, "--data", str(idx_data), "--k", "3", "--crop-size", "6")]) == 0
    assert json.loads((tmp_path / "eval-knn.json").read_text())["test_image_sizes"] == {"resize": 6, "crop": 6}
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    _, test = transforms_for_checkpoint(trained, spec)
    expected = (torch.arange(64, dtype=torch.float32).reshape(1, 8, 8) / 255 - 0.3) / 0.4
    torch.testing.assert_close(test(image), expected)  # the image as it is, normalised as in pretraining
    _, test = transforms_for_checkpoint(export_full(model, tmp_path / "no-config.pt"), spec)
    assert test(image).shape == (1, 224, 224)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_images_are_left_out_of_the_evaluation(tmp_path, workers):
    import numpy as np
    from PIL import Image

    from swav.checkpoint import save_model_file

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
        (tmp_path / "data" / cls / "broken.png").write_bytes(b"")
    spec = ModelSpec("resnet18", small_images=True, hidden_dim=0, output_dim=8, num_prototypes=(5,))
    checkpoint = save_model_file(tmp_path / "m.pt", build_model(spec), spec.to_dict(),
                                 config={"data": {"max_bad_fraction": 0.5}})
    data = str(tmp_path / "data")
    argv = ["eval-knn", *_common(checkpoint, tmp_path, "--train-data", data, "--val-data", data, "--k", "3")]
    argv[argv.index("--workers") + 1] = workers
    assert _main(argv) == 0
    result = json.loads((tmp_path / "eval-knn.json").read_text())
    assert (result["num_train"], result["num_test"]) == (12, 12)  # 14 files each, the 2 empty ones left out
    assert result["unreadable_left_out"] == {"train": 2, "test": 2}


def test_images_outside_class_folders_are_named_before_any_decoding(tmp_path, capsys):
    from PIL import Image

    from swav.checkpoint import save_model_file

    (tmp_path / "data" / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / "data" / "a" / f"{i}.png")
    Image.new("RGB", (12, 12)).save(tmp_path / "data" / "loose.png")
    spec = ModelSpec("resnet18", small_images=True, hidden_dim=0, output_dim=8, num_prototypes=(5,))
    checkpoint = save_model_file(tmp_path / "m.pt", build_model(spec), spec.to_dict())
    data = str(tmp_path / "data")
    assert _main(["eval-knn", *_common(checkpoint, tmp_path, "--train-data", data, "--val-data", data)]) == 1
    err = capsys.readouterr().err
    assert "1 image(s) are not in a class sub-folder" in err and "loose.png" in err


def test_unreadable_images_are_left_out_when_classes_are_matched_by_name(tmp_path):
    import numpy as np
    from PIL import Image

    from swav.checkpoint import save_model_file

    rng = np.random.default_rng(1)
    for split, classes in (("train", ("a", "b")), ("val", ("b",))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    (tmp_path / "val" / "b" / "broken.png").write_bytes(b"")  # val's class b is train's class 1: relabelled
    spec = ModelSpec("resnet18", small_images=True, hidden_dim=0, output_dim=8, num_prototypes=(5,))
    checkpoint = save_model_file(tmp_path / "m.pt", build_model(spec), spec.to_dict())
    argv = ["eval-knn", *_common(checkpoint, tmp_path, "--train-data", str(tmp_path / "train"),
                                 "--val-data", str(tmp_path / "val"), "--k", "3")]
    assert _main(argv) == 0
    result = json.loads((tmp_path / "eval-knn.json").read_text())
    assert (result["num_train"], result["num_test"]) == (12, 6)
    assert result["unreadable_left_out"] == {"train": 0, "test": 1}


def test_an_earlier_result_is_not_replaced_without_overwrite(tmp_path, gray_checkpoint, idx_data, capsys):
    argv = ["eval-knn", *_common(gray_checkpoint, tmp_path, "--data", str(idx_data), "--k", "3")]
    assert _main(argv) == 0
    first = (tmp_path / "eval-knn.json").read_bytes()
    again = [a for a in argv if a != "--overwrite"] + ["--k", "5"]
    capsys.readouterr()
    assert _main(again) == 1
    err = capsys.readouterr().err
    assert "already holds a result" in err and "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "eval-knn.json").read_bytes() == first


def test_knn_reports_the_k_it_used(tmp_path, gray_checkpoint, idx_data, capsys):
    assert _main(["eval-knn", *_common(gray_checkpoint, tmp_path, "--data", str(idx_data), "--k", "3", "100000")]) == 0
    rows = json.loads((tmp_path / "eval-knn.json").read_text())["results"]
    assert rows[0]["k"] == 3 and "k_asked" not in rows[0]
    assert rows[1]["k_asked"] == 100000 and rows[1]["k"] < 100000
    assert f"(asked 100000: only {rows[1]['k']} training samples)" in capsys.readouterr().out


def test_val_data_in_any_data_form_is_its_test_split(tmp_path, gray_checkpoint, idx_data, folder_data, capsys):
    """--val-data with IDX files or a folder holding train/ and val/ evaluates on their held-out split (it used
    to read their training split, scoring the training images); a plain class-folder tree is used whole, and
    the same folder for training and testing is warned about."""
    argv = ["eval-knn", *_common(gray_checkpoint, tmp_path, "--train-data", str(idx_data), "--val-data",
                                 str(idx_data), "--k", "3")]
    assert _main(argv) == 0
    result = json.loads((tmp_path / "eval-knn.json").read_text())
    assert (result["num_train"], result["num_test"]) == (24, 12)

    spec = ModelSpec("resnet18", small_images=True, in_channels=3, hidden_dim=0, output_dim=8, num_prototypes=(5,))
    rgb = export_full(build_model(spec), tmp_path / "rgb.pt")
    for val, expected in ((folder_data, 6), (folder_data / "val", 6), (folder_data / "train", 12)):
        out = tmp_path / val.name
        argv = ["eval-knn", *_common(rgb, out, "--train-data", str(folder_data / "train"), "--val-data", str(val),
                                     "--k", "3")]
        assert _main(argv) == 0
        assert json.loads((out / "eval-knn.json").read_text())["num_test"] == expected
        warned = "the test images are the training images" in capsys.readouterr().err
        assert warned == (val.name == "train"), val


def test_resize_size_is_refused_for_a_small_images_model(tmp_path, gray_checkpoint, idx_data, capsys):
    """Small-image models take the image whole at one size: --resize-size had no effect (it was ignored)."""
    argv = ["eval-knn", *_common(gray_checkpoint, tmp_path, "--data", str(idx_data), "--resize-size", "40")]
    assert _main(argv) == 2
    assert "--resize-size 40: this model is for small images" in capsys.readouterr().err

"""The evaluation / extract commands: classes matched by name, one-line errors, checks before the work.

Everything runs the real ``swav`` command line in-process (:func:`swav.cli.main`) on tiny image
folders and a tiny checkpoint written by :func:`swav.export.export_full`.
"""

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from swav.cli import main
from swav.export import export_full
from swav.model import ModelSpec, build_model

EVAL_COMMANDS = {
    "eval-knn": ["--k", "1"],
    "eval-linear": ["--mode", "fast", "--epochs", "1"],
    "finetune": ["--label-fraction", "0.5", "--epochs", "1"],
}


def _pattern(name, i):
    """An 8 x 8 RGB image that differs per class name and per index (no two images alike)."""
    image = np.full((8, 8, 3), 10 + 3 * i, dtype=np.uint8)
    if name == "cat":
        image[:4] = 200
    elif name == "dog":
        image[:, :4] = 200
    elif name == "bird":
        image[2:6, 2:6] = 250
    else:  # any other class: a diagonal
        image[np.arange(8), np.arange(8)] = 220
    image[7, i % 8, 0] = 255
    return image


def _folder(root, classes, n=4):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_pattern(name, i)).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    return {
        "train3": _folder(root / "train3", ("bird", "cat", "dog")),  # bird 0, cat 1, dog 2
        "train2": _folder(root / "train2", ("cat", "dog")),
        "val_cat_dog": _folder(root / "val_cat_dog", ("cat", "dog")),  # cat 0, dog 1: shifted by one
        "val_bird_cat": _folder(root / "val_bird_cat", ("bird", "cat")),
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec("resnet-compact-8", small_images=True, hidden_dim=0, output_dim=8, num_prototypes=(5,))
    return export_full(build_model(spec), tmp_path_factory.mktemp("ckpt") / "model.pt")


def _run(command, checkpoint, train, val, out, *extra, device="cpu"):
    argv = [command, "--checkpoint", str(checkpoint), "--train-data", str(train), "--val-data", str(val),
            "--output-dir", str(out), "--batch-size", "8", "--workers", "0", "--device", device, "--no-progress"]
    return main([*argv, *EVAL_COMMANDS[command], *extra])


def _one_line_error(capsys, command):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if f"swav {command}: error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# 1. val classes are matched to train classes by name


def test_knn_matches_val_classes_to_train_classes_by_name(data, checkpoint, tmp_path):
    # every val image is a copy of a train image of the same class name, so 1-NN is always right;
    # by folder position val/cat (0) would be scored as train/bird (0): top-1 0
    assert _run("eval-knn", checkpoint, data["train3"], data["val_cat_dog"], tmp_path) == 0
    result = json.loads((tmp_path / "eval-knn.json").read_text())
    assert (result["num_classes"], result["num_train"], result["num_test"]) == (3, 12, 8)
    assert result["results"][0]["top1"] == pytest.approx(100.0)


@pytest.mark.parametrize("command", sorted(EVAL_COMMANDS))
def test_val_class_missing_from_train_is_refused_by_name(data, checkpoint, tmp_path, capsys, command):
    assert _run(command, checkpoint, data["train2"], data["val_bird_cat"], tmp_path) == 1
    line = _one_line_error(capsys, command)
    assert "val has class folders not in train: 'bird'; give folders with the same class names" in line
    assert not (tmp_path / f"{command}.json").exists()


@pytest.mark.parametrize("command", ["eval-linear", "finetune"])
def test_val_with_a_subset_of_train_classes_runs(data, checkpoint, tmp_path, command):
    assert _run(command, checkpoint, data["train3"], data["val_cat_dog"], tmp_path) == 0
    result = json.loads((tmp_path / f"{command}.json").read_text())
    assert result["num_classes"] == 3 and result["num_test"] == 8


def test_relabelled_val_set_gives_train_indices(data):
    from swav.cli.evaluate import _match_classes
    from swav.datasets import ImageFolderDataset

    train, val = ImageFolderDataset(data["train3"]), ImageFolderDataset(data["val_cat_dog"])
    matched = _match_classes(train, val)
    names = [os.path.basename(os.path.dirname(path)) for path, _ in val.samples]
    expected = [train.class_to_idx[name] for name in names]
    assert matched.targets == expected
    assert [matched[i][1] for i in range(len(matched))] == expected
    assert [label for _, label in matched.samples] == expected
    assert len(matched) == len(val) and matched.classes == train.classes
    same = ImageFolderDataset(data["train3"])
    assert _match_classes(train, same) is same  # nothing to do: same class list


def test_idx_labels_are_left_as_they_are(tmp_path):
    """IDX labels are the file's class numbers; the class names are only guessed from the path
    ('fashion' in it or not), so a copy of Fashion-MNIST's test files elsewhere keeps its labels."""
    import gzip
    import struct

    from swav.cli.evaluate import _match_classes
    from swav.datasets import IDXDataset

    def write(folder, split, labels):
        folder.mkdir(parents=True, exist_ok=True)
        images = np.zeros((len(labels), 4, 4), dtype=np.uint8)
        for stem, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
            with gzip.open(folder / f"{stem}.gz", "wb") as fh:
                fh.write(header + array.tobytes())

    labels = np.arange(10, dtype=np.uint8)
    write(tmp_path / "fashion-mnist", "train", labels)
    write(tmp_path / "copy", "t10k", labels)
    train, test = IDXDataset(tmp_path / "fashion-mnist", "train"), IDXDataset(tmp_path / "copy", "test")
    assert train.classes != test.classes
    assert _match_classes(train, test) is test


# 2. one-line errors instead of tracebacks


@pytest.fixture(scope="module")
def tensor_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tensor") / "tensor.pt"
    torch.save(torch.zeros(3), path)
    return path


@pytest.mark.parametrize("command", sorted(EVAL_COMMANDS))
def test_tensor_file_as_checkpoint_is_a_one_line_error(data, tensor_file, tmp_path, capsys, command):
    assert _run(command, tensor_file, data["train2"], data["val_cat_dog"], tmp_path) == 1
    line = _one_line_error(capsys, command)
    assert f"{str(tensor_file)!r} holds a Tensor, expected a dict" in line


def test_extract_tensor_file_is_a_one_line_error(data, tensor_file, tmp_path, capsys):
    argv = ["extract", "--checkpoint", str(tensor_file), "--data", str(data["train2"]),
            "--output-dir", str(tmp_path / "x"), "--workers", "0", "--no-progress"]
    assert main(argv) == 1
    assert "holds a Tensor, expected a dict" in _one_line_error(capsys, "extract")


def test_not_a_state_dict_is_a_user_error_but_other_type_errors_stay_bugs():
    from swav.cli import is_user_error
    from swav.pretrained import NotAStateDictError

    assert is_user_error(NotAStateDictError("x")) and isinstance(NotAStateDictError("x"), TypeError)
    assert not is_user_error(TypeError("a bug"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["eval-knn", "extract"])
def test_device_cuda_without_cuda_is_refused_before_loading(data, tmp_path, capsys, command):
    missing = tmp_path / "missing.pt"  # never read: the device is checked first
    if command == "extract":
        argv = ["extract", "--checkpoint", str(missing), "--data", str(data["train2"]),
                "--output-dir", str(tmp_path / "x"), "--device", "cuda"]
        assert main(argv) == 2  # a usage error
    else:
        assert _run(command, missing, data["train2"], data["val_cat_dog"], tmp_path, device="cuda") == 2
    line = _one_line_error(capsys, command)
    assert line.endswith("--device cuda but CUDA is not available here; use --device cpu")


@pytest.mark.parametrize("command", ["eval-linear", "finetune", "extract", "cluster"])
def test_invalid_device_name_is_refused(data, tmp_path, capsys, command):
    missing = tmp_path / "missing.pt"
    if command in ("extract", "cluster"):
        argv = [command, "--checkpoint", str(missing), "--data", str(data["train2"]),
                "--output-dir", str(tmp_path / "x"), "--device", "gpu"]
        assert main(argv) == 2
    else:
        assert _run(command, missing, data["train2"], data["val_cat_dog"], tmp_path, device="gpu") == 2
    assert _one_line_error(capsys, command).endswith("--device 'gpu' is invalid: use auto, cpu, cuda or cuda:N")


def test_check_device_values():
    from swav.cli import check_device

    assert [check_device(d) for d in ("auto", "cpu", "CPU ")] == ["auto", "cpu", "cpu"]
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", ""):
        with pytest.raises(ValueError, match="is invalid: use auto, cpu, cuda or cuda:N"):
            check_device(bad)
    if torch.cuda.is_available():
        assert check_device("cuda:0") == "cuda:0"
        with pytest.raises(ValueError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


# 3. files that are not checkpoints, and run folders


@pytest.fixture
def run_folder(tmp_path, checkpoint):
    run = tmp_path / "run1"
    run.mkdir()
    (run / "model.pt").write_bytes(checkpoint.read_bytes())
    (run / "config.yaml").write_text("model:\n  backbone: resnet-compact-8\ncrops:\n  sizes: [8, 4]\n")
    Image.fromarray(_pattern("cat", 0)).save(run / "preview.png")
    return run


@pytest.mark.parametrize("name, kind", [("config.yaml", "YAML file"), ("preview.png", "PNG image file")])
def test_non_checkpoint_file_is_named_as_such(data, run_folder, tmp_path, capsys, monkeypatch, name, kind):
    monkeypatch.chdir(tmp_path)
    assert _run("eval-knn", f"run1/{name}", data["train2"], data["val_cat_dog"], tmp_path) == 1
    line = _one_line_error(capsys, "eval-knn")
    assert f"'run1/{name}' is not a checkpoint ({kind}); pass the run's model.pt ('run1/model.pt')" in line
    assert "arbitrary code" not in line


def test_run_folder_as_checkpoint_points_at_its_model(data, run_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given in ("run1", "run1/"):
        assert _run("eval-knn", given, data["train2"], data["val_cat_dog"], tmp_path) == 1
        assert _one_line_error(capsys, "eval-knn").endswith(f"{given!r} is a run folder: pass run1/model.pt")


# 4. argument checks come before the model and the data are loaded


@pytest.mark.parametrize("command, extra, message", [
    ("eval-knn", ["--k", "0"], "--k: must be >= 1, got 0"),
    ("eval-knn", ["--temperature", "0"], "--temperature: must be > 0, got 0"),
    ("eval-linear", ["--lr", "-1"], "--lr: must be > 0, got -1"),
    ("eval-linear", ["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    ("eval-linear", ["--standardize", "--mode", "full"], "--standardize: applies to --mode fast only"),
    ("finetune", ["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    ("finetune", ["--label-fraction", "1.5"], "--label-fraction: must be in (0, 1]"),
    ("finetune", ["--epochs", "2", "--milestones", "1", "2"], "--milestones 2: at or after --epochs 2 (epochs count from 0, so the last is 1)"),
    ("eval-knn", ["--workers", "-1"], "--workers: must be >= 0, got -1"),
    ("eval-linear", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
])
def test_bad_arguments_fail_before_any_loading(tmp_path, capsys, command, extra, message):
    # neither the checkpoint nor the data exist: reaching them would give a different error
    missing = tmp_path / "missing"
    assert _run(command, missing / "model.pt", missing / "train", missing / "val", tmp_path, *extra) == 2  # usage
    line = _one_line_error(capsys, command)
    assert message in line and "missing" not in line


def test_output_dir_that_is_a_file_is_refused_first(tmp_path, capsys):
    missing = tmp_path / "missing"
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in ((afile, f"--output-dir {str(afile)!r} is an existing file: choose a folder"),
                         (afile / "sub", (f"--output-dir {str(afile / 'sub')!r}: {str(afile)!r} is a file, so the "
                                          "folder cannot be created there"))):
        assert _run("eval-knn", missing / "model.pt", missing / "train", missing / "val", out) == 1
        assert message in _one_line_error(capsys, "eval-knn")


def test_output_dir_whose_json_name_is_a_folder_is_refused_first(tmp_path, capsys):
    missing = tmp_path / "missing"
    (tmp_path / "out" / "eval-knn.json").mkdir(parents=True)
    assert _run("eval-knn", missing / "model.pt", missing / "train", missing / "val", tmp_path / "out") == 1
    assert "eval-knn.json' is a folder, so eval-knn.json cannot be written" in _one_line_error(capsys, "eval-knn")


def _read_only_folder(tmp_path):
    """A folder this process cannot write to: chmod 555, or for root (who ignores that) /sys."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, "/sys"):
        try:
            with tempfile.NamedTemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    pytest.skip("no folder this process cannot write to")


def test_read_only_output_dir_is_refused_first(tmp_path, capsys):
    missing = tmp_path / "missing"
    read_only = _read_only_folder(tmp_path)
    try:
        for out in (read_only, os.path.join(read_only, "new-sub-folder")):
            assert _run("eval-knn", missing / "model.pt", missing / "train", missing / "val", out) == 1
            line = _one_line_error(capsys, "eval-knn")
            assert f"--output-dir {str(out)!r}: cannot write in " in line
    finally:
        (tmp_path / "ro").chmod(0o755)

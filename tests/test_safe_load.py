"""Safe checkpoint reading: pickles that run code are refused without running, damaged files named."""
from __future__ import annotations

import ast
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from swav.safe_load import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    convert_trusted_checkpoint,
    load_state_file,
    read_safetensors_metadata,
    safe_torch_load,
)

REPO = Path(__file__).resolve().parents[1]


class _CreatesMarker:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code a malicious file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_payload_really_runs_code_with_plain_pickle(tmp_path):
    # The check below is meaningful only if the payload does run when unpickled unsafely.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_CreatesMarker(marker)))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_its_code_does_not_run(tmp_path, writer):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth.tar"
    payload = {"state_dict": {"w": torch.zeros(2)}, "trap": _CreatesMarker(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_torch_load(path)
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message and "arbitrary code" in message and "convert_trusted_checkpoint" in message
    with pytest.raises(UnsafeCheckpointError):  # same through the dispatcher
        load_state_file(path)
    assert not marker.exists()


def test_plain_checkpoints_load_in_both_torch_formats(tmp_path):
    state = {"a": torch.arange(6.0).view(2, 3), "meta": {"epoch": 3, "name": "x", "sizes": [1, 2]}}
    for i, zip_format in enumerate((True, False)):
        path = tmp_path / f"ok{i}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        loaded = safe_torch_load(path)
        assert torch.equal(loaded["a"], state["a"]) and loaded["meta"] == state["meta"]


def test_safetensors_dispatch_and_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.full((2, 2), 3.0)}, str(path), metadata={"k": "v"})
    assert torch.equal(load_state_file(path)["w"], torch.full((2, 2), 3.0))
    assert read_safetensors_metadata(path) == {"k": "v"}


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated-zip", "text", "empty-safetensors", "truncated-safetensors",
                                  "text-safetensors"])
def test_damaged_files_raise_corrupt_error_naming_the_path(tmp_path, kind):
    suffix = ".safetensors" if "safetensors" in kind else ".pt"
    path = tmp_path / f"damaged{suffix}"
    if kind.startswith("empty"):
        path.write_bytes(b"")
    elif kind.startswith("text"):
        path.write_text("this is not a checkpoint\n" * 10)
    elif suffix == ".pt":
        torch.save({"w": torch.randn(64, 64)}, path)
        _truncate(path)
    else:
        save_file({"w": torch.randn(64, 64)}, str(path))
        _truncate(path)
    with pytest.raises(CorruptCheckpointError) as info:
        load_state_file(path)
    assert str(path) in str(info.value)
    if kind == "empty":
        assert "empty" in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        safe_torch_load(tmp_path / "nope.pt")
    with pytest.raises(IsADirectoryError):
        load_state_file(tmp_path)


def test_convert_trusted_checkpoint_keeps_plain_values_and_drops_objects(tmp_path, caplog):
    src, dst = tmp_path / "old.pth.tar", tmp_path / "new.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "best_acc": np.float64(0.75), "hist": np.arange(4),
                "epoch": np.int64(7), "args": Path("/some/where")}, src)
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(src)  # numpy scalars are not weights-only loadable
    with caplog.at_level(logging.WARNING, logger="swav.safe_load"):
        convert_trusted_checkpoint(src, dst)
    out = safe_torch_load(dst)
    assert torch.equal(out["state_dict"]["w"], torch.ones(3))
    assert out["best_acc"] == 0.75 and type(out["best_acc"]) is float and out["epoch"] == 7
    assert torch.equal(out["hist"], torch.arange(4))
    assert "args" not in out and "checkpoint['args']" in caplog.text


def _torch_load_calls(path: Path) -> list[tuple[int, dict]]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
        if is_call and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            calls.append((node.lineno, {k.arg: k.value for k in node.keywords}))
    return calls


def test_every_torch_load_in_the_package_passes_weights_only_explicitly():
    offenders = []
    for path in [*sorted((REPO / "swav").rglob("*.py")), REPO / "hubconf.py"]:
        for line, keywords in _torch_load_calls(path):
            value = keywords.get("weights_only")
            explicit_true = isinstance(value, ast.Constant) and value.value is True
            trusted_conversion = path.name == "safe_load.py" and isinstance(value, ast.Constant) and value.value is False
            if not (explicit_true or trusted_conversion):
                offenders.append(f"{path.relative_to(REPO)}:{line}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def _not_a_checkpoint_error():
    from swav.safe_load import NotACheckpointError

    return NotACheckpointError


@pytest.mark.parametrize("name, kind", [
    ("config.yaml", "YAML file"), ("summary.json", "JSON file"), ("notes.pt", "text file"),
    ("picture.png", "PNG image file"), ("photo.pth.tar", "JPEG image file"), ("weights.safetensors", "text file"),
    ("features.npy", "NumPy array file, e.g. features written by `swav extract`"),
])
def test_files_that_are_plainly_no_checkpoint_say_what_they_are(tmp_path, name, kind):
    from PIL import Image

    run = tmp_path / "run1"
    run.mkdir()
    path = run / name
    if kind == "PNG image file":
        Image.new("RGB", (4, 4)).save(path, format="PNG")
    elif kind == "JPEG image file":
        Image.new("RGB", (4, 4)).save(path, format="JPEG")
    elif kind == "JSON file":
        path.write_text('{"top1": 71.2, "epochs": 100}\n')
    elif kind.startswith("NumPy"):
        import numpy as np
        np.save(path, np.zeros((4, 8), dtype=np.float32))
    elif kind == "text file":
        path.write_text("this is not a checkpoint\n" * 10)
    else:
        path.write_text("model:\n  backbone: resnet50\ncrops:\n  sizes: [224, 96]\n")
    error = _not_a_checkpoint_error()
    with pytest.raises(error) as info:
        load_state_file(path)
    message = str(info.value)
    assert message.startswith(f"{str(path)!r} is not a checkpoint ({kind}); pass the run's model.pt")
    assert "arbitrary code" not in message
    assert isinstance(info.value, CorruptCheckpointError)  # callers falling back on damaged files still do
    torch.save({"w": torch.ones(1)}, run / "model.pt")  # with the run's model next to it, it is named
    with pytest.raises(error, match=f"pass the run's model.pt \\({str(run / 'model.pt')!r}\\)"):
        load_state_file(path)


def test_real_checkpoints_and_pickles_are_not_mistaken_for_other_files(tmp_path):
    from swav.safe_load import describe_non_checkpoint

    for i, zip_format in enumerate((True, False)):
        torch.save({"w": torch.ones(2)}, tmp_path / f"ok{i}.pt", _use_new_zipfile_serialization=zip_format)
        assert describe_non_checkpoint(tmp_path / f"ok{i}.pt") is None
    save_file({"w": torch.ones(2)}, str(tmp_path / "ok.safetensors"))
    assert describe_non_checkpoint(tmp_path / "ok.safetensors") is None
    # a protocol-0 pickle is plain ASCII text, but still a pickle: refused as unsafe, code not run
    marker = tmp_path / "code_ran"
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps({"trap": _CreatesMarker(marker)}, protocol=0))
    assert path.read_bytes().isascii() and describe_non_checkpoint(path) is None
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(path)
    assert not marker.exists()
    # longer than the part of the file that is looked at (1 MiB): still not mistaken for text
    big = tmp_path / "big.pkl"
    big.write_bytes(pickle.dumps({"pad": "x" * (2 << 20), "trap": _CreatesMarker(marker)}, protocol=0))
    assert describe_non_checkpoint(big) is None
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(big)
    assert not marker.exists()
    # a checkpoint cut after its first bytes is damaged, not "a text file"
    whole = (tmp_path / "ok0.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:2])
    assert describe_non_checkpoint(tmp_path / "cut.pt") is None


def test_a_flipped_bit_in_a_model_file_is_refused_by_every_command_that_loads_it(tmp_path):
    """eval, export, extract and cluster read models through read_checkpoint: its CRC-32 check catches a bit
    flipped in a tensor, which torch.load itself returns silently (and an export would re-save with good CRCs)."""
    from swav.pretrained import load_pretrained, read_checkpoint

    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    start = data.find(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[:64])
    assert start > 0
    data[start + 1000] ^= 0x10
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4096, dtype=torch.float32))
    with pytest.raises(CorruptCheckpointError, match="weights.pt.*damaged.*CRC"):
        read_checkpoint(path)
    with pytest.raises(CorruptCheckpointError):
        load_pretrained(path)

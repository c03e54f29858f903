"""Shared pieces of the fault-injection tests (tests/test_reliability.py): the tiny run every scenario
trains, subprocess helpers with timeouts, the uninterrupted reference run, damaged files, an image folder
with every kind of bad and odd file, and a network whose gradients can be made infinite on purpose."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from swav.checkpoint import PAUSE_HOOK_ENV, load_checkpoint, step_checkpoint_path
from swav.cli import main
from swav.model import ModelSpec, SwAVModel
from tests.test_images import png_with_header
from tests.train_helpers import assert_same_state

ROOT = Path(__file__).resolve().parents[1]

TIMEOUT = 120  # seconds for any one subprocess: nothing may hang
BASE = ["--epochs", "2", "--batch-size", "8", "--warmup_epochs", "0", "--freeze_prototypes_niters", "2",
        "--nmb_crops", "2", "2", "--size_crops", "12", "8", "--min_scale_crops", "0.3", "0.1", "--max_scale_crops",
        "1", "0.3", "--nmb_prototypes", "10", "--feat_dim", "8", "--hidden_mlp", "16", "--queue_length", "16",
        "--epoch_queue_starts", "1", "--workers", "0", "--no-summary", "--arch", "resnet-compact-4",
        "--set", "data.channels=1", "--set", "run.device=cpu", "--set", "run.precision=fp32",
        "--set", "run.tensorboard=false", "--set", "run.log_every_steps=1", "--set", "run.checkpoint_every_steps=1",
        "--set", "run.keep_checkpoints=20", "--set", "run.dist_timeout_minutes=1"]
TOTAL_STEPS = 16



def write_idx_data(folder: Path) -> Path:
    """64 random 16 x 16 grey images with labels, as MNIST-style IDX files (loads in milliseconds)."""
    images = np.random.default_rng(0).integers(0, 256, (64, 16, 16), dtype=np.uint8)
    (folder / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 64, 16, 16)
                                                     + images.tobytes())
    (folder / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 64)
                                                     + (np.arange(64) % 10).astype(np.uint8).tobytes())
    return folder


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(data), "--output-dir", str(out), *BASE, *extra]


def launch(args: list[str], log: Path, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """``python -m swav <args>`` with one thread, output to ``log`` (files, so that no pipe can fill up)."""
    full_env = {k: v for k, v in os.environ.items() if k != PAUSE_HOOK_ENV}
    full_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))  # as the in-process reference
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "swav", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=full_env, cwd=ROOT, **kwargs)


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"subprocess hung; its output:\n{log.read_text(errors='replace')[-3000:]}") from None
    return code, log.read_text(errors="replace")


def wait_until(condition, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out + err


def snapshot(folder: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def metric_steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "step"]


class Reference:
    """The uninterrupted run, started in the background when a test first needs it."""

    def __init__(self, data: Path, out: Path) -> None:
        self.out, self.log = out, out.parent / "reference.log"
        self.proc = launch(argv(data, out), self.log)
        self._final: dict | None = None

    def final(self) -> dict:
        if self._final is None:
            code, text = finish(self.proc, self.log)
            assert code == 0, text[-3000:]
            self._final = load_checkpoint(self.out / "checkpoints" / "final.pt")
            assert self._final["step"] == TOTAL_STEPS and self._final["finished"]
        return self._final


def assert_matches_reference(out: Path, reference: Reference) -> None:
    final = load_checkpoint(out / "checkpoints" / "final.pt")
    assert final["finished"] and final["queues"][0] is not None
    assert_same_state(reference.final(), final)  # model, momentum buffers and queue, bit for bit
    assert metric_steps(out) == list(range(1, TOTAL_STEPS + 1))  # every step logged exactly once



def rank_env(rank: int, port: int, pause: str = "") -> dict[str, str]:
    env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return {**env, PAUSE_HOOK_ENV: pause} if pause else env


def interrupted_copy(reference: Reference, dest: Path, last_step: int) -> Path:
    """The reference run folder as it was right after checkpoint ``last_step`` (same files, same config)."""
    reference.final()
    shutil.copytree(reference.out, dest)
    for name in ("model.pt", "checkpoints/final.pt"):
        (dest / name).unlink()
    for step in range(last_step + 1, TOTAL_STEPS):  # the last step is saved as final.pt only
        step_checkpoint_path(dest, step).unlink()
    return dest


def flip_one_byte_of_a_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    data[record.header_offset + 30 + name_len + extra_len + record.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


class InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, poison):
        ctx.poison = poison
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad * float("inf") if ctx.poison else grad), None


class Poison(nn.Module):
    """Identity whose backward turns the gradient into Inf while ``schedule`` (per forward call) says so."""

    def __init__(self, schedule) -> None:
        super().__init__()
        self.schedule, self.calls = schedule, 0

    def forward(self, x):
        self.calls += 1
        return InfGradient.apply(x, bool(self.schedule(self.calls)))


def poisonable_model(spec, schedule=lambda call: False):
    trunk = nn.Sequential(nn.Conv2d(spec.in_channels, 6, 3, padding=1), Poison(schedule), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return SwAVModel(trunk, 8, spec.hidden_dim, spec.output_dim, spec.num_prototypes, spec.head_batch_norm)


def tiny_spec() -> ModelSpec:
    return ModelSpec("custom", in_channels=3, hidden_dim=16, output_dim=8, num_prototypes=10)


def make_image_folder(root: Path) -> tuple[list[str], list[str]]:
    """48 readable images (40 plain, 8 odd but valid) and 8 unreadable files, plus things to ignore."""
    rng = np.random.default_rng(0)
    photo = Path("/work/shared/data/photos-500x375")
    photos = sorted(photo.glob("*.jpg"))[:2] if photo.is_dir() else []
    good, bad = [], []
    for i in range(40):
        sub = root / ["a", "b", "a/deep"][i % 3]
        sub.mkdir(parents=True, exist_ok=True)
        name = sub / f"{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(name)
        good.append(name)
    odd = root / "odd"
    odd.mkdir()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(odd / "one_pixel.png")
    Image.fromarray(np.linspace(0, 65535, 24 * 20).astype(np.uint16).reshape(20, 24)).save(odd / "sixteen_bit.png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).convert("CMYK").save(odd / "cmyk.jpg")
    Image.new("RGBA", (20, 24), (10, 20, 30, 0)).save(odd / "rgba.png")
    palette = Image.new("P", (20, 24), 3)
    palette.info["transparency"] = 3
    palette.save(odd / "palette.png", transparency=3)
    Image.new("LA", (20, 24), (90, 128)).save(odd / "la.png")
    rotated = Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(odd / "exif_rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(odd / "фото_猫 é.png")
    good += sorted(odd.iterdir())
    broken = root / "broken"
    broken.mkdir()
    source = photos[0].read_bytes() if photos else (odd / "cmyk.jpg").read_bytes()
    (broken / "truncated.jpg").write_bytes(source[: len(source) // 3])
    deep = (odd / "sixteen_bit.png").read_bytes()
    (broken / "truncated.png").write_bytes(deep[: len(deep) // 2])
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "空っぽ.jpg").write_bytes(b"")
    (broken / "text.jpg").write_text("<html>404 Not Found</html>")
    (broken / "page.png").write_text("not a png either")
    (broken / "gone.jpg").symlink_to(root / "does-not-exist.jpg")
    (broken / "bomb.png").write_bytes(png_with_header(40_000, 40_000))  # 1.6 G pixels declared, 100 bytes on disk
    bad = sorted(broken.iterdir())
    hidden = root / ".cache"
    hidden.mkdir()
    (hidden / "junk.jpg").write_text("ignored: hidden folder")
    (root / ".hidden.jpg").write_text("ignored: hidden file")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # a symlink loop
    return [str(p) for p in good], [str(p) for p in bad]


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

"""A rank that raises stops the whole torchrun job quickly, with its message, and no rank hangs (issue 5).

The real launcher runs the real command: ``python -m torch.distributed.run --standalone --nproc_per_node 2
-m swav pretrain ...`` on gloo, and ``debug.inject_error_step`` makes rank 1 raise in step 2 while rank 0
is inside the step's collectives. Rank 0's next collective fails when rank 1's process goes away, and
torchrun ends the job; ``run.dist_timeout_minutes`` bounds the wait if a peer hangs instead.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--no-summary", "--set", "model.backbone=resnet-compact-4", "--set", "crops.counts=[2,2]",
        "--set", "crops.sizes=[12,8]", "--set", "crops.min_scales=[0.3,0.1]", "--set", "crops.max_scales=[1,0.3]",
        "--set", "model.hidden_dim=16", "--set", "model.output_dim=8", "--set", "model.num_prototypes=10",
        "--set", "optim.batch_size_per_device=4", "--set", "optim.epochs=2", "--set", "optim.warmup_epochs=0",
        "--set", "swav.freeze_prototypes_steps=0", "--set", "data.workers=0", "--set", "run.precision=fp32",
        "--set", "run.tensorboard=false"]


def write_images(folder, n: int = 24, size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def torchrun(args: list[str], timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "swav",
           "pretrain", *args]
    # run this checkout's swav, whatever an editable install elsewhere points to
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    return done, time.monotonic() - start


@pytest.mark.distributed
def test_an_exception_on_rank_one_ends_the_job(tmp_path):
    write_images(tmp_path / "images")
    done, seconds = torchrun(["--data", str(tmp_path / "images"), "--output-dir", str(tmp_path / "run"), *TINY,
                              "--set", "debug.inject_error_step=2", "--set", "debug.inject_error_rank=1",
                              "--set", "run.dist_timeout_minutes=1"])
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert seconds < 60, f"the job took {seconds:.0f} s to stop"
    assert "debug.inject_error_step=2: failure injected on rank 1" in output  # the cause, as the CLI prints it
    assert "rank 1 of 2 stopped: InjectedFailure" in output  # the engine's note on which rank failed
    assert "Root Cause" in output and "rank      : 1" in output  # torchrun names rank 1 as the first failure
    assert not (tmp_path / "run" / "checkpoints" / "final.pt").exists()

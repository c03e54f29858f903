"""The benchmark scripts run, on the smallest settings, and record what their tables need.

They are tools, not tests of speed: no timing is asserted here. What is checked is that each script still
runs against the library as it is, prints its table, and writes JSON with the machine it ran on and a peak
memory figure for every configuration (the speed issue asks for both).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def run_script(name: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def make_photos(folder: Path, count: int, height: int, width: int) -> Path:
    """A folder of ``count`` random JPEGs."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def check_machine(record: dict) -> None:
    machine = record["machine"]
    assert machine["cpu_model"] and machine["torch"] and machine["threads"] >= 1
    assert isinstance(machine["isa_flags"], list)


def test_machine_description_and_peak_memory_window():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import machine
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert machine.header().startswith("machine: ")
    if not machine.reset_peak_rss():
        pytest.skip("this system cannot reset the peak resident memory")
    before = machine.peak_rss_gib()
    block = np.ones(2**26)  # 512 MiB, touched
    during = machine.peak_rss_gib()
    del block
    machine.reset_peak_rss()
    after = machine.peak_rss_gib()
    assert during - before > 0.4 and during - after > 0.4


def test_sinkhorn_benchmark(tmp_path):
    out = tmp_path / "s.json"
    text = run_script("sinkhorn.py", "--sizes", "32x50", "64x100", "--repeats", "1", "--json", str(out))
    assert "exp peak GiB" in text
    record = json.loads(out.read_text())
    check_machine(record)
    assert [(r["B"], r["K"]) for r in record["rows"]] == [(32, 50), (64, 100)]
    assert all(r["exp_peak_gib"] > 0 and r["log_peak_gib"] > 0 for r in record["rows"])


def test_data_pipeline_benchmark(tmp_path):
    photos = make_photos(tmp_path / "photos", 3, 120, 160)
    out = tmp_path / "d.json"
    text = run_script("data_pipeline.py", "--data", str(photos), "--images", "2", "--batch-size", "2",
                      "--rounds", "2", "--colour-strategies", "auto", "grouped", "--json", str(out))
    assert "vs PIL-blur chain" in text
    record = json.loads(out.read_text())
    check_machine(record)
    assert record["photos"] == 3 and record["rounds"] == 2
    names = [r["pipeline"] for r in record["results"]]
    assert names[:3] == ["torchvision-pil", "torchvision-pil+PILblur", "MultiCropTransform"]
    assert len(names) == 5
    for row in record["results"]:
        assert row["peak_rss_gib"] > 0 and len(row["per_round"]) == 2
        assert len(row["ratio_vs_pil_blur_chain_per_round"]) == 2


def test_train_step_benchmark_probes_memory_per_configuration(tmp_path):
    out = tmp_path / "t.json"
    text = run_script("train_step.py", "--preset", "fashion_mnist_cpu", "--batch", "8", "--repeats", "2",
                      "--warmup", "0", "--variants", "fp32", "bf16-cl", "--json", str(out))
    assert "peak resident memory" in text and "peak GiB" in text
    record = json.loads(out.read_text())
    check_machine(record)
    assert record["reference_variant"] == "fp32" and record["crops"]["sizes"] == [28, 16]
    assert [r["variant"] for r in record["rows"]] == ["fp32", "bf16-cl"]
    for row in record["rows"]:
        assert row["peak_rss_gib"] > 0 and len(row["step_times_s"]) == 2
    assert record["loss_tolerance"] == 0.01 and record["rows"][1]["within_tolerance"] is True
    assert "bf16-cl: |dloss|" in text and "within tolerance" in text


def test_train_step_benchmark_tolerance_refuses_codes_that_moved():
    """The stated tolerance can fail: a code table with a tenth of every row's mass moved elsewhere is out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_step as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    torch = pytest.importorskip("torch")
    codes = torch.softmax(torch.randn(2, 16, 30, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert bench.agreement(5.0, codes, (5.0, codes))["within_tolerance"]
    moved = 0.9 * codes + 0.1 * torch.roll(codes, 1, dims=-1)
    result = bench.agreement(5.0, moved, (5.0, codes))
    assert 0.1 < result["codes_mean_row_l1_vs_fp32"] and not result["within_tolerance"]
    assert not bench.agreement(5.02, codes, (5.0, codes))["within_tolerance"]


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_end_to_end_benchmark(tmp_path):
    out = tmp_path / "e.json"
    text = run_script("end_to_end.py", "--steps", "20", "--warmup", "10", "--repeats", "1",
                      "--set", "optim.batch_size_per_device=16", "--json", str(out))
    assert "same steps on pre-made crops" in text
    record = json.loads(out.read_text())
    check_machine(record)
    assert record["overrides"] == ["optim.batch_size_per_device=16"] and record["batch"] == 16
    assert record["peak_rss_gib"]["engine"] > 0 and record["peak_rss_gib"]["premade"] > 0
    assert len(record["engine_runs"][0]) == len(record["premade_runs"][0]) == 2  # 20 steps: two 10-step intervals


def test_end_to_end_benchmark_refuses_steps_it_cannot_time_alike():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "end_to_end.py"), "--steps", "25"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "multiples of 10" in done.stderr


def test_gpu_benchmark_script_runs_every_path_on_the_cpu(tmp_path):
    """The one-command GPU benchmark, with CUDA calls as no-ops (--smoke-cpu): a lent GPU's minutes are too
    scarce to find out there that the script no longer runs."""
    photos = make_photos(tmp_path / "photos", 4, 150, 200)
    out = tmp_path / "g.json"
    text = run_script("gpu_train_step.py", "--smoke-cpu", "--batch-sizes", "2", "--steps", "1", "--warmup", "0",
                      "--data", str(photos), "--workers", "1", "--skip-fp32", "--work-dir", str(tmp_path / "work"),
                      "--json", str(out), "--engine-steps", "2", "--engine-prefetch", "0", timeout=600)
    assert "host-device synchronisations per call" in text
    record = json.loads(out.read_text())
    check_machine(record)
    inputs = [row["input"] for row in record["rows"]]
    assert inputs[0] == "synthetic" and any(i.startswith("jpeg") for i in inputs)
    assert not [row["error"] for row in record["rows"] if "error" in row]  # a failed row is recorded, not raised
    assert all("peak_gib" in row for row in record["rows"])
    # swav pretrain itself (what gpu_check.sh's first call measures) ran its steps
    engine = [row for row in record["rows"] if row["input"].startswith("swav pretrain")]
    assert len(engine) == 1 and engine[0]["status"] == "max_steps" and engine[0]["steps"] == 2
    assert 0 < engine[0]["wall_s"] < record["wall_s"]

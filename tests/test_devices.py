"""The engine on every device this machine has: the CPU always, a CUDA GPU as well where one is present (CI has
none; a GPU machine runs the same file). Every precision trains from JPEG files through the ``device`` pipeline
(nvJPEG + roi_align on a GPU), a run stopped and resumed ends in the state of a straight run, and the deferred
check skips a NaN step on the device and names it one step later."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from swav.checkpoint import list_checkpoints, load_checkpoint
from swav.config import with_values
from swav.device_crops import DeviceMultiCrop
from swav.health import NonFiniteError
from swav.multicrop import CropGroup
from swav.train import train
from tests.train_helpers import DEVICES, final_state, tiny_config, tiny_model

# fp16 needs a GPU (on a CPU the engine falls back to bf16/fp32 with a warning)
CASES = [(d, p) for d in DEVICES for p in ("fp32", "bf16", "fp16") if p != "fp16" or d == "cuda"]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(3)
    for i in range(20):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((40, 30), Image.BICUBIC)
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=90)
        (root / f"{i:02d}.jpg").write_bytes(buffer.getvalue())
    return root


@pytest.fixture(autouse=True)
def _deterministic_cudnn(monkeypatch):
    """Resume is compared exactly: cuDNN must pick the same (deterministic) algorithms in every run."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def _config(out, data, device, precision, **values):
    return tiny_config(out, data, **{"run.device": device, "run.precision": precision, "data.pipeline": "device",
                                     "run.cudnn_benchmark": False, "run.channels_last": True, **values})


@pytest.mark.parametrize("device,precision", CASES)
def test_every_precision_trains_and_resumes_to_the_straight_run(tmp_path, jpeg_folder, device, precision):
    straight = train(_config(tmp_path / "straight", jpeg_folder, device, precision, **{"run.max_steps": 6}),
                     model_builder=tiny_model)
    assert straight.status == "max_steps" and straight.step == 6
    train(_config(tmp_path / "split", jpeg_folder, device, precision, **{"run.max_steps": 3}),
          model_builder=tiny_model)
    resumed = train(_config(tmp_path / "split", jpeg_folder, device, precision, **{"run.max_steps": 6}),
                    model_builder=tiny_model, resume=True)
    assert resumed.step == 6
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    for key, value in a["model"].items():
        assert value.device.type == "cpu"  # checkpoints load anywhere
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
        assert torch.equal(value, b["model"][key]), key
    if precision == "fp16":  # the gradient scaler's state travels with the checkpoint
        assert a["scaler"]["scale"] == b["scaler"]["scale"] and a["scaler"]["scale"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_deferred_check_stops_at_the_nan_step_with_nothing_saved_after_it(tmp_path, jpeg_folder, device):
    cfg = _config(tmp_path, jpeg_folder, device, "bf16", **{"debug.inject_nan_step": 4,
                                                            "run.checkpoint_every_steps": 3,
                                                            "run.check_sync": "deferred"})
    with pytest.raises(NonFiniteError) as info:
        train(cfg, model_builder=tiny_model)
    assert info.value.step == 4 and "in step 4" in str(info.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt"]
    last = load_checkpoint(tmp_path / "checkpoints" / "step_00000003.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert train(with_values(cfg, {"debug.inject_nan_step": -1, "run.max_steps": 5}), model_builder=tiny_model,
                 resume=True).step == 5


@pytest.mark.parametrize("device", DEVICES)
def test_decoding_never_overwrites_memory_that_queued_kernels_still_read(device):
    """Images freed while kernels reading them are still queued (a stalled stream, as when the host runs a step
    ahead of the GPU) keep their values: the decoder is not handed their memory before those reads are done."""
    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((500, 375), Image.BICUBIC).save(buffer, "JPEG", quality=90)
    encoded = [torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)] * 4
    cropper = DeviceMultiCrop([CropGroup(32, 2, 0.14, 1.0), CropGroup(16, 2, 0.05, 0.14)], seed=0, device=device)
    cropper(encoded, range(4))
    wrong = 0
    for _ in range(10):
        victims = [torch.ones((3, 375, 500), dtype=torch.uint8, device=device) for _ in range(4)]  # decoded size
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda._sleep(100_000_000)  # keeps the reads below queued while the host goes on
        sums = [v.sum(dtype=torch.int64) for v in victims]
        del victims
        crops = cropper(encoded, range(4))
        wrong += sum(int(s) != 3 * 375 * 500 for s in sums)
        assert [c.shape[-1] for c in crops] == [32, 32, 16, 16]
    assert wrong == 0


@pytest.mark.parametrize("device", DEVICES)
def test_batches_made_in_a_background_thread_train_like_inline_ones(tmp_path, jpeg_folder, device):
    """``data.prefetch_batches`` (auto: 1 on a GPU): decode, crops and colour in a thread, same training."""
    states = []
    for prefetch in (0, 2):
        out = tmp_path / f"p{prefetch}"
        result = train(_config(out, jpeg_folder, device, "bf16", **{"run.max_steps": 5,
                                                                    "data.prefetch_batches": prefetch}),
                       model_builder=tiny_model)
        assert result.step == 5
        states.append(final_state(out)["model"])
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts host-device synchronisations on a CUDA GPU")
def test_the_tensor_pipeline_makes_its_crops_on_a_gpu_without_synchronising():
    """The in-memory data sets' pipeline (Fashion-MNIST, CIFAR) draws on the host and copies to the GPU: every copy
    goes through pinned memory, so none waits for the step queued before it."""
    from swav.tensor_multicrop import TensorMultiCrop

    groups = [CropGroup(32, 2, 0.14, 1.0), CropGroup(16, 4, 0.05, 0.14)]
    multicrop = TensorMultiCrop(groups, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), blur_prob=0.5)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, device="cuda")
    multicrop(images, torch.Generator().manual_seed(0))  # first use: the constants reach the GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        crops = multicrop(images, torch.Generator().manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = multicrop(images.cpu(), torch.Generator().manual_seed(1))
    for got, expected in zip(crops, want, strict=True):
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=0)

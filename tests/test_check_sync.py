"""``run.check_sync`` (issue "Speed": no host-device synchronisation inside the step): the deferred mode reads a
step's flags one step later, skips a non-finite step's update on the device, and otherwise trains exactly like
the per-step mode. Run on the CPU, where both modes are available, and on a CUDA GPU as well where one is present."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from swav.config import with_values
from swav.health import NonFiniteError
from swav.lars import LARS
from swav.model import ModelSpec
from swav.train_step import SwAVStep, resolve_channels_last, resolve_check_sync
from tests.train_helpers import DEVICES, tiny_config, tiny_model

STEPS = 5


def _step_fn(tmp_path, check_sync: str, device: str = "cpu", **values) -> SwAVStep:
    cfg = tiny_config(tmp_path, **{"run.check_sync": check_sync, "run.device": device, **values})
    torch.manual_seed(0)
    raw = tiny_model(ModelSpec(backbone="tiny", hidden_dim=16, output_dim=8, num_prototypes=(10,))).to(device)
    return SwAVStep(raw, raw, LARS(raw.parameters(), lr=0.0), config=cfg, lr_schedule=np.full(STEPS + 2, 0.3),
                    queue_length_per_rank=0, precision="fp32", device=torch.device(device), rank=0)


def _crops(k: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return [torch.randn(4, 3, size, size, generator=g).to(device) for size in (12, 12, 8, 8)]


def _params(step_fn: SwAVStep) -> list[torch.Tensor]:
    return [p.detach().clone() for p in step_fn.raw_model.parameters()]


def _assert_unchanged(step_fn: SwAVStep, before: list[torch.Tensor]) -> None:
    """Parameters as before, except that every step starts by re-normalising the prototypes."""
    for (name, p), b in zip(step_fn.raw_model.named_parameters(), before):
        if name.startswith("prototypes"):  # normalising twice may move the last bit
            torch.testing.assert_close(p.detach(), torch.nn.functional.normalize(b, dim=1), rtol=0, atol=1e-6)
        else:
            assert torch.equal(p.detach(), b), name


@pytest.mark.parametrize("device", DEVICES)
def test_deferred_trains_exactly_like_per_step_checks(tmp_path, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    runs = {}
    for mode in ("step", "deferred"):
        step_fn = _step_fn(tmp_path / mode, mode, device)
        assert step_fn.check_sync == mode
        losses = [float(step_fn(_crops(k, device), k).loss) for k in range(STEPS)]
        step_fn.flush()
        runs[mode] = (losses, _params(step_fn))
    assert runs["step"][0] == runs["deferred"][0]
    for a, b in zip(runs["step"][1], runs["deferred"][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_deferred_skips_the_bad_update_and_raises_one_step_later_naming_the_bad_step(tmp_path, device):
    step_fn = _step_fn(tmp_path, "deferred", device, **{"debug.inject_nan_step": 3})
    for k in range(2):
        step_fn(_crops(k, device), k)
    before = _params(step_fn)
    momentum = [step_fn.optimizer.state[p]["momentum_buffer"].clone() for p in step_fn.raw_model.parameters()]
    out = step_fn(_crops(2, device), 2)  # step 3: NaN loss, not raised yet (no host sync in this step)
    assert not torch.isfinite(out.loss)
    _assert_unchanged(step_fn, before)  # the update was skipped on the device
    for p, m in zip(step_fn.raw_model.parameters(), momentum):
        assert torch.equal(step_fn.optimizer.state[p]["momentum_buffer"], m)
    with pytest.raises(NonFiniteError) as info:
        step_fn(_crops(3, device), 3)
    assert info.value.step == 3 and "in step 3" in str(info.value)
    assert "backbone.0.weight" in info.value.parameter_names
    _assert_unchanged(step_fn, before)  # and step 4's update was not queued either


def test_flush_raises_for_a_bad_last_step_and_carries_stop_flags(tmp_path):
    step_fn = _step_fn(tmp_path, "deferred", **{"debug.inject_nan_step": 2})
    step_fn(_crops(0), 0)
    step_fn(_crops(1), 1)
    with pytest.raises(NonFiniteError):
        step_fn.flush()
    step_fn = _step_fn(tmp_path, "deferred")
    first = step_fn(_crops(0), 0, stop_signal=15, time_over=True)
    assert (first.stop_signal, first.time_over) == (0, False)  # read one step later
    step_fn.flush()  # e.g. a checkpoint in between: the flags are kept for the next output
    second = step_fn(_crops(1), 1)
    assert (second.stop_signal, second.time_over) == (15, True)
    assert (step_fn(_crops(2), 2).stop_signal, step_fn.flush()) == (0, None)


def test_auto_is_per_step_on_cpu_and_deferred_needs_fused_lars_without_fp16(tmp_path):
    layer = torch.nn.Linear(3, 2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_check_sync("auto", cpu, LARS(layer.parameters(), lr=0.1), fp16=False) == "step"
    assert resolve_check_sync("auto", cuda, LARS(layer.parameters(), lr=0.1), fp16=False) == "deferred"
    assert resolve_check_sync("auto", cuda, LARS(layer.parameters(), lr=0.1), fp16=True) == "step"
    sgd = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    assert resolve_check_sync("auto", cuda, sgd, fp16=False) == "step"
    for optimizer, fp16 in ((sgd, False), (LARS(layer.parameters(), lr=0.1, fused=False), False),
                            (LARS(layer.parameters(), lr=0.1), True)):
        with pytest.raises(ValueError, match="run.check_sync=step"):
            resolve_check_sync("deferred", cpu, optimizer, fp16=fp16)
    with pytest.raises(ValueError, match="run.check_sync"):
        with_values(tiny_config(tmp_path), {"run.check_sync": "later"})


@pytest.mark.parametrize("precision, expected", [("fp32", False), ("bf16", True)])
def test_the_automatic_layout_is_channels_last_for_bf16_and_contiguous_for_fp32_on_a_cpu(tmp_path, precision,
                                                                                         expected):
    """run.channels_last null (the default): bf16 convolutions are faster channels-last (the CPU default job's step
    1.25x), fp32 ones on a CPU are left as they are."""
    cfg = tiny_config(tmp_path)
    assert cfg.run.channels_last is None
    torch.manual_seed(0)
    raw = tiny_model(ModelSpec(backbone="tiny", hidden_dim=16, output_dim=8, num_prototypes=(10,)))
    step_fn = SwAVStep(raw, raw, LARS(raw.parameters(), lr=0.0), config=cfg, lr_schedule=np.full(3, 0.3),
                       queue_length_per_rank=0, precision=precision, device=torch.device("cpu"), rank=0)
    seen = []
    raw.register_forward_pre_hook(lambda module, args: seen.extend(args[0]))
    step_fn([x.contiguous() for x in _crops(0)], 0)
    layout = torch.channels_last if expected else torch.contiguous_format
    assert step_fn.channels_last is expected and all(x.is_contiguous(memory_format=layout) for x in seen)
    assert resolve_channels_last(None, torch.device("cuda"), "fp32") is True  # GPUs: always (tensor cores)
    assert resolve_channels_last(False, torch.device("cpu"), "bf16") is False  # an explicit setting wins


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_step_gives_the_model_the_memory_layout_asked_for(tmp_path, channels_last):
    """The CPU's OpenCV colour stage hands over channels-last crops; the model gets what ``run.channels_last``
    says (a channels-last input alone turns oneDNN's activations channels-last, slower in fp32)."""
    step_fn = _step_fn(tmp_path, "step", **{"run.channels_last": channels_last})
    seen = []
    step_fn.raw_model.register_forward_pre_hook(lambda module, args: seen.extend(args[0]))
    step_fn([x.contiguous(memory_format=torch.channels_last) for x in _crops(0)], 0)
    step_fn([x.contiguous() for x in _crops(1)], 1)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert len(seen) == 8 and all(x.is_contiguous(memory_format=layout) for x in seen)

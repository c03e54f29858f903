"""Health signals (SPEC §13): collapse warning near ln K, prototypes in use, NaN parameter names."""
from __future__ import annotations

import math

import torch
from torch import nn

from swav.health import CollapseMonitor, NonFiniteError, gradients_finite, nonfinite_parameter_names, prototypes_in_use
from swav.loss import swav_loss


def test_collapse_is_detected_at_ln_k_only_after_start_step():
    k = 3000
    collapsed = swav_loss(torch.zeros(2 * 8, k), num_crops=2).item()  # all embeddings equal: loss = ln K
    assert math.isclose(collapsed, math.log(k), rel_tol=1e-6)
    monitor = CollapseMonitor(math.log(k), start_step=100, patience=3)
    assert all(monitor.update(step, collapsed) is None for step in (10, 20, 30, 40))  # warm-up: ignored
    assert monitor.update(110, collapsed) is None and monitor.update(120, 7.0) is None  # streak broken
    assert monitor.update(130, collapsed) is None and monitor.update(140, collapsed) is None
    warning = monitor.update(150, collapsed * 1.01)
    assert warning is not None and "ln K = 8.006" in warning and "swav.epsilon" in warning
    assert "freeze_prototypes_steps" in warning and monitor.update(160, collapsed) is None  # warns once


def test_prototypes_in_use_counts_distinct_argmax():
    codes = torch.zeros(2, 5, 7)
    codes[0, torch.arange(5), torch.tensor([0, 0, 3, 3, 6])] = 1.0
    codes[1, torch.arange(5), torch.tensor([1, 1, 1, 1, 1])] = 1.0
    assert prototypes_in_use(codes) == 4
    assert prototypes_in_use(torch.full((1, 4, 10), 0.1)) == 1  # uniform codes: a single winner


def test_nonfinite_gradients_are_named():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net(torch.randn(5, 3)).sum().backward()
    assert bool(gradients_finite(net.parameters()))
    net[1].weight.grad[0, 0] = float("inf")
    assert not bool(gradients_finite(net.parameters()))
    assert nonfinite_parameter_names(net.named_parameters()) == ["1.weight"]
    error = NonFiniteError(12, float("nan"), ["1.weight"])
    assert "in step 12" in str(error) and "1.weight" in str(error) and "step 11 or earlier" in str(error)


def test_a_loss_above_ln_k_is_reported_as_not_learning():
    k = 300
    monitor = CollapseMonitor(math.log(k), start_step=0, patience=3)
    assert monitor.update(1, 9.0) is None and monitor.update(2, 6.5) is None
    warning = monitor.update(3, 10.4)
    assert warning is not None and "not learning" in warning and "optim.base_lr" in warning
    assert monitor.update(4, 10.0) is None  # once
    nan = CollapseMonitor(math.log(k), start_step=100, nan_check=False)
    first = nan.update(5, float("nan"))  # before start_step too
    assert first is not None and "nan" in first and "run.nan_check=false" in first
    assert nan.update(6, float("inf")) is None
    # with the NaN check on, the step is skipped and the run stops with NonFiniteError: nothing to add here
    assert CollapseMonitor(math.log(k), start_step=0).update(5, float("nan")) is None


def test_nan_error_prints_entry_counts_as_integers_for_every_head():
    text = str(NonFiniteError(5, float("nan"), [], terms={"head 0 l(0,1)": 1.23456,
                                                          "head 0 non-finite scores(0)": 123456.0}))
    assert "head 0 non-finite scores(0) = 123456" in text and "head 0 l(0,1) = 1.235" in text


def test_collapse_advice_names_the_temperature_and_the_loss_floor():
    from swav.health import COLLAPSE_ADVICE, loss_floor
    assert "swav.temperature" in COLLAPSE_ADVICE and "shorten" in COLLAPSE_ADVICE
    # floor = -log softmax(cosines / T) of the right prototype, with cosine 1 to it and -1 to the others
    k, t = 7, 0.5
    cosines = -torch.ones(k, dtype=torch.float64)
    cosines[0] = 1.0
    direct = -torch.log_softmax(cosines / t, dim=0)[0].item()
    assert math.isclose(loss_floor(k, t), direct, rel_tol=1e-12)
    assert loss_floor(300, 5.0) > 0.9 * math.log(300) > loss_floor(300, 1.0)

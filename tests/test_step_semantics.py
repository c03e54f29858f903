"""What the training step does with the config (SPEC §3-§6, §9): the loss settings reach the loss, the queue is
filled with the assignment crops' embeddings and used once full (one queue per assignment crop, each head scored
with its own prototypes), frozen prototypes do not move under any optimiser, and the engine builds LARS with the
configured settings. Each is checked against the building blocks called directly, not against the engine itself."""
import numpy as np
import pytest
import torch

from swav.lars import LARS
from swav.loss import swav_loss
from swav.model import ModelSpec
from swav.train_step import SwAVStep
from tests.train_helpers import tiny_config, tiny_model


def _step(tmp_path, values, heads=(10,)):
    cfg = tiny_config(tmp_path, **values)
    raw = tiny_model(ModelSpec(backbone="tiny", hidden_dim=16, output_dim=8, num_prototypes=heads))
    step_fn = SwAVStep(raw, raw, LARS(raw.parameters(), lr=0.0), config=cfg, lr_schedule=np.zeros(10),
                       queue_length_per_rank=cfg.swav.queue_length, precision="fp32", device=torch.device("cpu"),
                       rank=0)
    seen = []
    raw.register_forward_hook(lambda m, i, o: seen.append(o))
    return cfg, raw, step_fn, seen


def _crops(k):
    g = torch.Generator().manual_seed(k)
    return [torch.randn(4, 3, 12, 12, generator=g) for _ in range(2)] + \
           [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


# --- the step passes the configured temperature, epsilon, iterations, assignment crops, log_domain (T9-T12, T16)
def test_step_uses_the_configured_loss_hyperparameters(tmp_path):
    values = {"swav.temperature": 0.25, "swav.epsilon": 0.002, "swav.sinkhorn_iterations": 5,
              "swav.crops_for_assign": [1, 2], "swav.log_domain": True}
    cfg, raw, step_fn, seen = _step(tmp_path, values)
    out = step_fn(_crops(0), 0)
    o = seen[-1]
    loss, codes = swav_loss([s.detach() for s in o.scores], 4, (1, 2), temperature=0.25, epsilon=0.002,
                            sinkhorn_iterations=5, log_domain=True, return_codes=True)
    torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.codes_ABK, codes[0], atol=1e-6, rtol=1e-5)


# --- queue semantics inside the step (T5, T7, T8, T15): push the assignment crops, use only when full,
#     one queue per assignment crop, each head scored with its own prototypes
def test_queue_is_pushed_used_when_full_and_scored_per_crop_and_head(tmp_path):
    cfg, raw, step_fn, seen = _step(tmp_path, {"swav.queue_length": 8, "swav.queue_start_epoch": 0},
                                    heads=(10, 10))
    step_fn.start_epoch(0)
    for k in range(4):
        before, full = step_fn.queue.embeddings.clone(), step_fn.queue.is_full
        assert full == (k >= 2)
        out = step_fn(_crops(k), k)
        o = seen[-1]
        z = o.embeddings.detach()
        for i, a in enumerate((0, 1)):
            assert torch.equal(step_fn.queue.embeddings[i, :4], z[a * 4:(a + 1) * 4])
        queue_scores = [[before[i] @ w.detach().t() for i in range(2)] for w in raw.prototypes.weights()] \
            if full else None
        expected = swav_loss([s.detach() for s in o.scores], 4, (0, 1), queue_scores=queue_scores)
        torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


# --- freezing drops the gradients (None), so that no optimiser touches the prototypes (T14: zero_() instead)
@pytest.mark.parametrize("lars", [True, False])
def test_frozen_prototypes_do_not_move_with_any_optimiser(tmp_path, lars):
    cfg, raw, _, _ = _step(tmp_path, {"swav.freeze_prototypes_steps": 2, "optim.lars": lars})
    params = list(raw.parameters())
    opt = LARS(params, lr=0.5, weight_decay=0.1) if lars else torch.optim.SGD(params, lr=0.5, momentum=0.9,
                                                                              weight_decay=0.1)
    step_fn = SwAVStep(raw, raw, opt, config=cfg, lr_schedule=np.full(10, 0.5), queue_length_per_rank=0,
                       precision="fp32", device=torch.device("cpu"), rank=0)
    raw.normalize_prototypes()
    start = raw.prototypes.weight.detach().clone()
    for k in range(3):
        step_fn(_crops(k), k)
        moved = (raw.prototypes.weight.detach() - start).abs().max()
        assert (moved < 1e-7) == (k < 2), (k, moved)


# --- the engine builds LARS with the configured weight decay, momentum and trust coefficient (TR1, TR2)
def test_optimiser_takes_the_configured_lars_settings():
    from swav.config import Config, with_values
    from swav.train import _optimizer
    cfg = with_values(Config(), {"optim.weight_decay": 1e-4, "optim.trust_coefficient": 0.02, "optim.momentum": 0.8})
    raw = tiny_model(ModelSpec(backbone="tiny", hidden_dim=16, output_dim=8, num_prototypes=(10,)))
    opt = _optimizer(raw, cfg)
    assert opt.trust_coefficient == 0.02
    assert all((g["lars_weight_decay"], g["momentum"]) == (1e-4, 0.8) for g in opt.param_groups)

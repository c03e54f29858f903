import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swav.loss import SwAVLoss, swav_loss
from tests.test_sinkhorn import naive_sinkhorn, numpy_sinkhorn, one_confident_sample


def naive_loss(scores, num_crops, assign, tau, eps, iters, queue=None):
    """Per-pair loop reference of SPEC §4/§5 in float64 numpy."""
    s = scores.detach().double().numpy()
    B = s.shape[0] // num_crops
    total = 0.0
    for i, a in enumerate(assign):
        block = s[a * B:(a + 1) * B]
        if queue is not None and queue[i] is not None:
            block = np.concatenate([queue[i].double().numpy(), block])
        q = naive_sinkhorn(block, eps, iters)[-B:]
        sub = 0.0
        for v in range(num_crops):
            if v == a:
                continue
            x = s[v * B:(v + 1) * B] / tau
            logp = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
            sub += -np.mean(np.sum(q * logp, axis=1))
        total += sub / (num_crops - 1)
    return total / len(assign)


def cosine_scores(n, K, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, D, generator=g), dim=1) @ F.normalize(torch.randn(K, D, generator=g), dim=1).t()


@pytest.mark.parametrize("V,B,K,assign", [(2, 5, 7, (0, 1)), (8, 4, 12, (0, 1)), (4, 3, 6, (2,)), (3, 6, 5, (0, 1, 2))])
def test_matches_naive_loop(V, B, K, assign):
    scores = cosine_scores(V * B, K)
    got = swav_loss(scores.double(), V, assign, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)
    assert abs(got.item() - naive_loss(scores, V, assign, 0.1, 0.05, 3)) < 1e-6


def test_matches_naive_loop_with_queue():
    V, B, K, L = 4, 3, 9, 12
    scores = cosine_scores(V * B, K).double()
    queue = [cosine_scores(L, K, seed=1).double(), cosine_scores(L, K, seed=2).double()]
    got = swav_loss(scores, V, (0, 1), queue_scores=queue)
    assert abs(got.item() - naive_loss(scores, V, (0, 1), 0.1, 0.05, 3, queue)) < 1e-6
    # the queue really changes the codes
    assert abs(got.item() - swav_loss(scores, V, (0, 1)).item()) > 1e-4


def test_identical_embeddings_give_ln_k():
    K = 3000
    z = F.normalize(torch.ones(8 * 16, 128), dim=1)
    protos = F.normalize(torch.randn(K, 128), dim=1)
    loss = swav_loss(z @ protos.t(), num_crops=8)
    # identical rows: codes are uniform 1/K after Sinkhorn; the loss is then logsumexp - mean,
    # which is ln K exactly when the prototype scores are uniform too
    logp = F.log_softmax((z[:1] @ protos.t()) / 0.1, dim=1)
    assert abs(loss.item() - (-logp.mean().item())) < 1e-5
    uniform = swav_loss(torch.zeros(8 * 16, K), num_crops=8)
    assert abs(uniform.item() - math.log(K)) < 1e-5


def test_gradients_reach_scores_not_codes():
    scores = cosine_scores(4 * 5, 6).requires_grad_()
    loss, codes = swav_loss(scores, 4, return_codes=True)
    assert not codes.requires_grad
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    # the analytic gradient w.r.t. crop v's scores is (softmax - mean of targets)/tau/B/...: check
    # by finite differences on one entry
    eps = 1e-6
    s = scores.detach().double()
    i, k = 7, 2
    plus, minus = s.clone(), s.clone()
    plus[i, k] += eps
    minus[i, k] -= eps
    # hold codes fixed: recompute loss with the codes of the unperturbed scores
    def fixed_code_loss(x):
        B = 5
        total = 0.0
        for ai, a in enumerate((0, 1)):
            q = codes[ai].double()
            terms = [-(q * F.log_softmax(x[v * B:(v + 1) * B] / 0.1, dim=1)).sum(1).mean() for v in range(4) if v != a]
            total += sum(terms) / 3
        return total / 2
    numeric = (fixed_code_loss(plus) - fixed_code_loss(minus)) / (2 * eps)
    assert abs(numeric.item() - scores.grad[i, k].item()) < 1e-5


def test_multi_head_is_mean_over_heads():
    a, b = cosine_scores(12, 5), cosine_scores(12, 7, seed=3)
    both = swav_loss([a, b], num_crops=3)
    assert abs(both.item() - (swav_loss(a, 3).item() + swav_loss(b, 3).item()) / 2) < 1e-6


def test_module_and_bad_arguments():
    crit = SwAVLoss(num_crops=4, crops_for_assign=(0, 1))
    scores = cosine_scores(8, 5)
    assert torch.isclose(crit(scores), swav_loss(scores, 4))
    with pytest.raises(ValueError, match="crops_for_assign"):
        SwAVLoss(num_crops=2, crops_for_assign=(0, 2))
    with pytest.raises(ValueError, match="crops_for_assign"):
        swav_loss(scores, 4, crops_for_assign=(1, 1))
    with pytest.raises(ValueError, match="num_crops"):
        swav_loss(cosine_scores(9, 5), 4)


def test_bf16_scores_close_to_fp32():
    scores = cosine_scores(8 * 32, 100)
    fp32 = swav_loss(scores, 8)
    bf16 = swav_loss(scores.bfloat16(), 8)
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 2e-2 * fp32.item()


def test_scores_of_the_wrong_shape_are_refused():
    import pytest

    from swav import swav_loss

    with pytest.raises(ValueError, match=r"scores has shape \(12,\): expected \(V\*B\) x K"):
        swav_loss(torch.randn(12), num_crops=4)
    with pytest.raises(ValueError, match=r"scores has shape \(4, 3, 10\)"):
        swav_loss(torch.randn(4, 3, 10), num_crops=4)
    with pytest.raises(ValueError, match="queue_scores has 1 entries for 2 prototype heads"):
        swav_loss([torch.randn(12, 10), torch.randn(12, 10)], num_crops=4, queue_scores=[[None, None]])
    with pytest.raises(ValueError, match="not a positive multiple"):
        swav_loss(torch.randn(0, 10), num_crops=4)


# --- loss: every hyper-parameter reaches the math (L1, L3, L4) and log_domain reaches Sinkhorn (L9)
@pytest.mark.parametrize("tau,eps,iters", [(0.25, 0.03, 1), (0.05, 0.1, 5)])
def test_loss_matches_naive_loop_at_other_hyperparameters(tau, eps, iters):
    V, B, K = 4, 5, 7
    scores = cosine_scores(V * B, K)
    got = swav_loss(scores.double(), V, (0, 1), temperature=tau, epsilon=eps, sinkhorn_iterations=iters)
    assert abs(got.item() - naive_loss(scores, V, (0, 1), tau, eps, iters)) < 1e-6


def test_loss_codes_at_small_epsilon_are_exact():
    s = one_confident_sample(B=64, K=300)
    _, codes = swav_loss(torch.cat([s, s.flip(0)]), 2, (0,), epsilon=0.005, return_codes=True)
    np.testing.assert_allclose(codes[0].double().numpy(), numpy_sinkhorn(s.double().numpy(), 0.005, 3),
                               atol=1e-5, rtol=1e-3)

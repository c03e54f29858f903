import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swav.sinkhorn import needs_log_domain, sinkhorn_knopp
from tests.distributed_helpers import run_distributed


def naive_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """SPEC §3 written the slow obvious way, float64 loops, no max subtraction."""
    B, K = scores.shape
    Q = [[math.exp(scores[b, k] / epsilon) for b in range(B)] for k in range(K)]
    total = sum(sum(row) for row in Q)
    Q = [[q / total for q in row] for row in Q]
    for _ in range(iterations):
        for k in range(K):
            s = sum(Q[k])
            Q[k] = [q / s / K for q in Q[k]]
        for b in range(B):
            s = sum(Q[k][b] for k in range(K))
            for k in range(K):
                Q[k][b] = Q[k][b] / s / B
    return np.array([[Q[k][b] * B for k in range(K)] for b in range(B)])


def unit_scores(B: int, K: int, D: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, D, generator=g), dim=1)
    c = F.normalize(torch.randn(K, D, generator=g), dim=1)
    return z @ c.t()


@pytest.mark.parametrize("B,K", [(1, 1), (1, 10), (7, 10), (7, 1), (256, 10), (7, 3000), (1, 3000)])
def test_matches_naive_reference(B, K):
    scores = unit_scores(B, K)
    expected = naive_sinkhorn(scores.double().numpy(), 0.05, 3)
    got = sinkhorn_knopp(scores.double(), epsilon=0.05, iterations=3)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=1e-6)
    got32 = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), expected, atol=1e-6, rtol=1e-4)


def test_matches_naive_reference_large_batch_many_prototypes():
    # B=256, K=3000 with a vectorised float64 numpy reference (the loop version is too slow)
    scores = unit_scores(256, 3000).double()
    Q = np.exp(scores.numpy() / 0.05).T
    Q /= Q.sum()
    K, B = Q.shape
    for _ in range(3):
        Q /= Q.sum(axis=1, keepdims=True); Q /= K
        Q /= Q.sum(axis=0, keepdims=True); Q /= B
    np.testing.assert_allclose(sinkhorn_knopp(scores).numpy(), (Q * B).T, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("log_domain", [False, True])
def test_rows_sum_to_one_and_equipartition(log_domain):
    B, K = 64, 16
    codes = sinkhorn_knopp(unit_scores(B, K), iterations=100, log_domain=log_domain)
    torch.testing.assert_close(codes.sum(1), torch.ones(B), atol=1e-5, rtol=0)
    assert (codes.sum(0) - B / K).abs().max() < 1e-3


def test_shift_invariance():
    scores = unit_scores(32, 20)
    torch.testing.assert_close(sinkhorn_knopp(scores), sinkhorn_knopp(scores + 3.7), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_finite_and_fp32(dtype):
    codes = sinkhorn_knopp(unit_scores(64, 3000).to(dtype))
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(64), atol=1e-4, rtol=0)


def numpy_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """SPEC §3 vectorised in float64, no max subtraction (exp(1 / 0.005) = e^200 is a float64 number)."""
    Q = np.exp(scores / epsilon).T
    Q /= Q.sum()
    K, B = Q.shape
    for _ in range(iterations):
        Q /= Q.sum(axis=1, keepdims=True); Q /= K
        Q /= Q.sum(axis=0, keepdims=True); Q /= B
    return (Q * B).T


def one_confident_sample(B: int = 256, K: int = 3000, D: int = 128) -> torch.Tensor:
    """Cosines of a batch where one sample sits close to a prototype (cosine about 0.9) and the rest are spread:
    the global maximum is far above every other sample's best score."""
    g = torch.Generator().manual_seed(3)
    c = F.normalize(torch.randn(K, D, generator=g), dim=1)
    z = F.normalize(torch.randn(B, D, generator=g), dim=1)
    z[0] = F.normalize(c[0] + 0.3 * F.normalize(torch.randn(D, generator=g), dim=0), dim=0)
    return z @ c.t()


@pytest.mark.parametrize("epsilon", [0.05, 0.03, 0.01, 0.005])
def test_default_codes_are_exact_at_small_epsilon(epsilon):
    scores = one_confident_sample()
    expected = numpy_sinkhorn(scores.double().numpy(), epsilon, 3)
    codes = sinkhorn_knopp(scores, epsilon=epsilon)  # float32, log_domain=None (automatic)
    np.testing.assert_allclose(codes.double().numpy(), expected, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(codes.sum(1), torch.ones(len(scores)), atol=1e-4, rtol=0)


def test_the_exp_form_underflows_where_the_default_leaves_it():
    # the data above really exercises the underflow: forced exp form at eps 0.005 zeroes whole rows
    scores = one_confident_sample()
    forced = sinkhorn_knopp(scores, epsilon=0.005, log_domain=False)
    assert (forced.sum(1) < 0.5).sum() > 100
    assert needs_log_domain(0.005) and needs_log_domain(0.02) and not needs_log_domain(0.03)
    assert not needs_log_domain(0.005, torch.float64)
    # at eps 0.03 (the small-data advice of SPEC §13) the exp form is exact
    np.testing.assert_allclose(sinkhorn_knopp(scores, epsilon=0.03, log_domain=False).double().numpy(),
                               numpy_sinkhorn(scores.double().numpy(), 0.03, 3), atol=1e-5, rtol=1e-3)


def test_tiny_epsilon_in_the_log_domain_is_finite():
    codes = sinkhorn_knopp(unit_scores(128, 300), epsilon=0.001, log_domain=True)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(128), atol=1e-4, rtol=0)


def test_log_domain_matches_exp_domain():
    scores = unit_scores(50, 40)
    torch.testing.assert_close(
        sinkhorn_knopp(scores.double(), log_domain=True), sinkhorn_knopp(scores.double()), atol=1e-9, rtol=1e-7
    )


def test_no_gradient_and_bad_arguments():
    scores = unit_scores(8, 4).requires_grad_()
    assert not sinkhorn_knopp(scores).requires_grad
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(scores, epsilon=0)
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_knopp(torch.randn(3))


def _distributed_codes(rank, world_size, scores, log_domain):
    rows = torch.tensor_split(scores, world_size)[rank]
    return sinkhorn_knopp(rows, epsilon=0.05, iterations=3, log_domain=log_domain)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_equals_single_process(world_size):
    scores = unit_scores(12, 30).double() * 5  # sharp scores: exercises the global max
    single = sinkhorn_knopp(scores)
    for log_domain in (False, True):
        parts = run_distributed(_distributed_codes, world_size, scores, log_domain)
        torch.testing.assert_close(torch.cat(parts), single, atol=1e-6, rtol=0)


# --- sinkhorn iterations=0 (S3)
def test_zero_iterations_is_the_scaled_kernel():
    s = unit_scores(7, 10).double()
    np.testing.assert_allclose(sinkhorn_knopp(s, iterations=0).numpy(), naive_sinkhorn(s.numpy(), 0.05, 0), rtol=1e-9)

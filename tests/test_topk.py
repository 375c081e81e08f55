"""Claims about shiva_export/topk.py: hard deterministic top-k (D7), soft ranks (Eq. 5, D6), STE gates (D5, Eq. 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiva_export.errors import ConfigError
from shiva_export.topk import (
    DifferentiableTopK,
    SoftRank,
    check_ratio,
    gather_rows,
    hard_topk_indices,
    inclusion_probability,
    scatter_rows,
    soft_rank,
)


def numpy_topk_reference(scores: np.ndarray, k: int) -> np.ndarray:
    """Descending score, ties to the lower index (stable sort of -s), then ascending token order."""
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return np.sort(order, axis=-1)


def naive_soft_rank(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 5 as written: r_i = 1 + sum_{j != i} sigmoid((s_j - s_i) / tau), through plain autograd."""
    num_tokens = scores.shape[-1]
    pairwise = torch.sigmoid((scores[:, None, :] - scores[:, :, None]) / tau)      # [B, i, j]
    off_diagonal = 1 - torch.eye(num_tokens, dtype=scores.dtype)
    return 1 + (pairwise * off_diagonal).sum(-1)


# --- hard top-k -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 16, 31, 32])
def test_hard_topk_keeps_exactly_k_distinct_tokens(k):
    scores = torch.randn(3, 32, generator=torch.Generator().manual_seed(k))
    indices = hard_topk_indices(scores, k)
    assert indices.shape == (3, k)
    assert indices.dtype == torch.int64
    for row in indices:
        assert len(set(row.tolist())) == k


def test_hard_topk_returns_indices_in_ascending_token_order():
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    indices = hard_topk_indices(scores, 20)
    assert bool((indices[:, 1:] > indices[:, :-1]).all())


def test_hard_topk_keeps_the_highest_scores():
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    indices = hard_topk_indices(scores, 20)
    kept = torch.gather(scores, 1, indices)
    dropped = scores.clone().scatter_(1, indices, float("-inf"))
    assert bool((kept.min(dim=1).values > dropped.max(dim=1).values).all())


def test_hard_topk_ties_go_to_the_lower_token_index():
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0]])
    assert hard_topk_indices(scores, 2).tolist() == [[1, 3]]
    assert hard_topk_indices(scores, 3).tolist() == [[1, 3, 4]]
    constant = torch.zeros(2, 9)
    assert hard_topk_indices(constant, 4).tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("k", [1, 7, 33, 64])
def test_hard_topk_equals_numpy_stable_argsort_reference(k):
    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 6, (16, 64), generator=gen).float()  # few levels: ties everywhere
    expected = numpy_topk_reference(scores.numpy(), k)
    np.testing.assert_array_equal(hard_topk_indices(scores, k).numpy(), expected)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_hard_topk_refuses_k_outside_1_to_n(k):
    with pytest.raises(ConfigError, match=rf"k={k} is out of range; expected 1 <= k <= N=10"):
        hard_topk_indices(torch.randn(2, 10), k)


@pytest.mark.parametrize("k", [2.0, torch.tensor(2)])
def test_hard_topk_refuses_k_that_is_not_a_python_int(k):
    with pytest.raises(ConfigError, match="k must be a Python int"):
        hard_topk_indices(torch.randn(2, 10), k)


@pytest.mark.parametrize("ratio", [0.0, -0.25, 1.5, float("nan"), torch.tensor([0.5, 1.01])])
def test_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ConfigError, match=r"keep ratio .* is outside \(0, 1\]"):
        check_ratio(ratio)


def test_differentiable_topk_refuses_ratio_outside_zero_one():
    with pytest.raises(ConfigError, match=r"keep ratio 0 is outside \(0, 1\]"):
        DifferentiableTopK()(torch.randn(1, 8, 4), torch.randn(1, 8), 0.0)


def test_ratio_of_exactly_one_is_accepted():
    check_ratio(1.0)
    check_ratio(torch.tensor([1e-6, 0.5, 1.0]))


# --- soft rank ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.05, 0.2, 1.0])
def test_soft_rank_matches_the_naive_pairwise_formula(tau):
    scores = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(soft_rank(scores, tau), naive_soft_rank(scores, tau), rtol=1e-12, atol=1e-12)


def test_soft_rank_is_one_for_the_top_score_and_n_for_the_bottom_when_well_separated():
    scores = torch.tensor([[0.0, 10.0, 20.0, 30.0]], dtype=torch.float64)
    torch.testing.assert_close(soft_rank(scores, 0.01), torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64))


def test_soft_rank_gradient_matches_the_naive_formula():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 25, dtype=torch.float64, generator=gen)
    weights = torch.randn(2, 25, dtype=torch.float64, generator=gen)
    ours, naive = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    (soft_rank(ours, 0.3, chunk=7) * weights).sum().backward()
    (naive_soft_rank(naive, 0.3) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, naive.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_soft_rank_passes_gradcheck_in_float64(chunk):
    scores = torch.randn(2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: SoftRank.apply(s, 0.5, chunk), (scores,))


def test_chunked_soft_rank_equals_unchunked_in_value_and_gradient():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 37, generator=gen)
    weights = torch.randn(2, 37, generator=gen)
    results = []
    for chunk in (5, 37, 1024):
        s = scores.clone().requires_grad_()
        ranks = soft_rank(s, 0.2, chunk=chunk)
        (ranks * weights).sum().backward()
        results.append((ranks.detach(), s.grad))
    for ranks, grad in results[1:]:
        torch.testing.assert_close(ranks, results[0][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-6)


# --- differentiable top-k (STE gates) ----------------------------------------------------------------------------


def _split_inputs(seed: int = 0, batch: int = 2, num_tokens: int = 12, dim: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_tokens, dim, generator=gen)
    scores = torch.randn(batch, num_tokens, generator=gen)
    return x, scores


@pytest.mark.parametrize("surrogate", [True, False])
def test_differentiable_topk_forward_values_equal_the_hard_split_exactly(surrogate):
    x, scores = _split_inputs()
    x.requires_grad_()
    scores.requires_grad_()
    ratio = torch.tensor([0.5, 0.5], requires_grad=True)
    kept, passed, indices, pi = DifferentiableTopK()(x, scores, ratio, surrogate=surrogate)
    expected_indices = hard_topk_indices(scores.detach(), 6)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(kept, gather_rows(x.detach(), expected_indices))
    assert torch.equal(passed, x.detach())
    assert (pi is None) == (not surrogate)


def test_differentiable_topk_uses_floor_of_n_times_ratio_when_k_is_not_given():
    x, scores = _split_inputs(num_tokens=12)
    kept, _, indices, _ = DifferentiableTopK()(x, scores, 0.45)   # 12 * 0.45 = 5.4
    assert kept.shape[1] == indices.shape[1] == 5


def test_inclusion_probability_follows_eq_30():
    ranks = torch.tensor([[1.0, 2.5, 4.0, 8.0]])
    pi = inclusion_probability(ranks, torch.tensor(0.5), tau_sel=0.1)
    torch.testing.assert_close(pi, torch.sigmoid((4 * 0.5 - ranks) / (0.1 * 4)))


def test_gradient_wrt_pi_is_the_residual_aware_ste_of_eq_7():
    """dL/dpi_i = <grad_sel_i, x_i> for kept tokens, -<grad_rej_i, x_i> for dropped ones."""
    x, scores = _split_inputs(seed=7, num_tokens=10, dim=4)
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(2, 10, 4, generator=gen)

    def block(rows):  # any non-linear function of the kept tokens
        return torch.tanh(rows) * 2 + rows.square()

    def loss_of(kept, passed, indices):
        return (scatter_rows(passed, indices, block(kept)) * weight).sum()

    scores.requires_grad_()     # pi is only part of the graph when something upstream is trained
    kept, passed, indices, pi = DifferentiableTopK(tau_rank=0.3, tau_sel=0.2)(x, scores, 0.4)
    (grad_pi,) = torch.autograd.grad(loss_of(kept, passed, indices), pi)

    kept_ref = gather_rows(x, indices).requires_grad_()
    passed_ref = x.clone().requires_grad_()
    grad_sel, grad_rej = torch.autograd.grad(loss_of(kept_ref, passed_ref, indices), (kept_ref, passed_ref))
    expected = -(grad_rej * x).sum(-1)
    expected = expected.scatter(1, indices, (grad_sel * gather_rows(x, indices)).sum(-1))
    dropped = torch.ones_like(expected, dtype=torch.bool).scatter(1, indices, False)
    assert bool((grad_rej.abs().sum(-1)[dropped] > 0).all())          # the example exercises both branches
    torch.testing.assert_close(grad_pi, expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_scores_and_the_ratio_through_pi():
    """Score gradient = soft-rank chain rule of Eq. 20; ratio gradient = sum_i g_i dpi_i/dr (Eq. 24)."""
    x, scores = _split_inputs(seed=9, num_tokens=10, dim=4)
    weight = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(10))
    scores.requires_grad_()
    ratio = torch.tensor([0.5, 0.5], requires_grad=True)
    tau_rank, tau_sel = 0.3, 0.2
    kept, passed, indices, pi = DifferentiableTopK(tau_rank, tau_sel)(x, scores, ratio)
    loss = (scatter_rows(passed, indices, torch.tanh(kept)) * weight).sum()
    grad_pi = torch.autograd.grad(loss, pi, retain_graph=True)[0]
    loss.backward()

    assert scores.grad is not None and bool(scores.grad.abs().sum() > 0)
    assert ratio.grad is not None and bool(ratio.grad.abs().sum() > 0)
    # dpi/dr = pi (1 - pi) / tau_sel (Eq. 30: N cancels)
    p = pi.detach()
    torch.testing.assert_close(ratio.grad, (grad_pi * p * (1 - p) / tau_sel).sum(-1), rtol=1e-5, atol=1e-7)
    reference = scores.detach().clone().requires_grad_()
    pi_ref = inclusion_probability(naive_soft_rank(reference, tau_rank), ratio.detach(), tau_sel)
    (pi_ref * grad_pi).sum().backward()
    torch.testing.assert_close(scores.grad, reference.grad, rtol=1e-4, atol=1e-6)


# --- row scatter formulations ----------------------------------------------------------------------------------

@pytest.mark.parametrize("batch, num_tokens, k", [(2, 64, 23), (3, 40, 40), (1, 17, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_where_row_scatter_gives_exactly_the_scatternd_result(batch, num_tokens, k, dtype):
    generator = torch.Generator().manual_seed(batch * 100 + k)
    base = torch.randn(batch, num_tokens, 8, generator=generator).to(dtype)
    indices = torch.stack([torch.randperm(num_tokens, generator=generator)[:k].sort().values for _ in range(batch)])
    rows = torch.randn(batch, k, 8, generator=generator)                      # fp32 rows: cast to base's dtype
    expected = scatter_rows(base, indices, rows, method="scatternd")
    got = scatter_rows(base, indices, rows, method="where")
    assert got.dtype == dtype and torch.equal(got, expected)
    untouched = torch.ones(batch, num_tokens, dtype=torch.bool)
    untouched[torch.arange(batch).unsqueeze(1), indices] = False
    assert torch.equal(got[untouched], base[untouched])


def test_unknown_row_scatter_method_is_refused():
    with pytest.raises(ValueError, match="row scatter method 'atomic' is unknown"):
        scatter_rows(torch.zeros(1, 4, 2), torch.tensor([[0, 2]]), torch.ones(1, 2, 2), method="atomic")

"""Claims about shiva_export/policy.py: ratio policy (Eqs. 10-11, D9), EMA budget (Eqs. 12-13, D10), strata (D11)."""

from __future__ import annotations

import math

import pytest
import torch

from shiva_export.errors import ConfigError
from shiva_export.policy import AdaptiveRatioPolicy, BudgetLoss, stratified_ratios, stratified_timesteps

NUM_LAYERS = 6
TIMESTEPS = torch.tensor([0.0, 1.0, 250.0, 500.0, 999.0, 1000.0])


def randomized_policy(target_keep: float = 0.6, r_min: float = 0.1, seed: int = 0) -> AdaptiveRatioPolicy:
    """A policy whose zero-initialised heads are replaced by large random weights: ratios spread far from target."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = AdaptiveRatioPolicy(NUM_LAYERS, target_keep=target_keep, r_min=r_min)
        for head in (policy.time_mlp[-1], policy.layer_mlp[-1]):
            torch.nn.init.normal_(head.weight, std=3.0)
            torch.nn.init.normal_(head.bias, std=3.0)
    return policy


@pytest.mark.parametrize("target", [0.25, 0.6, 0.8])
def test_untrained_policy_returns_the_target_everywhere_except_dense_layers(target):
    policy = AdaptiveRatioPolicy(NUM_LAYERS, target_keep=target, r_min=0.1, dense_layers=(0, 3))
    ratios = policy.ratios(TIMESTEPS)
    assert ratios.shape == (len(TIMESTEPS), NUM_LAYERS)
    pruned = [1, 2, 4, 5]
    torch.testing.assert_close(ratios[:, pruned], torch.full((len(TIMESTEPS), 4), target), rtol=0, atol=1e-6)
    assert bool((ratios[:, [0, 3]] == 1.0).all())


def test_untrained_policy_with_target_one_keeps_every_token():
    ratios = AdaptiveRatioPolicy(NUM_LAYERS, target_keep=1.0).ratios(TIMESTEPS)
    assert bool((ratios == 1.0).all())


def test_policy_ratios_stay_within_r_min_and_one():
    policy = randomized_policy(r_min=0.15)
    with torch.no_grad():
        ratios = policy(torch.linspace(0, 1000, 51), logit_noise=4.0, generator=torch.Generator().manual_seed(0))
    assert float(ratios.min()) >= 0.15
    assert float(ratios.max()) <= 1.0
    assert bool((ratios == 0.15).any())          # the clamp is exercised, not just never reached
    assert float(ratios[:, 1:].max()) > 0.9


def test_logit_noise_changes_ratios_and_is_reproducible_from_the_generator():
    policy = AdaptiveRatioPolicy(NUM_LAYERS)
    clean = policy(TIMESTEPS)
    noisy = policy(TIMESTEPS, logit_noise=1.0, generator=torch.Generator().manual_seed(1))
    again = policy(TIMESTEPS, logit_noise=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(noisy[:, 1:], clean[:, 1:])
    assert torch.equal(noisy, again)
    assert bool((noisy[:, 0] == 1.0).all())       # dense layer stays dense under noise


def test_policy_logit_is_a_sum_of_time_and_layer_terms():
    """Decoupled additive form (Eq. 11): logit(t, l) - logit(t', l) does not depend on l."""
    logits = randomized_policy().logits(TIMESTEPS)
    differences = logits[1:] - logits[:1]
    torch.testing.assert_close(differences, differences[:, :1].expand_as(differences), rtol=0, atol=1e-5)


def test_policy_branches_are_centred_so_the_anchor_is_the_level():
    """time(t) averages to 0 over the centring grid and layer(l) over the pruned layers: the anchor is the mean logit."""
    from shiva_export.policy import CENTRE_POINTS, NUM_TRAIN_TIMESTEPS

    policy = randomized_policy()
    grid = (torch.arange(CENTRE_POINTS, dtype=torch.float32) + 0.5) * (NUM_TRAIN_TIMESTEPS / CENTRE_POINTS)
    with torch.no_grad():
        logits = policy.logits(grid)
    pruned = logits[:, policy.pruned_mask]
    assert float(pruned.mean()) == pytest.approx(float(policy.anchor.detach()), abs=1e-4)
    assert float(pruned.std()) > 1.0                                   # the branches do shape the logits
    torch.testing.assert_close(policy.logits(grid[:3]), logits[:3])     # one timestep's logit: not batch-dependent


@pytest.mark.parametrize("target", [0.0, -0.2, 1.01, float("nan")])
def test_policy_refuses_target_keep_outside_zero_one(target):
    with pytest.raises(ConfigError, match=r"target keep ratio .* is outside \(0, 1\]"):
        AdaptiveRatioPolicy(NUM_LAYERS, target_keep=target)


@pytest.mark.parametrize("target", [0.0, 1.5])
def test_budget_loss_refuses_target_keep_outside_zero_one(target):
    with pytest.raises(ConfigError, match=r"target keep ratio .* is outside \(0, 1\]"):
        BudgetLoss(target)


def test_policy_refuses_r_min_above_target():
    with pytest.raises(ConfigError, match=r"r_min 0.7 must be in \(0, target_keep=0.6\]"):
        AdaptiveRatioPolicy(NUM_LAYERS, target_keep=0.6, r_min=0.7)


@pytest.mark.parametrize("dense", [(6,), (-1,)])
def test_policy_refuses_dense_layers_out_of_range(dense):
    with pytest.raises(ConfigError, match=r"dense layers \[-?\d\] are out of range for a 6-layer policy"):
        AdaptiveRatioPolicy(NUM_LAYERS, dense_layers=dense)


# --- budget loss -------------------------------------------------------------------------------------------------


def test_budget_ema_weights_the_new_batch_mean_by_beta():
    budget = BudgetLoss(0.6)
    assert budget.beta == 0.2
    assert float(budget.ema) == pytest.approx(0.6)
    budget(torch.tensor(0.9))
    assert float(budget.ema) == pytest.approx(0.8 * 0.6 + 0.2 * 0.9)
    budget(torch.tensor(0.4))
    assert float(budget.ema) == pytest.approx(0.8 * (0.8 * 0.6 + 0.2 * 0.9) + 0.2 * 0.4)


def test_budget_loss_value_and_gradient_use_the_updated_ema():
    """L = lambda * r_bar * sg[2 (mu - R)], mu already updated with this batch (Eq. 13)."""
    budget = BudgetLoss(0.6, weight=0.5)
    r_bar = torch.tensor(0.9, requires_grad=True)
    loss = budget(r_bar)
    mu = 0.8 * 0.6 + 0.2 * 0.9
    assert loss.item() == pytest.approx(0.5 * 0.9 * 2 * (mu - 0.6))
    loss.backward()
    assert float(r_bar.grad) == pytest.approx(0.5 * 2 * (mu - 0.6))


@pytest.mark.parametrize("batch_mean, direction", [(0.95, "down"), (0.2, "up")])
def test_budget_gradient_moves_policy_ratios_toward_the_target(batch_mean, direction):
    """EMA above target -> positive gradient on r_bar -> an SGD step lowers the ratios (and vice versa)."""
    policy = AdaptiveRatioPolicy(NUM_LAYERS, target_keep=0.6)
    budget = BudgetLoss(0.6)
    for _ in range(3):                             # drive the EMA to one side of the target
        budget(torch.tensor(batch_mean))
    ratios = policy(TIMESTEPS)
    r_bar = ratios[:, 1:].mean()
    budget(r_bar).backward()
    above = float(budget.ema) > 0.6
    assert above == (direction == "down")
    assert (float(policy.anchor.grad) > 0) == above
    with torch.no_grad():
        for param in policy.parameters():
            if param.grad is not None:
                param -= 0.5 * param.grad
    moved = float(policy.ratios(TIMESTEPS)[:, 1:].mean()) - r_bar.item()
    assert (moved < 0) == (direction == "down") and moved != 0


# --- stratified sampling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_stratified_timesteps_put_one_sample_in_each_stratum(seed):
    count = 8
    t = stratified_timesteps(count, torch.Generator().manual_seed(seed))
    width = 1000 / count
    for i, value in enumerate(t.tolist()):
        assert i * width <= value <= (i + 1) * width


def test_stratified_timesteps_split_across_micro_batches_cover_every_stratum_once():
    total, per_batch = 8, 2
    gen = torch.Generator().manual_seed(0)
    samples = torch.cat([stratified_timesteps(per_batch, gen, offset=o, total_strata=total)
                         for o in range(0, total, per_batch)])
    strata = torch.clamp(torch.floor(samples / (1000 / total)), max=total - 1)
    assert strata.tolist() == list(range(total))


@pytest.mark.parametrize("seed", range(5))
def test_stratified_ratios_come_from_disjoint_sub_intervals(seed):
    count, r_min, r_max = 4, 0.2, 1.0
    ratios = stratified_ratios(count, r_min, r_max, torch.Generator().manual_seed(seed))
    width = (r_max - r_min) / count
    bounds = [(r_min + i * width, r_min + (i + 1) * width) for i in range(count)]
    for (low, high), value in zip(bounds, ratios.tolist()):
        assert low - 1e-6 <= value <= high + 1e-6
    assert all(math.isclose(bounds[i][1], bounds[i + 1][0]) for i in range(count - 1))   # tiles [r_min, r_max]
    assert math.isclose(bounds[0][0], r_min) and math.isclose(bounds[-1][1], r_max)


def test_stratified_ratios_with_offset_use_the_groups_own_sub_interval():
    ratios = stratified_ratios(1, 0.2, 1.0, torch.Generator().manual_seed(0), offset=3, total_strata=4)
    assert 0.8 - 1e-6 <= float(ratios) <= 1.0 + 1e-6


@pytest.mark.parametrize("sampler", [
    lambda **kw: stratified_timesteps(generator=torch.Generator(), **kw),
    lambda **kw: stratified_ratios(r_min=0.2, r_max=1.0, generator=torch.Generator(), **kw),
], ids=["timesteps", "ratios"])
@pytest.mark.parametrize("count, offset, total", [(4, 6, 8), (2, -1, 8), (0, 0, 8)])
def test_strata_outside_the_total_are_refused(sampler, count, offset, total):
    with pytest.raises(ConfigError, match=r"strata .* are outside 0\.\.7"):
        sampler(count=count, offset=offset, total_strata=total)

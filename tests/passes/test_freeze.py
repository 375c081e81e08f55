"""Freeze pass: learned ratios -> aligned k -> FLOP-optimal buckets -> a hashed, verifiable schedule."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from shiva_export.passes.freeze import (
    SCHEDULE_SCHEMA,
    FreezeConfig,
    Schedule,
    StepFlops,
    constant_ratio_policy,
    freeze,
    group_buckets,
    k_table,
    learned_counts,
    scheduler_timesteps,
)

from shiva_export.errors import ArtifactError, ConfigError
from shiva_export.flops import dense_model_flops, model_flops
from shiva_export.io import sha256_json
from shiva_export.models import read_preset
from shiva_export.policy import AdaptiveRatioPolicy

TINY = read_preset("tiny-sd35")["config"]  # 6 blocks, dual attention in 0..2; 256 px -> N = 256
N_TINY, LAYERS = 256, 6
TINY_CFG = FreezeConfig(num_steps=10, align=16, max_buckets=3)


def ramp(timesteps: torch.Tensor, num_layers: int = LAYERS) -> torch.Tensor:
    """Stand-in policy: keep more late (small t) and deep; dense block 0 returns 1."""
    layer = torch.arange(num_layers, dtype=torch.float32) / max(1, num_layers - 1)
    ratios = (0.25 + 0.5 * (1 - timesteps[:, None] / 1000) + 0.2 * layer[None]).clamp(0.1, 1.0)
    ratios[:, 0] = 1.0
    return ratios


def sum_of_squares(k: np.ndarray) -> float:
    """A non-linear cost that is non-decreasing in every k (like FLOPs, whose attention term is quadratic)."""
    return float(np.sum((1 + np.arange(len(k))) * k.astype(np.float64) ** 2))


@pytest.fixture(scope="module")
def schedule() -> Schedule:
    return freeze(ramp, TINY, 256, 256, 2, 24, TINY_CFG, model_hash="m" * 64, checkpoint_hash="c" * 64)


# --- FreezeConfig ----------------------------------------------------------------------------------------------

def test_k_min_defaults_to_the_alignment_and_config_round_trips():
    cfg = FreezeConfig(align=32, dense_layers=[3, 0, 3])
    assert cfg.k_min == 32 and cfg.dense_layers == (0, 3)
    assert FreezeConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert FreezeConfig().to_json() == {"schema": 1, "num_steps": 28, "shift": 3.0, "align": 64, "align_to": "k",
                                        "k_min": 64, "max_buckets": 4, "dense_layers": [0]}


@pytest.mark.parametrize("kwargs, message", [
    ({"align": 0}, "FreezeConfig.align=0 must be >= 1"),
    ({"max_buckets": 0}, "FreezeConfig.max_buckets=0 must be >= 1"),
    ({"num_steps": 0}, "FreezeConfig.num_steps=0 must be >= 1"),
    ({"k_min": 0}, "FreezeConfig.k_min=0 must be >= 1"),
    ({"shift": -1.0}, "FreezeConfig.shift must be a finite number > 0"),
    ({"dense_layers": (-1,)}, "dense_layers entry=-1 must be >= 0"),
    ({"align": 1.5}, "FreezeConfig.align must be an integer"),
    ({"align_to": "tokens"}, "FreezeConfig.align_to must be one of ['k', 'sequence', 'either'], got 'tokens'"),
])
def test_invalid_freeze_config_is_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        FreezeConfig(**kwargs)


# --- timesteps ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, shift", [(28, 3.0), (50, 3.0), (4, 1.0)])
def test_timesteps_are_exactly_the_flow_matching_schedulers(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    timesteps = scheduler_timesteps(steps, shift)
    assert torch.equal(timesteps, scheduler.timesteps) and timesteps.dtype == torch.float32
    assert timesteps[0] == 1000 and bool((timesteps[1:] < timesteps[:-1]).all())


# --- k table --------------------------------------------------------------------------------------------------

def test_k_is_aligned_up_and_clamped_to_k_min_and_n():
    cfg = FreezeConfig(align=16, dense_layers=())
    ratios = torch.tensor([[0.5, 0.51, 0.01, 1.0, 0.999]])
    assert k_table(ratios, 256, cfg).tolist() == [[128, 144, 16, 256, 256]]
    with_k_min = FreezeConfig(align=16, k_min=48, dense_layers=())
    assert k_table(ratios, 256, with_k_min).tolist() == [[128, 144, 48, 256, 256]]
    # N not a multiple of the alignment: rounding up may pass N, which clamps to N (dense).
    assert k_table(torch.tensor([[0.99]]), 200, cfg).tolist() == [[200]]
    # k_min above N: nothing can be pruned, every layer runs all N tokens.
    assert k_table(torch.tensor([[0.3]]), 32, FreezeConfig(align=64, dense_layers=())).tolist() == [[32]]


def test_k_rounds_up_the_training_count_floor_n_r():
    """D13: k = align_up(floor(N r)); floor(N r) is what training kept (D6), so N r = 128.5 stays at 128."""
    cfg = FreezeConfig(align=16, dense_layers=())
    assert learned_counts(torch.tensor([[128.5 / 256]]), 256).tolist() == [[128]]
    assert k_table(torch.tensor([[128.5 / 256]]), 256, cfg).tolist() == [[128]]


def test_k_never_drops_more_tokens_than_learned():
    generator = torch.Generator().manual_seed(0)
    ratios = torch.rand(40, 12, generator=generator).clamp_min(1e-3)
    for num_tokens, align in ((4096, 64), (3600, 64), (256, 16), (97, 8)):
        cfg = FreezeConfig(align=align, dense_layers=())
        table, learned = k_table(ratios, num_tokens, cfg), learned_counts(ratios, num_tokens)
        assert (table >= learned).all() and (table <= num_tokens).all()
        pruned = table < num_tokens
        assert (table[pruned] % align == 0).all() and (table[pruned] - learned[pruned] < align).all()


def test_sequence_alignment_rounds_k_plus_context_up_and_never_drops_learned_tokens():
    """SD3.5 at 1024 px: keep 0.6 -> floor(4096 * 0.6) = 2457; 2457 + 333 rounds up to 2816, so k = 2483."""
    cfg = FreezeConfig(align=128, align_to="sequence", dense_layers=())
    assert k_table(torch.tensor([[0.6, 0.4, 1.0]]), 4096, cfg, context_tokens=333).tolist() == [[2483, 1715, 4096]]
    # Without context tokens the two targets agree.
    plain = FreezeConfig(align=128, dense_layers=())
    ratios = torch.rand(20, 6, generator=torch.Generator().manual_seed(1)).clamp_min(0.05)
    assert (k_table(ratios, 4096, cfg) == k_table(ratios, 4096, plain)).all()
    table, learned = k_table(ratios, 4096, cfg, 333), learned_counts(ratios, 4096)
    pruned = table < 4096
    assert (table >= learned).all() and ((table[pruned] + 333) % 128 == 0).all()
    assert (table[pruned] - learned[pruned] < 128).all()


def test_either_alignment_takes_whichever_boundary_comes_first():
    """keep 0.6: 2457 -> 2483 (2483 + 333 = 2816) before 2496; keep 0.4: 1638 -> 1664 before 1715."""
    cfg = FreezeConfig(align=128, align_to="either", dense_layers=())
    assert k_table(torch.tensor([[0.6, 0.4]]), 4096, cfg, context_tokens=333).tolist() == [[2483, 1664]]
    ratios = torch.rand(20, 6, generator=torch.Generator().manual_seed(2)).clamp_min(0.05)
    by_k = k_table(ratios, 4096, FreezeConfig(align=128, dense_layers=()), 333)
    either, learned = k_table(ratios, 4096, cfg, 333), learned_counts(ratios, 4096)
    assert (either >= learned).all() and (either <= by_k).all()
    pruned = either < 4096
    assert ((either[pruned] % 128 == 0) | ((either[pruned] + 333) % 128 == 0)).all()


def test_a_schedule_frozen_with_sequence_alignment_round_trips():
    cfg = FreezeConfig(num_steps=7, align=16, align_to="sequence")
    frozen = freeze(ramp, TINY, 256, 256, 2, 24, cfg)
    pruned = np.array(frozen.k_table)[:, 1:]
    assert (((pruned + 24) % 16 == 0) | (pruned == N_TINY)).all()
    assert Schedule.from_json(json.loads(json.dumps(frozen.to_json()))) == frozen


def test_dense_layers_keep_all_tokens_whatever_the_policy_says():
    cfg = FreezeConfig(align=16, dense_layers=(0, 2))
    table = k_table(torch.full((3, 4), 0.1), 256, cfg)
    assert (table[:, [0, 2]] == 256).all() and (table[:, [1, 3]] == 32).all()


@pytest.mark.parametrize("ratios, num_tokens, message", [
    ([[0.5, 0.0]], 256, "keep ratio 0 at step 0, layer 1 is outside"),
    ([[0.5, 1.5]], 256, "keep ratio 1.5 at step 0, layer 1 is outside"),
    ([[float("nan"), 0.5]], 256, "keep ratio nan at step 0, layer 0 is outside"),
    ([[-0.2, 0.5]], 256, "keep ratio -0.2"),
    ([0.5, 0.5], 256, r"expected a non-empty \[steps, layers\] table, got shape \(2,\)"),
    ([[0.5, 0.5]], 0, r"num_tokens \(N\)=0 must be >= 1"),
])
def test_bad_ratio_tables_are_config_errors(ratios, num_tokens, message):
    with pytest.raises(ConfigError, match=message):
        k_table(torch.tensor(ratios, dtype=torch.float64), num_tokens, FreezeConfig(dense_layers=()))


def test_dense_layer_outside_the_table_is_config_error():
    with pytest.raises(ConfigError, match=r"dense layers \[4\] do not exist; the ratio table has 2 layers"):
        k_table(torch.full((1, 2), 0.5), 256, FreezeConfig(dense_layers=(0, 4)))


# --- buckets --------------------------------------------------------------------------------------------------

def brute_force_cost(table: np.ndarray, max_buckets: int, cost_fn) -> float:
    """Least cost over every split of the steps into at most max_buckets contiguous groups."""
    steps, best = len(table), float("inf")
    for cuts in range(min(max_buckets, steps)):
        for bounds in itertools.combinations(range(1, steps), cuts):
            edges = (0, *bounds, steps)
            cost = sum((b - a) * cost_fn(table[a:b].max(axis=0)) for a, b in zip(edges, edges[1:]))
            best = min(best, cost)
    return best


def realised_cost(table: np.ndarray, bucketing, cost_fn) -> float:
    return sum(cost_fn(np.array(bucketing.bucket_k[b])) for b in bucketing.step_to_bucket)


@pytest.mark.parametrize("seed", range(12))
def test_dp_grouping_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(1, 9))
    table = rng.choice([16, 32, 48, 64], size=(steps, 3)) if seed % 2 else np.sort(
        rng.choice([16, 32, 48, 64], size=(steps, 3)), axis=0)  # odd seeds: arbitrary; even: monotone in t
    for max_buckets in (1, 2, 3, 4):
        bucketing = group_buckets(table, max_buckets, sum_of_squares)
        assert bucketing.cost == pytest.approx(brute_force_cost(table, max_buckets, sum_of_squares), rel=1e-12)
        assert bucketing.cost == pytest.approx(realised_cost(table, bucketing, sum_of_squares), rel=1e-12)


def test_dp_grouping_is_optimal_under_the_flop_cost():
    cost = StepFlops(TINY, N_TINY, 24, 2)
    table = k_table(ramp(scheduler_timesteps(7, 3.0)), N_TINY, FreezeConfig(align=16))
    for max_buckets in (1, 2, 3):
        bucketing = group_buckets(table, max_buckets, cost)
        assert bucketing.cost == brute_force_cost(table, max_buckets, cost)


def test_one_bucket_runs_the_max_over_all_steps():
    table = np.array([[64, 16, 48], [32, 64, 16], [16, 16, 64]])
    bucketing = group_buckets(table, 1, sum_of_squares)
    assert bucketing.bucket_k == ((64, 64, 64),) and bucketing.step_to_bucket == (0, 0, 0)


def test_bucket_count_never_exceeds_b_and_buckets_are_contiguous():
    rng = np.random.default_rng(1)
    table = rng.choice([64, 128, 192, 256], size=(30, 5))
    for max_buckets in (1, 2, 3, 5, 8):
        bucketing = group_buckets(table, max_buckets, sum_of_squares)
        assert 1 <= bucketing.num_buckets <= max_buckets
        assert list(bucketing.step_to_bucket) == sorted(bucketing.step_to_bucket)  # contiguous, in step order
        assert set(bucketing.step_to_bucket) == set(range(bucketing.num_buckets))
        for bucket, k in enumerate(bucketing.bucket_k):
            assert list(k) == table[list(bucketing.steps_of(bucket))].max(axis=0).tolist()


def test_identical_consecutive_steps_share_a_bucket_and_fewer_runs_use_fewer_buckets():
    table = np.array([[64, 32]] * 3 + [[128, 64]] * 4)
    bucketing = group_buckets(table, 4, sum_of_squares)
    assert bucketing.step_to_bucket == (0, 0, 0, 1, 1, 1, 1)
    assert bucketing.bucket_k == ((64, 32), (128, 64))
    assert group_buckets(np.full((5, 3), 64), 4, sum_of_squares).num_buckets == 1


def test_zero_buckets_or_bad_tables_are_config_errors():
    with pytest.raises(ConfigError, match=r"max_buckets \(B\)=0 must be >= 1"):
        group_buckets(np.full((3, 2), 64), 0, sum_of_squares)
    with pytest.raises(ConfigError, match="expected integer token counts"):
        group_buckets(np.full((3, 2), 64.0), 2, sum_of_squares)
    with pytest.raises(ConfigError, match="cost_fn returned nan"):
        group_buckets(np.full((3, 2), 64), 2, lambda k: float("nan"))


# --- freeze ---------------------------------------------------------------------------------------------------

def test_policy_is_evaluated_once_at_the_schedulers_timesteps():
    seen = []

    def recording(timesteps):
        seen.append(timesteps.clone())
        return ramp(timesteps)

    schedule = freeze(recording, TINY, 256, 256, 2, 24, TINY_CFG)
    expected = scheduler_timesteps(TINY_CFG.num_steps, TINY_CFG.shift)
    assert all(torch.equal(t, expected) for t in seen)
    assert schedule.timesteps == tuple(expected.tolist())
    assert np.allclose(schedule.ratios, ramp(expected).numpy())


def test_schedule_respects_alignment_buckets_and_dense_layers(schedule):
    table, realised = np.array(schedule.k_table), np.array(schedule.realised_k)
    assert schedule.num_tokens == N_TINY and len(schedule.buckets) <= TINY_CFG.max_buckets
    assert (realised >= table).all() and (table >= learned_counts(torch.tensor(schedule.ratios), N_TINY)).all()
    assert (realised[:, 0] == N_TINY).all()
    assert ((realised % 16 == 0) | (realised == N_TINY)).all()


def test_summary_orders_learned_aligned_realised_and_matches_the_flop_model(schedule):
    summary = schedule.summary
    assert summary.learned_keep_ratio <= summary.aligned_keep_ratio <= summary.realised_keep_ratio <= 1
    assert summary.learned_flop_ratio <= summary.aligned_flop_ratio <= summary.realised_flop_ratio < 1
    assert summary.dense_flops_per_step == dense_model_flops(TINY, N_TINY, 24, 2)
    assert summary.dense_flops_total == TINY_CFG.num_steps * summary.dense_flops_per_step
    realised = sum(model_flops(TINY, k, 24, 2, num_tokens=N_TINY) for k in schedule.realised_k)
    assert summary.realised_flops_total == realised
    assert realised == sum(len(b.steps) * b.flops_per_step for b in schedule.buckets)
    ratios = np.array(schedule.ratios)[:, 1:]
    assert summary.learned_keep_ratio == pytest.approx(ratios.mean())


def test_one_bucket_schedule_runs_every_step_at_the_elementwise_max():
    schedule = freeze(ramp, TINY, 256, 256, 2, 24, FreezeConfig(num_steps=10, align=16, max_buckets=1))
    assert len(schedule.buckets) == 1
    assert list(schedule.buckets[0].k) == np.array(schedule.k_table).max(axis=0).tolist()


def test_more_buckets_never_cost_more():
    costs = [freeze(ramp, TINY, 256, 256, 2, 24, FreezeConfig(num_steps=12, align=16, max_buckets=b))
             .summary.realised_flops_total for b in (1, 2, 3, 6, 12)]
    assert costs == sorted(costs, reverse=True)
    exact = freeze(ramp, TINY, 256, 256, 2, 24, FreezeConfig(num_steps=12, align=16, max_buckets=12)).summary
    assert exact.realised_flops_total == exact.aligned_flops_total


def test_lead_adaptive_ratio_policy_and_constant_policy_freeze_to_one_bucket():
    policy = AdaptiveRatioPolicy(LAYERS, target_keep=0.5).eval()
    for ratio_fn in (policy.ratios, constant_ratio_policy(0.5, LAYERS)):
        schedule = freeze(ratio_fn, TINY, 256, 256, 2, 24, TINY_CFG)
        assert [b.k for b in schedule.buckets] == [(256, 128, 128, 128, 128, 128)]


def test_policy_with_wrong_shape_or_noise_is_config_error():
    with pytest.raises(ConfigError, match=r"returned shape \[10, 5\] for 10 timesteps; expected .* \[10, 6\]"):
        freeze(lambda t: ramp(t, 5), TINY, 256, 256, 2, 24, TINY_CFG)
    generator = torch.Generator().manual_seed(0)
    noisy = AdaptiveRatioPolicy(LAYERS)
    with pytest.raises(ConfigError, match="different ratios for the same timesteps"):
        freeze(lambda t: noisy(t, logit_noise=1.0, generator=generator), TINY, 256, 256, 2, 24, TINY_CFG)
    with pytest.raises(ConfigError, match="keep ratio 1.2 at step 0, layer 0"):
        freeze(lambda t: ramp(t) + 0.2, TINY, 256, 256, 2, 24, TINY_CFG)


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="not divisible by 16"):
        freeze(ramp, TINY, 250, 256, 2, 24, TINY_CFG)
    with pytest.raises(ConfigError, match="batch=0 must be >= 1"):
        freeze(ramp, TINY, 256, 256, 0, 24, TINY_CFG)
    with pytest.raises(ConfigError, match=r"dense layers \[7\] do not exist; the model has 6 blocks"):
        freeze(ramp, TINY, 256, 256, 2, 24, FreezeConfig(num_steps=4, dense_layers=(0, 7)))


# --- the schedule artifact ------------------------------------------------------------------------------------

def test_schedule_round_trips_through_json_with_the_same_hash(schedule, tmp_path):
    path = schedule.save(tmp_path / "schedule.json")
    loaded = Schedule.load(path)
    assert loaded == schedule and loaded.schedule_hash == schedule.schedule_hash
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEDULE_SCHEMA and data["schedule_hash"] == schedule.schedule_hash
    assert data["model_hash"] == "m" * 64 and data["checkpoint_hash"] == "c" * 64
    assert data["realised_k_table"] == [list(k) for k in schedule.realised_k]
    assert not list(tmp_path.glob(".*partial*"))  # atomic write leaves no temp file


def test_schedule_hash_covers_the_content(schedule):
    other = freeze(ramp, TINY, 256, 256, 2, 24, TINY_CFG, model_hash="x" * 64, checkpoint_hash="c" * 64)
    assert other.schedule_hash != schedule.schedule_hash
    again = freeze(ramp, TINY, 256, 256, 2, 24, TINY_CFG, model_hash="m" * 64, checkpoint_hash="c" * 64)
    assert again.schedule_hash == schedule.schedule_hash


def test_every_frozen_timestep_maps_to_its_steps_bucket(schedule):
    for step, t in enumerate(schedule.timesteps):
        assert schedule.bucket_for_timestep(t) == schedule.step_to_bucket[step] == schedule.bucket_for_step(step)
        nudged = torch.tensor(t, dtype=torch.float32) + 0.004  # a 0-d tensor, as a runtime would pass it
        assert schedule.bucket_for_timestep(nudged) == schedule.step_to_bucket[step]


def test_timestep_off_the_frozen_grid_is_config_error_naming_it_and_the_grid(schedule):
    with pytest.raises(ConfigError, match=r"timestep 500\.0 is not within 0\.01 of any of the 10 frozen timesteps "
                                          r"\[1000\.0, .*\] \(steps=10, FlowMatchEulerDiscreteScheduler shift=3\)"):
        schedule.bucket_for_timestep(500.0)
    with pytest.raises(ConfigError, match="step 10 is out of range; the schedule has 10 steps"):
        schedule.bucket_for_step(10)


def write_edited(schedule: Schedule, tmp_path, edit, rehash: bool) -> str:
    """The schedule's JSON after `edit`; with rehash, schedule_hash is recomputed as a careless tool would."""
    data = schedule.to_json()
    edit(data)
    if rehash:
        data["schedule_hash"] = sha256_json({k: v for k, v in data.items() if k != "schedule_hash"})
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, rehash, message", [
    (lambda d: d.update(schema_version="shiva.schedule/9"), False, "unknown schema_version 'shiva.schedule/9'"),
    (lambda d: d["buckets"][0]["k"].__setitem__(1, 16), False, "content does not match schedule_hash"),
    (lambda d: d.pop("schedule_hash"), False, "missing key 'schedule_hash'"),
    (lambda d: d.pop("k_table"), True, "missing key 'k_table'"),
    (lambda d: d.update(timesteps="fast"), True, "timesteps entries must be numbers"),
    (lambda d: d["freeze_config"].update(align=0), True, "FreezeConfig.align=0 must be >= 1"),
    (lambda d: d["step_to_bucket"].__setitem__(0, 7), True, "step_to_bucket does not map every step to a bucket"),
    (lambda d: d["k_table"][3].__setitem__(2, 16), True, "k_table is not the aligned k of the ratios"),
    (lambda d: d["summary"].update(realised_flops_total=1), True, r"summary \['realised_flops_total', "
                                                                   r"'realised_flop_ratio'\] do not follow"),
    (lambda d: d["buckets"][0].update(flops_per_step=1), True, r"summary \['realised_flops_total'\] do not follow"),
    (lambda d: d.update(extra=1), True, r"\['extra'\] do not match the rest"),
])
def test_edited_or_malformed_schedule_is_artifact_error(schedule, tmp_path, edit, rehash, message):
    with pytest.raises(ArtifactError, match=message):
        Schedule.load(write_edited(schedule, tmp_path, edit, rehash))


def test_bucket_below_its_steps_k_is_refused_even_with_a_matching_hash(schedule, tmp_path):
    def shrink_last_bucket(data):
        data["buckets"][-1]["k"][1] -= 16  # fewer tokens than its steps learned: would prune too much

    with pytest.raises(ArtifactError, match=r"bucket \d+ k is not the max over its steps"):
        Schedule.load(write_edited(schedule, tmp_path, shrink_last_bucket, rehash=True))


def test_truncated_missing_or_non_object_schedule_file_is_artifact_error(schedule, tmp_path):
    path = schedule.save(tmp_path / "schedule.json")
    path.write_text(path.read_text()[:200])
    with pytest.raises(ArtifactError, match=r"schedule.json: not valid JSON \(.* at line \d+, column \d+\)"):
        Schedule.load(path)
    with pytest.raises(ArtifactError, match="cannot read schedule"):
        Schedule.load(tmp_path / "missing.json")
    path.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="expected a JSON object, got list"):
        Schedule.load(path)

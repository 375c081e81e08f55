"""The fidelity study's methods (scripts/fidelity/methods.py) on tiny-sd35 at a 16x16 latent (8x8 tokens), through a
FlowMatchEuler CFG sampler as the study's: invariants against dense and Shiva, the kept sets, reset, FLOPs
(measured against torch's FlopCounterMode), and bad parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from shiva_export import flops
from shiva_export.errors import ConfigError
from shiva_export.models import load_transformer, shipped_router
from shiva_export.pruned import load_pruned_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "fidelity"))
import methods  # noqa: E402

STEPS, LATENT, CONTEXT, GRID = 6, 16, 8, (8, 8)
N = GRID[0] * GRID[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny forwards gain nothing from two, and on a shared 2-core machine two threads
    made single calls 2-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain():
    return load_transformer("tiny-sd35")[0]


@pytest.fixture(scope="module")
def pruned():
    return load_pruned_model("tiny-sd35", shipped_router("tiny-sd35"), cfg_consistent=True)


@pytest.fixture(scope="module")
def schedule(pruned):
    return methods.freeze_schedule(pruned, FlowMatchEulerDiscreteScheduler(shift=3.0), STEPS, LATENT, CONTEXT,
                                   align=1)


@pytest.fixture(scope="module")
def inputs(plain):
    generator = torch.Generator().manual_seed(0)
    cfg = plain.config
    return (torch.randn(1, cfg.in_channels, LATENT, LATENT, generator=generator),
            torch.randn(2, CONTEXT, cfg.joint_attention_dim, generator=generator),
            torch.randn(2, cfg.pooled_projection_dim, generator=generator))


def sample(denoiser, inputs, on_step=None, guidance: float = 4.0, shift: float = 3.0) -> torch.Tensor:
    """The study's sampler: reset, then FlowMatchEuler with CFG at batch 2, one call per step."""
    latents, context, pooled = inputs
    denoiser.reset()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(denoiser.steps)
    x = latents.clone()
    for t in scheduler.timesteps:
        out = denoiser(hidden_states=torch.cat([x, x]), encoder_hidden_states=context, pooled_projections=pooled,
                       timestep=t.expand(2), return_dict=False)[0]
        if on_step is not None:
            on_step(denoiser)
        uncond, cond = out.chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def dense_out(plain, inputs):
    return sample(methods.dense(plain, STEPS), inputs)


@pytest.fixture(scope="module")
def shiva_out(pruned, schedule, inputs):
    return sample(methods.shiva_adaptive(pruned, schedule), inputs)


def test_tome_at_ratio_zero_is_dense_exactly(plain, inputs, dense_out):
    with methods.tome(plain, 0.0, STEPS) as tome:
        assert torch.equal(sample(tome, inputs), dense_out)


def test_shiva_uniform_keep_one_is_the_unpatched_model(pruned, inputs):
    unpatched = SD3Transformer2DModel.from_config(pruned.config).eval()
    unpatched.load_state_dict({name: value for name, value in pruned.transformer.state_dict().items()
                               if not name.startswith("shiva_routers.")})
    out = sample(methods.shiva_uniform(pruned, 1.0, STEPS), inputs)
    torch.testing.assert_close(out, sample(methods.dense(unpatched, STEPS), inputs), rtol=0, atol=1e-6)
    assert not torch.equal(out, sample(methods.shiva_uniform(pruned, 0.5, STEPS), inputs))


def test_caches_that_never_skip_are_dense_exactly(plain, inputs, dense_out):
    with methods.first_block_cache(plain, 0.0, STEPS) as fbc:
        assert torch.equal(sample(fbc, inputs), dense_out)
    with methods.taylorseer(plain, STEPS, interval=1) as seer:   # every step a full step
        assert torch.equal(sample(seer, inputs), dense_out)


def test_shiva_plus_cache_at_threshold_zero_is_shiva_bit_for_bit(pruned, schedule, inputs, shiva_out):
    with methods.shiva_plus_cache(pruned, schedule, 0.0) as combined:
        assert torch.equal(sample(combined, inputs), shiva_out)
    shiva = methods.shiva_adaptive(pruned, schedule)
    sample(shiva, inputs)
    with methods.shiva_plus_cache(pruned, schedule, 0.0) as combined:
        sample(combined, inputs)
        assert combined.flops_per_image() == shiva.flops_per_image()
    with methods.shiva_plus_cache(pruned, schedule, 1e9) as skipping:   # skips every step after the first
        assert not torch.equal(sample(skipping, inputs), shiva_out)
        assert skipping.flops_per_image() < shiva.flops_per_image()


def test_shiva_runs_the_frozen_k_of_each_step(pruned, schedule, inputs):
    kept = []
    sample(methods.shiva_adaptive(pruned, schedule), inputs, lambda d: kept.append(dict(d.last_kept)))
    assert [tuple(step[l] for l in range(1, 6)) for step in kept] == [k[1:] for k in schedule.realised_k]
    assert min(min(k[1:]) for k in schedule.realised_k) < N == min(schedule.realised_k[-1])   # pruned and dense steps


@pytest.mark.parametrize("make", ["random", "grid"])
def test_same_k_baselines_keep_exactly_the_schedules_k(pruned, schedule, inputs, make):
    factory = methods.random_select if make == "random" else methods.grid_select
    seen = []
    sample(factory(pruned, schedule), inputs, lambda d: seen.append(dict(d.last_indices)))
    for step, indices in enumerate(seen):
        for layer in range(1, 6):
            chosen = indices[layer]
            assert chosen.shape == (2, schedule.realised_k[step][layer])
            assert torch.equal(chosen[0], chosen[1])                 # CFG halves keep one set
            assert torch.equal(chosen[0], chosen[0].unique())        # distinct, ascending
    random_sets = {tuple(seen[0][layer][0].tolist()) for layer in range(1, 6)}
    assert len(random_sets) == (5 if make == "random" else 1)      # redrawn per layer / one fixed grid


def test_random_selection_is_seeded(plain, inputs):
    runs = {}
    for seed in (0, 0, 1):
        with methods.random_select(plain, 0.3, STEPS, seed=seed) as chooser:
            indices = []
            sample(chooser, inputs, lambda d: indices.append(d.last_indices[3][0].tolist()))
        runs.setdefault(seed, []).append(indices)
    assert runs[0][0] == runs[0][1] != runs[1][0]


def test_grid_keeps_the_strided_lattice(plain, inputs):
    lattice = {row * GRID[1] + col for row in range(0, GRID[0], 2) for col in range(0, GRID[1], 2)}
    coarse = {row * GRID[1] + col for row in range(0, GRID[0], 4) for col in range(0, GRID[1], 4)}
    for keep, expected in ((0.25, lattice), (1 / 16, coarse)):
        with methods.grid_select(plain, keep, STEPS) as grid:
            sample(grid, inputs, lambda d: [set(d.last_indices[l][0].tolist()) == expected or pytest.fail(
                f"keep {keep}: layer {l} kept {sorted(d.last_indices[l][0].tolist())}") for l in range(1, 6)])
    with methods.grid_select(plain, 0.25, STEPS, cycle=True) as cycling:   # layers 1-4 of a step tile the grid
        sets = []
        sample(cycling, inputs, lambda d: sets.append([set(d.last_indices[l][0].tolist()) for l in range(1, 5)]))
    assert all(set().union(*step) == set(range(N)) and sum(map(len, step)) == N for step in sets)


def test_reset_makes_every_trajectory_identical(plain, pruned, schedule, inputs):
    makers = [lambda: methods.random_select(pruned, schedule, seed=3), lambda: methods.tome(plain, 0.5, STEPS),
              lambda: methods.first_block_cache(plain, 0.5, STEPS),
              lambda: methods.taylorseer(plain, STEPS, interval=2, warmup=2),
              lambda: methods.shiva_plus_cache(pruned, schedule, 0.5)]
    for make in makers:
        with make() as method:
            first, flops_first = sample(method, inputs), method.flops_per_image()
            assert torch.equal(sample(method, inputs), first), method.name
            assert method.flops_per_image() == flops_first, method.name


def test_dense_flops_are_the_flop_models_steps_times_cfg_times_one_forward(plain, inputs):
    for steps in (STEPS, 3):
        method = methods.dense(plain, steps)
        sample(method, inputs)
        one = flops.dense_model_flops(plain.config, N, CONTEXT, 1)
        assert method.flops_per_image() == steps * 2 * one == methods.dense_flops_per_image(
            plain.config, steps, N, CONTEXT)


def test_measured_flops_are_what_torch_counts(plain, pruned, schedule, inputs):
    makers = [lambda: methods.dense(plain, STEPS), lambda: methods.shiva_adaptive(pruned, schedule),
              lambda: methods.shiva_uniform(pruned, 0.4, STEPS), lambda: methods.grid_select(pruned, schedule),
              lambda: methods.tome(plain, 0.5, STEPS), lambda: methods.first_block_cache(plain, 0.5, STEPS),
              lambda: methods.taylorseer(plain, STEPS, interval=2, warmup=2),
              lambda: methods.shiva_plus_cache(pruned, schedule, 0.5)]
    dense = methods.dense_flops_per_image(plain.config, STEPS, N, CONTEXT)
    measured = {}
    for make in makers:
        with make() as method, torch.no_grad(), sdpa_kernel(SDPBackend.MATH), \
                FlopCounterMode(display=False) as counter:
            sample(method, inputs)
        assert method.flops_per_image() == counter.get_total_flops(), method.name   # one image: batch 2
        measured[method.name.split("(")[0]] = method.flops_per_image() / dense
    assert measured["dense"] == 1
    assert all(measured[name] < 1 for name in measured if name != "dense"), measured
    assert measured["shiva_plus_cache"] < measured["shiva_adaptive"], measured


def test_a_cache_that_skips_pays_block_zero_and_the_embeddings_only(plain, inputs):
    with methods.first_block_cache(plain, 1e9, STEPS) as fbc:
        sample(fbc, inputs)
        per_call = [f // 2 for f in fbc.call_flops]
    cfg = plain.config
    head = sum(flops.embedding_flops(cfg, N, CONTEXT).values()) + flops.block_flops(cfg, 0, N, CONTEXT)
    assert per_call == [flops.dense_model_flops(cfg, N, CONTEXT, 1)] + [head] * (STEPS - 1)


def test_tome_ratio_for_flops_hits_the_target(plain, inputs):
    dense = methods.dense_flops_per_image(plain.config, STEPS, N, CONTEXT)
    for target in (0.8, 0.65):
        ratio = methods.tome_ratio_for_flops(plain.config, target, GRID, CONTEXT)
        with methods.tome(plain, ratio, STEPS) as tome:
            sample(tome, inputs)
        fraction = tome.flops_per_image() / dense
        assert fraction == pytest.approx(methods.tome_flops_fraction(plain.config, ratio, GRID, CONTEXT), rel=1e-12)
        assert abs(fraction - target) < 0.03 * target, (target, ratio, fraction)


def test_tome_merge_averages_groups_and_unmerge_copies_back():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, N, 16, generator=generator, dtype=torch.float64)
    r = 20
    merge, unmerge = methods.bipartite_soft_matching_random2d(x, GRID[1], GRID[0], 2, 2, r, generator=generator)
    merged = merge(x)
    assert merged.shape == (2, N - r, 16)
    restored = unmerge(merged)
    for sample_x, sample_y in zip(x, restored):
        groups = {}
        for index, row in enumerate(sample_y):
            groups.setdefault(tuple(row.tolist()), []).append(index)
        assert len(groups) == N - r
        for members in groups.values():   # each group holds one dst window token and the src tokens merged into it
            torch.testing.assert_close(sample_y[members[0]], sample_x[members].mean(dim=0))


def test_bad_parameters_are_one_line_config_errors(plain, pruned, schedule, inputs):
    bad = [lambda: methods.shiva_uniform(pruned, 0, STEPS), lambda: methods.shiva_uniform(pruned, 1.5, STEPS),
           lambda: methods.random_select(plain, float("nan"), STEPS), lambda: methods.tome(plain, 1.0, STEPS),
           lambda: methods.tome(plain, 0.8, STEPS), lambda: methods.tome(plain, -0.1, STEPS),
           lambda: methods.first_block_cache(plain, -0.1, STEPS), lambda: methods.dense(plain, 0),
           lambda: methods.taylorseer(plain, STEPS, interval=0), lambda: methods.taylorseer(plain, STEPS, warmup=0),
           lambda: methods.shiva_adaptive(plain, schedule), lambda: methods.shiva_plus_cache(pruned, schedule, -1),
           lambda: methods.random_select(pruned, schedule, steps=STEPS + 1),
           lambda: methods.tome_ratio_for_flops(plain.config, 0.1, GRID, CONTEXT)]
    for make in bad:
        with pytest.raises(ConfigError) as err:
            make()
        assert "\n" not in str(err.value)
    dense = methods.dense(plain, 2)
    batch = (torch.cat([inputs[0]] * 2), *inputs[1:])
    sample(dense, inputs)
    with pytest.raises(ConfigError, match="call 3 but the method was built for 2 steps; call reset"):
        dense(*batch, torch.full((2,), 1.0))
    dense.reset()
    with pytest.raises(ConfigError, match="after 0 of 2 steps"):
        dense.flops_per_image()
    with pytest.raises(ConfigError, match="step 1: timestep .*, but the schedule's step 1 is at"):
        sample(methods.shiva_adaptive(pruned, schedule), inputs, shift=1.0)   # another sampler than the freeze's
    with methods.tome(plain, 0.5, STEPS):
        with pytest.raises(ConfigError, match="close"):
            methods.first_block_cache(plain, 0.1, STEPS)
        with pytest.raises(ConfigError, match="close"):
            sample(methods.dense(plain, STEPS), inputs)

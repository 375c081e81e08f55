"""Claims about shiva_export/patching.py on both tiny presets: block semantics (D1-D3), CFG (D4), modes, errors."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from shiva_export.errors import ConfigError
from shiva_export.models import example_inputs, load_transformer, num_image_tokens
from shiva_export.patching import (
    PRUNING_HOOK,
    PruningConfig,
    apply_token_pruning,
    get_pruning_state,
    remove_token_pruning,
    static_k,
    training_ratios,
)
from shiva_export.policy import AdaptiveRatioPolicy
from shiva_export.router import RouterBank

PRESETS = ["tiny-sd3", "tiny-sd35"]
SIZE = 128            # 128 px -> 16x16 latent -> 8x8 patches: N = 64 image tokens
CONTEXT_TOKENS = 8
KEEP = [0.5, 0.25, 0.75, 0.5, 0.125]   # per pruned layer; N * r is an exact integer for N = 64


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    transformer, _ = load_transformer(request.param)
    return transformer


@pytest.fixture(scope="module")
def num_layers(model) -> int:
    return len(model.transformer_blocks)


@pytest.fixture(scope="module")
def num_tokens(model) -> int:
    return num_image_tokens(dict(model.config), SIZE, SIZE)


@pytest.fixture(scope="module")
def inputs(model):
    return example_inputs(dict(model.config), SIZE, SIZE, batch=2, context_tokens=CONTEXT_TOKENS, seed=0)


@pytest.fixture(scope="module")
def dense_output(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def make_routers(model, seed: int = 0) -> RouterBank:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RouterBank.for_transformer(model)


@contextlib.contextmanager
def pruned(model, routers: RouterBank | None = None, **config):
    """Apply pruning for the duration of a test; the module-scoped model is always restored."""
    state = apply_token_pruning(model, routers or make_routers(model), PruningConfig(**config))
    try:
        yield state
    finally:
        remove_token_pruning(model)


@contextlib.contextmanager
def observed_token_counts(model):
    """(block, submodule) -> tokens that submodule received: image tokens for attn/attn2/ff, context for 'context'."""
    counts, handles = {}, []

    def watch(index, name, module):
        def hook(_, args, kwargs):
            counts[(index, name)] = kwargs.get("hidden_states", args[0] if args else None).shape[1]
            if kwargs.get("encoder_hidden_states") is not None:
                counts[(index, "context")] = kwargs["encoder_hidden_states"].shape[1]
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    for index, block in enumerate(model.transformer_blocks):
        for name in ("attn", "attn2", "ff"):
            if getattr(block, name, None) is not None:
                watch(index, name, getattr(block, name))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def k_vector(num_layers: int, num_tokens: int) -> list[int]:
    return [num_tokens] + [int(num_tokens * r) for r in KEEP[: num_layers - 1]]


def ratio_vector(num_layers: int) -> torch.Tensor:
    return torch.tensor([1.0] + KEEP[: num_layers - 1])


# --- block semantics ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("select_full_layers", [False, True])
def test_a_layer_keeping_every_token_runs_dense_without_its_router_unless_asked(model, inputs, dense_output,
                                                                                 num_layers, num_tokens,
                                                                                 select_full_layers):
    """k == N: selection is the identity, so by default the block skips router, top-k, gather and scatter."""
    routers = make_routers(model)
    calls = []
    original = routers.score_context
    routers.score_context = lambda layer, *args: calls.append(layer) or original(layer, *args)
    k = k_vector(num_layers, num_tokens)
    k[2] = num_tokens
    with pruned(model, routers), torch.no_grad():
        with static_k(model, k, record=True, select_full_layers=select_full_layers) as state:
            model(**inputs)
            assert state.processed_tokens[2] == num_tokens
            assert torch.equal(state.indices[2], torch.arange(num_tokens).expand(2, num_tokens))
        assert calls == [layer for layer in range(1, num_layers) if layer != 2 or select_full_layers]
        with static_k(model, [num_tokens] * num_layers, select_full_layers=select_full_layers):
            full_output = model(**inputs).sample
    assert len(calls) == (2 * (num_layers - 1) if select_full_layers else num_layers - 2)
    assert (full_output - dense_output).abs().max().item() <= (1e-6 if select_full_layers else 0.0)


@pytest.mark.parametrize("mode", ["static", "train"])
def test_keeping_every_token_reproduces_the_dense_model(model, inputs, dense_output, num_layers, num_tokens, mode):
    with pruned(model):
        run = (static_k(model, [num_tokens] * num_layers) if mode == "static"
               else training_ratios(model, torch.ones(num_layers), generator=torch.Generator().manual_seed(0)))
        with run, torch.no_grad():
            output = model(**inputs).sample
    assert (output - dense_output).abs().max().item() <= 1e-6


def test_dense_mode_hooks_are_inert(model, inputs, dense_output):
    with pruned(model) as state, torch.no_grad():
        assert state.mode == "dense"
        assert torch.equal(model(**inputs).sample, dense_output)


def test_each_pruned_block_processes_exactly_its_k_image_tokens_and_the_full_context(model, inputs, num_layers,
                                                                                     num_tokens):
    k = k_vector(num_layers, num_tokens)
    with pruned(model), observed_token_counts(model) as counts, torch.no_grad():
        with static_k(model, k, record=True) as state:
            model(**inputs)
            assert state.processed_tokens == {layer: k[layer] for layer in range(1, num_layers)}
            assert all(state.indices[layer].shape == (2, k[layer]) for layer in range(1, num_layers))
    for (layer, name), tokens in counts.items():
        assert tokens == (CONTEXT_TOKENS if name == "context" else k[layer]), (layer, name)
    assert {name for _, name in counts} >= {"attn", "ff", "context"}
    if model.transformer_blocks[0].use_dual_attention:          # SD3.5: attn2 runs on kept tokens only (D2)
        assert all(counts[(layer, "attn2")] == k[layer] for layer in range(num_layers)
                   if model.transformer_blocks[layer].use_dual_attention)


@pytest.mark.parametrize("mode", ["static", "train"])
def test_block_zero_is_dense_unhooked_and_processes_all_tokens(model, inputs, num_layers, num_tokens, mode):
    with pruned(model) as state, observed_token_counts(model) as counts:
        assert getattr(model.transformer_blocks[0], "_diffusers_hook", None) is None or \
            model.transformer_blocks[0]._diffusers_hook.get_hook(PRUNING_HOOK) is None
        assert all(model.transformer_blocks[layer]._diffusers_hook.get_hook(PRUNING_HOOK) is not None
                   for layer in range(1, num_layers))
        assert state.pruned_layers == list(range(1, num_layers))
        run = (static_k(model, k_vector(num_layers, num_tokens), record=True) if mode == "static"
               else training_ratios(model, ratio_vector(num_layers), record=True))
        with run as recording, torch.no_grad():
            model(**inputs)
            assert 0 not in recording.processed_tokens
    assert counts[(0, "attn")] == counts[(0, "ff")] == num_tokens
    assert counts[(1, "ff")] < num_tokens


def test_configured_dense_layers_are_left_unhooked(model, inputs, num_layers, num_tokens):
    k = k_vector(num_layers, num_tokens)
    with pruned(model, dense_layers=(0, 2)), observed_token_counts(model) as counts, torch.no_grad():
        with static_k(model, k, record=True) as state:
            model(**inputs)
            assert sorted(state.processed_tokens) == [layer for layer in range(num_layers) if layer not in (0, 2)]
    assert counts[(2, "ff")] == num_tokens


def test_dropped_tokens_leave_the_block_unchanged(model, inputs, num_layers, num_tokens):
    """Identity skip (D1): a dropped token's block output is its block input, bit for bit."""
    seen = {}
    block = model.transformer_blocks[1]
    handle = block.register_forward_hook(
        lambda _, args, kwargs, output: seen.update(x=kwargs["hidden_states"], y=output[1]), with_kwargs=True)
    try:
        with pruned(model), torch.no_grad(), static_k(model, k_vector(num_layers, num_tokens), record=True) as state:
            model(**inputs)
            kept = state.indices[1]
    finally:
        handle.remove()
    dropped = torch.ones(2, num_tokens, dtype=torch.bool).scatter(1, kept, False)
    assert torch.equal(seen["y"][dropped], seen["x"][dropped])
    assert not torch.equal(seen["y"][~dropped], seen["x"][~dropped])


# --- CFG consistency (D4) ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "train"])
def test_cfg_halves_keep_the_same_tokens_only_when_cfg_consistent(model, num_layers, num_tokens, mode):
    """Batch [uncond(a, b); cond(a, b)]: with cfg_consistent sample i and i + 2 keep identical indices."""
    batch_inputs = example_inputs(dict(model.config), SIZE, SIZE, batch=4, context_tokens=CONTEXT_TOKENS, seed=1)
    indices = {}
    for consistent in (True, False):
        with pruned(model, cfg_consistent=consistent), torch.no_grad():
            run = (static_k(model, k_vector(num_layers, num_tokens), record=True) if mode == "static"
                   else training_ratios(model, ratio_vector(num_layers), record=True,
                                        generator=torch.Generator().manual_seed(0)))
            with run as state:
                model(**batch_inputs)
                indices[consistent] = dict(state.indices)
    for layer in range(1, num_layers):
        assert torch.equal(indices[True][layer][:2], indices[True][layer][2:]), layer
    assert any(not torch.equal(indices[False][layer][:2], indices[False][layer][2:]) for layer in range(1, num_layers))


def test_cfg_consistent_selection_refuses_an_odd_batch(model, num_layers, num_tokens):
    odd = example_inputs(dict(model.config), SIZE, SIZE, batch=3, context_tokens=CONTEXT_TOKENS)
    with pruned(model, cfg_consistent=True), torch.no_grad(), static_k(model, k_vector(num_layers, num_tokens)):
        with pytest.raises(ConfigError, match=r"CFG-consistent selection needs an even batch .* got batch 3"):
            model(**odd)


# --- training mode -----------------------------------------------------------------------------------------------


def test_training_mode_sends_gradients_to_router_and_policy(model, inputs, num_layers):
    policy = AdaptiveRatioPolicy(num_layers, target_keep=0.5, dense_layers=(0,))
    routers = make_routers(model)
    target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(2))
    with pruned(model, routers):
        ratios = policy(inputs["timestep"])
        assert ratios.shape == (2, num_layers)
        with training_ratios(model, ratios, generator=torch.Generator().manual_seed(0)):
            loss = (model(**inputs).sample - target).square().mean()
    loss.backward()
    for index, router in enumerate(routers.routers):
        for name in ("proj_x.weight", "proj_t.weight", "proj_p.weight", "score.weight"):
            grad = router.get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0, (index, name)
    slot_one = routers.routers[0].layer_embedding.weight.grad[1]   # layer 1 = router 0, slot 1
    assert slot_one.abs().sum() > 0
    assert policy.anchor.grad is not None and policy.anchor.grad != 0
    assert policy.time_mlp[-1].weight.grad.abs().sum() > 0
    assert policy.layer_mlp[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_static_mode_equals_the_training_forward_without_score_noise(model, inputs, num_layers, num_tokens):
    k = k_vector(num_layers, num_tokens)
    ratios = ratio_vector(num_layers).requires_grad_()
    with pruned(model):
        with static_k(model, k, record=True) as state, torch.no_grad():
            static_out = model(**inputs).sample
            static_indices = dict(state.indices)
        with training_ratios(model, ratios, score_noise=0.0, record=True) as state:
            train_out = model(**inputs).sample
            train_indices = dict(state.indices)
            assert state.processed_tokens == {layer: k[layer] for layer in range(1, num_layers)}
    assert train_out.requires_grad
    assert torch.equal(train_out.detach(), static_out)
    assert all(torch.equal(train_indices[layer], static_indices[layer]) for layer in range(1, num_layers))


def test_score_noise_changes_the_training_selection(model, inputs, num_layers):
    with pruned(model), torch.no_grad():
        selections = []
        for noise in (0.0, 1.0):
            with training_ratios(model, ratio_vector(num_layers), score_noise=noise, record=True,
                                 generator=torch.Generator().manual_seed(0)) as state:
                model(**inputs)
                selections.append(dict(state.indices))
    assert any(not torch.equal(selections[0][layer], selections[1][layer]) for layer in range(1, num_layers))


# --- removal -----------------------------------------------------------------------------------------------------


def test_remove_token_pruning_restores_the_dense_model_exactly(model, inputs, dense_output, num_layers, num_tokens):
    with pruned(model), torch.no_grad(), static_k(model, k_vector(num_layers, num_tokens)):
        assert not torch.equal(model(**inputs).sample, dense_output)      # pruning had an effect
    assert get_pruning_state(model) is None
    assert not hasattr(model, "shiva_routers")
    assert not any(name.startswith("shiva_routers") for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, dense_output)
    with pruned(model) as state:                                            # and it can be applied again
        assert get_pruning_state(model) is state


def test_routers_are_registered_on_the_model_while_applied(model):
    routers = make_routers(model)
    with pruned(model, routers):
        assert model.shiva_routers is routers
        assert any(name.startswith("shiva_routers.") for name, _ in model.named_parameters())


# --- bad input ---------------------------------------------------------------------------------------------------


def test_k_below_one_is_refused(model, num_layers, num_tokens):
    k = k_vector(num_layers, num_tokens)
    k[1] = 0
    with pruned(model), pytest.raises(ConfigError, match=r"layer 1: k=0 is out of range; expected 1 <= k"):
        with static_k(model, k):
            pass


def test_k_above_the_token_count_is_refused(model, inputs, num_layers, num_tokens):
    k = k_vector(num_layers, num_tokens)
    k[2] = num_tokens + 1
    with pruned(model), torch.no_grad(), static_k(model, k):
        with pytest.raises(ConfigError, match=rf"layer 2: k={num_tokens + 1} is out of range; "
                                              rf"expected 1 <= k <= N={num_tokens}"):
            model(**inputs)


def test_k_that_is_not_an_int_is_refused(model, num_layers, num_tokens):
    k = k_vector(num_layers, num_tokens)
    k[1] = 16.0
    with pruned(model), pytest.raises(ConfigError, match=r"layer 1: k must be a Python int"):
        with static_k(model, k):
            pass


@pytest.mark.parametrize("delta", [-1, 1])
def test_k_vector_of_the_wrong_length_is_refused(model, num_layers, num_tokens, delta):
    k = [num_tokens] * (num_layers + delta)
    with pruned(model), pytest.raises(ConfigError, match=rf"k has {num_layers + delta} entries but the model has "
                                                        rf"{num_layers} layers"):
        with static_k(model, k):
            pass


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_training_ratio_outside_zero_one_is_refused(model, num_layers, bad):
    ratios = ratio_vector(num_layers)
    ratios[1] = bad
    with pruned(model), pytest.raises(ConfigError, match=rf"keep ratio {bad:g} is outside \(0, 1\]"):
        with training_ratios(model, ratios):
            pass


def test_training_ratios_for_the_wrong_layer_count_are_refused(model, num_layers):
    with pruned(model), pytest.raises(ConfigError, match=rf"ratios have {num_layers + 1} layers but the model has"):
        with training_ratios(model, torch.full((num_layers + 1,), 0.5)):
            pass


def test_modes_need_pruning_applied_first(model, num_layers, num_tokens):
    with pytest.raises(ConfigError, match="token pruning is not applied to this model; call apply_token_pruning"):
        with static_k(model, [num_tokens] * num_layers):
            pass


def test_applying_twice_is_refused_and_leaves_the_first_patch_working(model, inputs, num_layers, num_tokens):
    with pruned(model) as state:
        with pytest.raises(ConfigError, match="token pruning is already applied to this model; "
                                              "call remove_token_pruning first"):
            apply_token_pruning(model, make_routers(model, seed=1))
        assert get_pruning_state(model) is state
        with static_k(model, k_vector(num_layers, num_tokens), record=True) as recording, torch.no_grad():
            model(**inputs)
            assert len(recording.processed_tokens) == num_layers - 1


def test_router_bank_for_another_depth_is_refused(model, num_layers):
    routers = RouterBank(num_layers + 2, token_dim=128, temb_dim=128, context_dim=128)
    with pytest.raises(ConfigError, match=rf"router bank is for {num_layers + 2} layers but the model has "
                                          rf"{num_layers}"):
        apply_token_pruning(model, routers)
    assert get_pruning_state(model) is None


def test_dense_layers_out_of_range_are_refused(model, num_layers):
    with pytest.raises(ConfigError, match=rf"dense layers \[{num_layers}\] are out of range"):
        apply_token_pruning(model, make_routers(model), PruningConfig(dense_layers=(0, num_layers)))
    assert get_pruning_state(model) is None


def test_a_module_without_transformer_blocks_is_refused():
    with pytest.raises(ConfigError, match="model class .Linear. is not supported; expected one of"):
        apply_token_pruning(nn.Linear(4, 4), RouterBank(1, 4, 4, 4))


def test_a_model_with_other_blocks_is_refused():
    class NotSD3(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    with pytest.raises(ConfigError, match=r"model class 'NotSD3' is not supported; expected one of"):
        apply_token_pruning(NotSD3(), RouterBank(2, 4, 4, 4))


def test_a_flux_model_gets_hooks_on_both_block_kinds_in_order():
    from diffusers import FluxTransformer2DModel

    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    with pytest.raises(ConfigError, match=r"router bank is for 2 layers but the model has 3"):
        apply_token_pruning(flux, RouterBank(2, 32, 32, 32))
    state = apply_token_pruning(flux, RouterBank(3, 32, 32, 32))
    hooked = [bool(getattr(block, "_diffusers_hook", None) and block._diffusers_hook.get_hook(PRUNING_HOOK))
              for block in [*flux.transformer_blocks, *flux.single_transformer_blocks]]
    assert state.num_layers == 3 and state.pruned_layers == [1, 2] and hooked == [False, True, True]

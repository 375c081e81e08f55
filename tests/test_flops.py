"""The analytic SD3 FLOP model: exact against torch's FLOP counter on tiny models, consistent under pruning."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from shiva_export import flops
from shiva_export.errors import ConfigError
from shiva_export.models import read_preset

SD35_MEDIUM = read_preset("sd35-medium-shape")["config"]
TINY_SD3 = read_preset("tiny-sd3")["config"]
TINY_SD35 = read_preset("tiny-sd35")["config"]
N_1024, S_SD3 = 4096, 333  # 1024 px -> 64 x 64 patches; CLIP 77 + T5 256 text tokens


def counted_flops(module, *args) -> int:
    """FLOPs torch counts for a forward (math SDPA, so attention is visible as bmm on CPU)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-sd35"])
def tiny_model(request):
    torch.manual_seed(0)
    return SD3Transformer2DModel(**read_preset(request.param)["config"]).eval()


def test_dense_forward_matches_torch_flop_counter_exactly(tiny_model):
    cfg, batch, context = tiny_model.config, 2, 24
    inputs = (torch.randn(batch, 16, 16, 16), torch.randn(batch, context, cfg.joint_attention_dim),
              torch.randn(batch, cfg.pooled_projection_dim), torch.full((batch,), 500.0))
    assert flops.dense_model_flops(cfg, 64, context, batch) == counted_flops(tiny_model, *inputs)


@pytest.mark.parametrize("k", [1, 37, 96])
def test_every_block_on_k_kept_tokens_matches_torch_flop_counter(tiny_model, k):
    cfg, batch, context = tiny_model.config, 2, 24
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    for layer, block in enumerate(tiny_model.transformer_blocks):
        counted = counted_flops(block, torch.randn(batch, k, dim), torch.randn(batch, context, dim),
                                torch.randn(batch, dim))
        assert batch * flops.block_flops(cfg, layer, k, context) == counted, f"layer {layer}"


def test_k_equal_n_everywhere_is_the_dense_model():
    k_full = [N_1024] * SD35_MEDIUM["num_layers"]
    dense = flops.dense_model_flops(SD35_MEDIUM, N_1024, S_SD3, 1)
    assert flops.model_flops(SD35_MEDIUM, k_full, S_SD3, 1, num_tokens=N_1024) == dense
    assert flops.model_flops(SD35_MEDIUM, k_full, S_SD3, 1) == dense  # N defaults to the native 1024 px
    assert all(flops.block_flops_breakdown(SD35_MEDIUM, layer, N_1024, S_SD3, num_tokens=N_1024)["router"] == 0
               for layer in range(24))


@pytest.mark.parametrize("layer", [0, 12, 13, 23])  # dual attention, last dual, plain, context_pre_only
def test_block_flops_strictly_increase_with_k(layer):
    values = [flops.block_flops(SD35_MEDIUM, layer, k, S_SD3) for k in range(0, N_1024 + 1, 64)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_model_flops_increase_when_any_layer_keeps_more_tokens():
    base = [N_1024] + [2048] * 23
    reference = flops.model_flops(SD35_MEDIUM, base, S_SD3, 2)
    for layer in range(1, 24):
        more = list(base)
        more[layer] += 64
        assert flops.model_flops(SD35_MEDIUM, more, S_SD3, 2) > reference


@pytest.mark.parametrize("layer, dual", [(5, True), (20, False)])
def test_attention_is_quadratic_in_kept_tokens(layer, dual):
    """Second difference in k is constant: 8 D from joint attention over S + k, plus 8 D from attn2 over k."""
    dim = 24 * 64
    f = [flops.block_flops(SD35_MEDIUM, layer, k, S_SD3) for k in (1000, 1001, 1002, 3000, 3001, 3002)]
    for a, b, c in (f[0:3], f[3:6]):
        assert c - 2 * b + a == 8 * dim * (2 if dual else 1)
    joint = [flops.block_flops_breakdown(SD35_MEDIUM, layer, k, S_SD3)["joint_attention"] for k in (0, 2048)]
    assert joint == [4 * S_SD3**2 * dim, 4 * (S_SD3 + 2048) ** 2 * dim]


def test_context_stream_cost_does_not_depend_on_k():
    for k in (64, 4096):
        parts = flops.block_flops_breakdown(SD35_MEDIUM, 7, k, S_SD3)
        assert parts["context_qkv"] == 2 * S_SD3 * 1536 * 3 * 1536
        assert parts["context_ffn"] == 2 * 2 * S_SD3 * 1536 * 4 * 1536


def test_last_block_projects_context_queries_but_has_no_context_output_or_ffn():
    last = flops.block_flops_breakdown(SD35_MEDIUM, 23, 4096, S_SD3)
    assert last["context_out"] == 0 and last["context_ffn"] == 0 and last["context_qkv"] > 0


def test_router_is_paid_only_by_pruned_blocks_and_scores_all_n_tokens():
    pruned = flops.block_flops_breakdown(SD35_MEDIUM, 3, 1024, S_SD3, num_tokens=N_1024)
    assert pruned["router"] == 2 * N_1024 * 1536 * 64 + 2 * N_1024 * 64 + 2 * 2 * 1536 * 64
    assert flops.block_flops_breakdown(SD35_MEDIUM, 3, 1024, S_SD3)["router"] == 0  # N unknown: no router
    assert pruned["router"] < 0.01 * sum(pruned.values())


def test_sd35_medium_dense_forward_is_about_the_papers_11_8_tflops():
    """One forward at batch 1: 11.25 TFLOPs (matmuls only); the paper's 11.80 T reads as per forward, not per image."""
    per_step = flops.dense_model_flops(SD35_MEDIUM, N_1024, S_SD3, 1)
    assert per_step == 11_249_573_707_776
    assert 0.9 < per_step / 11.80e12 < 1.0
    assert flops.dense_model_flops(SD35_MEDIUM, N_1024, S_SD3, 2) == 2 * per_step


def test_uniform_keep_reduces_flops_about_as_much_as_the_paper_reports():
    """Paper: retention 0.6 -> -41.0 %, 0.8 -> -24.4 % (adaptive schedules); uniform keep gives -44.0 % and -23.2 %."""
    dense = flops.dense_model_flops(SD35_MEDIUM, N_1024, S_SD3, 1)
    for keep, paper in ((0.6, 0.410), (0.8, 0.244)):
        k = [N_1024] + [int(N_1024 * keep)] * 23
        reduction = 1 - flops.model_flops(SD35_MEDIUM, k, S_SD3, 1, num_tokens=N_1024) / dense
        assert abs(reduction - paper) < 0.035


def test_bad_inputs_are_config_errors_naming_the_problem():
    with pytest.raises(ConfigError, match=r"missing \['num_layers'\]"):
        flops.block_flops({k: v for k, v in TINY_SD3.items() if k != "num_layers"}, 0, 1, 1)
    with pytest.raises(ConfigError, match="caption_projection_dim=64 must equal"):
        flops.block_flops({**TINY_SD3, "caption_projection_dim": 64}, 0, 1, 1)
    with pytest.raises(ConfigError, match="k=300 exceeds the image tokens N=256"):
        flops.block_flops(TINY_SD3, 1, 300, 24, num_tokens=256)
    with pytest.raises(ConfigError, match="layer 4 is out of range; the model has 4 blocks"):
        flops.block_flops(TINY_SD3, 4, 10, 24)
    with pytest.raises(ConfigError, match="k must be an integer"):
        flops.block_flops(TINY_SD3, 0, 10.5, 24)
    with pytest.raises(ConfigError, match="k_per_layer has 3 entries; expected one per block \\(4\\)"):
        flops.model_flops(TINY_SD3, [256] * 3, 24, 1)
    with pytest.raises(ConfigError, match="batch=0 must be >= 1"):
        flops.model_flops(TINY_SD3, [256] * 4, 24, 0)

"""Claims about shiva_export/kernels.py: the fused CUDA kernels equal the torch reference path.

On a CPU machine they run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before anything imports
Triton); Triton is a test dependency on Linux x86-64. The same checks run on the GPU by
scripts/microbench_selection.py (its "equivalence" lines). Without Triton (another platform) they skip.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from shiva_export import kernels
from shiva_export.models import example_inputs, load_transformer, num_image_tokens
from shiva_export.patching import PruningConfig, apply_token_pruning, cfg_joint_scores, static_k
from shiva_export.router import ContextAwareRouter, RouterBank
from shiva_export.topk import flat_row_index, hard_topk_indices, scatter_rows

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (its CPU interpreter runs these checks; "
                                         "on a GPU scripts/microbench_selection.py prints the same equivalence)")


@pytest.fixture
def interpreted(monkeypatch):
    """Triton kernels on this machine's tensors: native on CUDA, the interpreter on CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(kernels, "_INTERPRETED_CPU", device == "cpu")
    with kernels.enabled(True), torch.no_grad():
        yield device


def reference_selection(scores, k, cfg):
    if cfg:
        half = hard_topk_indices(cfg_joint_scores(scores), k)
        indices = torch.cat([half, half], dim=0)
    else:
        indices = hard_topk_indices(scores, k)
    return indices, flat_row_index(indices, scores.shape[1])


def scores_of(kind: str, batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(batch, n, generator=gen)
    if kind == "ties":               # few distinct values: most of the boundary is ties
        return torch.randint(0, 4, (batch, n), generator=gen).float()
    if kind == "fp16-rounded":       # what an fp16 router gives: many exact ties
        return torch.randn(batch, n, generator=gen).half().float()
    scores = torch.randn(batch, n, generator=gen)   # special values: +-inf, NaN, signed zeros
    scores[:, 0], scores[:, 1], scores[:, 2] = float("inf"), float("-inf"), float("nan")
    scores[:, 3::7] = 0.0
    scores[:, 4::7] = -0.0
    return scores


@needs_triton
@pytest.mark.parametrize("kind", ["random", "ties", "fp16-rounded", "special"])
@pytest.mark.parametrize("n,batch,k,cfg", [(64, 2, 17, True), (100, 3, 50, False), (256, 2, 256, True),
                                           (256, 4, 1, True), (4096, 2, 2496, True), (4096, 2, 1664, False)])
def test_fused_selection_is_bit_identical_to_the_torch_path(interpreted, kind, n, batch, k, cfg):
    gen = torch.Generator().manual_seed(n * 7 + k)
    scores = scores_of(kind, batch, n, gen).to(interpreted)
    indices, flat = kernels.select_topk(scores, k, cfg_consistent=cfg)
    want_indices, want_flat = reference_selection(scores, k, cfg)
    assert indices.dtype == want_indices.dtype == torch.int64
    assert torch.equal(indices, want_indices)
    assert torch.equal(flat, want_flat)


@needs_triton
def test_fused_scatter_equals_scatter_rows(interpreted):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 96, 48, generator=gen).half().to(interpreted)
    indices = torch.sort(torch.randperm(96, generator=gen)[:40]).values.repeat(2, 1).to(interpreted)
    rows = torch.randn(2, 40, 48, generator=gen).half().to(interpreted)
    want = scatter_rows(base.clone(), indices, rows)
    got = kernels.scatter_rows_(base.clone(), flat_row_index(indices, 96), rows)
    assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("slot", [0, 1])
def test_fused_router_matches_the_fp32_router_to_fp16_rounding(interpreted, slot):
    torch.manual_seed(0)
    dim = 128
    router = ContextAwareRouter(dim, dim, dim)
    for p in router.parameters():
        p.data.normal_(0, 0.2)
    tokens, temb, pooled = torch.randn(2, 96, dim), torch.randn(2, dim), torch.randn(2, dim)
    want = router(tokens, temb, pooled, slot)
    half = ContextAwareRouter(dim, dim, dim)
    half.load_state_dict(router.state_dict())
    half = half.half().to(interpreted)
    args = (tokens.half().to(interpreted), temb.half().to(interpreted), pooled.half().to(interpreted))
    assert kernels.router_supported(half, args[0])
    got = kernels.router_scores(half, *args, slot)
    torch_fp16 = half(*args, slot) if interpreted == "cpu" else None
    assert got.dtype == torch.float32 and got.shape == (2, 96)
    error = (got.cpu() - want).abs().max().item()
    assert error < 2e-3 * want.abs().max().item()
    if torch_fp16 is not None:  # the torch fp16 path (here the fused one too, interpreted); nothing worse
        assert (torch_fp16.cpu() - want).abs().max().item() < 4e-3 * want.abs().max().item()


@needs_triton
def test_fused_router_pools_the_context_tokens_itself(interpreted):
    torch.manual_seed(1)
    dim, layers = 64, 4
    bank = RouterBank(layers, dim, dim, dim)
    for p in bank.parameters():
        p.data.normal_(0, 0.2)
    tokens, temb, context = torch.randn(2, 80, dim), torch.randn(2, dim), torch.randn(2, 13, dim)
    half = RouterBank(layers, dim, dim, dim)
    half.load_state_dict(bank.state_dict())
    half = half.half().to(interpreted)
    for layer in range(layers):
        want = bank(layer, tokens, temb, context.mean(dim=1))
        got = half.score_context(layer, tokens.half().to(interpreted), temb.half().to(interpreted),
                                 context.half().to(interpreted))
        assert (got.cpu() - want).abs().max().item() < 2e-3 * want.abs().max().item()


def test_score_context_without_the_fused_path_is_the_router_on_the_mean_context():
    torch.manual_seed(2)
    bank = RouterBank(4, 32, 32, 32)
    tokens, temb, context = torch.randn(2, 10, 32), torch.randn(2, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(bank.score_context(3, tokens, temb, context), bank(3, tokens, temb, context.mean(dim=1)))


@needs_triton
@pytest.mark.parametrize("cfg", [True, False])
def test_patched_model_with_fused_kernels_equals_the_torch_path_exactly(interpreted, cfg):
    transformer, _ = load_transformer("tiny-sd35")
    torch.manual_seed(0)
    routers = RouterBank.for_transformer(transformer).eval()
    apply_token_pruning(transformer, routers, PruningConfig(cfg_consistent=cfg))
    num_tokens = num_image_tokens(transformer.config, 128, 128)
    layers = len(transformer.transformer_blocks)
    k = tuple([num_tokens] + [num_tokens // 2, num_tokens // 4, num_tokens, 3 * num_tokens // 4, 7][:layers - 1])
    inputs = example_inputs(transformer.config, batch=2, height=128, width=128, context_tokens=8)
    transformer.to(interpreted)
    inputs = {name: value.to(interpreted) for name, value in inputs.items()}
    outputs = {}
    for fused in (False, True):
        with kernels.enabled(fused), static_k(transformer, k, record=True, inplace_scatter=fused) as state:
            sample = transformer(**{n: v.clone() for n, v in inputs.items()}, return_dict=False)[0]
            outputs[fused] = (sample, {l: v.clone() for l, v in state.indices.items()})
    assert torch.equal(outputs[True][0], outputs[False][0])
    for layer, indices in outputs[False][1].items():
        assert torch.equal(outputs[True][1][layer], indices)


def test_the_fused_path_is_off_on_cpu_tensors_and_under_autograd(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 3)
    assert not kernels.usable(x)                 # CPU tensors: the torch path (and the exported graph)
    with kernels.enabled(False):
        assert not kernels.usable(x)
    if torch.cuda.is_available():
        y = x.cuda()
        with torch.enable_grad():
            assert not kernels.usable(y)         # training: autograd needs the torch ops
        with torch.no_grad(), kernels.enabled(True):
            assert kernels.usable(y) == kernels.triton_available()


def test_the_fused_path_is_off_for_tracer_tensors_and_under_onnx_export(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(kernels, "_INTERPRETED_CPU", True)   # would otherwise take CPU tensors
    with torch.no_grad(), kernels.enabled(True):
        assert kernels.usable(torch.zeros(2, 3)) == kernels.triton_available()
        with FakeTensorMode():
            assert not kernels.usable(torch.zeros(2, 3))     # torch.export / torch.onnx trace with fake tensors
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        assert not kernels.usable(torch.zeros(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_selection_on_the_gpu_matches_the_torch_path():
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad(), kernels.enabled(True):
        for kind in ("random", "fp16-rounded", "special"):
            scores = scores_of(kind, 2, 4096, gen).cuda()
            got = kernels.select_topk(scores, 2496, cfg_consistent=True)
            want = reference_selection(scores, 2496, True)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
def test_compiled_blocks_with_the_fused_gather_scatter_step_match_the_uncompiled_model(interpreted):
    from shiva_export.patching import compile_blocks

    transformer, _ = load_transformer("tiny-sd35")
    torch.manual_seed(0)
    apply_token_pruning(transformer, RouterBank.for_transformer(transformer).eval(), PruningConfig(cfg_consistent=True))
    num_tokens = num_image_tokens(transformer.config, 128, 128)
    k = (num_tokens, 32, 16, 64, 48, 32)
    inputs = {n: v.to(interpreted) for n, v in example_inputs(transformer.config, batch=2, height=128, width=128,
                                                               context_tokens=8).items()}
    transformer.to(interpreted)
    with static_k(transformer, k, inplace_scatter=True, record=True) as state:
        want = transformer(**inputs, return_dict=False)[0]
        want_indices = dict(state.indices)
    compile_blocks(transformer)
    with static_k(transformer, k, inplace_scatter=True, record=True) as state:
        got = transformer(**inputs, return_dict=False)[0]
        assert all(torch.equal(state.indices[l], want_indices[l]) for l in want_indices)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

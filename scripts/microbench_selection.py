"""Micro-benchmark of the per-block selection path on a GPU: router, top-k variants, gather and scatter variants.

    python scripts/microbench_selection.py [--tokens 4096 --dim 1536 --batch 2 --keep 0.6]

Each line is the CUDA-event time of one op over [batch, tokens, dim] fp16 activations (mean of 50 CUDA-graph
replays after warm-up). Used to choose the eager implementations in shiva_export/topk.py and the fused Triton
kernels of shiva_export/kernels.py (the exported graph is unaffected). The "equivalence" lines check the fused
kernels against the torch path on this GPU: selection bit-identical, router within fp16 rounding of fp32.
"""

from __future__ import annotations

import argparse

import torch

from shiva_export import kernels
from shiva_export.patching import cfg_joint_scores
from shiva_export.router import ContextAwareRouter
from shiva_export.topk import ascending_compaction, flat_row_index, gather_rows, hard_topk_indices, scatter_rows


def bench(fn, runs=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        fn()
    start.record()
    for _ in range(runs):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / runs * 1e3  # microseconds


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--keep", type=float, default=0.6)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    b, n, d = args.batch, args.tokens, args.dim
    k = int(n * args.keep) // 64 * 64
    x = torch.randn(b, n, d, device="cuda", dtype=torch.float16)
    temb = torch.randn(b, d, device="cuda", dtype=torch.float16)
    ctx = torch.randn(b, d, device="cuda", dtype=torch.float16)
    scores = torch.randn(b, n, device="cuda")
    router32 = ContextAwareRouter(d, d, d).cuda()
    router16 = ContextAwareRouter(d, d, d).cuda()
    router16.load_state_dict(router32.state_dict())
    router16.half()
    equivalence(router32, router16, x, temb, ctx, n, k)

    def torch_router16():  # the hook's torch path: pool the context tokens, then the router's ops
        with kernels.enabled(False):
            return router16(x, temb, ctx3.mean(dim=1), 0)

    def torch_selection(kk):  # the hook's torch path: CFG max, sort, compaction, both halves, flat rows
        half = hard_topk_indices(cfg_joint_scores(scores), kk)
        idx2 = torch.cat([half, half], dim=0)
        return flat_row_index(idx2, n)

    flat_full = kernels.select_topk(scores, n, cfg_consistent=True)[1]
    y_full = torch.randn(b, n, d, device="cuda", dtype=torch.float16)
    top = torch.topk(scores, k).indices
    idx = ascending_compaction(top, n)
    y = torch.randn(b, k, d, device="cuda", dtype=torch.float16)
    flat = flat_row_index(idx, n)
    ctx3 = torch.randn(b, 333, d, device="cuda", dtype=torch.float16)
    results = {
        "router fp32": lambda: router32(x, temb, ctx, 0),
        "router fp16 incl. context mean (torch)": torch_router16,
        "router fp16 incl. context mean (fused triton)": lambda: kernels.router_scores(router16, x, temb, ctx3, 0),
        "router fp16 on pooled context (fused triton)": lambda: kernels.router_scores(router16, x, temb, ctx, 0),
        f"selection k={k} (torch: max+sort+compaction+cat+flat)": lambda: torch_selection(k),
        f"selection k={k} (fused triton)": lambda: kernels.select_topk(scores, k, cfg_consistent=True),
        **{f"selection k={k} (fused triton, {w} warps)": (lambda w=w: kernels.select_topk(scores, k, True, num_warps=w))
           for w in (1, 2, 4, 16)},
        f"selection k={n} (torch)": lambda: torch_selection(n),
        f"selection k={n} (fused triton)": lambda: kernels.select_topk(scores, n, cfg_consistent=True),
        "scatter rows (triton row copy, in place)": lambda: kernels.scatter_rows_(x, flat, y),
        f"scatter rows k={n} (index_copy_, in place)": lambda: x.view(b * n, d).index_copy_(0, flat_full,
                                                                                           y_full.view(-1, d)),
        f"scatter rows k={n} (triton, in place)": lambda: kernels.scatter_rows_(x, flat_full, y_full),
        "gather rows (index_select on flat)": lambda: x.view(b * n, d).index_select(0, flat),
        "context mean (pooled for the router)": lambda: ctx3.mean(dim=1),
        "stable sort [:k]": lambda: torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k],
        "topk(k)": lambda: torch.topk(scores, k).indices,
        "compaction (cumsum permutation)": lambda: ascending_compaction(top, n),
        "sort of k indices": lambda: top.sort(dim=-1).values,
        "gather rows (index_select)": lambda: gather_rows(x, idx),
        "scatter rows (index_put)": lambda: scatter_rows(x, idx, y),
        "scatter rows (clone+index_copy_)": lambda: x.reshape(b * n, d).clone().index_copy_(0, flat, y.reshape(-1, d)),
        "scatter rows (clone+index_put_)": lambda: x.reshape(b * n, d).clone().index_put_((flat,), y.reshape(-1, d)),
        "clone only": lambda: x.clone(),
    }
    for name, fn in results.items():
        print(f"{name:>52}: {bench(fn):8.1f} us", flush=True)


def equivalence(router32, router16, x, temb, ctx, n, k):
    """Fused kernels vs the torch path on this GPU, printed (and asserted for the selection)."""
    gen = torch.Generator().manual_seed(0)
    cases = {"random": torch.randn(2, n, generator=gen),
             "fp16-rounded": torch.randn(2, n, generator=gen).half().float(),
             "ties": torch.randint(0, 4, (2, n), generator=gen).float()}
    special = torch.randn(2, n, generator=gen)
    special[:, 0], special[:, 1], special[:, 2], special[:, 3::7], special[:, 4::7] = \
        float("inf"), float("-inf"), float("nan"), 0.0, -0.0
    cases["special"] = special
    for name, s in cases.items():
        s = s.cuda()
        for kk in (k, n, 64):
            for cfg in (True, False):
                idx, flat = kernels.select_topk(s, kk, cfg_consistent=cfg)
                half = hard_topk_indices(cfg_joint_scores(s), kk) if cfg else hard_topk_indices(s, kk)
                want = torch.cat([half, half], dim=0) if cfg else half
                same = torch.equal(idx, want) and torch.equal(flat, flat_row_index(want, n))
                print(f"equivalence selection {name} k={kk} cfg={cfg}: {'identical' if same else 'DIFFERENT'}")
                assert same
    ref = router32(x.float(), temb.float(), ctx.float(), 1)
    with kernels.enabled(False):
        torch16 = router16(x, temb, ctx, 1)
    fused = kernels.router_scores(router16, x, temb, ctx, 1)
    ctx_tokens = torch.randn(2, 333, x.shape[-1], device="cuda", dtype=torch.float16)
    pooled_ref = router32(x.float(), temb.float(), ctx_tokens.float().mean(dim=1), 1)
    pooled_fused = kernels.router_scores(router16, x, temb, ctx_tokens, 1)
    print(f"equivalence router with context tokens (mean fused): max abs vs fp32 "
          f"{(pooled_fused - pooled_ref).abs().max().item():.3g}")

    scale = ref.abs().max().item()
    print(f"equivalence router (scale {scale:.3g}): fused vs fp32 max abs {(fused - ref).abs().max().item():.3g}, "
          f"torch fp16 vs fp32 max abs {(torch16 - ref).abs().max().item():.3g}; top-{k} agreement vs fp32: fused "
          f"{agreement(fused, ref, k):.4f}, torch fp16 {agreement(torch16, ref, k):.4f}")
    base = torch.randn(2, n, x.shape[-1], device="cuda", dtype=torch.float16)
    idx = hard_topk_indices(torch.randn(2, n, device="cuda"), k)
    rows = torch.randn(2, k, x.shape[-1], device="cuda", dtype=torch.float16)
    same = torch.equal(kernels.scatter_rows_(base.clone(), flat_row_index(idx, n), rows), scatter_rows(base, idx, rows))
    print(f"equivalence scatter: {'identical' if same else 'DIFFERENT'}", flush=True)
    assert same


def agreement(a, b, k):
    ia, ib = hard_topk_indices(a, k), hard_topk_indices(b, k)
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ia, ib)) / ib.numel()


if __name__ == "__main__":
    main()

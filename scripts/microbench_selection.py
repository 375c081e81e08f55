"""Micro-benchmark of the per-block selection path on a GPU: router, top-k variants, gather and scatter variants.

    python scripts/microbench_selection.py [--tokens 4096 --dim 1536 --batch 2 --keep 0.6]

Each line is the CUDA-event time of one op over [batch, tokens, dim] fp16 activations (mean of 50 after warm-up).
Used to choose the eager implementations in shiva_export/topk.py; the exported graph is unaffected.
"""

from __future__ import annotations

import argparse

import torch

from shiva_export.router import ContextAwareRouter
from shiva_export.topk import ascending_compaction, flat_row_index, gather_rows, scatter_rows


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
    b, n, d = args.batch, args.tokens, args.dim
    k = int(n * args.keep) // 64 * 64
    x = torch.randn(b, n, d, device="cuda", dtype=torch.float16)
    temb = torch.randn(b, d, device="cuda", dtype=torch.float16)
    ctx = torch.randn(b, d, device="cuda", dtype=torch.float16)
    scores = torch.randn(b, n, device="cuda")
    router32 = ContextAwareRouter(d, d, d).cuda()
    router16 = ContextAwareRouter(d, d, d).cuda().half()
    top = torch.topk(scores, k).indices
    idx = ascending_compaction(top, n)
    y = torch.randn(b, k, d, device="cuda", dtype=torch.float16)
    flat = flat_row_index(idx, n)
    results = {
        "router fp32": lambda: router32(x, temb, ctx, 0),
        "router fp16": lambda: router16(x, temb, ctx, 0),
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
        print(f"{name:>36}: {bench(fn):8.1f} us")


if __name__ == "__main__":
    main()

"""Per-shape kernel timings behind the keep-0.6 gap: SDPA backends and the block's GEMMs, dense vs pruned lengths.

The whole-model profile (docs/benchmarks/h200/profile-fused.txt) shows attention falling to 0.505x of dense and
the GEMMs to 0.72x at keep 0.6, against FLOP ratios near 0.40 and 0.64. This script times each kernel family in
isolation at the exact shapes of sd35-medium-shape (batch 2, 24 heads of 64, width 1536, FFN 6144, 333 context
tokens), so a choice (attention backend per length, k per tile) can be made from numbers.

    python scripts/gpu_shapes_bench.py --out docs/benchmarks/h200/shapes
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

BATCH, HEADS, HEAD_DIM, WIDTH, FFN, CONTEXT, TOKENS = 2, 24, 64, 1536, 6144, 333, 4096


def time_ms(fn, warmup: int = 5, runs: int = 30) -> float:
    """Median of per-call CUDA-graph replays (launch gaps removed, as in gpu_bench's cudagraph column)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 10)
    times.sort()
    return times[len(times) // 2]


def attention_rows(lengths: list[int], names: list[str]) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    backends = {name: backends[name] for name in names}
    rows = []
    for length in lengths:
        q, k, v = (torch.randn(BATCH, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(3))
        flops = 4 * BATCH * HEADS * length * length * HEAD_DIM
        row = {"length": length}
        for name, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
                row[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
            except RuntimeError as error:
                row[name] = {"error": str(error).splitlines()[0][:120]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def gemm_rows(token_counts: list[int]) -> list[dict]:
    shapes = {"qkv_sep": [(WIDTH, WIDTH)] * 3, "qkv_fused": [(3 * WIDTH, WIDTH)], "out": [(WIDTH, WIDTH)],
              "ff_up": [(FFN, WIDTH)], "ff_down": [(WIDTH, FFN)]}
    rows = []
    for tokens in token_counts:
        rows_m = BATCH * tokens
        row = {"tokens": tokens, "m": rows_m}
        for name, weights in shapes.items():
            mats = [(torch.randn(n, kdim, device="cuda", dtype=torch.float16) * 0.02,
                     torch.zeros(n, device="cuda", dtype=torch.float16)) for n, kdim in weights]
            x = torch.randn(BATCH, tokens, weights[0][1], device="cuda", dtype=torch.float16)
            flops = sum(2 * rows_m * n * kdim for n, kdim in weights)
            ms = time_ms(lambda: [F.linear(x, w, b) for w, b in mats])
            row[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def parse_lengths(spec: str) -> list[int]:
    """'2752-2880:16,4429' -> [2752, 2768, ..., 2880, 4429]."""
    lengths = []
    for part in filter(None, spec.split(",")):
        if "-" in part:
            span, _, step = part.partition(":")
            low, high = (int(v) for v in span.split("-"))
            lengths += list(range(low, high + 1, int(step or 1)))
        else:
            lengths.append(int(part))
    return lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", default="0.4,0.6,0.8")
    parser.add_argument("--lengths", default="", help="extra SDPA sequence lengths, e.g. 2752-2880:16,4429")
    parser.add_argument("--backends", default="cudnn,flash,efficient")
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    keeps = [float(v) for v in args.keeps.split(",")]
    ks = sorted({TOKENS} | {int(TOKENS * r) // 8 * 8 for r in keeps}
                | {128 * round((TOKENS * r + CONTEXT) / 128) - CONTEXT for r in keeps})
    joint = [k + CONTEXT for k in ks]
    backends = args.backends.split(",")
    attention = attention_rows(sorted(set(joint + ks + parse_lengths(args.lengths))), backends)
    gemms = [] if args.skip_gemm else gemm_rows(ks)
    props = torch.cuda.get_device_properties(0)
    device = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    result = {"device": device, "attention": attention, "gemm": gemms,
              "command": "python scripts/gpu_shapes_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
    backend_cols = [b for b in ("cudnn", "flash", "efficient") if b in backends]
    lines = [f"# Kernel timings per shape: {device['gpu']} ({device['sms']} SMs), torch {device['torch']}, "
             f"CUDA {device['cuda']}, cuDNN {device['cudnn']}", "", f"Command: `{result['command']}`", "",
             "Median per call over CUDA-graph replays, fp16, batch 2.", "",
             "## SDPA (24 heads x 64), ms (TFLOPS)", "", "| length | " + " | ".join(backend_cols) + " |",
             "|---" * (len(backend_cols) + 1) + "|"]
    for row in attention:
        cells = [f"{row[b]['ms']} ({row[b]['tflops']})" if "ms" in row[b] else "n/a" for b in backend_cols]
        lines.append(f"| {row['length']} | " + " | ".join(cells) + " |")
    lines += [] if not gemms else ["", "## Linear layers on image tokens, ms (TFLOPS)", "",
              "| tokens | rows M | qkv (3 GEMMs) | qkv fused | out | ff up | ff down |",
              "|---|---|---|---|---|---|---|"]
    for row in gemms:
        cells = [f"{row[n]['ms']} ({row[n]['tflops']})" for n in ("qkv_sep", "qkv_fused", "out", "ff_up", "ff_down")]
        lines.append(f"| {row['tokens']} | {row['m']} | " + " | ".join(cells) + " |")
    with open(args.out + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

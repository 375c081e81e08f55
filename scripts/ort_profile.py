"""Where ONNX Runtime spends a step: per-op-type device time of exported graphs, from ORT's own profiler.

    python scripts/ort_profile.py DIR/dense.onnx DIR/b1.onnx --runs 5 --out docs/benchmarks/h200/ort-profile

Feeds come from the graph's input shapes (random, seed 0); weights are whatever the export wrote. ORT's own node
events time the host side of each node on the CUDA EP (launches are asynchronous), so ``--device-time`` records the
GPU kernels instead, with torch.profiler's CUPTI tracer running in the same process as ORT.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np


def feed_for(session) -> dict:
    rng = np.random.default_rng(0)
    types = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
             "tensor(bfloat16)": np.float32}
    feed = {}
    for arg in session.get_inputs():
        dtype = types[arg.type]
        value = rng.standard_normal(arg.shape).astype(dtype) if dtype != np.int64 else np.zeros(arg.shape, np.int64)
        if arg.name == "timestep":
            value = np.full(arg.shape, 500.0, dtype)
        feed[arg.name] = value
    return feed


def profile(path: str, runs: int, provider: str) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join("/tmp", os.path.basename(path))
    session = ort.InferenceSession(path, options, providers=[provider])
    feed = feed_for(session)
    warmup = 2
    for _ in range(warmup + runs):
        session.run(None, feed)
    trace = session.end_profiling()
    with open(trace) as handle:
        events = json.load(handle)
    # the warm-up runs are in the trace too: count node events from the first timed run on
    starts = sorted(event["ts"] for event in events if event.get("name") == "model_run")
    timed_from = starts[warmup] if len(starts) > warmup else 0
    per_type = collections.defaultdict(float)
    per_node = collections.defaultdict(float)
    for event in events:
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and event.get("ts", 0) >= timed_from):
            op = event["args"].get("op_name", "?")
            per_type[op] += event["dur"] / 1000 / runs
            per_node[(op, event["name"][: -len("_kernel_time")])] += event["dur"] / 1000 / runs
    os.remove(trace)
    top = sorted(per_node.items(), key=lambda item: -item[1])[:15]
    return {"graph": path, "total_ms": sum(per_type.values()),
            "per_op_type_ms": dict(sorted(per_type.items(), key=lambda item: -item[1])),
            "top_nodes_ms": [{"op": op, "node": name, "ms": ms} for (op, name), ms in top]}


def device_profile(path: str, runs: int, provider: str) -> dict:
    """GPU time per CUDA kernel name over `runs` steps (CUPTI via torch.profiler sees ORT's kernels too)."""
    import onnxruntime as ort
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    session = ort.InferenceSession(path, providers=[provider])
    feed = feed_for(session)
    for _ in range(3):
        session.run(None, feed)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            session.run(None, feed)
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type.name == "CUDA":
            per_kernel[event.name[:90]] += event.device_time / 1000 / runs
    ranked = dict(sorted(per_kernel.items(), key=lambda item: -item[1]))
    return {"graph": path, "total_ms": sum(ranked.values()), "per_op_type_ms": ranked, "top_nodes_ms": []}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--provider", default="CUDAExecutionProvider")
    parser.add_argument("--device-time", action="store_true", help="GPU time per kernel (CUPTI) instead of ORT nodes")
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    args = parser.parse_args(argv)
    run = device_profile if args.device_time else profile
    results = [run(path, args.runs, args.provider) for path in args.graphs]
    with open(args.out + ".json", "w") as handle:
        json.dump({"command": "python " + " ".join(sys.argv), "results": results}, handle, indent=1)
    ops = sorted({op for r in results for op in r["per_op_type_ms"]},
                 key=lambda op: -max(r["per_op_type_ms"].get(op, 0.0) for r in results))
    names = [os.path.basename(r["graph"]) for r in results]
    what = "GPU time per CUDA kernel (CUPTI)" if args.device_time else "time per op type (sum of ORT node events)"
    lines = [f"# ONNX Runtime ({args.provider}) {what}, ms per step", "",
             f"Command: `python {' '.join(sys.argv)}`", "", "| op type | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    lines.append("| **total** | " + " | ".join(f"{r['total_ms']:.2f}" for r in results) + " |")
    for op in ops:
        lines.append(f"| {op.replace('|', '/')} | "
                     + " | ".join(f"{r['per_op_type_ms'].get(op, 0.0):.3f}" for r in results) + " |")
    for r in results:
        lines += ["", f"Top nodes of {os.path.basename(r['graph'])}:", ""]
        lines += [f"- {n['op']} `{n['node']}`: {n['ms']:.3f} ms" for n in r["top_nodes_ms"]]
    with open(args.out + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

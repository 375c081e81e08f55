"""GPU evidence for issue 7: per-step and 50-step-loop speed of the pruned static model, dense vs pruned.

Runs on a CUDA machine (also on CPU with a tiny preset, to test the script itself):

    python scripts/gpu_bench.py --phase torch --out docs/benchmarks/h100     # PyTorch eager + CUDA graph
    python scripts/gpu_bench.py --phase ort   --out docs/benchmarks/h100     # ONNX Runtime CUDA on static graphs

Every ratio is measured side by side in one process on one device: the same weights, inputs and backend for
the dense and the pruned model. Weights are random (the preset's seed); speed does not depend on them.
Configurations: dense; keep 1.0 (router + selection + scatter, all tokens kept: the overhead); uniform keep
0.6 and 0.4 (block 0 dense, k rounded up by the freeze pass: to a multiple of --align, or with --align-to
sequence so that k + context tokens is one); and a paper-shaped schedule (keep ~0.4 in the
early high-noise steps rising to ~0.8, mean 0.6) frozen into buckets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from shiva_export import backbones, kernels
from shiva_export.backbones.base import Backbone
from shiva_export.errors import ConfigError
from shiva_export.export import DenseModel, ExportConfig, StaticBucket, example_feed, torch_dtype
from shiva_export.flops import ModelDims
from shiva_export.io import write_bytes
from shiva_export.models import num_image_tokens
from shiva_export.passes.freeze import FreezeConfig, StepFlops, freeze, k_table
from shiva_export.patching import compile_blocks, static_k
from shiva_export.pruned import load_pruned_model


PROJECTION_LAYOUTS = ("separate", "fused")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["torch", "ort"], required=True)
    parser.add_argument("--model", default="sd35-medium-shape")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's (2 for CFG, 1 for FLUX.1)")
    parser.add_argument("--context-tokens", type=int, default=None, help="default: the preset's text tokens")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="backbone dtype on the GPU")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of the loop")
    parser.add_argument("--buckets", type=int, default=4, help="buckets of the paper-shaped schedule")
    parser.add_argument("--align", type=int, default=None, help="k alignment (default: the preset's, else 64)")
    parser.add_argument("--align-to", choices=["k", "sequence", "either"], default=None,
                        help="what --align rounds up: k, k + context tokens (the joint attention length), or either, "
                        "whichever comes first (default: the preset's, else k)")
    parser.add_argument("--keeps", default="1.0,0.6,0.4", help="uniform keep ratios to time per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--loop-runs", type=int, default=3)
    parser.add_argument("--router-dtype", choices=["fp32", "model"], default="fp32",
                        help="fp32 routers (default) or routers in the backbone's fp16")
    parser.add_argument("--kernels", default="triton",
                        help="comma list of selection/router implementations to time, each a full torch phase in this "
                        "process: triton (fused kernels of shiva_export/kernels.py, the default on CUDA), torch (the "
                        "pure-torch path); writes <phase>-<kernels>.json/.md when more than one is given")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="torch.compile every block's computation (patching.compile_blocks) for dense and pruned "
                        "alike, before timing; the hook (router, selection, gather, scatter) stays eager")
    parser.add_argument("--compile-rows", action=argparse.BooleanOptionalAction, default=True,
                        help="with --compile-blocks: also compile the row gather and in-place scatter into each "
                        "pruned block's graph (default), or keep them eager kernels")
    parser.add_argument("--compile-mode", default=None,
                        help="with --compile-blocks: torch.compile mode for the blocks, e.g. max-autotune-no-cudagraphs "
                        "(inductor benchmarks cuBLAS against its Triton GEMM templates per shape and keeps the fastest)")
    parser.add_argument("--fuse-qkv", action="store_true",
                        help="fuse each attention's q/k/v projections into one GEMM (diffusers' fuse_qkv_projections), "
                        "for dense and pruned alike, before timing")
    parser.add_argument("--projections", default="separate",
                        help="comma list of projection layouts, each timed for dense and pruned alike in this process: "
                        "separate (the model's own Linear layers) and/or fused (the backbone's fused layout; FLUX.1: "
                        "one GEMM for each single-stream block's q/k/v and MLP input, BFL's linear1, and one per stream "
                        "for each double-stream attention's q/k/v); fused runs last, since fusing is done in place")
    parser.add_argument("--attention-backend", default="",
                        help="comma list of diffusers attention backends (transformer.set_attention_backend), each "
                        "timed for dense and pruned alike in this process, e.g. native,_native_cudnn,_native_flash; "
                        "default: diffusers' own (native SDPA), unchanged")
    parser.add_argument("--skip-schedule", action="store_true",
                        help="time only dense and the uniform keeps: no schedule buckets or loop (numerics then "
                        "compare the uniform keeps below 1)")
    parser.add_argument("--numerics", action=argparse.BooleanOptionalAction, default=True,
                        help="torch phase: compare the bf16/fp16 buckets with the fp32 reference after timing "
                        "(default); --no-numerics times only")
    parser.add_argument("--compile", default="", help="comma list of configs also run as torch.compile + CUDA graph, "
                        "e.g. dense,keep1,keep0.6,keep0.4 (each compiles for a minute or more)")
    parser.add_argument("--ort-step", choices=["export", "run", "all"], default="all",
                        help="ort phase: export the graphs, time them, or both (split to fit per-call time limits)")
    parser.add_argument("--ort-configs", default="", help="ort phase: only these configs (and dense), e.g. keep0.6; "
                        "the sd35-medium-shape export takes about a minute per graph")
    parser.add_argument("--ort-cuda-graph", action="store_true",
                        help="ort phase: run every session as a captured CUDA graph (CUDA EP enable_cuda_graph; the "
                        "graphs are fully static, inputs and output bound to fixed device buffers)")
    parser.add_argument("--onnx-dir", default="/tmp/shiva_gpu_onnx",
                        help="where the ort phase exports; the run step also takes a comma list of folders, each "
                        "exported by its own process (--ort-step export --ort-configs ...) to split the export time")
    parser.add_argument("--out", required=True, help="folder for <phase>.json and <phase>.md")
    args = parser.parse_args(argv)
    layouts = [name for name in args.projections.split(",") if name]
    if not layouts or any(name not in PROJECTION_LAYOUTS for name in layouts) or len(set(layouts)) < len(layouts):
        parser.error(f"--projections takes separate and/or fused, each once, got {args.projections!r}")
    if "fused" in layouts and args.phase == "ort":
        parser.error("--projections fused: the ort phase exports the model's own layers; expected --phase torch")
    if "fused" in layouts and args.fuse_qkv:
        parser.error("--projections fused and --fuse-qkv are two layouts of the same projections; use one")
    args.layouts = sorted(layouts, key=PROJECTION_LAYOUTS.index)   # fusing is in place: separate is timed first
    args.kernel_variants = [v for v in args.kernels.split(",") if v]
    if not args.kernel_variants or any(v not in ("triton", "torch") for v in args.kernel_variants):
        parser.error(f"--kernels takes triton and/or torch, got {args.kernels!r}")
    args.backends = [b for b in args.attention_backend.split(",") if b] or [None]
    if args.phase == "ort" and args.backends != [None]:
        parser.error("--attention-backend: the ort phase times ONNX Runtime, which uses no diffusers attention "
                     "backend; expected --phase torch")
    return args


def refuse(message: str) -> None:
    """Bad input found after parsing: one line, exit 2."""
    print(f"gpu_bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def require_fused_layout(transformer) -> None:
    """Refuses, before any timing, a family whose adapter has no fused projection layout."""
    adapter = backbones.for_model(transformer)
    if type(adapter).fuse_projections is Backbone.fuse_projections:
        try:
            adapter.fuse_projections(transformer)   # the base class only refuses; its message names the family
        except ConfigError as err:
            refuse(f"--projections fused: {err}")


def fuse_layout(transformer) -> None:
    """The backbone's fused projection layout, in place (a refusal leaves the model unfused)."""
    try:
        blocks = backbones.for_model(transformer).fuse_projections(transformer)
    except ConfigError as err:
        refuse(f"--projections fused: {err}")
    print(f"== the fused projection layout is in place ({blocks} blocks)", flush=True)


BLAS_ENVIRONMENT = ("CUBLASLT_WORKSPACE_SIZE", "CUBLAS_WORKSPACE_CONFIG", "TORCH_BLAS_PREFER_CUBLASLT")


def device_facts() -> dict:
    facts = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, compute_capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        with contextlib.suppress(Exception):
            facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=20).stdout.strip()
    else:
        facts["device"] = f"CPU ({platform.processor() or platform.machine()})"
    with contextlib.suppress(ImportError):
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(ImportError):
        import diffusers

        facts["diffusers"] = diffusers.__version__
    with contextlib.suppress(Exception):   # a fact, never a reason to lose the run
        if torch.cuda.is_available():
            facts["blas"] = str(torch.backends.cuda.preferred_blas_library()).rsplit(".", 1)[-1]
    # environment read by the CUDA libraries when they start: a run that sets one says so
    facts.update({name: os.environ[name] for name in BLAS_ENVIRONMENT if name in os.environ})
    return facts


def summarize(times_ms: list[float]) -> dict:
    ordered = sorted(times_ms)

    def pct(p):
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {"mean_ms": statistics.fmean(ordered), "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "runs": len(ordered)}


class Timer:
    """CUDA events on a GPU (device time of the enqueued work), perf_counter on CPU."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()

    def time(self, fn, warmup: int, runs: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(runs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return out

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def num_blocks(pruned) -> int:
    """Prunable blocks in execution order (FLUX.1: double- then single-stream), as the adapter counts them."""
    return backbones.for_config(pruned.config).num_blocks(pruned.config)


def freeze_config(pruned, args) -> FreezeConfig:
    return FreezeConfig(num_steps=args.steps, shift=3.0, align=args.align, align_to=args.align_to,
                        max_buckets=args.buckets, dense_layers=pruned.policy.dense_layers)


def uniform_k(pruned, args, num_tokens: int, keep: float) -> tuple[int, ...]:
    """The freeze pass's k for a constant keep ratio (the same rounding as every built schedule)."""
    ratios = torch.full((1, num_blocks(pruned)), keep, dtype=torch.float32)
    return tuple(int(k) for k in k_table(ratios, num_tokens, freeze_config(pruned, args), args.context_tokens)[0])


def paper_schedule(pruned, args, num_tokens: int):
    """Keep ~0.4 in the early (high-noise) steps rising linearly to ~0.8 in the late steps: mean 0.6."""
    cfg = freeze_config(pruned, args)
    from shiva_export.passes.freeze import scheduler_timesteps

    grid = scheduler_timesteps(args.steps, 3.0)
    layers = num_blocks(pruned)

    def ratio_fn(timesteps: torch.Tensor) -> torch.Tensor:
        step = torch.argmin((timesteps.reshape(-1, 1) - grid.reshape(1, -1)).abs(), dim=1).float()
        ramp = 0.4 + 0.4 * step / max(1, args.steps - 1)
        ratios = ramp.reshape(-1, 1).repeat(1, layers)
        ratios[:, list(cfg.dense_layers)] = 1.0
        return ratios

    return freeze(ratio_fn, pruned.config, args.height, args.width, args.batch, args.context_tokens, cfg)


def configurations(pruned, args, num_tokens):
    layers = num_blocks(pruned)
    configs = {"dense": None}
    for keep in [float(x) for x in args.keeps.split(",") if x]:
        configs[f"keep{keep:g}"] = uniform_k(pruned, args, num_tokens, keep)
    schedule = paper_schedule(pruned, args, num_tokens)
    for bucket in schedule.buckets if not args.skip_schedule else ():
        configs[f"sched_b{bucket.index}"] = bucket.k
    return configs, schedule


def flops_of(pruned, args, num_tokens, k):
    step_flops = StepFlops(ModelDims.from_config(pruned.config), num_tokens, args.context_tokens, args.batch)
    return step_flops.dense() if k is None else step_flops(k)


def torch_module(pruned, k, constants):
    """The dense model or one static bucket, called with the graph inputs; `constants` are the family's shape-fixed
    inputs (FLUX.1's img_ids / txt_ids), on the model's device."""
    if k is None:
        dense = DenseModel(pruned.transformer, constants)
        return lambda **feed: dense(**feed)
    # select_full_layers: the keep-1.0 row measures router + selection + scatter with every token kept
    bucket = StaticBucket(pruned.transformer, k, inplace_scatter=True, select_full_layers=True, constants=constants)
    return lambda **feed: bucket(**feed)


def capture_graph(fn, feed):
    """CUDA-graph capture of one static forward; returns a replay callable."""
    static_in = {name: value.clone() for name, value in feed.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(**static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(**static_in)
    return graph.replay, static_out


def run_torch_phase(pruned, args, num_tokens, configs, schedule, facts):
    timer = Timer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ExportConfig(args.height, args.width, args.batch, args.context_tokens, args.run_dtype)
    feed = {k: v.to(device) for k, v in example_feed(pruned.config, cfg, seed=0).items()}
    constants = {k: v.to(device) for k, v in cfg.constants(pruned.config).items()}
    rows, runners = {}, {}
    with torch.inference_mode():
        reference = {}
        if args.compile_blocks and not getattr(pruned.transformer, "_bench_blocks_compiled", False):
            for name, k in configs.items():  # the same static forward uncompiled: what compiled outputs must equal
                reference[name] = torch_module(pruned, k, constants)(**feed).float().clone()
            mode = {"mode": args.compile_mode} if args.compile_mode else {}
            compile_blocks(pruned.transformer, gather_scatter=args.compile_rows, **mode)
            pruned.transformer._bench_blocks_compiled = True
        for name, k in configs.items():
            fn = torch_module(pruned, k, constants)
            row = {"k": list(k) if k else None, "flops": flops_of(pruned, args, num_tokens, k)}
            t0 = time.perf_counter()
            fn(**feed)  # first call: compiles the blocks' graphs under --compile-blocks
            timer.sync()
            first_call_s = time.perf_counter() - t0
            row["eager"] = summarize(timer.time(lambda: fn(**feed), args.warmup, args.runs))
            if device == "cuda":
                replay, _ = capture_graph(fn, feed)
                runners[name] = replay
                row["cudagraph"] = summarize(timer.time(replay, args.warmup, args.runs))
            else:
                runners[name] = lambda fn=fn: fn(**feed)
            if name in args.compile.split(","):
                row["compile"] = compiled_row(fn, feed, timer, args)
            if args.compile_blocks:
                row["first_call_seconds"] = first_call_s
                if name in reference:
                    out = fn(**feed).float()
                    row["vs_uncompiled"] = {"cosine": cosine(out, reference[name]),
                                            "max_abs": float((out - reference[name]).abs().max())}
                    print(f"{name:>10}: compiled vs uncompiled cosine {row['vs_uncompiled']['cosine']:.6f}, "
                          f"max abs {row['vs_uncompiled']['max_abs']:.3g}", flush=True)
            rows[name] = row
            print(f"{name:>10}: first call {first_call_s:.1f} s, eager {row['eager']['mean_ms']:.2f} ms"
                  + (f", cudagraph {row['cudagraph']['mean_ms']:.2f} ms" if "cudagraph" in row else ""), flush=True)
        loop = {}
        for label, per_step in (("dense", ["dense"] * args.steps),
                                ("schedule", [f"sched_b{b}" for b in schedule.step_to_bucket])):
            if args.skip_schedule:
                break

            def run_loop(per_step=per_step):
                for name in per_step:
                    runners[name]()
            loop[label] = summarize(timer.time(run_loop, 1, args.loop_runs))
        # fp32 reference runs would recompile every block: numerics come from the uncompiled runs
        timed_only = args.compile_blocks or not args.numerics
        numerics = {} if timed_only else torch_numerics(pruned, configs, {**feed, **constants}, device)
    return {"per_step": rows, "loop": loop, "numerics": numerics}


def compiled_row(fn, feed, timer, args) -> dict:
    """torch.compile (inductor, default mode) of the same static forward, then captured in a CUDA graph."""
    import torch._dynamo

    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(fn, fullgraph=False, dynamic=False)
        compiled(**feed)
        replay, _ = capture_graph(compiled, feed) if torch.cuda.is_available() else (lambda: compiled(**feed), None)
    except Exception as err:  # recorded, not hidden: the row says why there is no number
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    summary = summarize(timer.time(replay, args.warmup, args.runs))
    summary["compile_seconds"] = time.perf_counter() - t0
    return summary


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def torch_numerics(pruned, configs, feed, device):
    """fp16/bf16 static model vs the fp32 static-mode reference: cosine, max abs, selection agreement per bucket (the
    schedule's buckets, or the uniform keeps below 1 under --skip-schedule). `feed` holds the constants too."""
    out = {}
    half_dtype = pruned.transformer.dtype
    router_fp32 = next(pruned.routers.parameters()).dtype == torch.float32
    for name, k in configs.items():
        uniform = name.startswith("keep") and not any(name.startswith(s) for s in ("sched_",))
        if k is None or name == "keep1" or not (name.startswith("sched_") or (uniform and not any(
                c.startswith("sched_") for c in configs))):
            continue
        with static_k(pruned.transformer, k, record=True) as state:
            low = pruned.transformer(**feed, return_dict=False)[0].float()
            low_idx = {l: v.clone() for l, v in state.indices.items()}
        pruned.to_dtype(torch.float32)
        feed32 = {n: (v.float() if v.is_floating_point() else v) for n, v in feed.items()}
        with static_k(pruned.transformer, k, record=True) as state:
            ref = pruned.transformer(**feed32, return_dict=False)[0]
            ref_idx = {l: v.clone() for l, v in state.indices.items()}
        pruned.to_dtype(half_dtype, router_fp32=router_fp32)
        agreement = {l: selection_agreement(low_idx[l], ref_idx[l]) for l in ref_idx}
        out[name] = {"cosine": cosine(low, ref), "max_abs": float((low - ref).abs().max()),
                     "agreement_min": min(agreement.values()), "agreement_mean": statistics.fmean(agreement.values())}
    return out


def selection_agreement(a, b) -> float:
    """Share of kept indices that agree as sets, per sample, averaged."""
    a, b = torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()
    shared = [len(set(x.tolist()) & set(y.tolist())) / max(1, len(y)) for x, y in zip(a, b)]
    return statistics.fmean(shared)


def run_ort_phase(pruned, args, num_tokens, configs, schedule, facts):
    import numpy as np
    import onnxruntime as ort

    from shiva_export.export import export_buckets
    from shiva_export.passes.manager import tensorrt_safety

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.run_dtype
    cfg = ExportConfig(args.height, args.width, args.batch, args.context_tokens, dtype, debug_indices=True)
    names = [n for n, k in configs.items() if k is not None]
    if args.ort_configs:
        names = [n for n in names if n in args.ort_configs.split(",")]
    onnx_dirs = [Path(d) for d in args.onnx_dir.split(",") if d]
    onnx_dir = onnx_dirs[0]
    index_path = onnx_dir / "index.json"
    if args.ort_step in ("export", "all"):
        t0 = time.perf_counter()
        written = export_buckets(pruned.transformer, [configs[n] for n in names], cfg, onnx_dir,
                                 graph_passes=tensorrt_safety(cfg.dtype))
        index = {"export_seconds": time.perf_counter() - t0,
                 "graphs": {name: graph.to_json() for name, graph in zip(names, written.graphs)}}
        write_bytes(index_path, json.dumps(index).encode())
        print(f"exported {len(written.graphs) + 1} graphs in {index['export_seconds']:.0f} s", flush=True)
        if args.ort_step == "export":
            raise SystemExit(0)
    files = {"dense": onnx_dir / "dense.onnx"}
    debug_files = {}
    export_s = []
    for folder in onnx_dirs:
        index = json.loads((folder / "index.json").read_text())
        export_s.append(index["export_seconds"])
        for name, record in index["graphs"].items():
            files[name] = folder / record["file"]
            debug_files[name] = folder / record["debug_file"]
    missing = [name for name in names if name not in files]
    if missing:
        refuse(f"no exported graph for {missing} in {args.onnx_dir}; expected --ort-step export first")
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    timed_providers = providers
    if args.ort_cuda_graph and device == "cuda":
        timed_providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})]
    feed = {k: v.numpy() for k, v in example_feed(pruned.config, cfg, seed=0).items()}
    timer = Timer()
    rows = {}
    sessions = {}
    for name in ["dense", *names]:
        sess = ort.InferenceSession(str(files[name]), providers=timed_providers)
        if providers[0] not in sess.get_providers():
            raise SystemExit(f"{providers[0]} unavailable: {sess.get_providers()}")
        binding = sess.io_binding()
        for input_name, value in feed.items():
            binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
        out_meta = sess.get_outputs()[0]
        out_type = np.float16 if out_meta.type == "tensor(float16)" else np.float32
        # a fixed output buffer: a captured CUDA graph replays into the same address
        binding.bind_ortvalue_output("sample", ort.OrtValue.ortvalue_from_shape_and_type(
            out_meta.shape, out_type, device, 0))
        sessions[name] = (sess, binding)

        def run(sess=sess, binding=binding):
            sess.run_with_iobinding(binding)

        # ORT synchronises its stream before returning, so wall time == device time here
        rows[name] = {"k": list(configs.get(name) or []) or None,
                      "flops": flops_of(pruned, args, num_tokens, configs.get(name)),
                      # a CUDA-graph session captures on its first runs: never time those
                      "ort": summarize(perf_times(run, max(args.warmup, 2), args.runs))}
        print(f"{name:>10}: ort {rows[name]['ort']['mean_ms']:.2f} ms", flush=True)
        if name != "dense" and not name.startswith("sched_"):
            del sessions[name], sess, binding  # only the loop's sessions stay resident
    loop = {}
    if all(f"sched_b{b.index}" in names for b in schedule.buckets):
        for label, per_step in (("dense", ["dense"] * args.steps),
                                ("schedule", [f"sched_b{b}" for b in schedule.step_to_bucket])):
            def run_loop(per_step=per_step):
                for name in per_step:
                    sessions[name][0].run_with_iobinding(sessions[name][1])
            loop[label] = summarize(perf_times(run_loop, 1, args.loop_runs))
    # numerics: fp16 ORT vs the fp32 PyTorch static-mode reference, per schedule bucket
    numerics = {}
    pruned.to_dtype(torch.float32)
    feed32 = {n: torch.from_numpy(v).float().to(device) for n, v in feed.items()}
    feed32.update({n: v.to(device) for n, v in cfg.constants(pruned.config).items()})
    for name in names:
        sessions.pop(name, None)
        sess = ort.InferenceSession(str(debug_files[name]), providers=providers)
        outs = sess.run(None, feed)
        out_names = [o.name for o in sess.get_outputs()]
        with torch.inference_mode(), static_k(pruned.transformer, configs[name], record=True) as state:
            ref = pruned.transformer(**feed32, return_dict=False)[0].float().cpu()
            ref_idx = {l: v.cpu() for l, v in state.indices.items()}
        got = torch.from_numpy(outs[0].astype(np.float32))
        agreement = {l: selection_agreement(outs[out_names.index(f"indices_layer{l}")], ref_idx[l]) for l in ref_idx}
        numerics[name] = {"cosine": cosine(got, ref), "max_abs": float((got - ref).abs().max()),
                          "agreement_min": min(agreement.values()),
                          "agreement_mean": statistics.fmean(agreement.values())}
        del sess
        print(f"{name}: cosine {numerics[name]['cosine']:.6f} agreement {numerics[name]['agreement_min']:.4f}")
    return {"per_step": rows, "loop": loop, "numerics": numerics, "export_seconds": export_s}


def perf_times(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def render_markdown(result: dict) -> str:
    facts, phase = result["facts"], result["phase"]
    lines = [f"# GPU benchmark ({phase}): {result['model']} at {result['height']}x{result['width']}, "
             f"batch {result['batch']}, {result['context_tokens']} context tokens, {result['dtype']}", "",
             "Device: " + ", ".join(f"{k} {v}" for k, v in facts.items()), "",
             f"Selection/router kernels: {result.get('kernels', 'torch')} (fused Triton kernels used: "
             f"{result.get('fused_kernels_used', False)}); routers: {result.get('router_dtype')}; blocks compiled "
             f"(torch.compile, dense and pruned alike): {result.get('compile_blocks', False)}; gather/scatter compiled "
             f"into the blocks: {result.get('compile_rows', False)}; q/k/v projections fused: "
             f"{result.get('fuse_qkv', False)}; input projections fused: {result.get('fuse_projections', False)}; "
             f"compile mode: {result.get('compile_mode') or 'default'}; attention "
             f"backend: {result.get('attention_backend') or 'default'}", "",
             f"Command: `{result['command']}`", ""]
    rows = result["per_step"]
    backends = [b for b in ("eager", "cudagraph", "compile", "ort")
                if b in rows["dense"] and "mean_ms" in rows["dense"][b]]
    header = "| config | mean keep | FLOP-bound speedup | " + " | ".join(
        f"{b} mean ms | {b} P50 | {b} P95 | {b} speedup" for b in backends) + " |"
    lines += ["## Per transformer step", "", header, "|" + "---|" * (3 + 4 * len(backends))]
    dense = rows["dense"]
    for name, row in rows.items():
        keep = "1.0 (dense)" if row["k"] is None else f"{statistics.fmean(row['k'][1:]) / result['num_tokens']:.3f}"
        cells = [name, keep, f"{dense['flops'] / row['flops']:.2f}x"]
        for b in backends:
            s = row.get(b)
            if not s or "mean_ms" not in s:
                cells += ["-", "-", "-", (s or {}).get("error", "-")[:40]]
                continue
            cells += [f"{s['mean_ms']:.2f}", f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}",
                      f"{dense[b]['mean_ms'] / s['mean_ms']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    loop = result["loop"]
    if not loop:
        lines += ["", "Loop: not run (--skip-schedule, or not every schedule bucket was exported in this run)"]
    lines += [] if not loop else ["", f"## {result['steps']}-step loop (transformer only), paper-shaped schedule in "
                  f"{len(result['schedule']['buckets'])} buckets", "",
              "| loop | mean ms | P50 | P95 | speedup |", "|---|---|---|---|---|"]
    for label, s in loop.items() if loop else []:
        lines.append(f"| {label} | {s['mean_ms']:.1f} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | "
                     f"{loop['dense']['mean_ms'] / s['mean_ms']:.2f}x |")
    sched = result["schedule"]
    lines += ["", f"Schedule: realised keep {sched['realised_keep_ratio']:.3f}, FLOP-bound loop speedup "
                  f"{1 / sched['realised_flop_ratio']:.2f}x; buckets: "
                  + "; ".join(f"b{b['index']} k={b['k'][1]} x{len(b['steps'])} steps" for b in sched["buckets"])]
    compared = {name: row["vs_uncompiled"] for name, row in rows.items() if "vs_uncompiled" in row}
    if compared:
        lines += ["", "## Compiled blocks vs the same model uncompiled (same dtype, kernels and inputs)", "",
                  "| config | cosine | max abs | first call (compiles) |", "|---|---|---|---|"]
        for name, c in compared.items():
            lines.append(f"| {name} | {c['cosine']:.6f} | {c['max_abs']:.3g} | "
                         f"{rows[name].get('first_call_seconds', float('nan')):.1f} s |")
    if result.get("numerics"):
        lines += ["", "## Numerics vs the fp32 PyTorch static-mode reference", "",
                  "| bucket | cosine | max abs | selection agreement (min layer) | mean |", "|---|---|---|---|---|"]
        for name, n in result["numerics"].items():
            lines.append(f"| {name} | {n['cosine']:.6f} | {n['max_abs']:.3g} | {n['agreement_min']:.4f} | "
                         f"{n['agreement_mean']:.4f} |")
    return "\n".join(lines) + "\n"


def set_attention_backend(transformer, name: str) -> None:
    """diffusers' set_attention_backend, refused where no attention processor of the model takes a backend (it would
    otherwise change nothing silently, e.g. SD3's JointAttnProcessor2_0)."""
    try:
        transformer.set_attention_backend(name)
    except (ValueError, AttributeError) as err:
        refuse(f"--attention-backend {name}: {err}")
    processors = [m.processor for m in transformer.modules() if getattr(m, "processor", None) is not None]
    if not any(str(getattr(getattr(p, "_attention_backend", None), "value", "")) == name.lower() for p in processors):
        refuse(f"--attention-backend {name}: no attention processor of {type(transformer).__name__} takes a backend; "
               "expected a model whose processors dispatch through diffusers' attention backends")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    if args.batch is None:  # the preset's batch (2: [uncond; cond] CFG, 1: guidance-distilled), before the model
        from shiva_export.models import preset_names, read_preset

        preset = read_preset(args.model) if args.model in preset_names() else {}
        args.batch = preset.get("defaults", {}).get("batch", 2)
    pruned = load_pruned_model(args.model, cfg_consistent=args.batch % 2 == 0, device=device)
    print(f"model {args.model} built on {device} in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in pruned.transformer.parameters()) / 1e9:.2f}B parameters)", flush=True)
    if args.fuse_qkv:
        if not hasattr(pruned.transformer, "fuse_qkv_projections"):
            refuse(f"--fuse-qkv: {type(pruned.transformer).__name__} has no fuse_qkv_projections")
        pruned.transformer.fuse_qkv_projections()
    layouts = args.layouts
    if "fused" in layouts:
        require_fused_layout(pruned.transformer)
    defaults = pruned.source.defaults
    args.context_tokens = args.context_tokens or defaults.get("context_tokens", 333)
    args.run_dtype = args.dtype if device == "cuda" else "fp32"
    if device == "cuda":
        pruned.to_dtype(torch_dtype(args.run_dtype), router_fp32=args.router_dtype == "fp32")
    num_tokens = num_image_tokens(pruned.config, args.height, args.width)
    args.align = args.align or pruned.source.defaults.get("align", 64)
    args.align_to = args.align_to or pruned.source.defaults.get("align_to", "k")
    configs, schedule = configurations(pruned, args, num_tokens)
    facts = device_facts()
    print(json.dumps(facts), flush=True)
    phase = run_torch_phase if args.phase == "torch" else run_ort_phase
    variants = [(layout, variant, backend) for layout in layouts for variant in args.kernel_variants
                for backend in args.backends]
    in_place = "separate"
    for layout, variant, backend in variants:
        if layout != in_place:   # variants run layout by layout: the model is fused once, before the first
            fuse_layout(pruned.transformer)
            in_place = layout
        kernels.set_enabled(variant == "triton")
        if backend is not None:
            set_attention_backend(pruned.transformer, backend)
        print(f"== kernels: {variant} (fused path usable: {kernels.triton_available() and device == 'cuda'}); "
              f"attention backend: {backend or 'default'}; projections: {layout}", flush=True)
        try:
            result = phase(pruned, args, num_tokens, configs, schedule, facts)
        except Exception as err:  # one variant's failure (e.g. a kernel) must not lose the others' rows
            if len(variants) == 1:
                raise
            print(f"== kernels: {variant}, attention backend {backend or 'default'}, projections {layout} failed: "
                  f"{type(err).__name__}: {str(err)[:500]}", flush=True)
            continue
        result.update(phase=args.phase, router_dtype=args.router_dtype, facts=facts, model=args.model,
                      compile_blocks=args.compile_blocks, compile_mode=args.compile_mode,
                      fuse_qkv=args.fuse_qkv, fuse_projections=layout == "fused",
                      compile_rows=args.compile_blocks and args.compile_rows, attention_backend=backend,
                      ort_cuda_graph=args.ort_cuda_graph,
                      height=args.height, width=args.width, kernels=variant,
                      fused_kernels_used=variant == "triton" and kernels.triton_available() and device == "cuda",
                      align=args.align, align_to=args.align_to, batch=args.batch,
                      context_tokens=args.context_tokens, num_tokens=num_tokens, steps=args.steps,
                      dtype=args.run_dtype, command="python " + " ".join(sys.argv),
                      schedule={"buckets": [b.to_json() for b in schedule.buckets],
                                "step_to_bucket": list(schedule.step_to_bucket), **schedule.summary.to_json()})
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "-".join([args.phase] + ([layout] if len(layouts) > 1 else [])
                        + ([variant] if len(args.kernel_variants) > 1 else [])
                        + ([backend.strip("_")] if len(args.backends) > 1 else []))
        write_bytes(out / f"{stem}.json", (json.dumps(result, indent=2) + "\n").encode())
        write_bytes(out / f"{stem}.md", render_markdown(result).encode())
        print(render_markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`bench`: dense vs pruned on the same backend, side by side, beside the FLOP-bound speedup."""

from __future__ import annotations

import argparse

from shiva_export.commands._args import add_device_arg, add_out_arg


def add_parser(subparsers) -> argparse.ArgumentParser:
    from shiva_export.engines.bench import ORT_CUDA_TARGETS, TORCH_TARGETS, BenchConfig
    from shiva_export.engines.runners import ENGINE_SET_CHOICES

    parser = subparsers.add_parser(
        "bench", help="time dense vs pruned per bucket and for the whole sampling loop",
        description="Time the dense graph and every bucket graph on the same backend, interleaved, after a warm-up; "
                    "then the whole loop (each step on its bucket's engine vs the dense graph for all steps). Reports "
                    "mean/P50/P95/P99, the measured speedup and the FLOP-bound one in OUT/bench.json and "
                    "OUT/bench.md. On CPU: ONNX Runtime; on a CUDA GPU also PyTorch eager, a CUDA graph of the "
                    "static-mode model and ONNX Runtime CUDA (if onnxruntime-gpu is installed).")
    add_out_arg(parser)
    group = parser.add_argument_group("bench", "what is timed and how often")
    group.add_argument("--warmup", type=int, default=BenchConfig.warmup, help="untimed calls per graph first")
    group.add_argument("--runs", type=int, default=BenchConfig.runs, help="timed calls per graph")
    group.add_argument("--loop-runs", type=int, default=BenchConfig.loop_runs, help="timed whole loops per variant")
    group.add_argument("--seed", type=int, default=BenchConfig.seed, help="seeds the (random) inputs")
    group.add_argument("--backend", action="append",
                       choices=list(dict.fromkeys([*ENGINE_SET_CHOICES, *TORCH_TARGETS, *ORT_CUDA_TARGETS])),
                       default=None,
                       help="engine set to time; repeat for several (default: on a GPU torch-cudagraph, torch-eager "
                            "and onnxruntime-cuda-graph; on the CPU onnxruntime)")
    group.add_argument("--min-seconds", type=float, default=BenchConfig.min_seconds,
                       help=f"per-step warm-up and timed runs each go on until they last this long "
                            f"(default: {BenchConfig.min_seconds:g})")
    group.add_argument("--force", action="store_true", help="measure again even if bench.json is fresh")
    add_device_arg(group)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from shiva_export.engines.bench import BenchConfig, render_markdown, run_bench
    from shiva_export.pipeline import Workspace
    from shiva_export.torch_bench import torch_target

    config = BenchConfig(warmup=args.warmup, runs=args.runs, loop_runs=args.loop_runs, seed=args.seed,
                         min_seconds=args.min_seconds)
    ws = Workspace(args.out)
    report = run_bench(ws, config, backends=args.backend, force=args.force, device=args.device,
                       torch_target=torch_target)
    print(render_markdown(report.to_json()))
    print(f"{ws.path('bench.json')}" + (" (reused: same graphs, device and settings; --force measures again)"
                                         if report.reused else ""))
    return 0

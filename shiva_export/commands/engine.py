"""`engine`: build one engine per bucket graph of an artifact folder (ONNX Runtime, TensorRT, TensorRT-RTX)."""

from __future__ import annotations

import argparse

from shiva_export.commands._args import add_out_arg
from shiva_export.engines.backends.names import BACKENDS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "engine", help="build engines from the exported graphs",
        description="Build an engine per bucket graph with a metadata sidecar (ONNX and weights sha256, schedule and "
                    "checkpoint hash, precision, backend version, GPU, build options). Engines whose metadata still "
                    "matches are kept; stale ones are rebuilt and the reason is printed.")
    parser.add_argument("--backend", required=True, choices=tuple(BACKENDS),
                        help="engine backend: onnxruntime, tensorrt or tensorrt-rtx (ort, trt, trt-rtx: the same)")
    add_out_arg(parser)
    group = parser.add_argument_group("build options", "TensorRT / TensorRT-RTX builder settings")
    group.add_argument("--opt-level", type=int, default=None,
                       help="builder optimisation level 0..5 (default: the builder's own, 3)")
    group.add_argument("--timing-cache", default=None,
                       help="TensorRT timing cache file (loaded, merged, saved; default: none)")
    group.add_argument("--compute-capability", action="append", default=None,
                       help="TensorRT-RTX target GPU, repeatable, e.g. 8.9 (default: the builder's targets)")
    group.add_argument("--no-decomposable-attention", action="store_true",
                       help="require fused attention kernels (fp32 attention may then fail to build)")
    parser.add_argument("--force", action="store_true", help="rebuild even engines whose metadata matches")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shiva_export import pipeline
    from shiva_export.engines.backends.base import BuildOptions

    options = BuildOptions(builder_optimization_level=args.opt_level, timing_cache=args.timing_cache,
                           compute_capabilities=tuple(args.compute_capability) if args.compute_capability else None,
                           decomposable_attention=not args.no_decomposable_attention)
    ws = pipeline.Workspace(args.out)
    for entry in pipeline.run_engines(ws, args.backend, options=options, force=args.force):
        print(f"bucket {entry.bucket}: {entry.status:>5} {ws.path(entry.engine)} ({entry.reason})")
    reason = pipeline.runnable_reason(pipeline.backend_name(args.backend))
    if reason:
        print(f"note: these engines cannot run here ({reason}); they were built and their metadata written")
    return 0

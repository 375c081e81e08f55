"""`build`: the whole pipeline on one artifact folder, resuming every stage whose inputs are unchanged."""

from __future__ import annotations

import argparse
import time

from shiva_export.commands._args import add_artifact_args, add_device_arg, artifact_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "build", help="train-free demo or real run: freeze, export, lint, engines, check, bench, report",
        description="Run every stage into one artifact folder (default ./shiva_artifacts). With no arguments it "
                    "builds the embedded tiny-sd35 model (with the router checkpoint shipped for it, if the package has "
                    "one; otherwise seeded untrained routers at --target-keep). A second "
                    "run with the same inputs reuses every artifact whose hashes still match.")
    add_artifact_args(parser)
    parser.add_argument("--backend", action="append", default=None,
                        help="engine backend, repeatable: onnxruntime (always), tensorrt, tensorrt-rtx "
                             "(default: onnxruntime + every TensorRT flavour importable here)")
    parser.add_argument("--runs", type=int, default=5,
                        help="timed runs per configuration in the benchmark, at least (default: 5)")
    add_device_arg(parser)
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shiva_export import pipeline

    started = time.perf_counter()
    backends = pipeline.resolve_backends(args.backend)
    ws = pipeline.start(args.out, artifact_config(args))
    from shiva_export.report import render_summary

    result = pipeline.build(ws, backends=backends, runs=args.runs, force=args.force, device=args.device)
    print(render_summary(ws.manifest))
    reused = f"; reused: {', '.join(result.reused)}" if result.reused else ""
    print(f"  stages      ran: {', '.join(result.ran) or 'none'}{reused}")
    print(f"  stage time  {', '.join(f'{stage} {seconds:.1f} s' for stage, seconds in result.seconds.items())} "
          f"(check and bench on {result.device})")
    print(f"  wall time   {time.perf_counter() - started:.1f} s; report: {ws.root / 'report' / 'report.md'}")
    return 0 if result.passed else 1

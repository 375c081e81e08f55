"""`export`: freeze the policy into buckets and write one static ONNX graph per bucket."""

from __future__ import annotations

import argparse

from shiva_export.commands._args import add_artifact_args, artifact_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="freeze the ratio policy and export static ONNX graphs",
        description="Freeze the learned keep ratios into at most --buckets fixed-k schedules and export one fully "
                    "static, TensorRT-safe ONNX graph per bucket; all graphs share one weight file.")
    add_artifact_args(parser)
    parser.add_argument("--force", action="store_true", help="redo stages even if their inputs are unchanged")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from shiva_export import pipeline

    ws = pipeline.start(args.out, artifact_config(args))
    pipeline.run_freeze(ws, force=args.force)
    schedule = ws.schedule()
    with tqdm(total=len(schedule.buckets) + 1, desc="export", unit="graph", disable=None) as bar:
        pipeline.run_export(ws, force=args.force, progress=bar)
    for graph in ws.bucket_graphs():
        print(f"bucket {graph.bucket}: k={list(graph.k)} -> {ws.path(f'{pipeline.ONNX_DIR}/{graph.file}')}")
    return 0

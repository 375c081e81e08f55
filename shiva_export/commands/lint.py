"""`python -m shiva_export lint MODEL.onnx [--json]`: explain why a graph would fail or be slow
in TensorRT before anyone starts a build. Exit 0 clean, 1 errors found, 2 unusable input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shiva_export.passes.lint import format_report, lint_model


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "lint",
        help="check that an ONNX graph is fully static and TensorRT-legal",
        description="Static-graph lint: symbolic dims, data-dependent ops, TopK K > 3840, "
        "expanded gather/scatter indices, scatter reductions and duplicate indices, unfused "
        "attention. Exit 0 clean (warnings allowed), 1 errors found, 2 unusable input.",
    )
    parser.add_argument("model", type=Path, metavar="MODEL.onnx", help="ONNX file (external data beside it)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=cmd_lint)
    return parser


def cmd_lint(args: argparse.Namespace) -> int:
    report = lint_model(args.model)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0 if report else 1

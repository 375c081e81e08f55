"""`report`: report.md + report.json + plots of an artifact folder, rendered from the JSON its stages wrote."""

from __future__ import annotations

import argparse

from shiva_export.commands._args import add_out_arg


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report", help="write OUT/report/: report.md, report.json and plots of everything the stages recorded",
        description="Read the manifest and the files it lists (schedule.json, lint.json, engine sidecars, "
                    "check.json, check/repro.sh, bench.json) and write OUT/report/ whole: report.json (schema "
                    "shiva.report/1), report.md (summary, schedule, lint, engines, check, bench, reproduction "
                    "commands, what was not run and why) and PNG plots (keep-ratio heatmap over (step, layer), "
                    "dense vs pruned latency, error distributions). A stage that has not run is reported as not "
                    "run. Exit 0 written, 2 unusable input (no manifest, no freeze stage, a file changed since its "
                    "stage recorded it).")
    add_out_arg(parser)
    parser.add_argument("--no-probe", action="store_true",
                        help="do not import optional runtimes (TensorRT, TensorRT-RTX) to explain what was not "
                             "built or run")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from shiva_export.manifest import Manifest
    from shiva_export.report import render_summary, write_report

    manifest = Manifest.load(args.out)
    report = write_report(manifest, probe=not args.no_probe)
    print(render_summary(manifest))
    print(f"\n{report.markdown}")
    return 0

"""`inspect`: what an artifact folder holds: schedule, graphs, engines and their metadata, results."""

from __future__ import annotations

import argparse
import json

from shiva_export.commands._args import add_out_arg


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="print what an artifact folder holds",
                                   description="Print the schedule, graphs, engines, metadata and results recorded "
                                               "in an artifact folder's manifest, and whether its files are intact.")
    add_out_arg(parser)
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shiva_export.errors import ShivaError
    from shiva_export.manifest import Manifest

    manifest = Manifest.load(args.out)
    if args.json:
        print(json.dumps(manifest.data, indent=2, sort_keys=True))
        return 0
    cfg = manifest.data.get("config", {})
    print(f"{manifest.root}  ({manifest.data['schema']}, shiva_export {manifest.data['tool_version']})")
    print("config: " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if v is not None))
    intact = True
    for name, record in manifest.data["stages"].items():
        try:
            manifest.verify_files(name)
            status = "ok"
        except ShivaError as err:
            status, intact = f"STALE: {err}", False
        print(f"\n[{name}] finished {record.get('finished', '?')}, files {len(record.get('files', []))}: {status}")
        for line in describe(name, record):
            print("  " + line)
    return 0 if intact else 1


def describe(name: str, record: dict) -> list[str]:
    if name == "freeze":
        summary = record.get("summary", {})
        lines = [f"bucket {i}: k={k}" for i, k in enumerate(record.get("buckets", []))]
        if summary:
            lines.append(f"keep ratio learned {summary['learned_keep_ratio']:.3f}, realised "
                         f"{summary['realised_keep_ratio']:.3f}; FLOPs realised {summary['realised_flop_ratio']:.3f} "
                         "of dense")
        return lines
    if name == "export":
        return [f"{g['file']} (bucket {g['bucket']}) sha256 {g['sha256'][:12]}" for g in record.get("graphs", [])]
    if name == "engine":
        return [f"{backend}: {len(items)} engine(s) " + ", ".join(e.get("path", "?") for e in items)
                for backend, items in record.get("engines", {}).items()]
    if name in ("check", "bench", "lint"):
        return [f"{key}: {value}" for key, value in record.items()
                if key in ("passed", "summary", "errors", "warnings", "speedup")]
    return []

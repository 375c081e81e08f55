"""`inspect`: what an artifact folder holds: schedule, graphs, engines and their metadata, results.

Its verdict is the runtime's: the folder is opened and every engine set it records is prepared exactly as
`ShivaEngineTransformer.from_artifacts` would (paths inside the folder, sha256 of every file, graph identity,
engine sidecar -> graph -> weights). Exit 0: the runtime loads it and every stage is intact; 1: the runtime loads
it but a later stage's files (check, bench, report) changed; 2: the runtime would refuse it (the reason, in one
line).
"""

from __future__ import annotations

import argparse
import json

from shiva_export.commands._args import add_out_arg
from shiva_export.records import (STAGES, CheckRecord, EngineEntry, EngineRecord, ExportRecord, FreezeRecord,
                                  LintRecord, StageRecord)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="print what an artifact folder holds and whether it loads",
                                   description="Print the schedule, graphs, engines, metadata and results recorded "
                                               "in an artifact folder's manifest, whether its files are intact and "
                                               "whether the runtime would load it (the same checks). Exit 0 intact, "
                                               "1 a non-runtime stage is stale, 2 the runtime would refuse it.")
    add_out_arg(parser)
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shiva_export.errors import ShivaError
    from shiva_export.pipeline import Workspace

    ws = Workspace(args.out, write=False)  # manifest schema, paths inside the folder; rolls back a dead writer
    manifest = ws.manifest
    if args.json:
        print(json.dumps(manifest.data, indent=2, sort_keys=True))
        return 0
    cfg = manifest.config.to_json()  # a Workspace has refused a manifest without one
    print(f"{manifest.root}  ({manifest.data['schema']}, shiva_export {manifest.data['tool_version']})")
    print("config: " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if v is not None))
    intact = True
    for record in filter(None, map(manifest.record, STAGES)):
        try:
            manifest.verify_files(record.STAGE)
            status = "ok"
        except ShivaError as err:
            status, intact = f"STALE: {err}", False
        print(f"\n[{record.STAGE}] finished {record.finished or '?'}, files {len(record.files)}: {status}")
        for line in describe(record, manifest):
            print("  " + line)
    verdicts = runtime_verdicts(ws)
    print()
    for backend, verdict in verdicts.items():
        print(f"runtime: {verdict if isinstance(verdict, str) else 'REFUSED'} ({backend})")
    refused = [err for err in verdicts.values() if isinstance(err, ShivaError)]
    if refused:
        raise refused[0]  # the CLI prints it as the one-line error, exit 2
    return 0 if intact else 1


def runtime_verdicts(ws) -> dict:
    """backend -> "loads" / "not verifiable here: why" / the ShivaError the runtime raises, for the exported graphs
    and every engine set the manifest records."""
    from shiva_export.engines.backends.base import get_backend
    from shiva_export.errors import BackendUnavailableError, ShivaError
    from shiva_export.runtime import ShivaEngineTransformer

    if not ws.manifest.record(ExportRecord):
        return {}
    engines = ws.manifest.record(EngineRecord)
    backends = ["onnxruntime", *(engines.engines if engines else ())]
    verdicts: dict = {}
    for backend in backends:
        if backend != "onnxruntime":
            available, why = get_backend(backend).is_available()
            if not available:
                verdicts[backend] = f"not verifiable here: {why}"
                continue
        try:
            ShivaEngineTransformer.from_artifacts(ws.root, backend=backend).close()
            verdicts[backend] = "loads"
        except BackendUnavailableError as err:  # raised after every check passed: intact, but not runnable here
            verdicts[backend] = f"intact, cannot run here: {str(err).split('(', 1)[-1].rstrip(')')}"
        except ShivaError as err:
            verdicts[backend] = err
    return verdicts


def describe(record: StageRecord, manifest=None) -> list[str]:
    if isinstance(record, FreezeRecord):
        summary = record.summary
        lines = [f"bucket {i}: k={list(k)}" for i, k in enumerate(record.buckets)]
        if summary:
            lines.append(f"keep ratio learned {summary['learned_keep_ratio']:.3f}, realised "
                         f"{summary['realised_keep_ratio']:.3f}; FLOPs realised {summary['realised_flop_ratio']:.3f} "
                         "of dense")
        return lines
    if isinstance(record, ExportRecord):
        return [f"{g.file} (bucket {g.bucket}) sha256 {g.sha256[:12]}" for g in record.graphs]
    if isinstance(record, EngineRecord):
        lines = []
        for backend, entries in record.engines.items():
            lines.append(f"{backend}: {len(entries)} engine(s)")
            lines += [f"  bucket {e.bucket}: {e.engine} ({engine_freshness(manifest, e)})" for e in entries]
        return lines
    if isinstance(record, LintRecord):
        return [f"errors: {record.errors}", f"passed: {record.passed}", f"warnings: {record.warnings}"]
    if isinstance(record, CheckRecord):
        return [f"passed: {record.passed}"]
    return []


def engine_freshness(manifest, record: EngineEntry) -> str:
    """"fresh" if an engine and its sidecar are the files the manifest recorded and the sidecar names the graph the
    export now lists; else what is wrong."""
    from shiva_export.engines.metadata import read_metadata
    from shiva_export.errors import ShivaError

    if manifest is None:
        return "not verified"
    try:
        for relative in (record.engine, record.metadata):
            manifest.verify_file(relative, manifest.recorded_sha256(relative), "engine")
        built_from = read_metadata(manifest.path_of(record.engine)).onnx_sha256
    except (ShivaError, KeyError) as err:
        return f"STALE: {err}"
    export = manifest.record(ExportRecord)
    graphs = {g.file: g.sha256 for g in (export.graphs if export else ())}
    if graphs.get(record.onnx) != built_from:
        return f"STALE: built from another {record.onnx} than the export lists; rebuild it with " \
               f"`python -m shiva_export engine --backend {record.backend or '<backend>'} --out {manifest.root}`"
    return "fresh"

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

STAGE_ORDER = ("freeze", "export", "lint", "engine", "check", "bench", "report")


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
    cfg = manifest.data.get("config", {})
    print(f"{manifest.root}  ({manifest.data['schema']}, shiva_export {manifest.data['tool_version']})")
    print("config: " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if v is not None))
    intact = True
    for name, record in sorted(manifest.data["stages"].items(), key=lambda item: STAGE_ORDER.index(item[0])):
        try:
            manifest.verify_files(name)
            status = "ok"
        except ShivaError as err:
            status, intact = f"STALE: {err}", False
        print(f"\n[{name}] finished {record.get('finished', '?')}, files {len(record.get('files', []))}: {status}")
        for line in describe(name, record, manifest):
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

    if not ws.manifest.stage("export"):
        return {}
    backends = ["onnxruntime", *((ws.manifest.stage("engine") or {}).get("engines") or {})]
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


def describe(name: str, record: dict, manifest=None) -> list[str]:
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
        lines = []
        for backend, items in record.get("engines", {}).items():
            lines.append(f"{backend}: {len(items)} engine(s)")
            lines += [f"  bucket {e.get('bucket', '?')}: {e.get('engine', '?')} ({engine_freshness(manifest, e)})"
                      for e in items]
        return lines
    if name in ("check", "bench", "lint"):
        return [f"{key}: {value}" for key, value in record.items()
                if key in ("passed", "summary", "errors", "warnings", "speedup")]
    return []


def engine_freshness(manifest, record: dict) -> str:
    """"fresh" if an engine and its sidecar are the files the manifest recorded and the sidecar names the graph the
    export now lists; else what is wrong."""
    from shiva_export.engines.metadata import read_metadata
    from shiva_export.errors import ShivaError

    if manifest is None:
        return "not verified"
    try:
        for relative in (record["engine"], record["metadata"]):
            manifest.verify_file(relative, manifest.recorded_sha256(relative), "engine")
        built_from = read_metadata(manifest.path_of(record["engine"])).onnx_sha256
    except (ShivaError, KeyError) as err:
        return f"STALE: {err}"
    graphs = {g["file"]: g["sha256"] for g in (manifest.stage("export") or {}).get("graphs", [])}
    if graphs.get(record.get("onnx")) != built_from:
        return f"STALE: built from another {record.get('onnx')} than the export lists; rebuild it with " \
               f"`python -m shiva_export engine --backend {record.get('backend', '<backend>')} --out {manifest.root}`"
    return "fresh"

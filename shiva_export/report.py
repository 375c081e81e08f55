"""Report: one account of an artifact folder (schedule, lint, engines, parity, speed) built from its JSON files.

Reviewers should not need to read five JSON files and a shell script to learn what was built, whether it matches
PyTorch and how much faster it is. The report reads only what the manifest lists (plus the engine outputs that
`check` saved beside each bucket's reference, hashed into the report's inputs), turns it into ``report.json``
(schema ``shiva.report/1``), then renders ``report.md`` and the plots from that JSON alone (P5):

* ``keep_ratio.png``: learned keep ratios r(t, l) beside the realised ones (bucket k / N) over (step, layer),
  on the paper's Fig. 4b colour scale 0.2..1.0;
* ``latency.png``: dense vs pruned P50 per bucket and for the whole loop, per backend (from ``bench.json``);
* ``errors.png``: per-bucket max / mean abs error and 1 - cosine (from ``check.json``), and the distribution of
  |engine - reference| per element where the engine outputs were saved.

A stage that has not run is a "not run" line with its reason, never a crash. ``report/`` is built in a temp folder
and swapped in whole (P12); the ``report`` stage is recorded in the manifest afterwards with the files it wrote and
the hash of the stage records and files it read. `render_summary` is the short terminal table `build` prints.
"""

from __future__ import annotations

__all__ = [
    "ERRORS_PNG",
    "KEEP_RATIO_PNG",
    "KEEP_SCALE",
    "LATENCY_PNG",
    "REPORT_DIR",
    "REPORT_JSON",
    "REPORT_MD",
    "REPORT_SCHEMA",
    "REPORT_STAGE",
    "Report",
    "collect_report",
    "format_k",
    "render_markdown",
    "render_summary",
    "summarize",
    "write_report",
]

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from shiva_export import __version__
from shiva_export.engines.backends.names import BACKEND_LABELS as ENGINE_BACKENDS
from shiva_export.errors import ArtifactError, BackendUnavailableError, StaleArtifactError
from shiva_export.io import sha256_file, sha256_json
from shiva_export.manifest import Manifest
from shiva_export.records import (BENCH_JSON, BENCH_MD, BENCH_SCHEMA, CHECK_FILE, CHECK_REFERENCE, CHECK_SCHEMA,
                                  ENGINES_DIR, LINT_FILE, MANIFEST_NAME, ONNX_DIR, REPORT_DIR, REPORT_JSON, REPORT_MD,
                                  REPORT_SCHEMA, REPRO_FILE, SCHEDULE_FILE, SIDECAR_SUFFIX, STAGES, BenchRecord,
                                  CheckRecord, EngineRecord, ExportRecord, FreezeRecord, LintRecord, ReportRecord,
                                  check_bucket_dir, check_outputs_file)

logger = logging.getLogger(__name__)

REPORT_STAGE = ReportRecord.STAGE
KEEP_RATIO_PNG = "keep_ratio.png"
ALIGN_WORDS = {"k": "", "sequence": " counting the context tokens",
               "either": " (k or k + context tokens, whichever comes first)"}
LATENCY_PNG = "latency.png"
ERRORS_PNG = "errors.png"
KEEP_SCALE = (0.2, 1.0)          # colour range of the paper's Fig. 4b keep-ratio heatmap
BINS_PER_DECADE = 4              # |engine - reference| histogram, log10 bins
NOT_RUN = "not run"


@dataclasses.dataclass(frozen=True)
class Report:
    """What `write_report` wrote: the report folder, its files and the report.json content."""

    folder: Path
    files: tuple[Path, ...]
    data: dict

    @property
    def markdown(self) -> Path:
        return self.folder / REPORT_MD


# --------------------------------------------------------------------------------------------------- reading
class _Reader:
    """Reads files the manifest lists, checking each against its recorded sha256; remembers what it read."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.inputs: dict[str, str] = {}      # relative path -> sha256 of every file the report used

    def listed(self, stage: str, relative: str) -> Path:
        record = self.manifest.require(stage)
        entry = next((f for f in record.files if f.path == relative), None)
        if entry is None:
            raise ArtifactError(f"{self.manifest.root}: stage {stage!r} does not list {relative} in the manifest; "
                                f"re-run `python -m shiva_export {stage} --out {self.manifest.root}`")
        path = self.manifest.root / relative
        if not path.is_file():
            raise ArtifactError(f"{path}: listed by stage {stage!r} in the manifest but missing; re-run "
                                f"`python -m shiva_export {stage} --out {self.manifest.root}`")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise StaleArtifactError(f"{path}: sha256 differs from the manifest (stage {stage!r}); it changed after "
                                     f"the stage wrote it. Re-run `python -m shiva_export {stage} --out "
                                     f"{self.manifest.root}`")
        self.inputs[relative] = digest
        return path

    def json(self, stage: str, relative: str) -> Any:
        path = self.listed(stage, relative)
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ArtifactError(f"{path}: unreadable ({err}); re-run `python -m shiva_export {stage}`") from err

    def unlisted(self, relative: str) -> Path | None:
        """A file a stage wrote but does not list (check's engine outputs): hashed into the inputs if present."""
        path = self.manifest.root / relative
        if not path.is_file():
            return None
        self.inputs[relative] = sha256_file(path)
        return path


def _stage_inputs(manifest: Manifest, stages: Sequence[str]) -> dict[str, str | None]:
    records = [manifest.record(name) for name in stages]
    return {record.STAGE: record.inputs_hash for record in records if record}


# --------------------------------------------------------------------------------------------------- formatting
def format_k(k: Sequence[int]) -> str:
    """Run-length k-vector: 4096,2496x23 for one dense block then 23 blocks at 2496."""
    k = list(k)
    parts, start = [], 0
    for end in range(1, len(k) + 1):
        if end == len(k) or k[end] != k[start]:
            parts.append(f"{k[start]}" + (f"x{end - start}" if end - start > 1 else ""))
            start = end
    return ",".join(parts)


def _steps(steps: Sequence[int]) -> str:
    """"0-3" for contiguous steps, "0,2,5" otherwise (engines.trajectory.step_ranges)."""
    steps = list(steps)
    if steps and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else str(steps[0])
    return ",".join(map(str, steps))


def _flops(value: float) -> str:
    return f"{value / 1e12:.3f} TFLOPs" if value >= 1e11 else f"{value / 1e9:.3f} GFLOPs"


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.1f} KiB"


def _num(value: float | None, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


# --------------------------------------------------------------------------------------------------- summary
def _schedule(reader: _Reader) -> dict:
    reader.manifest.require(FreezeRecord)
    return reader.json("freeze", SCHEDULE_FILE)


def _check(reader: _Reader) -> dict | None:
    if not reader.manifest.record(CheckRecord):
        return None
    data = reader.json("check", CHECK_FILE)
    if data.get("schema") != CHECK_SCHEMA:
        raise ArtifactError(f"{reader.manifest.root / CHECK_FILE}: schema {data.get('schema')!r} is not "
                            f"{CHECK_SCHEMA!r}; re-run `python -m shiva_export check --force`")
    return data


def _bench(reader: _Reader) -> dict | None:
    if not reader.manifest.record(BenchRecord):
        return None
    data = reader.json("bench", BENCH_JSON)
    if data.get("schema") != BENCH_SCHEMA:
        raise ArtifactError(f"{reader.manifest.root / BENCH_JSON}: schema {data.get('schema')!r} is not "
                            f"{BENCH_SCHEMA!r}; re-run `python -m shiva_export bench`")
    return data


def _parity(check: dict | None, built: Sequence[str]) -> dict[str, dict]:
    """Per backend: verdict ("pass" | "FAIL" | "not checked"), buckets passed, loop verdict, failures."""
    parity: dict[str, dict] = {}
    if check is not None:
        for result in check["buckets"]:
            entry = parity.setdefault(result["backend"], {"buckets_passed": 0, "buckets": 0, "loop": None,
                                                          "failures": []})
            entry["buckets"] += 1
            entry["buckets_passed"] += bool(result["passed"])
            entry["failures"] += result["failures"]
        for result in check["trajectories"]:
            entry = parity.setdefault(result["backend"], {"buckets_passed": 0, "buckets": 0, "loop": None,
                                                          "failures": []})
            entry["loop"] = "pass" if result["passed"] else "FAIL"
            entry["failures"] += result["failures"]
        for entry in parity.values():
            entry["verdict"] = "FAIL" if entry["failures"] else "pass"
    for backend in built:
        parity.setdefault(backend, {"verdict": "not checked", "buckets_passed": 0, "buckets": 0, "loop": None,
                                    "failures": []})
    return parity


def _summary(manifest: Manifest, schedule: dict, check: dict | None, bench: dict | None) -> dict:
    config = manifest.config
    export = manifest.record(ExportRecord)
    summary = schedule["summary"]
    dense_layers = schedule["freeze_config"]["dense_layers"]
    pruned = [l for l in range(schedule["num_layers"]) if l not in dense_layers]
    n = schedule["num_tokens"]
    dense_step = summary["dense_flops_per_step"]
    buckets = [{"index": b["index"], "steps": b["steps"], "k": b["k"],
                "keep": float(np.mean([b["k"][l] for l in pruned]) / n) if pruned else 1.0,
                "flops_per_step": b["flops_per_step"], "flop_ratio": b["flops_per_step"] / dense_step,
                "flop_bound_speedup": dense_step / b["flops_per_step"]} for b in schedule["buckets"]]
    engine = manifest.record(EngineRecord)
    engines = engine.engines if engine else {}
    speedups = [{key: s[key] for key in ("backend", "scope", "dense_p50_ms", "pruned_p50_ms", "measured",
                                          "flop_bound", "efficiency") if key in s}
                for s in (bench or {}).get("speedups", [])]
    files = {"root": str(manifest.root.resolve()), "manifest": MANIFEST_NAME, "schedule": SCHEDULE_FILE,
             "onnx": [f.path for f in export.files] if export else [],
             "engines": {b: [e.engine for e in entries] for b, entries in engines.items()}}
    if manifest.record(LintRecord):
        files["lint"] = LINT_FILE
    if check is not None:
        files["check"] = [CHECK_FILE, REPRO_FILE]
    if bench is not None:
        files["bench"] = [BENCH_JSON, BENCH_MD]
    report = manifest.record(ReportRecord)
    files["report"] = [f.path for f in report.files] if report else []
    return {
        "model": config and config.model, "router": config and config.router,
        "dtype": export.config.dtype if export else config and config.dtype,
        "height": schedule["height"], "width": schedule["width"], "num_tokens": n,
        "context_tokens": schedule["context_tokens"], "batch": schedule["batch"],
        "cfg_batch": schedule["batch"] % 2 == 0, "steps": len(schedule["timesteps"]),
        "shift": schedule["freeze_config"]["shift"], "scheduler": _scheduler_name(schedule["freeze_config"]),
        "align": schedule["freeze_config"]["align"],
        "dense_layers": dense_layers, "schedule_hash": schedule["schedule_hash"], "buckets": buckets,
        "keep": {name: summary[f"{name}_keep_ratio"] for name in ("learned", "aligned", "realised")},
        "flops": {"dense_per_step": dense_step, "dense_total": summary["dense_flops_total"],
                  **{name: summary[f"{name}_flop_ratio"] for name in ("learned", "aligned", "realised")},
                  "flop_bound_speedup": 1.0 / summary["realised_flop_ratio"]},
        "parity": _parity(check, list(engines)),
        "checked": check is not None, "all_checks_passed": bool(check and check.get("passed")),
        "speedups": speedups, "benched": bench is not None,
        "device": (bench or {}).get("device", {}).get("name"),
        "files": files,
    }


def summarize(manifest: Manifest) -> dict:
    """The report's summary section from the manifest, schedule.json, check.json and bench.json (hash-checked)."""
    reader = _Reader(manifest)
    return _summary(manifest, _schedule(reader), _check(reader), _bench(reader))


def render_summary(manifest: Manifest) -> str:
    """The short terminal table `build` prints: buckets and k, keep/FLOPs, parity, speedup, where the files are."""
    s = summarize(manifest)
    k_width = max(len("k per layer"), *(len(format_k(b["k"])) for b in s["buckets"])) + 2
    lines = [f"{s['model']}: {s['height']}x{s['width']} px (N={s['num_tokens']} tokens), batch {s['batch']}, "
             f"{s['dtype']}, {s['steps']} steps, {len(s['buckets'])} bucket(s)",
             f"  {'bucket':<8}{'steps':<8}{'k per layer':<{k_width}}{'keep':>6}{'FLOPs/dense':>13}"]
    for b in s["buckets"]:
        lines.append(f"  b{b['index']:<7}{_steps(b['steps']):<8}{format_k(b['k']):<{k_width}}{b['keep']:>6.3f}"
                     f"{b['flop_ratio']:>13.3f}")
    keep, flops = s["keep"], s["flops"]
    lines.append(f"  keep ratio  learned {keep['learned']:.3f}, realised {keep['realised']:.3f}; FLOPs learned "
                 f"{flops['learned']:.3f}, realised {flops['realised']:.3f} of dense "
                 f"(FLOP-bound speedup {flops['flop_bound_speedup']:.2f}x)")
    if s["checked"]:
        parity = []
        for backend, p in s["parity"].items():
            if p["verdict"] == "not checked":
                parity.append(f"{backend} built, not checked")
                continue
            loop = f" + loop {p['loop']}" if p["loop"] else ""
            parity.append(f"{backend} {p['verdict']} ({p['buckets_passed']}/{p['buckets']} buckets{loop})")
        lines.append("  parity      " + "; ".join(parity))
    else:
        lines.append(f"  parity      {NOT_RUN} (python -m shiva_export check --out {s['files']['root']})")
    loops = [x for x in s["speedups"] if x["scope"] == "loop"]
    if loops:
        lines.append("  speedup     " + "; ".join(f"{x['backend']} {x['measured']:.2f}x measured vs "
                                                   f"{x['flop_bound']:.2f}x FLOP bound" for x in loops)
                     + (f" (loop P50, {s['device']})" if s["device"] else " (loop P50)"))
    else:
        lines.append(f"  speedup     {NOT_RUN} (python -m shiva_export bench --out {s['files']['root']})")
    files = s["files"]
    where = [MANIFEST_NAME, f"{ONNX_DIR}/ ({len(s['buckets'])} bucket graph(s))"]
    where += [f"{ENGINES_DIR}/{b}/" for b in files["engines"]]
    where += [f for f in (files.get("check", []) + files.get("bench", [])) if f.endswith((".json", ".md"))]
    where += [f for f in files["report"] if f.endswith(REPORT_MD)]
    lines.append(f"  files       {files['root']}: " + ", ".join(where))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- sections
def _schedule_section(schedule: dict) -> dict:
    n = schedule["num_tokens"]
    dense_layers = schedule["freeze_config"]["dense_layers"]
    pruned = [l for l in range(schedule["num_layers"]) if l not in dense_layers]
    ratios = np.asarray(schedule["ratios"], dtype=np.float64)
    aligned = np.asarray(schedule["k_table"], dtype=np.float64) / n
    realised = np.asarray(schedule["realised_k_table"], dtype=np.float64) / n

    def mean(row: np.ndarray) -> float:
        return float(row[pruned].mean()) if pruned else 1.0

    per_step = [{"step": s, "timestep": t, "bucket": schedule["step_to_bucket"][s], "learned_keep": mean(ratios[s]),
                 "aligned_keep": mean(aligned[s]), "realised_keep": mean(realised[s])}
                for s, t in enumerate(schedule["timesteps"])]
    return {"schedule_hash": schedule["schedule_hash"], "freeze_config": schedule["freeze_config"],
            "num_tokens": n, "num_layers": schedule["num_layers"], "pruned_layers": pruned,
            "timesteps": schedule["timesteps"], "step_to_bucket": schedule["step_to_bucket"],
            "ratios": schedule["ratios"], "k_table": schedule["k_table"],
            "realised_k_table": schedule["realised_k_table"], "per_step": per_step}


def _lint_section(reader: _Reader) -> dict:
    if not reader.manifest.record(LintRecord):
        return {"status": NOT_RUN, "reason": "the lint stage has not run on this folder"}
    reports = reader.json("lint", LINT_FILE)
    files = {}
    for name, report in sorted(reports.items()):
        rules: dict[str, int] = {}
        for finding in report["findings"]:
            rules[finding["rule"]] = rules.get(finding["rule"], 0) + 1
        files[name] = {**report, "rules": rules}
    return {"status": "ran", "passed": all(r["clean"] for r in reports.values()),
            "errors": sum(r["errors"] for r in reports.values()),
            "warnings": sum(r["warnings"] for r in reports.values()), "files": files}


def _engines_section(reader: _Reader) -> dict:
    stage = reader.manifest.record(EngineRecord)
    if not stage:
        return {"status": NOT_RUN, "reason": "no engine was built (the engine stage has not run)", "backends": {}}
    backends = {}
    listed = {f.path for f in stage.files}
    for backend, records in stage.engines.items():
        engines = []
        for record in records:
            entry = {key: getattr(record, key) for key in ("bucket", "engine", "onnx", "status", "reason", "seconds")}
            sidecar = record.engine + SIDECAR_SUFFIX
            if sidecar in listed:
                meta = reader.json("engine", sidecar)
                entry.update({key: meta.get(key) for key in ("engine_sha256", "onnx_sha256", "backend_version",
                                                              "precision", "gpu_name", "compute_capability",
                                                              "build_options", "created", "schedule_hash",
                                                              "versions")})
            path = reader.manifest.root / record.engine
            entry["size_bytes"] = path.stat().st_size if path.is_file() else None
            engines.append(entry)
        versions = sorted({e["backend_version"] for e in engines if e.get("backend_version")})
        backends[backend] = {"name": ENGINE_BACKENDS.get(backend, backend), "version": ", ".join(versions) or None,
                             "engines": engines}
    return {"status": "ran", "backends": backends}


def _error_distribution(reference: np.ndarray, got: np.ndarray) -> dict:
    err = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(reference, dtype=np.float64)).ravel()
    finite = err[np.isfinite(err)]
    nonzero = finite[finite > 0]
    dist = {"count": int(err.size), "non_finite": int(err.size - finite.size), "zeros": int(finite.size - nonzero.size),
            "mean": float(finite.mean()) if finite.size else None,
            "quantiles": {name: float(np.quantile(finite, q)) if finite.size else None
                          for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))},
            "log10_edges": [], "counts": []}
    if nonzero.size:
        logs = np.log10(nonzero)
        low, high = math.floor(logs.min()), max(math.ceil(logs.max()), math.floor(logs.min()) + 1)
        edges = np.linspace(low, high, (high - low) * BINS_PER_DECADE + 1)
        dist["log10_edges"] = [float(e) for e in edges]
        dist["counts"] = [int(c) for c in np.histogram(logs, bins=edges)[0]]
    return dist


def _only_runner(results) -> list:
    """The iterations of a RunResults file that holds one runner (check writes one per file)."""
    names = list(results.keys())
    if len(names) != 1:
        raise ArtifactError(f"expected one runner's outputs, found {names}; re-run `python -m shiva_export check`")
    return results[names[0]]


def _error_distributions(reader: _Reader, check: dict) -> tuple[list[dict], list[str]]:
    """|engine - reference| per element of "sample", per (backend, bucket), from the Polygraphy RunResults that
    check saved in check/bucket{i}/ (reference.json, listed; outputs-<backend>.json, hashed here)."""
    from polygraphy.comparator import RunResults
    from polygraphy.logger import G_LOGGER

    found, missing = [], []
    references: dict[int, list] = {}
    for result in check["buckets"]:
        bucket, backend = result["bucket"], result["backend"]
        outputs_rel = f"{check_bucket_dir(bucket)}/{check_outputs_file(backend)}"
        reference_rel = f"{check_bucket_dir(bucket)}/{CHECK_REFERENCE}"
        outputs_path = reader.unlisted(outputs_rel)
        if outputs_path is None:
            missing.append(outputs_rel)
            continue
        with G_LOGGER.verbosity(G_LOGGER.WARNING):   # Polygraphy logs every load on stdout
            if bucket not in references:
                references[bucket] = _only_runner(RunResults.load(str(reader.listed("check", reference_rel))))
            runs = _only_runner(RunResults.load(str(outputs_path)))
        reference = references[bucket]
        if len(runs) != len(reference):
            raise ArtifactError(f"{outputs_path}: {len(runs)} iterations; {reference_rel} has {len(reference)}. "
                                "Re-run `python -m shiva_export check --force`")
        ref = np.concatenate([np.asarray(it["sample"], dtype=np.float64).ravel() for it in reference])
        got = np.concatenate([np.asarray(it["sample"], dtype=np.float64).ravel() for it in runs])
        found.append({"backend": backend, "bucket": bucket, "steps": result["steps"], "source": outputs_rel,
                      **_error_distribution(ref, got)})
    return found, missing


def _check_section(reader: _Reader, check: dict | None) -> dict:
    if check is None:
        return {"status": NOT_RUN, "reason": "the check stage has not run on this folder"}
    distributions, missing = _error_distributions(reader, check)
    return {"status": "ran", "passed": check["passed"], "report": check, "error_distributions": distributions,
            "missing_outputs": missing}


def _bench_section(bench: dict | None) -> dict:
    if bench is None:
        return {"status": NOT_RUN, "reason": "the bench stage has not run on this folder"}
    return {"status": "ran", "report": bench}


def _repro_section(reader: _Reader, check: dict | None) -> dict:
    config = reader.manifest.config
    config = config.to_json() if config else {}
    flags = {"model": "--model", "router": "--router", "target_keep": "--target-keep", "steps": "--steps",
             "shift": "--shift", "buckets": "--buckets", "align": "--align", "align_to": "--align-to",
             "k_min": "--k-min",
             "height": "--height", "width": "--width", "batch": "--batch", "context_tokens": "--context-tokens",
             "dtype": "--dtype", "opset": "--opset", "row_scatter": "--row-scatter"}
    root = str(reader.manifest.root)
    args = " ".join(f"{flag} {config[key]:g}" if isinstance(config[key], float) else f"{flag} {config[key]}"
                    for key, flag in flags.items() if config.get(key) is not None)
    commands = [f"python -m shiva_export export {args} --out {root}"]
    if check is not None:
        c = check["config"]
        backends = " ".join(f"--backend {b}" for b in dict.fromkeys(r["backend"] for r in check["buckets"]))
        commands.append(f"python -m shiva_export check --out {root} {backends} --seed {c['seed']}"
                        + ("" if c.get("guidance_scale") is None else f" --guidance-scale {c['guidance_scale']:g}")
                        + ("" if c["full_trajectory"] else " --no-trajectory"))
    bench = reader.manifest.record(BenchRecord)
    if bench:
        c = bench.config or {}
        commands.append(f"python -m shiva_export bench --out {root} " + " ".join(
            f"--{key.replace('_', '-')} {c[key]}" for key in ("warmup", "runs", "loop_runs", "seed") if key in c))
    section = {"shiva_export": commands, "status": NOT_RUN, "script": None, "file": None,
               "commands": []}
    if check is None:
        section["reason"] = "check/repro.sh is written by the check stage, which has not run"
        return section
    script = reader.listed("check", REPRO_FILE).read_text()
    section.update(status="ran", file=REPRO_FILE, script=script,
                   commands=[line for line in script.splitlines()
                             if line.strip() and not line.startswith(("#", "set ", "cd "))])
    return section


def _why_cannot_run(backend: str, engine: Path) -> str | None:
    """Why engines of `backend` cannot run on this machine, or None when nothing known stops them (probed now)."""
    from shiva_export.engines.backends.base import current_device, get_backend

    impl = get_backend(backend)
    available, reason = impl.is_available()
    if not available:
        return reason
    if backend == "trt-rtx":
        from shiva_export.engines.backends.trt_rtx import check_can_run, plan_targets

        try:
            check_can_run(plan_targets(engine))
        except BackendUnavailableError as err:
            return str(err)
    elif impl.device_specific:
        device = current_device()
        meta = engine.with_name(engine.name + SIDECAR_SUFFIX)
        built_on = json.loads(meta.read_text()).get("gpu_name") if meta.is_file() else None
        if device.compute_capability is None:
            return f"no CUDA GPU here; {ENGINE_BACKENDS.get(backend, backend)} engines run only on a GPU"
        if built_on and built_on != device.name:
            return f"built on {built_on}; this machine has {device.name} ({backend} engines are device-specific)"
    return None


def _not_run(manifest: Manifest, sections: dict, probe: bool) -> list[dict]:
    """Everything that did not run, each with its reason. `probe`: ask the backends why (imports runtimes)."""
    root = manifest.root
    items = []
    for name in ("lint", "check", "bench"):
        if sections[name]["status"] == NOT_RUN:
            items.append({"what": name, "reason": sections[name]["reason"],
                          "how": f"python -m shiva_export {'build' if name == 'lint' else name} --out {root}"})
    built = sections["engines"]["backends"]
    if sections["engines"]["status"] == NOT_RUN:
        items.append({"what": "engine", "reason": sections["engines"]["reason"],
                      "how": f"python -m shiva_export build --out {root}"})
    engine = manifest.record(EngineRecord)
    recorded = (engine.skipped if engine else None) or {}   # {backend: reason}, if the stage records it
    for backend, label in ENGINE_BACKENDS.items():
        if backend in built:
            continue
        if backend in recorded:
            items.append({"what": f"{label} engines", "reason": recorded[backend], "probed": False,
                          "how": f"python -m shiva_export build --backend {backend} --out {root}"})
            continue
        reason = "not built (not probed: --no-probe)"
        if probe:
            from shiva_export.engines.backends.base import get_backend

            available, why = get_backend(backend).is_available()
            reason = f"not importable here: {why}" if not available else f"importable here ({why}) but not requested"
        items.append({"what": f"{label} engines", "reason": reason, "probed": probe,
                      "how": f"python -m shiva_export build --backend {backend} --out {root}"})
    check = sections["check"].get("report")
    checked = {r["backend"] for r in check["buckets"]} if check else set()
    benched = {r["backend"] for r in sections["bench"]["report"]["rows"]} if sections["bench"].get("report") else set()
    for backend, info in built.items():
        engine = root / info["engines"][0]["engine"]
        for stage, done in (("check", checked), ("bench", benched)):
            if backend in done or sections[stage]["status"] == NOT_RUN:
                continue
            blocker = _why_cannot_run(backend, engine) if probe else None
            items.append({"what": f"{info['name']} engines ({stage})", "probed": blocker is not None,
                          "reason": f"built but not run: {blocker}" if blocker else
                          f"built, not included in the {stage} run",
                          "how": f"python -m shiva_export {stage} --backend {backend} --out {root}"})
    if check:
        if not check["config"]["full_trajectory"]:
            items.append({"what": "full-trajectory check", "reason": "check ran with --no-trajectory",
                          "how": f"python -m shiva_export check --out {root} --force"})
        for result in check["buckets"]:
            if result["agreement"] is None:
                items.append({"what": f"token agreement, {result['backend']} bucket {result['bucket']}",
                              "reason": result.get("agreement_note") or "not measured"})
        for path in sections["check"]["missing_outputs"]:
            items.append({"what": f"per-element error distribution ({path})",
                          "reason": "check did not save the engine outputs; the per-bucket metrics are shown instead"})
    if sections["bench"].get("report"):
        for skipped in sections["bench"]["report"].get("skipped", []):
            items.append({"what": f"bench on {skipped['backend']}", "reason": skipped["reason"]})
    return items


def collect_report(manifest: Manifest, probe: bool = True) -> dict:
    """The report.json content: every fact the report shows, read from files the manifest lists.

    Args:
        manifest: the artifact folder's manifest (`Manifest.load`); the freeze stage must have run.
        probe: explain backends that were not built or run by asking them now (imports optional runtimes); the
            items say ``probed: true`` since the answer belongs to this machine, not to the artifacts.

    Raises:
        ArtifactError: the freeze stage has not run, or a listed file is missing or unreadable.
        StaleArtifactError: a listed file changed after its stage recorded it.
    """
    reader = _Reader(manifest)
    schedule = _schedule(reader)
    check, bench = _check(reader), _bench(reader)
    sections = {"summary": _summary(manifest, schedule, check, bench), "schedule": _schedule_section(schedule),
                "lint": _lint_section(reader), "engines": _engines_section(reader),
                "check": _check_section(reader, check), "bench": _bench_section(bench),
                "repro": _repro_section(reader, check)}
    sections["not_run"] = _not_run(manifest, sections, probe)
    used = [name for name in STAGES if name != REPORT_STAGE and manifest.record(name)]
    return {"schema": REPORT_SCHEMA, "tool_version": __version__,
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **sections,
            "inputs": {"stages": _stage_inputs(manifest, used), "files": dict(sorted(reader.inputs.items()))}}


# --------------------------------------------------------------------------------------------------- markdown
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _not_run_line(section: dict) -> list[str]:
    return [f"_{NOT_RUN.capitalize()}: {section['reason']}._", ""]


def _md_summary(data: dict) -> list[str]:
    s = data["summary"]
    keep, flops = s["keep"], s["flops"]
    buckets = "<br>".join(f"b{b['index']}: steps {_steps(b['steps'])}, k={format_k(b['k'])}" for b in s["buckets"])
    if s["checked"]:
        parity = "<br>".join(
            f"{backend}: " + ("built, not checked" if p["verdict"] == "not checked" else
                              f"**{p['verdict']}** ({p['buckets_passed']}/{p['buckets']} buckets"
                              + (f", loop {p['loop']}" if p["loop"] else "") + ")")
            for backend, p in s["parity"].items())
    else:
        parity = f"{NOT_RUN} (check)"
    if s["benched"] and s["speedups"]:
        speed = "<br>".join(f"{x['backend']} {x['scope']}: {x['measured']:.2f}x measured vs {x['flop_bound']:.2f}x "
                            f"FLOP bound ({x.get('efficiency', x['measured'] / x['flop_bound']):.0%})"
                            for x in s["speedups"]) + (f"<br>on {s['device']}" if s["device"] else "")
    else:
        speed = f"{NOT_RUN} (bench)"
    files = s["files"]
    where = [f"`{files['root']}/`", f"`{files['manifest']}`", f"`{files['schedule']}`",
             f"`{ONNX_DIR}/` ({len(files['onnx'])} files)"]
    where += [f"`{ENGINES_DIR}/{b}/` ({len(e)})" for b, e in files["engines"].items()]
    where += [f"`{f}`" for f in files.get("check", []) + files.get("bench", [])]
    where += [f"`{REPORT_DIR}/{REPORT_MD}`, `{REPORT_DIR}/{REPORT_JSON}`"]
    rows = [
        ("model", f"{s['model']}" + (f" (router {s['router']})" if s["router"] else " (no router checkpoint)")),
        ("resolution", f"{s['height']}x{s['width']} px, N = {s['num_tokens']} image tokens, "
                       f"{s['context_tokens']} context tokens"),
        ("batch", f"{s['batch']}" + (" ([uncond; cond], CFG-consistent selection)" if s["cfg_batch"] else "")),
        ("dtype", s["dtype"]),
        ("steps", f"{s['steps']} ({s.get('scheduler') or 'flow-matching Euler, shift ' + format(s['shift'], 'g')}); "
                  f"dense layers {s['dense_layers']}"),
        ("buckets", f"{len(s['buckets'])}: {buckets}"),
        ("keep ratio", f"learned {keep['learned']:.3f} → aligned {keep['aligned']:.3f} → realised "
                       f"{keep['realised']:.3f}"),
        ("FLOPs vs dense", f"learned {flops['learned']:.3f} → aligned {flops['aligned']:.3f} → realised "
                           f"{flops['realised']:.3f} (dense {_flops(flops['dense_per_step'])}/step; FLOP-bound "
                           f"speedup {flops['flop_bound_speedup']:.2f}x)"),
        ("parity", parity),
        ("speedup (P50)", speed),
        ("files", ", ".join(where)),
    ]
    return ["## Summary", "", *_table(("", ""), rows), ""]


def _md_schedule(data: dict) -> list[str]:
    sched, s = data["schedule"], data["summary"]
    cfg = sched["freeze_config"]
    lines = ["## Schedule", "",
             f"`schedule.json` (hash `{sched['schedule_hash'][:16]}`): {len(sched['timesteps'])} steps, "
             f"{sched['num_layers']} layers (pruned: {sched['pruned_layers']}), k aligned up to a multiple of "
             f"{cfg['align']}{ALIGN_WORDS[cfg.get('align_to', 'k')]} (k_min {cfg['k_min']}), "
             f"at most {cfg['max_buckets']} buckets.", "",
             f"![keep ratio over (step, layer)]({KEEP_RATIO_PNG})", ""]
    lines += _table(("bucket", "steps", "timesteps", "k per layer", "keep (pruned layers)", "FLOPs/step",
                     "vs dense", "FLOP-bound speedup"),
                    [(f"b{b['index']}", _steps(b["steps"]),
                      f"{sched['timesteps'][b['steps'][0]]:.1f} … {sched['timesteps'][b['steps'][-1]]:.1f}",
                      format_k(b["k"]), f"{b['keep']:.3f}", _flops(b["flops_per_step"]), f"{b['flop_ratio']:.3f}",
                      f"{b['flop_bound_speedup']:.2f}x") for b in s["buckets"]])
    lines += ["", "Mean keep ratio over pruned layers per step:", ""]
    lines += _table(("step", "timestep", "bucket", "learned", "aligned", "realised"),
                    [(p["step"], f"{p['timestep']:.1f}", f"b{p['bucket']}", f"{p['learned_keep']:.3f}",
                      f"{p['aligned_keep']:.3f}", f"{p['realised_keep']:.3f}") for p in sched["per_step"]])
    return lines + [""]


def _md_lint(data: dict) -> list[str]:
    lint = data["lint"]
    lines = ["## Lint", ""]
    if lint["status"] == NOT_RUN:
        return lines + _not_run_line(lint)
    lines += [f"{'Clean' if lint['passed'] else '**Errors found**'}: {lint['errors']} error(s), "
              f"{lint['warnings']} warning(s) over {len(lint['files'])} graphs (`{LINT_FILE}`).", ""]
    lines += _table(("graph", "errors", "warnings", "findings by rule"),
                    [(name, r["errors"], r["warnings"],
                      ", ".join(f"{rule} x{count}" for rule, count in sorted(r["rules"].items())) or "-")
                     for name, r in lint["files"].items()])
    examples: dict[tuple[str, str], str] = {}
    for name, report in lint["files"].items():
        for finding in report["findings"]:
            if finding["severity"] == "error":
                lines.append(f"- **error** `{name}` [{finding['node']}] {finding['rule']}: {finding['message']}")
            else:
                examples.setdefault((finding["severity"], finding["rule"]), finding["message"])
    if examples:
        lines += ["", "One example per warning rule:", ""]
        lines += [f"- {severity} {rule}: {message}" for (severity, rule), message in sorted(examples.items())]
    return lines + [""]


def _md_engines(data: dict) -> list[str]:
    engines = data["engines"]
    lines = ["## Engines", ""]
    if engines["status"] == NOT_RUN:
        return lines + _not_run_line(engines)
    rows = []
    for backend, info in engines["backends"].items():
        for e in info["engines"]:
            size = _size(e["size_bytes"]) if e.get("size_bytes") is not None else "missing"
            options = ", ".join(f"{k}={v}" for k, v in sorted((e.get("build_options") or {}).items())
                                if v is not None) or "defaults"
            built_on = e.get("gpu_name") or "-"
            if e.get("compute_capability") not in (None, "cpu"):
                built_on += f" (sm {e['compute_capability']})"
            rows.append((f"{info['name']} ({backend})", f"b{e['bucket']}", f"`{e['engine']}`", size,
                         e.get("backend_version") or "-", e.get("precision") or "-", built_on, options,
                         f"{e['status']} ({e['seconds']:g} s)" if e["status"] == "built" else e["status"],
                         (e.get("engine_sha256") or "-")[:12]))
    lines += _table(("backend", "bucket", "engine", "size", "version", "precision", "built on", "build options",
                     "status", "sha256"), rows)
    return lines + [""]


def _md_check(data: dict) -> list[str]:
    from shiva_export.engines.compare import render_report

    check = data["check"]
    lines = ["## Check (parity with PyTorch)", ""]
    if check["status"] == NOT_RUN:
        return lines + _not_run_line(check)
    report = check["report"]
    lines += [render_report(report), "", f"![errors per bucket]({ERRORS_PNG})", ""]
    gates = {b["gate"]["name"]: b["gate"] for b in report["buckets"]}
    gates.update({t["gate"]["name"]: t["gate"] for t in report["trajectories"]})
    lines += ["Gates:", ""]
    lines += _table(("gate", "max abs <=", "cosine >=", "PSNR dB >=", "agreement >="),
                    [(g["name"], _num(g["max_abs"], ".1e"), _num(g["cosine"], "g"), _num(g["psnr"], "g"),
                      "-" if g["agreement"] is None else f"{100 * g['agreement']:g}%") for g in gates.values()])
    ties = [(b, f"b{b['bucket']}", t) for b in report["buckets"] for t in b.get("near_ties") or ()]
    ties += [(t, "full loop", t["near_tie"]) for t in report["trajectories"] if t.get("near_tie")]
    if ties:
        lines += ["", "Near ties: steps whose selection first differs, by one token a row, where the PyTorch "
                  "reference's k-th and (k+1)-th router scores were within rounding of each other (relative margin "
                  "below); later layers and steps then see other inputs. They are gated by cosine and PSNR floors "
                  "instead of max abs and agreement:", ""]
        lines += _table(("backend", "scope", "step", "first layer", "margin", "floors"),
                        [(r["backend"], scope, t["step"], t["layer"], f"{t['margin']:.1e}",
                          f"cosine >= {_num(r['gate'].get('near_tie_cosine'), 'g')}, PSNR >= "
                          f"{_num(r['gate'].get('near_tie_psnr'), 'g')} dB") for r, scope, t in ties])
    layers = sorted({int(l) for b in report["buckets"] for l in (b["agreement"] or {})})
    if layers:
        lines += ["", "Token-selection agreement per pruned layer (share of identical kept indices):", ""]
        lines += _table(("backend", "bucket", *(f"layer {l}" for l in layers)),
                        [(b["backend"], f"b{b['bucket']}",
                          *((f"{100 * b['agreement'][str(l)]:.2f}%" if str(l) in b["agreement"] else "-")
                            for l in layers)) for b in report["buckets"] if b["agreement"]])
    if check["error_distributions"]:
        lines += ["", "Absolute error per element of `sample` (engine minus reference), over every step of the "
                  "bucket:", ""]
        lines += _table(("backend", "bucket", "elements", "exact", "mean", "P50", "P90", "P99", "P99.9", "max"),
                        [(d["backend"], f"b{d['bucket']}", d["count"], f"{d['zeros'] / d['count']:.1%}",
                          _num(d["mean"], ".2e"), *(_num(d["quantiles"][q], ".2e")
                                                    for q in ("p50", "p90", "p99", "p99.9", "max")))
                         for d in check["error_distributions"]])
    lines += ["", "Per step (worst over the batch):", ""]
    lines += _table(("backend", "bucket", "step", "max abs", "mean abs", "cosine", "PSNR dB"),
                    [(b["backend"], f"b{b['bucket']}", step, _num(m["max_abs"], ".2e"), _num(m["mean_abs"], ".2e"),
                      _num(m["cosine"], ".9f"), _num(m["psnr"], ".1f") if m["psnr"] is not None else "inf")
                     for b in report["buckets"] for step, m in zip(b["steps"], b["per_step"])])
    versions = ", ".join(f"{k} {v}" for k, v in sorted(report.get("versions", {}).items()))
    return lines + ["", f"Versions: {versions}", ""]


def _md_bench(data: dict) -> list[str]:
    bench = data["bench"]
    lines = ["## Bench (dense vs pruned)", ""]
    if bench["status"] == NOT_RUN:
        return lines + _not_run_line(bench)
    report = bench["report"]
    device, cfg = report["device"], report["config"]
    where = (f" (compute capability {device['compute_capability']})" if device.get("kind") == "cuda"
             else f" ({device.get('cpu_count')} CPUs)")
    lines += [f"Device: **{device.get('name')}**{where}. {cfg['warmup']} warm-up + {cfg['runs']} timed calls per "
              f"step row (dense and buckets interleaved); {cfg['loop_runs']} timed loops. Times in ms.", "",
              f"![latency dense vs pruned]({LATENCY_PNG})", ""]
    lines += _table(("backend", "variant", "scope", "steps", "GFLOPs", "mean", "P50", "P95", "P99", "runs", "clock"),
                    [(r["backend"], r["variant"], r["scope"], r["steps"], f"{r['flops'] / 1e9:.2f}",
                      f"{r['mean_ms']:.2f}", f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      r["runs"], r["clock"]) for r in report["rows"]])
    lines += ["", "Speedup of pruned over dense (P50 / P50) beside the FLOP bound (dense FLOPs / pruned FLOPs):", ""]
    lines += _table(("backend", "scope", "dense P50", "pruned P50", "measured", "FLOP-bound", "measured / bound"),
                    [(x["backend"], x["scope"], f"{x['dense_p50_ms']:.2f}", f"{x['pruned_p50_ms']:.2f}",
                      f"{x['measured']:.3f}x", f"{x['flop_bound']:.3f}x",
                      f"{x.get('efficiency', x['measured'] / x['flop_bound']):.2f}") for x in report["speedups"]])
    versions = ", ".join(f"{k} {v}" for k, v in sorted(report.get("versions", {}).items()))
    return lines + ["", f"Versions: {versions}", ""]


def _md_repro(data: dict) -> list[str]:
    repro = data["repro"]
    lines = ["## Reproduction", "", "With shiva_export:", "", "```bash", *repro["shiva_export"], "```", ""]
    if repro["status"] == NOT_RUN:
        return lines + _not_run_line(repro)
    return lines + [f"Without shiva_export (`{repro['file']}`, run from the artifact folder):", "", "```bash",
                    repro["script"].rstrip("\n"), "```", ""]


def _md_not_run(data: dict) -> list[str]:
    lines = ["## Not run", ""]
    if not data["not_run"]:
        return lines + ["Everything ran.", ""]
    for item in data["not_run"]:
        probed = " _(probed on the machine that wrote this report)_" if item.get("probed") else ""
        how = f" — `{item['how']}`" if item.get("how") else ""
        lines.append(f"- **{item['what']}**: {item['reason']}{probed}{how}")
    return lines + [""]


def render_markdown(data: Mapping[str, Any]) -> str:
    """report.md from report.json's content (never from logs or live objects)."""
    s = data["summary"]
    lines = [f"# shiva_export report: {s['model']}, {s['height']}x{s['width']} px, {s['dtype']}, {s['steps']} steps, "
             f"{len(s['buckets'])} bucket(s)", "",
             f"Written {data['generated']} by shiva_export {data['tool_version']} from `{s['files']['root']}`.", ""]
    for part in (_md_summary, _md_schedule, _md_lint, _md_engines, _md_check, _md_bench, _md_repro, _md_not_run):
        lines += part(data)
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_keep_ratio(data: Mapping[str, Any], path: Path) -> Path:
    """Learned ratios and realised k/N over (step, layer) side by side, colour scale 0.2..1.0 (paper Fig. 4b)."""
    sched = data["schedule"]
    learned = np.asarray(sched["ratios"], dtype=np.float64)
    realised = np.asarray(sched["realised_k_table"], dtype=np.float64) / sched["num_tokens"]
    steps, layers = learned.shape
    figure = _figure(min(18.0, 3.0 + 0.7 * layers), min(12.0, 2.0 + 0.28 * steps))
    axes = figure.subplots(1, 2, sharey=True)
    labels = [f"{s} (t={t:.0f})" for s, t in enumerate(sched["timesteps"])]
    image = None
    for ax, table, title in ((axes[0], learned, "learned keep ratio r(t, l)"),
                             (axes[1], realised, "realised k / N (bucket k-vectors)")):
        image = ax.imshow(table, vmin=KEEP_SCALE[0], vmax=KEEP_SCALE[1], cmap="viridis", aspect="auto",
                          interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_xticks(range(layers))
        if steps * layers <= 400:
            for s in range(steps):
                for l in range(layers):
                    ax.text(l, s, f"{table[s, l]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if table[s, l] < 0.6 else "black")
    stride = max(1, steps // 28)
    axes[0].set_yticks(range(0, steps, stride), labels[::stride])
    axes[0].set_ylabel("sampler step (timestep)")
    for bucket in data["summary"]["buckets"]:
        first, last = bucket["steps"][0], bucket["steps"][-1]
        if first > 0:
            axes[1].axhline(first - 0.5, color="white", linewidth=2)
        axes[1].text(layers - 0.45, (first + last) / 2, f" b{bucket['index']}", va="center", ha="left",
                     fontsize=9, clip_on=False)
    figure.colorbar(image, ax=list(axes), label="keep ratio", shrink=0.9)
    figure.suptitle(f"{data['summary']['model']}: keep ratio over (step, layer); N = {sched['num_tokens']}")
    figure.savefig(path, dpi=110)
    return path


def plot_latency(data: Mapping[str, Any], path: Path) -> Path:
    """Dense vs pruned P50 per bucket (one call) and for the whole loop, per backend; whiskers up to P95."""
    report = data["bench"]["report"]
    rows = {(r["backend"], r["variant"], r["scope"]): r for r in report["rows"]}
    speedups = {(s["backend"], s["scope"]): s for s in report["speedups"]}
    backends = list(dict.fromkeys(r["backend"] for r in report["rows"]))
    buckets = list(dict.fromkeys(r["scope"] for r in report["rows"]
                                 if r["variant"] == "pruned" and r["scope"] != "loop"))
    panels = (("one transformer call", [("dense", "dense", "step"), *((f"pruned {b}", "pruned", b) for b in buckets)]),
              (f"whole loop ({report['artifact'].get('steps', '?')} steps)",
               [("dense", "dense", "loop"), ("pruned", "pruned", "loop")]))
    side_by_side = len(backends) <= 2             # more backends: one panel above the other
    figure = (_figure(max(8.0, 5.2 * len(backends)), 4.6) if side_by_side
              else _figure(min(16.0, 2.0 + 2.4 * len(backends)), 8.4))
    for ax, (title, series) in zip(figure.subplots(1, 2) if side_by_side else figure.subplots(2, 1), panels):
        width = 0.8 / len(series)
        for i, (label, variant, scope) in enumerate(series):
            found = [(x, rows[(backend, variant, scope)]) for x, backend in enumerate(backends)
                     if (backend, variant, scope) in rows]
            xs = [x + (i - (len(series) - 1) / 2) * width for x, _ in found]
            ax.bar(xs, [r["p50_ms"] for _, r in found], width, label=label, capsize=3,
                   yerr=[[0.0] * len(found), [max(0.0, r["p95_ms"] - r["p50_ms"]) for _, r in found]],
                   color="0.6" if variant == "dense" else None)
            for x, (_, row) in zip(xs, found):
                speedup = speedups.get((row["backend"], scope)) if variant == "pruned" else None
                if speedup:
                    ax.annotate(f"{speedup['measured']:.2f}x\n(bound {speedup['flop_bound']:.2f}x)",
                                (x, row["p95_ms"]), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                                textcoords="offset points")
        ax.set_xticks(range(len(backends)), backends)
        ax.set_ylabel("ms (P50, whisker to P95)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.margins(y=0.25)
    figure.suptitle(f"dense vs pruned on {report['device'].get('name')}")
    figure.savefig(path, dpi=110)
    return path


def plot_errors(data: Mapping[str, Any], path: Path) -> Path:
    """Per-bucket max / mean abs error and 1 - cosine (with the max-abs gate), plus the |engine - reference|
    histogram per (backend, bucket) where check saved the engine outputs."""
    check = data["check"]
    report = check["report"]
    distributions = check["error_distributions"]
    results = [(f"{b['backend']}\nb{b['bucket']}", b["metrics"], b["gate"]) for b in report["buckets"]]
    results += [(f"{t['backend']}\nloop", t["metrics"], t["gate"]) for t in report["trajectories"]]
    figure = _figure(max(9.0, 4.5 + 1.2 * len(results)), 4.6)
    axes = figure.subplots(1, 2 if distributions else 1, squeeze=False)[0]
    ax = axes[0]
    floor = 1e-16                       # log axes: exact zeros are drawn at the floor
    width = 0.27
    for i, (name, key) in enumerate((("max abs", "max_abs"), ("mean abs", "mean_abs"), ("1 - cosine", "cosine"))):
        values = [max(floor, (1.0 - m[key]) if key == "cosine" else m[key]) for _, m, _ in results]
        ax.bar([x + (i - 1) * width for x in range(len(results))], values, width, label=name)
    for x, (_, _, gate) in enumerate(results):
        if gate.get("max_abs") is not None:
            ax.hlines(gate["max_abs"], x - 0.45, x + 0.45, colors="red", linestyles="--",
                      label="max-abs gate" if x == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(results)), [name for name, _, _ in results], fontsize=8)
    ax.set_title("worst step per bucket / final latents of the loop")
    ax.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    if distributions:
        ax = axes[1]
        for d in distributions:
            if d["counts"]:
                total = d["count"]
                ax.stairs([c / total for c in d["counts"]], [10 ** e for e in d["log10_edges"]],
                          label=f"{d['backend']} b{d['bucket']} ({d['zeros'] / total:.2%} exact)")
        ax.set_xscale("log")
        ax.set_xlabel("|engine - reference| per element")
        ax.set_ylabel("share of elements")
        ax.set_title("error distribution (all steps of the bucket)")
        ax.legend(fontsize=8)
    figure.suptitle(f"{report['model']} {report['dtype']}: engine vs PyTorch static-mode model")
    figure.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------------------------------- writing
def write_report(manifest: Manifest, probe: bool = True) -> Report:
    """Write ``report/`` (report.json, report.md, PNGs) whole, then record the ``report`` stage in the manifest.

    The report is always re-rendered (it is cheap); its stage record carries the files it wrote and the hash of
    the stage records and files it read, so a consumer can tell whether it still describes the folder.

    Raises:
        ArtifactError: no manifest, no freeze stage, or a listed file missing (StaleArtifactError: changed).
    """
    from shiva_export.io import atomic_directory, write_json

    data = collect_report(manifest, probe=probe)
    plots = {"keep_ratio": (KEEP_RATIO_PNG, plot_keep_ratio, True),
             "latency": (LATENCY_PNG, plot_latency, data["bench"]["status"] != NOT_RUN),
             "errors": (ERRORS_PNG, plot_errors, data["check"]["status"] != NOT_RUN)}
    data["plots"] = {name: file for name, (file, _, wanted) in plots.items() if wanted}
    folder = manifest.root / REPORT_DIR
    names = [REPORT_JSON, REPORT_MD, *data["plots"].values()]
    with manifest.writing():
        with atomic_directory(folder) as tmp:
            for name, (file, plot, wanted) in plots.items():
                if wanted:
                    plot(data, tmp / file)
            write_json(tmp / REPORT_JSON, data)
            (tmp / REPORT_MD).write_text(render_markdown(data))
        files = tuple(folder / name for name in names)
        inputs_hash = sha256_json(data["inputs"])
        manifest.set_stage(ReportRecord(files=tuple(map(manifest.file_record, files)), inputs=data["inputs"],
                                        schema=REPORT_SCHEMA), inputs_hash)
        manifest.save()
    logger.debug("report: %s", folder / REPORT_MD)
    return Report(folder=folder, files=files, data=data)


def _scheduler_name(freeze_config: dict) -> str | None:
    """How the report names the sampler: None for flow-matching Euler (the report's default wording)."""
    from shiva_export.passes.freeze import FreezeConfig, scheduler_text
    from shiva_export.models import scheduler_has_shift

    if scheduler_has_shift(freeze_config.get("scheduler")):
        return None
    return scheduler_text(FreezeConfig.from_json(freeze_config))

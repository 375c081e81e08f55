"""The stages, model -> freeze -> export -> lint -> engine -> check -> bench -> report, over one artifact folder.

Every stage reads what earlier stages recorded in the manifest, writes its files atomically, and records the
hash of its inputs; a stage whose inputs and files are unchanged is reused, not rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from shiva_export.engines.backends.names import TENSORRT_BACKENDS, backend_name
from shiva_export.errors import ArtifactError, ConfigError, StaleArtifactError
from shiva_export.io import sha256_json
from shiva_export.manifest import Manifest
from shiva_export.records import (LINT_FILE, MANIFEST_NAME, ONNX_DIR, SCHEDULE_FILE, ArtifactConfig, BenchRecord,
                                  CheckRecord, EngineEntry, EngineRecord, ExportRecord, FileRecord, FreezeRecord,
                                  GraphConfig, GraphRecord, LintRecord)

log = logging.getLogger(__name__)


class Workspace:
    """An artifact folder: its manifest, its config, and the pruned model loaded lazily once.

    A writing workspace (the default) holds the folder's lock for as long as it lives, finishes or rolls back
    what a killed writer left, and removes stale partial files; `write=False` (inspect, the runtime) takes the
    lock shared while it loads, so it never reads a folder that a stage is half-way through writing.
    """

    def __init__(self, root: str | Path, config: ArtifactConfig | None = None, write: bool = True):
        from shiva_export.artifact import FolderLock, recover, recover_needed, sweep

        self.root = Path(root)
        if config is None and not (self.root / MANIFEST_NAME).is_file():
            Manifest.load(self.root)  # the one-line "no manifest" error, before any lock file is made
        if write:
            FolderLock.acquire(self.root, exclusive=True, owner=self)  # held until this workspace is collected
            recover(self.root)
            sweep(self.root)
            self.manifest = Manifest.load(self.root, must_exist=config is None)
        else:
            lock = FolderLock.acquire(self.root, exclusive=False)
            try:
                if lock is not None and recover_needed(self.root):
                    FolderLock.acquire(self.root, exclusive=True)
                    try:
                        recover(self.root)
                    finally:
                        lock.release()
                self.manifest = Manifest.load(self.root)
            finally:
                if lock is not None:
                    lock.release()
        if config is None:
            config = self.manifest.config
            if config is None:
                raise ArtifactError(f"{self.root}: the manifest has no config; run `python -m shiva_export export` first")
        self._given = config
        self._pruned = None
        self._config = None

    def _load(self):
        from shiva_export.models import preset_facts, preset_names, read_preset
        from shiva_export.pruned import load_pruned_model

        is_preset = self._given.model in preset_names()
        if is_preset:  # options are checked before the model is built
            preset = read_preset(self._given.model)
            config = self._given.resolve(preset["defaults"], preset_facts(self._given.model, preset))
        else:
            config = self._given.resolve({})
        pruned = load_pruned_model(config.model, config.router, target_keep=config.target_keep,
                                   cfg_consistent=bool(config.batch and config.batch % 2 == 0))
        if not is_preset:  # a folder's defaults come from its config and pipeline; CFG follows the batch
            config = self._given.resolve(pruned.source.defaults, pruned.source.facts)
            pruned.state.config = dataclasses.replace(pruned.state.config, cfg_consistent=config.cfg_consistent)
        self._config, self._pruned = config, pruned

    @property
    def config(self) -> ArtifactConfig:
        if self._config is None:
            self._load()
        return self._config

    @property
    def pruned(self):
        if self._pruned is None:
            self._load()
        return self._pruned

    def path(self, relative: str) -> Path:
        """A path inside the folder; a name (from the manifest or a sidecar) that leads outside is refused."""
        return self.manifest.path_of(relative)

    def schedule(self):
        from shiva_export.passes.freeze import Schedule

        self.manifest.verify_files(FreezeRecord)
        return Schedule.load(self.path(SCHEDULE_FILE))

    def bucket_graphs(self) -> tuple[GraphRecord, ...]:
        """The exported graphs' records, verified against the manifest.

        Each graph a record names must be the file the export stage listed with that sha256, under onnx/, once."""
        self.manifest.verify_files(ExportRecord)
        record = self.manifest.require(ExportRecord)
        listed = {entry.path: entry.sha256 for entry in record.files}
        named = []
        for graph in record.graphs:
            named += [(graph.file, graph.sha256)]
            if graph.debug_file:
                named += [(graph.debug_file, graph.debug_sha256)]
        if record.dense:
            named += [(record.dense.file, record.dense.sha256)]
        seen = set()
        for name, sha in named:
            relative = f"{ONNX_DIR}/{name}"
            if listed.get(relative) != sha or name in seen:
                raise StaleArtifactError(f"{self.root}: export record names graph {name!r} with sha256 "
                                         f"{str(sha)[:12]}, but the export's files list "
                                         f"{'it twice' if name in seen else str(listed.get(relative))[:12]}; "
                                         f"the manifest was edited. Re-run `python -m shiva_export export --out "
                                         f"{self.root}`")
            seen.add(name)
        buckets = sorted(g.bucket for g in record.graphs)
        if buckets != list(range(len(buckets))):
            raise StaleArtifactError(f"{self.root}: export record has buckets {buckets}; expected 0..{len(buckets) - 1}")
        return record.graphs

    def verified_graph(self, name: str, bucket: str, k: list[int] | None) -> tuple[Path, dict[str, str]]:
        """(`onnx/<name>`, {external weights file: recorded sha256}), refused unless the graph says it is this
        bucket with this k (its metadata_props) and every external weights file it reads is one the export stage
        listed (and so checked by sha256). Call after `bucket_graphs()`, which verifies the files' hashes."""
        from shiva_export.manifest import GRAPH_BUCKET_KEY, GRAPH_K_KEY
        from shiva_export.passes._files import read_model_proto

        path = self.path(f"{ONNX_DIR}/{name}")
        proto = read_model_proto(path)
        props = {p.key: p.value for p in proto.metadata_props}
        found = (props.get(GRAPH_BUCKET_KEY), props.get(GRAPH_K_KEY))
        if found != (bucket, json.dumps(k)):
            if found == (None, None):
                raise StaleArtifactError(f"{path}: the graph carries no bucket identity (exported by an older "
                                         f"shiva_export); re-run `python -m shiva_export export --out {self.root}`")
            raise StaleArtifactError(f"{path}: the manifest names this graph for bucket {bucket} (k={k}), but the "
                                     f"graph is bucket {found[0]} (k={found[1]}); the manifest was edited. Re-run "
                                     f"`python -m shiva_export export --out {self.root}`")
        listed = {e.path for e in self.manifest.require(ExportRecord).files}
        weights = {}
        for tensor in proto.graph.initializer:
            if tensor.data_location != tensor.EXTERNAL:
                continue
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            relative = f"{ONNX_DIR}/{location}"
            self.path(relative)  # refused if it leads outside the folder
            if relative not in listed:
                raise StaleArtifactError(f"{path}: initializer {tensor.name!r} reads external data {location!r}, "
                                         "which the export stage did not write; re-export")
            weights[location] = self.manifest.recorded_sha256(relative)
        return path, weights


def model_identity(ws: Workspace) -> dict:
    return {"model_hash": ws.pruned.source.model_hash, "checkpoint_hash": ws.pruned.checkpoint_hash}


def recorded_transformer_config(config) -> dict:
    """The backbone's diffusers config as JSON, kept in the export record so a deployment needs only the artifact
    folder (the runtime's `transformer.config`), not the source model."""
    return json.loads(json.dumps({key: value for key, value in dict(config).items()
                                  if not key.startswith("_") or key == "_class_name"}))


def run_freeze(ws: Workspace, force: bool = False) -> bool:
    """Policy at the sampler's timesteps -> k table -> buckets -> schedule.json. Returns True if it ran."""
    from shiva_export.passes.freeze import FreezeConfig, freeze

    cfg = ws.config
    freeze_cfg = FreezeConfig(num_steps=cfg.steps, shift=cfg.freeze_scheduler["shift"],
                              scheduler=cfg.freeze_scheduler, align=cfg.align, align_to=cfg.align_to,
                              k_min=cfg.k_min, max_buckets=cfg.buckets, dense_layers=ws.pruned.policy.dense_layers)
    inputs = sha256_json({"freeze": freeze_cfg.to_json(), "size": [cfg.height, cfg.width, cfg.batch, cfg.context_tokens,
                                                                   cfg.vae_scale_factor],
                          **model_identity(ws)})
    if not force and ws.manifest.is_fresh(FreezeRecord, inputs):
        log.info("freeze: schedule.json is up to date, reused")
        return False
    schedule = freeze(ws.pruned.policy.ratios, ws.pruned.config, cfg.height, cfg.width, cfg.batch,
                      cfg.context_tokens, freeze_cfg, **model_identity(ws), vae_scale_factor=cfg.vae_scale_factor)
    previous = ws.manifest.record(FreezeRecord)
    previous_hash = previous.schedule_hash if previous else None
    if previous_hash == schedule.schedule_hash and ws.manifest.is_fresh(FreezeRecord, inputs):
        log.info("freeze: the same schedule again; schedule.json and the later stages are kept")
        return True
    with ws.manifest.writing():
        path = schedule.save(ws.path(SCHEDULE_FILE))
        ws.manifest.set_stage(FreezeRecord(files=(ws.manifest.file_record(path),),
                                           schedule_hash=schedule.schedule_hash,
                                           buckets=tuple(tuple(b.k) for b in schedule.buckets),
                                           summary=schedule.summary.to_json()), inputs)
        if previous_hash != schedule.schedule_hash:  # the same schedule keeps its graphs
            ws.manifest.drop_stages("export", "lint", "engine", "check", "bench", "report")
        ws.manifest.save()
    return True


def run_export(ws: Workspace, force: bool = False, progress=None) -> bool:
    """One static ONNX graph per bucket (+ a debug twin with index outputs), one shared weight file."""
    import torch

    from shiva_export.export import ExportConfig, export_buckets, torch_dtype
    from shiva_export.passes.manager import tensorrt_safety

    cfg = ws.config
    schedule = ws.schedule()
    export_cfg = ExportConfig(cfg.height, cfg.width, cfg.batch, cfg.context_tokens, cfg.dtype, cfg.opset,
                              debug_indices=True, row_scatter=cfg.row_scatter,
                              vae_scale_factor=cfg.vae_scale_factor)
    transformer_config = recorded_transformer_config(ws.pruned.config)
    inputs = sha256_json({"schedule": schedule.schedule_hash, "export": dataclasses.asdict(export_cfg),
                          "transformer_config": transformer_config, **model_identity(ws)})
    if not force and ws.manifest.is_fresh(ExportRecord, inputs):
        log.info("export: ONNX graphs are up to date, reused")
        return False
    pruned = ws.pruned
    dtype = torch_dtype(cfg.dtype)
    if dtype != torch.float32:
        pruned.to_dtype(dtype)
    with ws.manifest.writing():
        try:
            written = export_buckets(pruned.transformer, [b.k for b in schedule.buckets], export_cfg,
                                     ws.path(ONNX_DIR), graph_passes=tensorrt_safety(export_cfg.dtype),
                                     progress=progress)
        finally:
            if dtype != torch.float32:
                pruned.to_dtype(torch.float32)
        _record_export(ws, written, export_cfg, transformer_config, schedule, inputs)
    return True


def _record_export(ws: Workspace, written, export_cfg, transformer_config: dict, schedule, inputs: str) -> None:
    """The export record of what `export_buckets` wrote (`ExportedGraphs`): its graphs, and its files under onnx/."""
    files = tuple(FileRecord(path=f"{ONNX_DIR}/{name}", sha256=sha256) for name, sha256 in written.files)
    ws.manifest.set_stage(ExportRecord(files=files, graphs=written.graphs, dense=written.dense,
                                       config=GraphConfig.from_json(dataclasses.asdict(export_cfg)),
                                       transformer_config=transformer_config,
                                       schedule_hash=schedule.schedule_hash), inputs)
    ws.manifest.drop_stages("lint", "engine", "check", "bench", "report")
    ws.manifest.save()


def start(root: str | Path, config: ArtifactConfig) -> Workspace:
    """Open (or create) an artifact folder for `config`; a folder made for other inputs is refused, not mixed."""
    from shiva_export.models import num_image_tokens

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} exists and is not a folder")
    created = [parent for parent in (root, *root.parents) if not parent.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--out {root} is not writable ({err.strerror}); choose another folder") from err
    try:
        ws = Workspace(root, config)
        resolved = ws.config.to_json()  # every option checked (and the model loaded) before anything is written
        num_image_tokens(ws.pruned.config, ws.config.height, ws.config.width, ws.config.vae_scale_factor)
    except BaseException:
        _remove_if_unused(created)
        raise
    stored = ws.manifest.config
    if stored is not None and stored.to_json() != resolved:
        changed = sorted(k for k, v in stored.to_json().items() if resolved.get(k) != v)
        log.info("config changed (%s): stages whose inputs changed will be redone", ", ".join(changed))
    ws.manifest.config = ws.config
    return ws


def _remove_if_unused(created: list[Path]) -> None:
    """Remove the folders `start` made for a run that was refused, if nothing but the lock file is in them."""
    from shiva_export.artifact import LOCK_NAME

    for folder in created:  # deepest first
        if not folder.is_dir() or any(p.name != LOCK_NAME for p in folder.iterdir()):
            return
        (folder / LOCK_NAME).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            return


def run_lint(ws: Workspace, force: bool = False) -> dict:
    """Lint every exported graph (production, debug, dense); returns {file: report json}; lint.json beside them."""
    from shiva_export.io import write_json
    from shiva_export.passes.lint import lint_model

    record = ws.manifest.require(ExportRecord)
    files = record.graph_files()
    inputs = sha256_json({name: record.inputs_hash for name in files})
    if not force and ws.manifest.is_fresh(LintRecord, inputs):
        log.info("lint: reports are up to date, reused")
        return dict(ws.manifest.require(LintRecord).reports or {})
    ws.bucket_graphs()
    reports = {name: lint_model(str(ws.path(f"{ONNX_DIR}/{name}"))).to_json() for name in files}
    errors = sum(r["errors"] for r in reports.values())
    warnings = sum(r["warnings"] for r in reports.values())
    with ws.manifest.writing():
        path = write_json(ws.path(LINT_FILE), reports)
        ws.manifest.set_stage(LintRecord(files=(ws.manifest.file_record(path),), reports=reports, errors=errors,
                                         warnings=warnings, passed=errors == 0), inputs)
        ws.manifest.save()
    return reports




def resolve_backends(requested: list[str] | None) -> list[str]:
    """Requested backends (aliases allowed), or: ONNX Runtime always + every TensorRT flavour importable here."""
    from shiva_export.engines.backends.base import get_backend

    if requested:
        names = list(dict.fromkeys(backend_name(name) for name in requested))
        for name in names:  # refused before any stage runs, not after minutes of freeze and export
            get_backend(name).require_available()
        return names
    names = ["ort"]
    for name in TENSORRT_BACKENDS:
        available, reason = get_backend(name).is_available()
        if available:
            names.append(name)
        else:
            log.info("%s not built: %s", name, reason)
    return names


def run_engines(ws: Workspace, backend: str, options=None, force: bool = False) -> tuple[EngineEntry, ...]:
    """engines/<backend>/bK.<ext> + metadata sidecars for every bucket graph; fresh engines are kept."""
    from shiva_export.engines.backends.base import BuildOptions, get_backend
    from shiva_export.engines.build import OnnxSource, build_engine, engine_path_for
    from shiva_export.engines.metadata import metadata_path

    backend = backend_name(backend)
    impl = get_backend(backend)
    impl.require_available()
    schedule = ws.schedule()  # schedule.json verified and validated before anything is built from it
    graphs = ws.bucket_graphs()
    check_export_matches_schedule(ws, graphs, schedule)
    schedule_hash = ws.manifest.require(FreezeRecord).schedule_hash
    checkpoint_hash = ws.manifest.config.router and ws.pruned.checkpoint_hash
    options = options or BuildOptions()
    entries, files = [], []
    with ws.manifest.writing():
        for graph in graphs:
            path, weights = ws.verified_graph(graph.file, str(graph.bucket), list(graph.k))
            source = OnnxSource(path, onnx_sha256=graph.sha256, weights_sha256=weights)
            engine_path = engine_path_for(ws.path(ONNX_DIR), impl, source.path)
            built = build_engine(impl, source, engine_path, options, schedule_hash=schedule_hash,
                                 checkpoint_hash=checkpoint_hash, force=force)
            entries.append(EngineEntry(bucket=graph.bucket, backend=built.backend, onnx=graph.file,
                                       engine=engine_path.relative_to(ws.root).as_posix(),
                                       metadata=metadata_path(engine_path).relative_to(ws.root).as_posix(),
                                       status=built.status, reason=built.reason, seconds=round(built.seconds, 3),
                                       build_options=options.to_json()))
            files += [ws.manifest.file_record(engine_path), ws.manifest.file_record(metadata_path(engine_path))]
        stage = ws.manifest.record(EngineRecord) or EngineRecord()
        prefix = engine_path_for(ws.path(ONNX_DIR), impl, "x").parent.relative_to(ws.root).as_posix() + "/"
        keep = tuple(f for f in stage.files if not f.path.startswith(prefix))
        ws.manifest.set_stage(dataclasses.replace(stage, engines={**stage.engines, backend: tuple(entries)},
                                                  files=keep + tuple(files)), inputs_hash=None)
        ws.manifest.save()
    return tuple(entries)


def check_export_matches_schedule(ws: Workspace, graphs, schedule) -> None:
    """Refuse graphs (`GraphRecord`s) exported from another schedule than schedule.json: hash, bucket k-vectors and
    shapes."""
    root, record = ws.root, ws.manifest.require(ExportRecord)
    if record.schedule_hash != schedule.schedule_hash:
        raise StaleArtifactError(f"{root}: the ONNX graphs were exported from schedule {record.schedule_hash}, "
                                 f"but schedule.json is {schedule.schedule_hash}; re-run "
                                 f"`python -m shiva_export export --out {root}`")
    exported = sorted((g.bucket, tuple(g.k)) for g in graphs)
    frozen = [(b.index, tuple(b.k)) for b in schedule.buckets]
    if exported != frozen:
        raise StaleArtifactError(f"{root}: exported buckets {exported} differ from the schedule's {frozen}; re-run "
                                 f"`python -m shiva_export export --out {root}`")
    shape = {key: getattr(record.config, key) for key in ("height", "width", "batch", "context_tokens")}
    frozen_shape = {key: getattr(schedule, key) for key in shape}
    if shape != frozen_shape:
        raise StaleArtifactError(f"{root}: graphs exported for {shape} but the schedule was frozen for "
                                 f"{frozen_shape}; re-run `python -m shiva_export export --out {root}`")


@dataclasses.dataclass
class BuildResult:
    """What one `build` did; its truth value is "every check passed"."""

    ran: list[str] = dataclasses.field(default_factory=list)
    reused: list[str] = dataclasses.field(default_factory=list)
    engines: dict[str, tuple[EngineEntry, ...]] = dataclasses.field(default_factory=dict)
    lint_passed: bool = True
    check: object = None
    bench: object = None
    not_run: list[str] = dataclasses.field(default_factory=list)
    device: str = "cpu"
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)   # wall time per stage, in pipeline order

    @property
    def passed(self) -> bool:
        return self.lint_passed and (self.check is None or bool(self.check))

    def __bool__(self) -> bool:
        return self.passed


def build(ws: Workspace, backends: list[str], runs: int = 5, force: bool = False, progress=True,
          device: str | None = None) -> BuildResult:
    """freeze -> export -> lint -> engines -> check -> bench -> report, each reused when its inputs are unchanged.

    device: where check and bench run the PyTorch reference and ONNX Runtime ("cpu" | "cuda"; default: the CUDA GPU
    when torch sees one and ONNX Runtime has its CUDA provider). Each stage's wall time is kept in
    `BuildResult.seconds`."""
    import time

    from tqdm import tqdm

    from shiva_export.engines.backends.base import compute_device

    device = compute_device(device, onnxruntime=True)
    result = BuildResult(device=device)

    def note(stage: str, ran: bool, started: float) -> None:
        (result.ran if ran else result.reused).append(stage)
        result.seconds[stage] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    note("freeze", run_freeze(ws, force=force), started)
    schedule = ws.schedule()
    started = time.perf_counter()
    with tqdm(total=len(schedule.buckets) + 1, desc="export", unit="graph", disable=not progress or None) as bar:
        note("export", run_export(ws, force=force, progress=bar), started)
    started = time.perf_counter()
    reports = run_lint(ws, force=force)
    result.seconds["lint"] = round(time.perf_counter() - started, 2)
    result.lint_passed = all(r["errors"] == 0 for r in reports.values())
    runnable = []
    for backend in backends:
        started = time.perf_counter()
        entries = run_engines(ws, backend, force=force)
        result.engines[backend] = entries
        note(f"engine:{backend}", any(e.status == "built" for e in entries), started)
        if runnable_here(backend):
            runnable.append(backend)
        else:
            result.not_run.append(f"{backend}: engines built, not run ({runnable_reason(backend)})")
    from shiva_export.engines.compare import run_check
    from shiva_export.reference import capture_trajectory

    started = time.perf_counter()
    previous = _finished(ws, CheckRecord)
    result.check = run_check(ws, backends=runnable, force=force, device=device, reference=capture_trajectory)
    note("check", _finished(ws, CheckRecord) != previous, started)
    from shiva_export.engines.bench import run_bench
    from shiva_export.torch_bench import torch_target

    started = time.perf_counter()
    previous = _finished(ws, BenchRecord)
    result.bench = run_bench(ws, runs=runs, force=force, device=device, torch_target=torch_target)
    note("bench", _finished(ws, BenchRecord) != previous, started)
    from shiva_export.report import write_report

    started = time.perf_counter()
    write_report(ws.manifest)
    note("report", True, started)
    return result


def _finished(ws: Workspace, kind) -> str | None:
    record = ws.manifest.record(kind)
    return record.finished if record else None


def require_runnable(engine_sets, verb: str) -> None:
    """Refuse, before any work, engine sets whose engines cannot run on this machine (TensorRT flavours without a
    supported GPU)."""
    from shiva_export.errors import BackendUnavailableError

    for engines in engine_sets:
        backend = getattr(getattr(engines, "backend", None), "name", None)
        reason = runnable_reason(backend) if backend in TENSORRT_BACKENDS else None
        if reason is not None:
            raise BackendUnavailableError(f"{verb} --backend {backend}: its engines cannot run here ({reason})")


def runnable_here(backend: str) -> bool:
    return runnable_reason(backend) is None


def runnable_reason(backend: str) -> str | None:
    """None if engines of this backend can run on this machine, else why not."""
    if backend == "ort":
        return None
    from shiva_export.engines.backends.base import current_device

    device = current_device()
    if device.compute_capability is None:
        return "no CUDA GPU here"
    if backend == "trt-rtx":
        from shiva_export.engines.backends.trt_rtx import DEFAULT_TARGETS

        if device.capability_str not in DEFAULT_TARGETS:
            return f"TensorRT-RTX does not run on {device.name}, compute capability {device.capability_str}"
    return None

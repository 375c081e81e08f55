"""The stage records: what each stage writes into the manifest, as typed, frozen values; and the names stages share.

A stage builds its record (`ExportRecord(graphs=..., ...)`) and hands it to `Manifest.set_stage`; a later stage
reads it back with `manifest.require(ExportRecord)` (or `manifest.record(ExportRecord)`: None if the stage has not
run). On disk a record is the JSON object `to_json()` gives; `from_json` reads one that `validate` has checked
against the record's `SPEC` (the manifest does, on load and before every save), so it trusts the types.

* Keys a later version wrote are kept in `extra` and written back: JSON -> record -> JSON changes nothing.
* An optional key that is absent reads as None and stays absent when written (`_NULL` fields write their None).
* Lists are tuples; free-form parts (a transformer config, lint reports, a check config) stay plain JSON values,
  copied in and out, so changing one never changes the manifest.

The names of the files and folders that more than one stage (or the runtime, or a deployment) reads are here too,
once; the backends' names are `engines.backends.names`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

from shiva_export.engines.backends.names import BACKEND_NAMES
from shiva_export.errors import ConfigError
from shiva_export.schema import Any_, Bool, Float, Hex, Int, ListOf, MapOf, Nullable, Obj, RelPath, Str

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------- names
MANIFEST_NAME = "manifest.json"
SCHEDULE_FILE = "schedule.json"       # freeze
ONNX_DIR = "onnx"                     # export: onnx/b{i}.onnx, onnx/b{i}.debug.onnx, onnx/dense.onnx, weights
WEIGHTS_FILE = "weights.bin"          # onnx/weights.bin, shared by every graph
DENSE_FILE = "dense.onnx"
ENGINES_DIR = "engines"               # engine: onnx/engines/<backend>/b{i}<the backend's suffix>
SIDECAR_SUFFIX = ".meta.json"         # beside each engine: <engine>.meta.json
LINT_FILE = "lint.json"
CHECK_FILE = "check.json"
CHECK_DIR = "check"                   # check/bucket{i}/..., check/repro.sh
CHECK_INPUTS = "inputs.json"          # check/bucket{i}/inputs.json: the bucket's feeds (Polygraphy --load-inputs)
CHECK_REFERENCE = "reference.json"    # check/bucket{i}/reference.json: PyTorch's outputs (a Polygraphy RunResults)
REPRO_FILE = f"{CHECK_DIR}/repro.sh"
BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"
REPORT_DIR = "report"                 # report/report.json, report/report.md, plots
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CHECK_SCHEMA = "shiva.check/1"        # check.json
BENCH_SCHEMA = "shiva.bench/1"        # bench.json
REPORT_SCHEMA = "shiva.report/1"      # report/report.json


def graph_file(bucket: int | str, debug: bool = False) -> str:
    """A bucket graph's file name in onnx/: b0.onnx, or b0.debug.onnx (the twin that also returns the indices)."""
    return f"b{bucket}.debug.onnx" if debug else f"b{bucket}.onnx"


def check_bucket_dir(bucket: int) -> str:
    """Where check keeps one bucket's inputs, reference and engine outputs: check/bucket0."""
    return f"{CHECK_DIR}/bucket{bucket}"


def check_outputs_file(engine_set: str) -> str:
    """An engine set's outputs for a bucket, beside its reference (a Polygraphy RunResults): outputs-ort.json."""
    return f"outputs-{engine_set}.json"


# --------------------------------------------------------------------------------------------------- base
_NULL = {"null": True}   # field metadata: written as null when None (others are left out when None)


def _json(value: Any) -> Any:
    """A record part as fresh JSON: records by their to_json, tuples as lists, mappings as dicts."""
    if isinstance(value, _Json):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_json(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _json(item) for key, item in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class _Json:
    """A frozen dataclass whose fields are the keys of one JSON object; other keys are kept in `extra`."""

    SPEC: ClassVar[Obj]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = _json(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and (value is not None or f.metadata.get("null")):
                data[f.name] = _json(value)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]):
        return cls._from(data)

    @classmethod
    def _from(cls, data: Mapping[str, Any], **parts: Any):
        """The record of `data`: `parts` (fields the caller converted) + every other field's value copied + extra."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {key: copy.deepcopy(value) for key, value in data.items() if key in names and key not in parts}
        extra = {key: copy.deepcopy(value) for key, value in data.items() if key not in names}
        return cls(**values, **parts, extra=extra)


def _tuple(data: Mapping[str, Any], key: str, item=lambda value: value) -> tuple | None:
    return None if data.get(key) is None else tuple(item(value) for value in data[key])


@dataclass(frozen=True, kw_only=True)
class FileRecord(_Json):
    """A file a stage wrote: its path relative to the artifact folder and its sha256."""

    SPEC: ClassVar[Obj] = Obj({"path": RelPath(), "sha256": Hex()})
    path: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class StageRecord(_Json):
    """What every stage records: the files it wrote, when it finished, the hash of its inputs (None: not reusable).

    `Manifest.set_stage` fills `finished` and `inputs_hash`."""

    STAGE: ClassVar[str]
    files: tuple[FileRecord, ...] = ()
    finished: str = ""
    inputs_hash: str | None = field(default=None, metadata=_NULL)

    @classmethod
    def _from(cls, data: Mapping[str, Any], **parts: Any):
        return super()._from(data, files=_tuple(data, "files", FileRecord.from_json) or (), **parts)


def _stage_spec(required: Mapping | None = None, optional: Mapping | None = None) -> Obj:
    return Obj({"files": ListOf(FileRecord.SPEC), "finished": Str(), **(required or {})},
               {"inputs_hash": Nullable(Hex()), **(optional or {})}, extra=True)


_K = ListOf(Int(minimum=0), min_length=1)
_JSON_OBJECT = Obj(extra=True)


# --------------------------------------------------------------------------------------------------- freeze
@dataclass(frozen=True, kw_only=True)
class FreezeRecord(StageRecord):
    """freeze: schedule.json's hash, the buckets' k-vectors and the keep / FLOP summary."""

    STAGE: ClassVar[str] = "freeze"
    SPEC: ClassVar[Obj] = _stage_spec(
        {"schedule_hash": Hex(), "buckets": ListOf(_K, min_length=1)},
        {"summary": Obj({name: Float(minimum=0) for name in (
            "learned_keep_ratio", "realised_keep_ratio", "realised_flop_ratio")}, extra=True)})
    schedule_hash: str
    buckets: tuple[tuple[int, ...], ...]
    summary: Mapping[str, Any] | None = None   # passes.freeze.ScheduleSummary.to_json()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FreezeRecord":
        return cls._from(data, buckets=_tuple(data, "buckets", tuple))


# --------------------------------------------------------------------------------------------------- export
@dataclass(frozen=True, kw_only=True)
class GraphRecord(_Json):
    """One bucket graph in onnx/: its k-vector, file and sha256, and its debug twin's (with index outputs)."""

    SPEC: ClassVar[Obj] = Obj({"bucket": Int(minimum=0), "k": _K, "file": RelPath(), "sha256": Hex()},
                              {"debug_file": RelPath(), "debug_sha256": Hex()}, extra=True)
    bucket: int
    k: tuple[int, ...]
    file: str
    sha256: str
    debug_file: str | None = None
    debug_sha256: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GraphRecord":
        return cls._from(data, k=tuple(data["k"]))


@dataclass(frozen=True, kw_only=True)
class DenseGraphRecord(_Json):
    """The unpruned baseline graph (onnx/dense.onnx) that bench times the buckets against."""

    SPEC: ClassVar[Obj] = Obj({"file": RelPath(), "sha256": Hex()})
    file: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class GraphConfig(_Json):
    """The static shapes and dtype the graphs were exported for: `export.ExportConfig` as JSON (its other fields,
    opset, row_scatter, ..., are in `extra`; `ExportConfig(**config.to_json())` is the config again)."""

    SPEC: ClassVar[Obj] = Obj({"height": Int(minimum=1), "width": Int(minimum=1), "batch": Int(minimum=1),
                               "context_tokens": Int(minimum=1), "dtype": Str(choices=("fp32", "fp16", "bf16"))},
                              extra=True)
    height: int
    width: int
    batch: int
    context_tokens: int
    dtype: str


@dataclass(frozen=True, kw_only=True)
class ExportRecord(StageRecord):
    """export: one graph per bucket (+ dense), the shapes they take, and the backbone's config (the runtime's)."""

    STAGE: ClassVar[str] = "export"
    SPEC: ClassVar[Obj] = _stage_spec(
        {"graphs": ListOf(GraphRecord.SPEC, min_length=1), "schedule_hash": Hex(), "config": GraphConfig.SPEC},
        {"dense": Nullable(DenseGraphRecord.SPEC), "transformer_config": _JSON_OBJECT})
    graphs: tuple[GraphRecord, ...]
    schedule_hash: str
    config: GraphConfig
    dense: DenseGraphRecord | None = None
    transformer_config: Mapping[str, Any] | None = None   # the diffusers config, `_class_name` kept

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ExportRecord":
        dense = data.get("dense")
        return cls._from(data, graphs=_tuple(data, "graphs", GraphRecord.from_json),
                         config=GraphConfig.from_json(data["config"]),
                         dense=None if dense is None else DenseGraphRecord.from_json(dense))

    def graph_files(self) -> list[str]:
        """Every graph file in onnx/ the record names: production, debug, dense."""
        files = [g.file for g in self.graphs] + [g.debug_file for g in self.graphs if g.debug_file]
        return files + ([self.dense.file] if self.dense else [])


# --------------------------------------------------------------------------------------------------- lint
@dataclass(frozen=True, kw_only=True)
class LintRecord(StageRecord):
    """lint: error and warning counts over every graph, and each graph's report (lint.json's content)."""

    STAGE: ClassVar[str] = "lint"
    SPEC: ClassVar[Obj] = _stage_spec({"errors": Int(minimum=0), "warnings": Int(minimum=0), "passed": Bool()},
                                      {"reports": MapOf(_JSON_OBJECT)})
    errors: int
    warnings: int
    passed: bool
    reports: Mapping[str, Any] | None = None   # graph file -> passes.lint.LintReport.to_json()


# --------------------------------------------------------------------------------------------------- engine
@dataclass(frozen=True, kw_only=True)
class EngineEntry(_Json):
    """One engine the engine stage built (or kept): paths relative to the folder, the graph, how it was built."""

    SPEC: ClassVar[Obj] = Obj({"bucket": Int(minimum=0), "engine": RelPath(), "metadata": RelPath()},
                              {"backend": Str(), "onnx": Str(), "status": Str(), "reason": Str(max_length=1 << 16),
                               "seconds": Float(minimum=0), "build_options": _JSON_OBJECT}, extra=True)
    bucket: int
    engine: str
    metadata: str
    backend: str | None = None
    onnx: str | None = None          # the graph's file name in onnx/
    status: str | None = None        # "built" | "fresh"
    reason: str | None = None
    seconds: float | None = None
    build_options: Mapping[str, Any] | None = None   # engines.backends.base.BuildOptions.to_json()


@dataclass(frozen=True, kw_only=True)
class EngineRecord(StageRecord):
    """engine: the engines of every backend built so far, by backend name (`engines.backends.names`)."""

    STAGE: ClassVar[str] = "engine"
    SPEC: ClassVar[Obj] = _stage_spec({"engines": MapOf(ListOf(EngineEntry.SPEC), keys=Str(choices=BACKEND_NAMES))},
                                      {"skipped": MapOf(Str(max_length=1 << 16))})
    engines: Mapping[str, tuple[EngineEntry, ...]] = field(default_factory=dict)
    skipped: Mapping[str, str] | None = None   # backend -> why it was not built, where the stage recorded it

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "EngineRecord":
        return cls._from(data, engines={backend: tuple(map(EngineEntry.from_json, entries))
                                        for backend, entries in data["engines"].items()})


# --------------------------------------------------------------------------------------------------- check, bench
@dataclass(frozen=True, kw_only=True)
class CheckRecord(StageRecord):
    """check: whether every gate passed, on which engine sets and device, with which settings (check.json)."""

    STAGE: ClassVar[str] = "check"
    SPEC: ClassVar[Obj] = _stage_spec({"passed": Bool()},
                                      {"backends": ListOf(Str()), "device": Str(), "config": _JSON_OBJECT,
                                       "failures": ListOf(Str(max_length=1 << 16))})
    passed: bool
    backends: tuple[str, ...] | None = None
    device: str | None = None
    config: Mapping[str, Any] | None = None      # engines.compare.CheckConfig.to_json()
    failures: tuple[str, ...] | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CheckRecord":
        return cls._from(data, backends=_tuple(data, "backends"), failures=_tuple(data, "failures"))


@dataclass(frozen=True, kw_only=True)
class BenchRecord(StageRecord):
    """bench: the settings, the device's name and the measured speedups (bench.json has the timings)."""

    STAGE: ClassVar[str] = "bench"
    SPEC: ClassVar[Obj] = _stage_spec(optional={"config": _JSON_OBJECT, "device": Nullable(Str()),
                                                "backends": ListOf(Str()), "speedups": MapOf(Any_())})
    config: Mapping[str, Any] | None = None      # engines.bench.BenchConfig.to_json()
    device: str | None = field(default=None, metadata=_NULL)
    backends: tuple[str, ...] | None = None
    speedups: Mapping[str, float] | None = None  # "<backend>/<scope>" -> measured speedup

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "BenchRecord":
        return cls._from(data, backends=_tuple(data, "backends"))


# --------------------------------------------------------------------------------------------------- report
@dataclass(frozen=True, kw_only=True)
class ReportRecord(StageRecord):
    """report: the files of report/ and what the report was made from (stage input hashes, file sha256s)."""

    STAGE: ClassVar[str] = "report"
    SPEC: ClassVar[Obj] = _stage_spec(optional={"inputs": _JSON_OBJECT, "schema": Str()})
    inputs: Mapping[str, Any] | None = None
    schema: str | None = None


# --------------------------------------------------------------------------------------------------- config
_POSITIVE = Nullable(Int(minimum=1))
DEFAULT_MODEL = "tiny-sd35"


@dataclass(frozen=True)
class ArtifactConfig:
    """Everything that decides what an artifact folder holds; the manifest's `config` (P2, P3). `resolve` fills the
    unset options from the model and its pipeline; `SPEC` is what a stored one must be, exactly these fields."""

    SPEC: ClassVar[Obj] = Obj({
        "model": Str(), "router": Nullable(Str()), "steps": Int(minimum=1, maximum=10_000),
        "shift": Nullable(Float(minimum=0, exclusive_minimum=True)), "buckets": Int(minimum=1, maximum=1024),
        "align": _POSITIVE, "align_to": Nullable(Str(choices=("k", "sequence", "either"))), "k_min": _POSITIVE,
        "height": _POSITIVE, "width": _POSITIVE, "batch": _POSITIVE, "context_tokens": _POSITIVE,
        "dtype": Str(choices=("fp32", "fp16", "bf16")), "opset": Int(minimum=18, maximum=23),
        "row_scatter": Str(choices=("where", "scatternd")),
        "target_keep": Float(minimum=0, maximum=1, exclusive_minimum=True)},
        # filled from the pipeline (absent in folders written before pipelines were read)
        {"scheduler": Nullable(Obj({"_class_name": Str(), "shift": Float(minimum=0, exclusive_minimum=True)},
                                   extra=True)),
         "vae_scale_factor": Nullable(Int(minimum=1, maximum=64))})

    model: str = DEFAULT_MODEL
    router: str | None = None
    steps: int = 28
    shift: float | None = None        # None: the pipeline's scheduler shift (a preset declares it)
    buckets: int = 4
    align: int | None = None          # None: the preset's default (64; 16 for tiny presets with 256 tokens)
    align_to: str | None = None       # None: the preset's default ("k"); "sequence" / "either" (FreezeConfig)
    k_min: int | None = None
    height: int | None = None         # image pixels; None: the preset's default
    width: int | None = None
    batch: int | None = None
    context_tokens: int | None = None
    dtype: str = "fp32"
    opset: int = 23
    row_scatter: str = "where"        # kept rows back into the sequence: Gather + Where, or "scatternd"
    target_keep: float = 0.6          # only used without --router (untrained, uniform policy)
    # filled by resolve from the pipeline (folder or preset), not options: what freeze, export, check and the
    # runtime must agree on with the pipeline that will call the engines
    scheduler: dict | None = None     # the scheduler's config, with `shift` applied
    vae_scale_factor: int | None = None

    def resolve(self, defaults: dict, facts=None) -> "ArtifactConfig":
        """Fill unset (None) options from the model's defaults and its pipeline facts (models.PipelineFacts), and
        validate what can be validated without the model. An option that overrides a pipeline fact says so."""
        from shiva_export.export import torch_dtype
        from shiva_export.topk import ROW_SCATTERS

        torch_dtype(self.dtype)
        for option, value in (("--align", self.align), ("--k-min", self.k_min), ("--height", self.height),
                              ("--width", self.width), ("--batch", self.batch),
                              ("--context-tokens", self.context_tokens)):
            if value is not None and value < 1:
                raise ConfigError(f"{option} {value} must be >= 1")
        if not 18 <= self.opset <= 23:
            raise ConfigError(f"--opset {self.opset} is not supported; expected 18..23 (23 gives fused Attention)")
        if self.shift is not None and not (math.isfinite(self.shift) and self.shift > 0):
            raise ConfigError(f"--shift {self.shift:g} must be a finite number > 0")
        filled = {name: defaults.get(name) if getattr(self, name) is None else getattr(self, name)
                  for name in ("height", "width", "batch", "context_tokens")}
        if facts is not None:
            filled.update(_pipeline_fields(self, facts))
            if filled["context_tokens"] is None:
                filled["context_tokens"] = facts.context_tokens
            elif self.context_tokens is not None and self.context_tokens != facts.context_tokens:
                log.info("note: --context-tokens %d overrides the %d text tokens of %s", self.context_tokens,
                         facts.context_tokens, facts.origin)
        filled["align"] = defaults.get("align", 64) if self.align is None else self.align
        filled["align_to"] = defaults.get("align_to", "k") if self.align_to is None else self.align_to
        if self.buckets < 1:
            raise ConfigError(f"--buckets {self.buckets} must be >= 1")
        if self.row_scatter not in ROW_SCATTERS:
            raise ConfigError(f"--row-scatter {self.row_scatter!r} is unknown; expected one of {list(ROW_SCATTERS)}")
        if self.steps < 1:
            raise ConfigError(f"--steps {self.steps} must be >= 1")
        if not 0 < self.target_keep <= 1:
            raise ConfigError(f"target keep {self.target_keep:g} is outside (0, 1]")
        if self.router and not Path(self.router).exists():
            raise ConfigError(f"router checkpoint {self.router!r} does not exist")
        return dataclasses.replace(self, **filled)

    @property
    def freeze_scheduler(self) -> dict:
        """The scheduler config freeze steps through: the pipeline's (its folder facts, or the family's defaults
        through the adapter's `folder_facts` for a transformer folder alone), filled in by `resolve`."""
        if self.scheduler is None:
            raise ConfigError(f"{self.model}: the config was resolved without its pipeline facts, so it has no "
                              "scheduler config to freeze with")
        return self.scheduler

    @property
    def cfg_consistent(self) -> bool:
        return bool(self.batch and self.batch % 2 == 0)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if self.router:
            data["router"] = str(Path(self.router).resolve())
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ArtifactConfig":
        """The config a manifest stored (validated against `SPEC`: exactly these fields)."""
        return cls(**data)


def _pipeline_fields(config: ArtifactConfig, facts) -> dict:
    """scheduler / shift / vae_scale_factor from the pipeline facts, unless the config already holds them (a stored
    config) or an option overrides them (with a note)."""
    from shiva_export.models import scheduler_has_shift

    scheduler = dict(config.scheduler) if config.scheduler is not None else dict(facts.scheduler)
    if config.shift is not None and not scheduler_has_shift(scheduler) and config.shift != scheduler.get("shift"):
        raise ConfigError(f"--shift {config.shift:g}: the {scheduler.get('_class_name')} of {facts.origin} has no "
                          "timestep shift; expected no --shift")
    shift = float(scheduler.get("shift", facts.shift)) if config.shift is None else float(config.shift)
    if config.shift is not None and config.scheduler is None and shift != facts.shift:
        log.info("note: --shift %g overrides the scheduler shift %g of %s", shift, facts.shift, facts.origin)
    scheduler["shift"] = shift
    factor = facts.vae_scale_factor if config.vae_scale_factor is None else config.vae_scale_factor
    return {"scheduler": scheduler, "shift": shift, "vae_scale_factor": factor}


# --------------------------------------------------------------------------------------------------- the stages
STAGE_RECORDS: dict[str, type[StageRecord]] = {record.STAGE: record for record in (
    FreezeRecord, ExportRecord, LintRecord, EngineRecord, CheckRecord, BenchRecord, ReportRecord)}
STAGES = tuple(STAGE_RECORDS)   # in pipeline order

R = TypeVar("R", bound=StageRecord)


def record_type(kind: type[R] | str) -> type[R]:
    """The record class of a stage, given the class or the stage's name."""
    if isinstance(kind, str):
        if kind not in STAGE_RECORDS:
            raise ValueError(f"unknown stage {kind!r}; expected one of {list(STAGES)}")
        return STAGE_RECORDS[kind]
    return kind

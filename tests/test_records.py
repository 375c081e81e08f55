"""Typed stage records (issue 14): JSON -> record -> JSON is lossless, records are frozen, later keys survive,
and a wrong type is still refused in one line by the manifest's validation."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from shiva_export.errors import ArtifactError
from shiva_export.manifest import Manifest
from shiva_export.records import (STAGE_RECORDS, STAGES, DenseGraphRecord, EngineEntry, EngineRecord, ExportRecord,
                                  FileRecord, FreezeRecord, GraphConfig, GraphRecord, LintRecord, ReportRecord)


@pytest.fixture(scope="module")
def every_stage(tiny_artifact, tmp_path_factory) -> Path:
    """A copy of the tiny artifact through every stage: lint, ort engines, a short check and bench, the report."""
    from shiva_export import pipeline
    from shiva_export.engines.bench import BenchConfig, run_bench
    from shiva_export.engines.compare import CheckConfig, run_check
    from shiva_export.reference import capture_trajectory
    from shiva_export.report import write_report

    root = Path(shutil.copytree(tiny_artifact, tmp_path_factory.mktemp("records") / "artifact"))
    ws = pipeline.Workspace(root)
    pipeline.run_lint(ws)
    pipeline.run_engines(ws, "ort")
    run_check(ws, backends=["onnxruntime"], config=CheckConfig(full_trajectory=False), reference=capture_trajectory)
    run_bench(ws, BenchConfig(warmup=1, runs=1, loop_runs=1, min_seconds=0))
    write_report(ws.manifest, probe=False)
    del ws
    return root


@pytest.fixture
def folder(every_stage, tmp_path) -> Path:
    return Path(shutil.copytree(every_stage, tmp_path / "artifact"))


def _stages(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())["stages"]


def _write(root: Path, stages: dict) -> None:
    data = json.loads((root / "manifest.json").read_text())
    data["stages"] = stages
    (root / "manifest.json").write_text(json.dumps(data))


def test_every_stage_record_round_trips_to_the_same_json(every_stage):
    stages = _stages(every_stage)
    assert sorted(stages) == sorted(STAGES)
    for name, data in stages.items():
        record = STAGE_RECORDS[name].from_json(data)
        assert record.to_json() == data, name
        assert json.dumps(record.to_json(), sort_keys=True) == json.dumps(data, sort_keys=True), name
        assert record.extra == {}, f"{name}: the stages write only keys the records know: {sorted(record.extra)}"


def test_the_manifest_reads_typed_records(every_stage):
    manifest = Manifest.load(every_stage)
    export = manifest.require(ExportRecord)
    assert manifest.require("export") == export and manifest.record(ExportRecord) == export
    assert isinstance(export.graphs, tuple) and all(isinstance(g, GraphRecord) for g in export.graphs)
    assert [g.bucket for g in export.graphs] == [0, 1] and isinstance(export.graphs[0].k, tuple)
    assert isinstance(export.config, GraphConfig) and isinstance(export.dense, DenseGraphRecord)
    assert all(isinstance(f, FileRecord) for f in export.files) and export.inputs_hash and export.finished
    assert export.graph_files() == ["b0.onnx", "b1.onnx", "b0.debug.onnx", "b1.debug.onnx", "dense.onnx"]
    engines = manifest.require(EngineRecord).engines
    assert list(engines) == ["ort"] and all(isinstance(e, EngineEntry) for e in engines["ort"])
    assert [e.onnx for e in engines["ort"]] == ["b0.onnx", "b1.onnx"]
    assert manifest.require(FreezeRecord).buckets == tuple(g.k for g in export.graphs)
    assert manifest.require(LintRecord).passed and manifest.require("check").passed
    assert manifest.require(ReportRecord).schema == "shiva.report/1"


def test_records_are_frozen_and_their_free_form_parts_are_copies(every_stage):
    manifest = Manifest.load(every_stage)
    export = manifest.require(ExportRecord)
    for obj, name in ((export, "graphs"), (export.graphs[0], "k"), (export.config, "batch"),
                      (export.files[0], "sha256"), (manifest.require(EngineRecord).engines["ort"][0], "engine")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)
    export.transformer_config["num_layers"] = -1
    assert manifest.require(ExportRecord).transformer_config["num_layers"] != -1


def test_a_key_a_later_version_wrote_survives_a_round_trip(folder):
    stages = _stages(folder)
    stages["export"]["later"] = {"nested": [1, 2]}
    stages["export"]["graphs"][0]["later"] = "graph"
    stages["export"]["config"]["later"] = 3
    stages["engine"]["engines"]["ort"][1]["later"] = None
    stages["engine"]["skipped"] = {"trt": "no tensorrt here"}
    _write(folder, stages)
    manifest = Manifest.load(folder)
    export = manifest.require(ExportRecord)
    assert export.extra == {"later": {"nested": [1, 2]}} and export.graphs[0].extra == {"later": "graph"}
    assert export.config.extra["later"] == 3 and export.graphs[1].extra == {}
    assert manifest.require(EngineRecord).skipped == {"trt": "no tensorrt here"}
    for name in ("export", "engine"):
        assert manifest.require(name).to_json() == stages[name]
    manifest.set_stage(dataclasses.replace(export, schedule_hash="f" * 64), export.inputs_hash)   # a stage re-records
    manifest.save()
    written = _stages(folder)
    assert written["export"]["later"] == {"nested": [1, 2]} and written["export"]["graphs"][0]["later"] == "graph"
    assert written["export"]["schedule_hash"] == "f" * 64 and written["engine"] == stages["engine"]


@pytest.mark.parametrize("where, value, message", [
    (("export", "graphs", 0, "bucket"), "0", "field stages.export.graphs[0].bucket: expected an integer >= 0, got '0'"),
    (("export", "graphs", 1, "k"), [], "field stages.export.graphs[1].k: expected a list of 1+ of an integer >= 0"),
    (("engine", "engines", "ort", 0, "seconds"), "fast", "field stages.engine.engines.ort[0].seconds: expected a "
                                                         "finite number >= 0, got 'fast'"),
    (("lint", "reports"), [], "field stages.lint.reports: expected an object of an object, got []"),
    (("check", "failures"), "none", "field stages.check.failures: expected a list of a string, got 'none'"),
])
def test_a_wrong_type_is_refused_by_validation_in_one_line(folder, where, value, message):
    stages = _stages(folder)
    target = stages
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    _write(folder, stages)
    with pytest.raises(ArtifactError) as err:
        Manifest.load(folder)
    assert str(err.value).startswith(f"{folder / 'manifest.json'}: {message}") and "\n" not in str(err.value)


def test_a_typed_record_with_a_wrong_type_is_refused_before_it_is_written(folder):
    manifest = Manifest.load(folder)
    before = (folder / "manifest.json").read_bytes()
    manifest.set_stage(dataclasses.replace(manifest.require(LintRecord), errors="many"))
    with pytest.raises(ArtifactError, match=r"\(about to be written\): field stages.lint.errors: expected an integer "
                                            r">= 0, got 'many'$"):
        manifest.save()
    assert (folder / "manifest.json").read_bytes() == before


def test_set_stage_stamps_the_record_and_require_names_the_command_to_run(tmp_path):
    manifest = Manifest(tmp_path)
    assert manifest.record(ExportRecord) is None and manifest.record("lint") is None
    with pytest.raises(ArtifactError, match=r"stage 'export' has not run; run `python -m shiva_export export --out "):
        manifest.require(ExportRecord)
    (tmp_path / "lint.json").write_text("{}")
    stored = manifest.set_stage(LintRecord(files=(manifest.file_record(tmp_path / "lint.json"),), errors=0,
                                           warnings=1, passed=True), "a" * 64)
    assert stored.inputs_hash == "a" * 64 and stored.finished and manifest.require(LintRecord) == stored
    assert manifest.data["stages"]["lint"] == {"files": [{"path": "lint.json", "sha256": stored.files[0].sha256}],
                                              "errors": 0, "warnings": 1, "passed": True, "inputs_hash": "a" * 64,
                                              "finished": stored.finished}
    assert manifest.is_fresh(LintRecord, "a" * 64) and not manifest.is_fresh("lint", "b" * 64)
    with pytest.raises(ValueError, match="unknown stage 'lnit'"):
        manifest.record("lnit")


def test_the_manifest_config_is_a_typed_frozen_artifact_config(every_stage, tmp_path):
    from shiva_export.records import ArtifactConfig

    manifest = Manifest.load(every_stage)
    config = manifest.config
    assert isinstance(config, ArtifactConfig) and config.model == "tiny-sd35" and config.buckets == 2
    assert config.to_json() == manifest.data["config"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3
    assert Manifest(tmp_path).config is None
    manifest.config = dataclasses.replace(config, steps=7)
    assert manifest.data["config"]["steps"] == 7 and manifest.config.steps == 7


def test_a_config_field_the_artifact_config_does_not_have_is_refused(folder):
    data = json.loads((folder / "manifest.json").read_text())
    data["config"]["extra_option"] = 1
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"field config.extra_option: unknown key"):
        Manifest.load(folder)


def test_the_export_record_lists_exactly_what_export_buckets_hashed(every_stage):
    from shiva_export.io import sha256_file

    export = Manifest.load(every_stage).require(ExportRecord)
    on_disk = {p.relative_to(every_stage).as_posix(): sha256_file(p) for p in (every_stage / "onnx").iterdir()
               if p.is_file()}
    assert {f.path: f.sha256 for f in export.files} == on_disk
    assert all(on_disk[f"onnx/{g.file}"] == g.sha256 and on_disk[f"onnx/{g.debug_file}"] == g.debug_sha256
               for g in export.graphs)
    assert on_disk[f"onnx/{export.dense.file}"] == export.dense.sha256

"""build_engines: one engine + sidecar per bucket, fresh engines skipped and said so, stale ones rebuilt."""

from __future__ import annotations

import logging

import pytest

from shiva_export.engines.backends.base import BuildOptions
from shiva_export.engines.build import OnnxSource, build_engines, find_bucket_graphs
from shiva_export.engines.metadata import metadata_path, onnx_facts
from shiva_export.errors import ArtifactError, StaleArtifactError


def test_build_engines_writes_engine_and_sidecar_per_bucket(fp32_export):
    records = build_engines(fp32_export, "ort", schedule_hash="sched")
    assert [r.bucket for r in records] == ["b0", "b1"]
    for record in records:
        assert record.status == "built" and record.reason == "no engine yet"
        assert record.engine_path == fp32_export / "engines" / "ort" / f"{record.bucket}.onnxref"
        assert record.metadata_path == metadata_path(record.engine_path) and record.metadata_path.is_file()
        assert record.metadata["schedule_hash"] == "sched"
    assert records[0].to_json()["status"] == "built"


def test_second_build_skips_fresh_engines_and_says_so(fp32_export, caplog):
    build_engines(fp32_export, "ort")
    with caplog.at_level(logging.INFO, logger="shiva_export.engines.build"):
        records = build_engines(fp32_export, "ort")
    assert [(r.status, r.reason) for r in records] == [("fresh", "metadata matches")] * 2
    assert "b0: ort engine" in caplog.text and "is fresh (metadata matches), skipped" in caplog.text
    assert "0 built, 2 fresh" in caplog.text


def test_only_the_changed_bucket_is_rebuilt(fp32_export, change_graph):
    build_engines(fp32_export, "ort")
    change_graph(fp32_export / "b1.onnx")
    b0, b1 = build_engines(fp32_export, "ort")
    assert b0.status == "fresh"
    assert b1.status == "built" and b1.reason.startswith("stale:") and "onnx_sha256" in b1.reason


def test_new_schedule_hash_or_options_force_a_rebuild(fp32_export):
    build_engines(fp32_export, "ort", schedule_hash="one")
    (b0, _) = build_engines(fp32_export, "ort", schedule_hash="two")
    assert b0.status == "built" and "schedule_hash expected 'two' found 'one'" in b0.reason
    (b0, _) = build_engines(fp32_export, "ort", BuildOptions(builder_optimization_level=5), schedule_hash="two")
    assert b0.status == "built" and "build_options" in b0.reason
    (b0, _) = build_engines(fp32_export, "ort", BuildOptions(builder_optimization_level=5), schedule_hash="two")
    assert b0.status == "fresh"


def test_force_rebuilds_fresh_engines(fp32_export):
    build_engines(fp32_export, "ort")
    assert {r.status for r in build_engines(fp32_export, "ort", force=True)} == {"built"}


def test_sources_with_moved_hashes_are_refused(fp32_export):
    wrong = OnnxSource(fp32_export / "b0.onnx", onnx_sha256="0" * 64)
    message = r"b0.onnx: graph changed since it was recorded; onnx_sha256 expected 0{16}"
    with pytest.raises(StaleArtifactError, match=message):
        build_engines(fp32_export, "ort", sources=[wrong])
    facts = onnx_facts(fp32_export / "b1.onnx")
    right = OnnxSource(fp32_export / "b1.onnx", facts.onnx_sha256, facts.weights_sha256)
    (record,) = build_engines(fp32_export, "ort", sources=[right])
    assert record.bucket == "b1" and record.status == "built"


def test_buckets_are_found_in_numeric_order(fp32_export):
    (fp32_export / "b1.onnx").rename(fp32_export / "b10.onnx")
    (fp32_export / "notes.onnx").write_bytes(b"")
    assert [p.name for p in find_bucket_graphs(fp32_export)] == ["b0.onnx", "b10.onnx"]


def test_folder_without_bucket_graphs_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no bucket graphs"):
        build_engines(tmp_path, "ort")
    with pytest.raises(ArtifactError, match="export folder not found"):
        build_engines(tmp_path / "missing", "ort")

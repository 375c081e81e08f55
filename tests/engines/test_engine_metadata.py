"""Engine sidecars: stale engines and engines from another export are refused, naming every differing field."""

from __future__ import annotations

import json

import pytest

from shiva_export.engines.backends.base import BuildOptions, DeviceInfo
from shiva_export.engines.backends.ort import BACKEND as ORT
from shiva_export.engines.metadata import (
    SCHEMA,
    metadata_path,
    onnx_facts,
    read_metadata,
    verify_metadata,
    write_metadata,
)
from shiva_export.errors import ArtifactError, StaleArtifactError
from shiva_export.io import sha256_file


def _engine(export_dir, bucket="b0", **kwargs):
    link = export_dir / "engines" / "ort" / f"{bucket}.onnxref"
    engine = ORT.build(export_dir / f"{bucket}.onnx", link, BuildOptions())
    write_metadata(
        engine,
        onnx_path=export_dir / f"{bucket}.onnx",
        backend="ort",
        backend_version=ORT.version(),
        options=BuildOptions(),
        device=DeviceInfo("cpu", None),
        **kwargs,
    )
    return engine


def test_sidecar_records_what_the_engine_was_built_from(fp32_export):
    engine = _engine(fp32_export, schedule_hash="s" * 64, checkpoint_hash=None)
    data = json.loads(metadata_path(engine).read_text())
    assert metadata_path(engine).name == "b0.onnxref.meta.json"
    assert data["schema"] == SCHEMA
    assert data["onnx_sha256"] == sha256_file(fp32_export / "b0.onnx")
    assert data["weights_sha256"] == {"weights.bin": sha256_file(fp32_export / "weights.bin")}
    assert data["engine_sha256"] == sha256_file(engine)
    assert data["schedule_hash"] == "s" * 64 and data["checkpoint_hash"] is None
    assert data["precision"] == "fp32"
    assert data["backend"] == "ort" and data["backend_version"] == ORT.version()
    assert data["gpu_name"] == "cpu" and data["compute_capability"] == "cpu"
    assert data["build_options"] == BuildOptions().to_json()
    assert data["outputs"]["sample"] == {"dtype": "float32", "shape": [2, 4, 4, 4]}
    assert data["created"].endswith("+00:00") and "onnx" in data["versions"]


def test_matching_metadata_passes(fp32_export):
    engine = _engine(fp32_export, schedule_hash="abc")
    facts = onnx_facts(fp32_export / "b0.onnx")
    meta = verify_metadata(engine, {"onnx_sha256": facts.onnx_sha256, "schedule_hash": "abc", "backend": "ort"})
    assert meta.schedule_hash == "abc"


def test_stale_engine_is_refused_after_onnx_changes(fp32_export, change_graph):
    engine = _engine(fp32_export)
    change_graph(fp32_export / "b0.onnx")
    with pytest.raises(StaleArtifactError, match=r"onnx_sha256 expected [0-9a-f]{16}… found [0-9a-f]{16}…") as err:
        verify_metadata(engine, {"onnx_sha256": onnx_facts(fp32_export / "b0.onnx").onnx_sha256})
    assert f"python -m shiva_export engine --backend ort {fp32_export}" in str(err.value)


def test_engine_from_another_export_is_refused_naming_every_difference(fp32_export, fp16_export):
    engine = _engine(fp32_export, schedule_hash="schedule-A", checkpoint_hash="ckpt")
    other = onnx_facts(fp16_export / "b0.onnx")
    expected = {
        "onnx_sha256": other.onnx_sha256,
        "weights_sha256": other.weights_sha256,
        "schedule_hash": "schedule-B",
        "checkpoint_hash": "ckpt",
        "precision": other.precision,
    }
    with pytest.raises(StaleArtifactError) as err:
        verify_metadata(engine, expected)
    message = str(err.value)
    for field in ("onnx_sha256", "weights_sha256", "precision"):
        assert f"{field} expected" in message
    assert "schedule_hash expected 'schedule-B' found 'schedule-A'" in message
    assert "precision expected 'fp16' found 'fp32'" in message
    assert "checkpoint_hash" not in message  # equal fields are not reported


def test_swapped_engine_is_refused(fp32_export):
    engine = _engine(fp32_export)
    engine.write_text(json.dumps({"schema": 1, "onnx": "../../b1.onnx"}))
    with pytest.raises(StaleArtifactError, match="engine_sha256 expected"):
        verify_metadata(engine, {})


def test_missing_engine_is_a_clear_artifact_error(fp32_export):
    engine = fp32_export / "engines" / "trt-rtx" / "b0.plan"
    command = f"python -m shiva_export engine --backend trt-rtx {fp32_export}"
    message = rf"b0.plan: engine not found. Rebuild with `{command}`"
    with pytest.raises(ArtifactError, match=message) as err:
        verify_metadata(engine, {})
    assert not isinstance(err.value, StaleArtifactError)


def test_missing_sidecar_is_a_clear_artifact_error(fp32_export):
    engine = _engine(fp32_export)
    metadata_path(engine).unlink()
    with pytest.raises(ArtifactError, match=r"metadata sidecar b0.onnxref.meta.json not found"):
        read_metadata(engine)


def test_unreadable_sidecar_is_an_artifact_error(fp32_export):
    engine = _engine(fp32_export)
    metadata_path(engine).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable metadata"):
        verify_metadata(engine, {})


def test_older_schema_is_stale(fp32_export):
    engine = _engine(fp32_export)
    data = json.loads(metadata_path(engine).read_text())
    data["schema"] = 0
    metadata_path(engine).write_text(json.dumps(data))
    with pytest.raises(StaleArtifactError, match="schema expected 1 found 0"):
        verify_metadata(engine, {})


def test_unknown_expected_field_is_a_bug_not_a_user_error(fp32_export):
    with pytest.raises(KeyError, match="onnx_hash"):
        verify_metadata(_engine(fp32_export), {"onnx_hash": "x"})

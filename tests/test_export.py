"""Freeze + static ONNX export (issue 3): checker-clean, fully static, TensorRT-legal graphs equal to PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from shiva_export import pipeline
from shiva_export.export import ExportConfig, StaticBucket, example_feed, export_buckets
from shiva_export.passes.lint import lint_model
from shiva_export.passes.topk import TENSORRT_MAX_TOPK
from shiva_export.pruned import load_pruned_model

FORBIDDEN = {"NonZero", "Loop", "If", "Scan", "Unique", "Compress", "GatherElements"}


def graph_ops(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def run_ort(path: Path, feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.numpy() for k, v in feed.items()})))


def reference(folder: Path, bucket_k, feed):
    ws = pipeline.Workspace(folder)
    with torch.no_grad():
        out = StaticBucket(ws.pruned.transformer, bucket_k, debug_indices=True)(**feed)
    pruned = ws.pruned.state.pruned_layers
    return out[0].numpy(), {f"indices_layer{l}": idx.numpy() for l, idx in zip(pruned, out[1:])}


@pytest.mark.parametrize("artifact", ["tiny_artifact", "tiny_sd3_artifact"])
def test_every_bucket_is_checker_clean_static_and_equals_pytorch(artifact, request):
    folder = request.getfixturevalue(artifact)
    ws = pipeline.Workspace(folder)
    graphs = ws.bucket_graphs()
    assert len(graphs) == 2
    weight_files = set()
    for graph in graphs:
        for name in (graph["file"], graph["debug_file"]):
            path = folder / "onnx" / name
            onnx.checker.check_model(str(path), full_check=True)
            report = lint_model(str(path))
            assert not report.errors and not report.warnings, [f.message for f in report.findings]
            nodes = graph_ops(path)
            assert not FORBIDDEN & {n.op_type for n in nodes}
            model = onnx.load(str(path), load_external_data=False)
            weight_files |= {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        feed = example_feed(ws.pruned.config, ExportConfig(**{k: v for k, v in ws.manifest.require("export")["config"]
                                                               .items() if k in ("height", "width", "batch",
                                                                                 "context_tokens", "dtype")}), seed=5)
        got = run_ort(folder / "onnx" / graph["debug_file"], feed)
        want, indices = reference(folder, graph["k"], feed)
        assert np.abs(got["sample"] - want).max() <= 1e-4
        for name, idx in indices.items():
            assert np.array_equal(got[name], idx), name
        production = run_ort(folder / "onnx" / graph["file"], feed)
        assert list(production) == ["sample"]
        assert np.array_equal(production["sample"], got["sample"])
    assert weight_files == {"weights.bin"}


def test_whole_tiny_model_at_4096_tokens_keep_095_exports_exactly_without_topk_over_3840(tmp_path):
    pruned = load_pruned_model("tiny-sd3", cfg_consistent=True)
    cfg = ExportConfig(height=1024, width=1024, batch=2, context_tokens=24, debug_indices=True)
    k = [4096] + [3891] * 3          # keep 0.95 of N = 4096: K > 3840 must be split
    records = export_buckets(pruned.transformer, [k], cfg, tmp_path / "onnx", dense=False)
    path = tmp_path / "onnx" / records[0]["debug_file"]
    topks = [n for n in graph_ops(path) if n.op_type == "TopK"]
    assert topks
    model = onnx.load(str(path))
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in topks:
        assert int(constants[node.input[1]].reshape(-1)[0]) <= TENSORRT_MAX_TOPK
    feed = example_feed(pruned.config, cfg, seed=1)
    got = run_ort(path, feed)
    with torch.no_grad():
        want = StaticBucket(pruned.transformer, k, debug_indices=True)(**feed)
    assert np.abs(got["sample"] - want[0].numpy()).max() <= 1e-4
    for layer, idx in zip(pruned.state.pruned_layers, want[1:]):
        assert np.array_equal(got[f"indices_layer{layer}"], idx.numpy())


def test_fp16_export_matches_the_fp32_reference_within_documented_tolerance(tmp_path):
    """fp16 graph (fp32 islands around normalisations) vs the fp32 PyTorch static model: cosine >= 0.9999."""
    pruned = load_pruned_model("tiny-sd35", cfg_consistent=True)
    k = [256, 192, 160, 160, 128, 128]
    cfg32 = ExportConfig(height=256, width=256, batch=2, context_tokens=24)
    feed = example_feed(pruned.config, cfg32, seed=2)
    with torch.no_grad():
        want = StaticBucket(pruned.transformer, k)(**feed).numpy().astype(np.float64)
    pruned.to_dtype(torch.float16)
    cfg16 = ExportConfig(height=256, width=256, batch=2, context_tokens=24, dtype="fp16")
    export_buckets(pruned.transformer, [k], cfg16, tmp_path / "onnx", dense=False)
    feed16 = {n: (v.half() if n != "timestep" else v) for n, v in feed.items()}
    got = run_ort(tmp_path / "onnx" / "b0.onnx", feed16)["sample"].astype(np.float64)
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine >= 0.9999
    assert np.abs(got - want).max() <= 5e-2 * np.abs(want).max()


def test_tensorrt_rtx_parses_and_builds_every_bucket_graph_on_cpu(tiny_artifact, tmp_path):
    from shiva_export.engines.backends.base import BuildOptions, get_backend

    backend = get_backend("trt-rtx")
    available, reason = backend.is_available()
    assert available, reason  # tensorrt-rtx-cu13 is a test dependency: it must import here
    ws = pipeline.Workspace(tiny_artifact)
    for graph in ws.bucket_graphs():
        plan = backend.build(tiny_artifact / "onnx" / graph["file"], tmp_path / f"b{graph['bucket']}.plan",
                             BuildOptions())
        assert plan.stat().st_size > 0


def shiva(*args, cwd):
    return subprocess.run([sys.executable, "-m", "shiva_export", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--buckets", "0"], "--buckets 0 must be >= 1"),
    (["--dtype", "int4"], "unknown dtype 'int4'"),
    (["--height", "264"], "not divisible"),
    (["--router", "/no/such/checkpoint"], "does not exist"),
])
def test_bad_export_input_is_refused_and_the_folder_keeps_what_it_had(artifact_copy, args, message):
    before = {p: p.read_bytes() for p in sorted(artifact_copy.rglob("*")) if p.is_file()}
    result = shiva("export", "--out", str(artifact_copy), *args, cwd=artifact_copy.parent)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    after = {p: p.read_bytes() for p in sorted(artifact_copy.rglob("*")) if p.is_file()}
    assert after == before


def test_schedule_is_a_schema_versioned_artifact_with_hashes(tiny_artifact):
    data = json.loads((tiny_artifact / "schedule.json").read_text())
    assert data["schema_version"] == "shiva.schedule/1"
    assert data["schedule_hash"] and data["model_hash"]
    assert len(data["buckets"]) == 2 and len(data["step_to_bucket"]) == 6

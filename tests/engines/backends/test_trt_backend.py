"""Full TensorRT backend: written against the real API; skipped where `import tensorrt` fails."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import shiva_export.engines
from shiva_export.engines.backends import trt
from shiva_export.engines.backends.base import BuildOptions, current_device
from shiva_export.engines.build import build_engines
from shiva_export.engines.metadata import read_metadata
from shiva_export.errors import BackendUnavailableError

_HAS_TRT = trt.BACKEND.is_available()[0]
needs_trt = pytest.mark.skipif(not _HAS_TRT, reason="tensorrt not importable")
needs_gpu = pytest.mark.skipif(current_device().compute_capability is None, reason="no CUDA GPU")


@pytest.mark.skipif(_HAS_TRT, reason="tensorrt is importable here")
def test_missing_tensorrt_is_reported_with_reason_and_alternatives(fp32_export):
    ok, reason = trt.BACKEND.is_available()
    assert not ok and "tensorrt is not importable" in reason and "--backend ort|trt-rtx" in reason
    with pytest.raises(BackendUnavailableError, match="tensorrt is not importable"):
        build_engines(fp32_export, "trt")
    assert not (fp32_export / "engines").exists()


def test_each_tensorrt_runtime_is_imported_in_exactly_one_module():
    # P8: tensorrt only in backends/trt.py, tensorrt_rtx only in backends/trt_rtx.py.
    root = Path(shiva_export.engines.__path__[0])
    importers = {"tensorrt": set(), "tensorrt_rtx": set()}
    for source in root.rglob("*.py"):
        for match in re.finditer(r"^\s*(?:import|from)\s+(tensorrt(?:_rtx)?)\b", source.read_text(), re.MULTILINE):
            importers[match[1]].add(source.relative_to(root).as_posix())
    assert importers == {"tensorrt": {"backends/trt.py"}, "tensorrt_rtx": {"backends/trt_rtx.py"}}


@needs_trt
def test_builds_strongly_typed_plan_with_timing_cache(fp16_export, tmp_path):
    cache = tmp_path / "timing.cache"
    options = BuildOptions(builder_optimization_level=0, timing_cache=str(cache))
    (record,) = build_engines(fp16_export, "trt", options)
    assert record.engine_path.suffix == ".plan" and record.engine_path.stat().st_size > 0
    assert cache.is_file()  # saved after the build
    meta = read_metadata(record.engine_path)
    assert meta.backend == "trt" and meta.precision == "fp16" and meta.versions["timing_cache"] == str(cache)
    # a second build reuses the cache and finds the engine fresh
    (again,) = build_engines(fp16_export, "trt", options)
    assert again.status == "fresh"


@needs_gpu
@needs_trt
def test_plan_output_matches_torch(fp32_export, feed, torch_reference):
    for record in build_engines(fp32_export, "trt"):
        with trt.BACKEND.make_runner(record.engine_path) as runner:
            got = runner.infer(feed)["sample"]
        np.testing.assert_allclose(got, torch_reference(record.bucket, feed), rtol=1e-2, atol=1e-3)

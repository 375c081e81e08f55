"""TensorRT-RTX: plans build on a CPU-only machine; running them is gated on a supported GPU."""

from __future__ import annotations

import numpy as np
import pytest

from shiva_export.engines.backends import trt_rtx
from shiva_export.engines.backends.base import BuildOptions, DeviceInfo, current_device
from shiva_export.engines.build import build_engines
from shiva_export.engines.metadata import onnx_facts, read_metadata, verify_metadata
from shiva_export.errors import BackendUnavailableError, ConfigError, StaleArtifactError, StaticGraphError

pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx not importable (pip install tensorrt-rtx-cu13)")

_DEVICE = current_device()
_CAN_RUN = _DEVICE.capability_str in trt_rtx.DEFAULT_TARGETS


def test_builds_fp16_plan_with_attention_on_cpu_and_writes_metadata(fp16_export):
    (record,) = build_engines(fp16_export, "trt-rtx", BuildOptions(decomposable_attention=False))
    assert record.status == "built"
    assert record.engine_path == fp16_export / "engines" / "trt-rtx" / "b0.plan"
    assert record.engine_path.read_bytes()[:4] == b"vtrt"  # a serialized TensorRT-RTX engine
    meta = read_metadata(record.engine_path)
    assert meta.precision == "fp16" and meta.backend == "trt-rtx"
    assert meta.backend_version == trt_rtx.BACKEND.version()
    assert meta.onnx == "../../b0.onnx" and meta.onnx_sha256 == onnx_facts(fp16_export / "b0.onnx").onnx_sha256
    assert list(meta.weights_sha256) == ["weights.bin"]
    assert meta.compute_capability == _DEVICE.capability_str and meta.gpu_name == _DEVICE.name
    assert meta.build_options["decomposable_attention"] is False
    assert meta.inputs["timestep"] == {"dtype": "float32", "shape": [2]}
    assert meta.inputs["hidden_states"] == {"dtype": "float16", "shape": [2, 4, 4, 4]}


def test_fp32_attention_fails_without_decomposable_and_says_how_to_fix(fp32_export):
    message = r"b0.onnx: TensorRT-RTX could not build a plan: .*decomposable_attention=True"
    with pytest.raises(StaticGraphError, match=message):
        trt_rtx.BACKEND.build(
            fp32_export / "b0.onnx", fp32_export / "b0.plan", BuildOptions(decomposable_attention=False)
        )
    assert not (fp32_export / "b0.plan").exists()  # nothing half-written


def test_fp32_attention_builds_when_marked_decomposable(fp32_export):
    options = BuildOptions(decomposable_attention=True, builder_optimization_level=0)
    records = build_engines(fp32_export, "trt-rtx", options)
    assert [r.status for r in records] == ["built", "built"]
    assert [read_metadata(r.engine_path).precision for r in records] == ["fp32", "fp32"]


def test_plan_is_refused_after_its_onnx_changes(fp16_export, change_graph):
    (record,) = build_engines(fp16_export, "trt-rtx")
    change_graph(fp16_export / "b0.onnx")
    facts = onnx_facts(fp16_export / "b0.onnx")
    message = r"b0.plan: .*onnx_sha256 expected [0-9a-f]{16}… found [0-9a-f]{16}…"
    with pytest.raises(StaleArtifactError, match=message) as err:
        verify_metadata(record.engine_path, {"onnx_sha256": facts.onnx_sha256, "weights_sha256": facts.weights_sha256})
    assert "weights_sha256" not in str(err.value)  # only what differs is named
    assert "python -m shiva_export engine --backend trt-rtx" in str(err.value)
    # and the next build rebuilds it, saying why
    (rebuilt,) = build_engines(fp16_export, "trt-rtx")
    assert rebuilt.status == "built" and "onnx_sha256" in rebuilt.reason


@pytest.mark.skipif(_DEVICE.compute_capability is not None, reason="a CUDA GPU is present")
def test_running_plan_without_gpu_raises_capability_message(fp16_export):
    (record,) = build_engines(fp16_export, "trt-rtx")
    runner = trt_rtx.BACKEND.make_runner(record.engine_path)  # lazy: nothing loads yet
    with pytest.raises(
        BackendUnavailableError,
        match=r"no CUDA GPU: TensorRT-RTX plans build here but run only on GPUs with compute capability "
        r"8\.0/8\.6/8\.9/12\.0/12\.1",
    ):
        runner.activate()
    assert not runner.is_active


def test_hopper_gpu_is_refused_naming_its_capability_and_the_supported_ones():
    h100 = DeviceInfo(name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0))
    with pytest.raises(
        BackendUnavailableError,
        match=r"NVIDIA H100 80GB HBM3 has compute capability 9\.0; this TensorRT-RTX plan runs only on compute "
        r"capability 8\.0/8\.6/8\.9/12\.0/12\.1",
    ):
        trt_rtx.check_can_run(device=h100)
    ada = DeviceInfo(name="NVIDIA L4", compute_capability=(8, 9))
    assert trt_rtx.check_can_run(device=ada) is ada


def test_explicit_targets_are_recorded_and_checked(fp16_export):
    (record,) = build_engines(fp16_export, "trt-rtx", BuildOptions(compute_capabilities=("7.5", "8.9")))
    assert trt_rtx.plan_targets(record.engine_path) == ("7.5", "8.9")
    runner = trt_rtx.BACKEND.make_runner(record.engine_path)
    assert runner.targets == ("7.5", "8.9")
    message = r"compute capability 8\.6; .* runs only on compute capability 7\.5/8\.9"
    with pytest.raises(BackendUnavailableError, match=message):
        trt_rtx.check_can_run(runner.targets, DeviceInfo("NVIDIA RTX A6000", (8, 6)))


def test_unsupported_target_capability_is_refused_at_build(fp16_export):
    with pytest.raises(BackendUnavailableError, match=r"cannot target compute capability 9\.0; it supports .*8\.9"):
        options = BuildOptions(compute_capabilities=("9.0",))
        trt_rtx.BACKEND.build(fp16_export / "b0.onnx", fp16_export / "b0.plan", options)


def test_timing_cache_is_refused_because_rtx_has_none(fp16_export, tmp_path):
    with pytest.raises(ConfigError, match="TensorRT-RTX has no timing cache"):
        build_engines(fp16_export, "trt-rtx", BuildOptions(timing_cache=str(tmp_path / "tc")))


@pytest.mark.skipif(not _CAN_RUN, reason=f"no GPU with compute capability {'/'.join(trt_rtx.DEFAULT_TARGETS)} "
                    f"(found {_DEVICE.capability_str}): TensorRT-RTX plans cannot run here")
def test_plan_output_matches_torch_on_supported_gpu(fp32_export, feed, torch_reference):
    records = build_engines(fp32_export, "trt-rtx")
    for record in records:
        with trt_rtx.BACKEND.make_runner(record.engine_path) as runner:
            got = runner.infer(feed)["sample"]
        np.testing.assert_allclose(got, torch_reference(record.bucket, feed), rtol=1e-2, atol=1e-3)

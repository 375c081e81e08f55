"""`check` fails a NaN or Inf in an engine output or in the PyTorch reference with one clear message per bucket."""

from __future__ import annotations

import json
import math

import numpy as np

from shiva_export.cli import EXIT_CHECK_FAILED, main
from shiva_export.engines.compare import GATES, Metrics
from tests.engines.test_check import rerecord_export


def poison_float_weights(onnx_dir) -> None:
    """Every fp32 weight in weights.bin becomes NaN, as a corrupted export would leave it; int64 tensors untouched."""
    import onnx

    model = onnx.load(str(onnx_dir / "dense.onnx"), load_external_data=False)
    data = np.fromfile(onnx_dir / "weights.bin", dtype=np.uint8)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        info = {e.key: int(e.value) for e in tensor.external_data if e.key in ("offset", "length")}
        data[info["offset"]:info["offset"] + info["length"]].view(np.float32)[:] = np.nan
    data.tofile(onnx_dir / "weights.bin")


def test_nan_engine_outputs_fail_every_bucket_and_the_loop_naming_the_count(artifact_copy, capsys):
    poison_float_weights(artifact_copy / "onnx")
    rerecord_export(artifact_copy)
    assert main(["check", "--out", str(artifact_copy)]) == EXIT_CHECK_FAILED
    report = json.loads((artifact_copy / "check.json").read_text())
    per_step = 2 * 16 * 32 * 32                                  # CFG batch 2, 16 latent channels, 32x32 latents
    expected = [f"bucket {b['bucket']}: engine output has {len(b['steps']) * per_step} non-finite values (NaN/Inf) "
                f"of {len(b['steps']) * per_step} (fp32 gate, onnxruntime)" for b in report["buckets"]]
    expected.append(f"full trajectory (6 steps): engine output has {per_step // 2} non-finite values (NaN/Inf) of "
                    f"{per_step // 2} (fp32 trajectory gate, onnxruntime)")
    assert report["failures"] == expected       # the metric failures a NaN causes are not listed besides
    assert all(b["metrics"]["max_abs"] == math.inf for b in report["buckets"])
    assert expected[0] in capsys.readouterr().out


def test_non_finite_reference_or_output_is_named_and_finite_ones_pass():
    gate = GATES["fp16"]
    ref, out = np.ones((2, 4), np.float32), np.ones((2, 4), np.float32)
    assert gate.nonfinite_failures("bucket 0", [ref], [out]) == ()
    ref[0, :2] = np.inf
    out[1, 3] = np.nan
    assert gate.nonfinite_failures("bucket 0", [ref, ref], [out], backend="ort") == (
        "bucket 0: engine output has 1 non-finite values (NaN/Inf) of 8 (fp16 gate, ort)",
        "bucket 0: PyTorch reference has 4 non-finite values (NaN/Inf) of 16 (fp16 gate, ort)")


def test_metrics_of_a_nan_reference_are_infinite_errors_not_nan():
    ref = np.array([1.0, np.nan, 2.0], np.float32)
    metrics = Metrics.of(ref, np.array([1.0, 1.5, 2.0], np.float32))
    assert (metrics.max_abs, metrics.mean_abs, metrics.cosine, metrics.psnr) == (math.inf, math.inf, -1.0, -math.inf)

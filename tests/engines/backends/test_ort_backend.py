"""ONNX Runtime backend: matches torch, shares weights across bucket sessions, refuses a missing CUDA EP."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest

from shiva_export.engines.backends import ort
from shiva_export.engines.backends.base import BuildOptions
from shiva_export.errors import ArtifactError, BackendUnavailableError, ConfigError


_HAS_CUDA_EP = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
needs_cuda_ep = pytest.mark.skipif(not _HAS_CUDA_EP, reason="no ONNX Runtime CUDA EP here (onnxruntime-gpu)")


def _links(export_dir):
    out = export_dir / "engines" / "ort"
    return [ort.BACKEND.build(export_dir / f"b{k}.onnx", out / f"b{k}.onnxref", BuildOptions()) for k in (0, 1)]


def test_build_writes_a_link_to_the_exported_graph(fp32_export):
    link = _links(fp32_export)[0]
    assert json.loads(link.read_text()) == {"onnx": "../../b0.onnx", "schema": 1}
    assert ort.resolve_onnx(link) == (fp32_export / "b0.onnx").resolve()


@pytest.mark.parametrize("share_weights", [True, False], ids=["shared", "private"])
def test_ort_runner_matches_torch_on_tiny_model(fp32_export, feed, torch_reference, share_weights):
    runners = ort.make_runners(_links(fp32_export), provider="cpu", share_weights=share_weights)
    for bucket, runner in zip(("b0", "b1"), runners):
        with runner:
            got = runner.infer(feed)["sample"]
        np.testing.assert_allclose(got, torch_reference(bucket, feed), rtol=1e-4, atol=1e-5)


def test_two_sessions_share_one_copy_of_the_weights(fp32_export, feed):
    b0, b1 = ort.make_runners(_links(fp32_export), provider="cpu", share_weights=True)
    store = b0._sess.weights
    assert store is b1._sess.weights
    with b0, b1:
        before = b0.infer(feed)["sample"].copy()
        # Each tensor is held once although both graphs use every weight.
        assert store.nbytes <= (fp32_export / "weights.bin").stat().st_size
        arrays = list(store.arrays().values())
        saved = [a.copy() for a in arrays]
        try:
            for array in arrays:  # zero the shared buffers: both sessions must see it
                array[...] = 0
            zero0, zero1 = b0.infer(feed)["sample"], b1.infer(feed)["sample"]
        finally:
            for array, old in zip(arrays, saved):
                array[...] = old
        assert not np.allclose(before, 0)
        np.testing.assert_array_equal(zero0, 0)  # proj_out weight and bias are zero now
        np.testing.assert_array_equal(zero1, 0)


def test_weights_file_is_never_modified_by_shared_sessions(fp32_export, feed):
    original = (fp32_export / "weights.bin").read_bytes()
    (runner,) = ort.make_runners(_links(fp32_export)[:1], share_weights=True)
    with runner:
        for array in runner._sess.weights.arrays().values():
            array[...] = 0
    assert (fp32_export / "weights.bin").read_bytes() == original


@pytest.mark.skipif(_HAS_CUDA_EP, reason="the CUDA EP is available here")
def test_cuda_provider_is_refused_without_cuda_ep(fp32_export):
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        ort.BACKEND.make_runner(_links(fp32_export)[0], provider="cuda")


def test_unknown_provider_is_a_config_error(fp32_export):
    with pytest.raises(ConfigError, match="provider 'rocm' is unknown"):
        ort.BACKEND.make_runner(_links(fp32_export)[0], provider="rocm")


def test_missing_link_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="engine link not found.*--backend ort"):
        ort.BACKEND.make_runner(tmp_path / "engines" / "ort" / "b0.onnxref")


def test_link_to_a_deleted_graph_is_an_artifact_error(fp32_export):
    link = _links(fp32_export)[0]
    (fp32_export / "b0.onnx").unlink()
    with pytest.raises(ArtifactError, match="b0.onnx, which does not exist"):
        ort.BACKEND.make_runner(link)


@needs_cuda_ep
@pytest.mark.parametrize("share_weights", [True, False], ids=["shared", "private"])
def test_ort_cuda_runner_matches_torch(fp32_export, feed, torch_reference, share_weights):
    runners = ort.make_runners(_links(fp32_export), provider="cuda", share_weights=share_weights)
    for bucket, runner in zip(("b0", "b1"), runners):
        with runner:
            got = runner.infer(feed)["sample"]
        # ORT's CUDA EP uses TF32 matmuls by default (provider option use_tf32): ~5e-4 off an fp32 CPU reference.
        np.testing.assert_allclose(got, torch_reference(bucket, feed), rtol=1e-2, atol=2e-3)


@needs_cuda_ep
def test_cuda_sessions_share_one_device_copy_of_the_weights(fp32_export, feed):
    b0, b1 = ort.make_runners(_links(fp32_export), provider="cuda", share_weights=True)
    store = b0._sess.weights
    assert store is b1._sess.weights and store.device == "cuda"
    with b0, b1:
        before = b0.infer(feed)["sample"].copy()
        values, arrays = store.values(), store.arrays()
        try:
            for key, value in values.items():  # zero the device buffers: both sessions must see it
                value.update_inplace(np.zeros_like(arrays[key]))
            zero0, zero1 = b0.infer(feed)["sample"], b1.infer(feed)["sample"]
        finally:
            for key, value in values.items():
                value.update_inplace(np.ascontiguousarray(arrays[key]))
        assert not np.allclose(before, 0)
        np.testing.assert_array_equal(zero0, 0)
        np.testing.assert_array_equal(zero1, 0)

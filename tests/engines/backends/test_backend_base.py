"""Runner input checks and the backend registry (exercised through the ORT runner, the one that runs anywhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiva_export.engines.backends import ort
from shiva_export.engines.backends.base import BACKEND_NAMES, BuildOptions, get_backend
from shiva_export.errors import ConfigError, InputError


@pytest.fixture
def runner(fp32_export):
    link = ort.BACKEND.build(fp32_export / "b0.onnx", fp32_export / "engines" / "ort" / "b0.onnxref", BuildOptions())
    with ort.BACKEND.make_runner(link, name="ort-b0") as active:
        yield active


def test_unknown_input_name_raises_input_error_naming_it(runner, feed):
    feed["hidden_state"] = feed.pop("hidden_states")
    message = r"runner 'ort-b0': unknown input 'hidden_state' \(did you mean 'hidden_states'\?\)"
    with pytest.raises(InputError, match=message):
        runner.infer(feed)


def test_missing_input_raises_input_error_listing_expected_and_given(runner, feed):
    del feed["timestep"]
    with pytest.raises(InputError, match=r"missing input 'timestep'; expected inputs \[.*'timestep'.*\], got \["):
        runner.infer(feed)


def test_wrong_shape_raises_input_error_with_expected_and_got(runner, feed):
    feed["hidden_states"] = np.zeros((2, 4, 8, 8), np.float32)
    with pytest.raises(InputError, match=r"input 'hidden_states' has shape \(2, 4, 8, 8\); expected \(2, 4, 4, 4\)"):
        runner.infer(feed)


def test_wrong_dtype_raises_input_error_with_expected_and_got(runner, feed):
    feed["timestep"] = feed["timestep"].astype(np.float16)
    with pytest.raises(InputError, match="input 'timestep' has dtype float16; expected float32"):
        runner.infer(feed)


def test_torch_tensors_are_checked_too(runner, feed):
    tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
    tensors["pooled_projections"] = tensors["pooled_projections"].double()
    with pytest.raises(InputError, match="input 'pooled_projections' has dtype float64; expected float32"):
        runner.infer(tensors)


def test_every_problem_is_reported_at_once(runner, feed):
    feed["hidden_states"] = feed["hidden_states"][:1]
    feed["timestep"] = feed["timestep"].astype(np.int64)
    with pytest.raises(InputError) as err:
        runner.infer(feed)
    assert "'hidden_states' has shape (1, 4, 4, 4)" in str(err.value)
    assert "'timestep' has dtype int64" in str(err.value)


def test_a_valid_feed_runs(runner, feed):
    assert runner.infer(feed)["sample"].shape == feed["hidden_states"].shape


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown backend 'tensorflow'; expected one of ort, trt, trt-rtx"):
        get_backend("tensorflow")


def test_every_backend_module_imports_without_its_runtime():
    for name in BACKEND_NAMES:
        backend = get_backend(name)
        ok, reason = backend.is_available()
        assert backend.name == name and isinstance(ok, bool) and reason


def test_build_options_are_validated():
    with pytest.raises(ConfigError, match="builder_optimization_level must be 0..5"):
        BuildOptions(builder_optimization_level=7)
    with pytest.raises(ConfigError, match="compute_capabilities"):
        BuildOptions(compute_capabilities=("sm89",))
    assert BuildOptions(compute_capabilities=["8.9"]).to_json()["compute_capabilities"] == ["8.9"]
    assert "timing_cache" not in BuildOptions(timing_cache="tc.bin").to_json()

"""A diffusers pipeline folder is the source of truth (issue: a real pipeline folder, as a user brings it).

The folders are StableDiffusion3Pipeline's own tiny test configuration (tests/pipelines.py: VAE scale factor 1,
4 latent channels, scheduler shift 1.0, CLIP + T5 text encoders), saved with `save_pretrained`, and an SD3.5-style
variant with another VAE depth (factor 2) and a dynamically shifted scheduler. `build --model DIR`, then the pipeline
loaded from the same folder runs with the engines at its own defaults (size, steps, guidance) and matches the
PyTorch pruned transformer.
"""

from __future__ import annotations

import json
import math
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from shiva_export import pipeline
from shiva_export.errors import ConfigError, InputError
from shiva_export.passes.freeze import Schedule
from shiva_export.runtime import ShivaEngineTransformer, load_pruned_reference
from tests.pipelines import save_sd3_pipeline

# fp32 ORT (CPU) vs PyTorch over the 28-step loop and the VAE decode, pixels in [0, 1]
PIXEL_ATOL = 1e-4


def load_pipe(folder) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **options) -> np.ndarray:
    """The pipeline at its own defaults (height/width from the transformer config, 28 steps, guidance 7)."""
    return pipe("a red square on a blue field", generator=torch.Generator().manual_seed(0), output_type="np",
                **options).images


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """diffusers' tiny SD3 test pipeline (3 blocks instead of 1: block 0 is dense), built by the `build` verb."""
    root = tmp_path_factory.mktemp("sd3")
    folder = save_sd3_pipeline(root / "pipe", num_layers=3)
    out = root / "artifacts"
    done = subprocess.run([sys.executable, "-m", "shiva_export", "build", "--model", str(folder), "--out", str(out),
                           "--backend", "onnxruntime", "--runs", "1"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder, out


@pytest.fixture(scope="module")
def sd35_dynamic(tmp_path_factory):
    """SD3.5-style blocks, a 2-level VAE (scale factor 2) and a dynamically shifted scheduler; freeze + export + ORT
    engines through the library."""
    root = tmp_path_factory.mktemp("sd35")
    folder = save_sd3_pipeline(root / "pipe", num_layers=4, sd35=True, vae_levels=2, shift=2.5,
                               use_dynamic_shifting=True)
    out = root / "artifacts"
    ws = pipeline.start(out, pipeline.ArtifactConfig(model=str(folder), buckets=2))
    pipeline.run_freeze(ws)
    pipeline.run_export(ws)
    pipeline.run_engines(ws, "ort")
    return folder, out


@pytest.mark.parametrize("name", ["sd3", "sd35_dynamic"])
def test_the_folder_decides_scheduler_vae_factor_and_text_length(name, request):
    folder, out = request.getfixturevalue(name)
    pipe = load_pipe(folder)
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["vae_scale_factor"] == pipe.vae_scale_factor == {"sd3": 1, "sd35_dynamic": 2}[name]
    assert config["shift"] == pipe.scheduler.config.shift == {"sd3": 1.0, "sd35_dynamic": 2.5}[name]
    assert config["scheduler"]["use_dynamic_shifting"] is (name == "sd35_dynamic")
    assert config["context_tokens"] == 77 + 256  # CLIP + the pipeline's default max_sequence_length of T5
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    assert (config["height"], config["width"]) == (size, size)
    # the frozen timesteps are the ones this pipeline's own scheduler visits at its default 28 steps
    schedule = Schedule.load(out / "schedule.json")
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(float(kwargs["timestep"][0])),
                                               with_kwargs=True)
    run(pipe)
    np.testing.assert_allclose(schedule.timesteps, seen, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["sd3", "sd35_dynamic"])
def test_engines_run_at_the_pipelines_defaults_and_match_pytorch(name, request):
    folder, out = request.getfixturevalue(name)
    pipe = load_pipe(folder)
    pipe.transformer = load_pruned_reference(out)
    reference = run(pipe)
    with ShivaEngineTransformer.from_artifacts(out) as engine:
        pipe.transformer = engine
        got = run(pipe)
    assert got.shape == reference.shape == (1, *(2 * [32 * pipe.vae_scale_factor]), 3)
    assert reference.std() > 0.01
    assert np.abs(got - reference).max() <= PIXEL_ATOL


def test_an_option_overrides_the_folder_and_the_runtime_names_what_was_frozen(sd3, tmp_path, caplog):
    folder, _ = sd3
    caplog.set_level(logging.INFO, logger="shiva_export")
    ws = pipeline.start(tmp_path / "a", pipeline.ArtifactConfig(model=str(folder), shift=3.0, steps=4, buckets=1))
    assert "--shift 3 overrides the scheduler shift 1 of pipeline folder" in caplog.text
    pipeline.run_freeze(ws)
    pipeline.run_export(ws)
    pipeline.run_engines(ws, "ort")
    del ws
    pipe = load_pipe(folder)
    with ShivaEngineTransformer.from_artifacts(tmp_path / "a") as engine:
        pipe.transformer = engine
        with pytest.raises(ConfigError, match=r"frozen timesteps .* FlowMatchEulerDiscreteScheduler shift=3\)"):
            run(pipe, num_inference_steps=4)


def test_a_wrong_size_is_named_in_the_folders_pixels(sd3):
    folder, out = sd3
    pipe = load_pipe(folder)
    with ShivaEngineTransformer.from_artifacts(out) as engine:
        pipe.transformer = engine
        with pytest.raises(InputError, match=r"expected \(2, 4, 32, 32\) \(a 64x96 px image; call the pipeline with "
                                             r"height=32, width=32\)"):
            run(pipe, height=64, width=96)


def test_train_takes_the_scheduler_shift_and_vae_factor_from_the_folder(sd35_dynamic, tmp_path):
    from shiva_export import checkpoint as ckpt
    from shiva_export.cli import main

    folder, _ = sd35_dynamic
    out = tmp_path / "router"
    assert main(["train", "--model", str(folder), "--out", str(out), "--no-progress", "--warmup-steps", "1",
                 "--policy-steps", "1", "--joint-steps", "1", "--lr-warmup-steps", "1", "--global-batch", "2",
                 "--micro-batch", "1", "--eval-steps", "2", "--eval-samples", "1"]) == 0
    train = ckpt.read_config(out)["train"]
    # the folder's scheduler shifts dynamically: at 32x32 tokens the sampler's shift is exp(mu), not SD3's 3.0
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    slope = (scheduler["max_shift"] - scheduler["base_shift"]) / (4096 - 256)
    mu = 1024 * slope + scheduler["base_shift"] - slope * 256
    assert train["timestep_shift"] == pytest.approx(math.exp(mu))
    # data-free latents at the pipeline's default size: 64 px through a factor-2 VAE = the transformer's 32x32
    assert (train["height"], train["width"]) == (64, 64)
    summary = json.loads((out / ckpt.SUMMARY_FILE).read_text())
    assert summary["num_image_tokens"] == 32 * 32

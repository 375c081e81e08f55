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


# ------------------------------------------------------------------------------------------ generate
def test_generate_writes_dense_engine_and_difference_side_by_side_with_time_and_fidelity(sd3, tmp_path):
    from PIL import Image

    from shiva_export.cli import main

    _, out = sd3
    assert main(["generate", "--out", str(out), "--prompt", "a red square", "--seed", "3",
                 "--image-out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("seed3-*.json")).read_text())
    png = Image.open(tmp_path / record["png"])
    assert png.size == (3 * 32 + 2 * 4, 32) and png.mode == "RGB"
    assert record["steps"] == 28 and record["guidance_scale"] == 7.0 and record["backend"] == "onnxruntime"
    assert record["seconds"]["dense"] > 0 and record["seconds"]["engine"] > 0
    # pruned (keep ~0.6) differs from dense, but is the same image, not another one
    assert 15 < record["psnr_db"] < 200 and 0.5 < record["ssim"] < 1


def test_image_metrics_are_exact_on_equal_images_and_fall_with_noise():
    from shiva_export.generate import psnr, ssim

    rng = np.random.default_rng(0)
    image = rng.random((32, 40, 3))
    assert psnr(image, image) == float("inf") and ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1)
    assert 20 < psnr(image, noisy) < 30 and ssim(image, noisy) < ssim(image, (image + noisy) / 2) < 1


def test_generate_on_a_preset_artifact_asks_for_the_pipeline_folder(tiny_artifact, capsys):
    from shiva_export.cli import main

    assert main(["generate", "--out", str(tiny_artifact), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a pipeline folder" in err[0] and "--model PIPELINE_DIR" in err[0]


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("prompts")
    (root / "prompts.txt").write_text("a red square\n\na blue circle\na green field\n")
    (root / "images").mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        array = np.zeros((40, 52, 3), np.uint8)
        array[...] = colour
        array[5:20, 5:30] = 255 - np.array(colour)
        Image.fromarray(array).save(root / "images" / f"{i:02d}.png")
    return root


def make(folder, prompts, out, *options) -> int:
    from shiva_export.cli import main

    return main(["data", "--model", str(folder), "--prompts", str(prompts / "prompts.txt"), "--out", str(out),
                 "--no-progress", *options])


def tensors(folder):
    from safetensors.torch import load_file

    index = json.loads((folder / "index.json").read_text())
    parts = [load_file(folder / shard["file"]) for shard in index["shards"]]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def test_data_from_images_and_from_teacher_samples_trains(sd3, prompts, tmp_path):
    from shiva_export.cli import main

    folder, _ = sd3
    pipe = load_pipe(folder)
    assert make(folder, prompts, tmp_path / "img", "--images", str(prompts / "images"), "--shard-size", "2") == 0
    assert make(folder, prompts, tmp_path / "teacher", "--steps", "3", "--shard-size", "2") == 0
    for name in ("img", "teacher"):
        index = json.loads((tmp_path / name / "index.json").read_text())
        assert [s["count"] for s in index["shards"]] == [2, 1]
        assert (index["latent_channels"], index["latent_height"], index["latent_width"]) == (4, 32, 32)
        assert (index["context_tokens"], index["context_dim"], index["pooled_dim"]) == (333, 32, 64)
        data = tensors(tmp_path / name)
        context, _, pooled, _ = pipe.encode_prompt("a blue circle", None, None, do_classifier_free_guidance=False)
        torch.testing.assert_close(data["encoder_hidden_states"][1], context[0])  # line 3 (a blank line skipped)
        torch.testing.assert_close(data["pooled_projections"][1], pooled[0])
    # image latents: a sample of the VAE's posterior (keyed by seed and index) of the image fitted to 32x32 (cover,
    # centre crop), normalised as the pipeline feeds the transformer
    from PIL import Image, ImageOps

    from shiva_export.data import sample_generator

    fitted = ImageOps.fit(Image.open(prompts / "images" / "00.png").convert("RGB"), (32, 32),
                          method=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(fitted, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
    sample = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=sample_generator(0, 0))
    normalised = (sample - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    torch.testing.assert_close(tensors(tmp_path / "img")["latents"][0], normalised[0])
    assert main(["train", "--model", str(folder), "--data", str(tmp_path / "teacher"), "--out", str(tmp_path / "r"),
                 "--no-progress", "--warmup-steps", "1", "--policy-steps", "1", "--joint-steps", "1",
                 "--lr-warmup-steps", "1", "--global-batch", "2", "--micro-batch", "1", "--eval-steps", "2",
                 "--eval-samples", "1"]) == 0


def test_data_resumes_after_the_last_finished_shard_and_does_not_depend_on_shard_size(sd3, prompts, tmp_path):
    folder, _ = sd3
    options = ("--images", str(prompts / "images"))
    assert make(folder, prompts, tmp_path / "a", *options, "--shard-size", "1") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    first_mtime = (tmp_path / "a" / "shard-00000.safetensors").stat().st_mtime_ns
    (tmp_path / "a" / "shard-00002.safetensors").unlink()   # as if killed before the last shard and the index
    (tmp_path / "a" / "index.json").unlink()
    assert make(folder, prompts, tmp_path / "a", *options, "--shard-size", "1") == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert (tmp_path / "a" / "shard-00000.safetensors").stat().st_mtime_ns == first_mtime  # not redone
    assert make(folder, prompts, tmp_path / "b", *options, "--shard-size", "3") == 0
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_data_refuses_bad_input_in_one_line_and_writes_nothing(sd3, prompts, tmp_path, capsys):
    folder, _ = sd3
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0.png").write_text("not an image")
    cases = [
        (["data", "--model", str(folder), "--prompts", str(tmp_path / "empty.txt")], "no prompts"),
        (["data", "--model", str(tmp_path), "--prompts", str(prompts / "prompts.txt")], "not a diffusers pipeline"),
        (["data", "--model", str(folder), "--prompts", str(prompts / "prompts.txt"), "--images",
          str(tmp_path / "bad")], "1 image files"),
    ]
    from shiva_export.cli import main

    for argv, expected in cases:
        out = tmp_path / "out"
        assert main([*argv, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
        assert not out.exists()
    assert make(folder, prompts, tmp_path / "c", "--images", str(prompts / "images")) == 0
    assert make(folder, prompts, tmp_path / "c", "--images", str(prompts / "images"), "--seed", "1") == 2
    assert "made from other inputs" in capsys.readouterr().err

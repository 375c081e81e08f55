"""Claims about shiva_export/runtime.py: the bucket engines as `pipe.transformer` of a real StableDiffusion3Pipeline.

Everything is local (no downloads): the session's tiny-sd3 artifact (conftest: 256x256 px, CFG batch 2, 24 context
tokens of width 64, 6 steps in 2 buckets), a 4-level AutoencoderKL (vae_scale_factor 8: 256 px <-> 32x32 latents)
and no text encoders (the embeddings are passed in).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from shiva_export.errors import ArtifactError, BackendUnavailableError, ConfigError, InputError, StaleArtifactError
from shiva_export.pipeline import Workspace
from shiva_export.runtime import ShivaEngineTransformer, load_pruned_reference

# fp32 ONNX Runtime (CPU) vs PyTorch (CPU), whole pipeline incl. VAE decode, pixels in [0, 1]. Measured on this
# artifact: max abs 4.5e-6 (mean 2.6e-7); latents before the VAE 5.2e-6..6.4e-6 over 3 prompts (|latent| <= 4.9).
PIXEL_ATOL = 1e-4


@pytest.fixture(scope="module")
def artifacts(tiny_sd3_artifact):
    buckets = Workspace(tiny_sd3_artifact).schedule().buckets
    assert len(buckets) == 2, f"switching engines per step needs two buckets, the freeze gave {buckets}"
    return tiny_sd3_artifact


def make_vae() -> AutoencoderKL:
    """4 levels: vae_scale_factor = 2 ** (4 - 1) = 8, as SD3's; 8 channels each keep decoding cheap."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             layers_per_block=1, norm_num_groups=4, sample_size=256, scaling_factor=1.5305,
                             shift_factor=0.0609).eval()


@pytest.fixture(scope="module")
def vae():
    return make_vae()


def make_pipeline(transformer, vae) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **overrides) -> np.ndarray:
    gen = torch.Generator().manual_seed(1)
    embeds = {"prompt_embeds": torch.randn(1, 24, 64, generator=gen),
              "pooled_prompt_embeds": torch.randn(1, 64, generator=gen),
              "negative_prompt_embeds": torch.randn(1, 24, 64, generator=gen),
              "negative_pooled_prompt_embeds": torch.randn(1, 64, generator=gen)}
    call = {"guidance_scale": 7.0, "num_inference_steps": pipe.transformer.num_inference_steps, "output_type": "np",
            "generator": torch.Generator().manual_seed(0), **embeds, **overrides}
    return pipe(**call).images


@pytest.fixture(scope="module")
def engine(artifacts):
    with ShivaEngineTransformer.from_artifacts(artifacts) as transformer:
        yield transformer


@pytest.fixture(scope="module")
def images(artifacts, engine, vae):
    """One pipeline, run with the PyTorch reference as its transformer, then with the engines assigned in its place."""
    pipe = make_pipeline(load_pruned_reference(artifacts), vae)
    reference = generate(pipe)  # before any ORT session exists: their idle threads slow torch down
    loaded_before = engine.active_buckets
    pipe.transformer = engine
    return {"reference": reference, "engine": generate(pipe), "loaded_before": loaded_before,
            "loaded_after": engine.active_buckets}


@pytest.fixture
def step_inputs():
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 16, 32, 32, generator=gen),
            "encoder_hidden_states": torch.randn(2, 24, 64, generator=gen),
            "pooled_projections": torch.randn(2, 64, generator=gen), "timestep": torch.full((2,), 1000.0)}


def test_engine_image_matches_pytorch_pruned_pipeline(images):
    reference, got = images["reference"], images["engine"]
    assert got.shape == reference.shape == (1, 256, 256, 3)  # default size = the exported one
    assert reference.std() > 0.05  # a real image, not a saturated one where any two runs agree
    assert np.abs(got - reference).max() <= PIXEL_ATOL


def test_engines_load_on_first_use_one_per_bucket(images):
    assert images["loaded_before"] == ()
    assert images["loaded_after"] == (0, 1)


def test_transformer_exposes_what_the_pipeline_reads(engine, vae):
    pipe = make_pipeline(engine, vae).to("cpu")
    cpu = torch.device("cpu")
    assert (pipe.device, pipe.dtype, pipe._execution_device) == (cpu, torch.float32, cpu)
    assert pipe.default_sample_size * pipe.vae_scale_factor == 256
    assert isinstance(engine, torch.nn.Module)
    assert (engine.config.sample_size, engine.config.patch_size, engine.config.in_channels) == (32, 2, 16)
    assert engine.config.joint_attention_dim == 64
    assert (engine.dtype, engine.device) == (torch.float32, torch.device("cpu"))
    assert engine.num_inference_steps == 6


def test_forward_returns_output_or_tuple_like_sd3_transformer(engine, step_inputs):
    output = engine(**step_inputs)
    (sample,) = engine(**step_inputs, return_dict=False)
    assert isinstance(output, Transformer2DModelOutput)
    assert output.sample.shape == (2, 16, 32, 32)
    torch.testing.assert_close(sample, output.sample)


def test_wrong_num_inference_steps_is_a_config_error_naming_the_frozen_grid(engine, vae):
    with pytest.raises(ConfigError, match=r"not within .* of any of the 6 frozen timesteps .*"
                                          r"Call StableDiffusion3Pipeline with num_inference_steps=6"):
        generate(make_pipeline(engine, vae), num_inference_steps=8)


def test_wrong_resolution_is_an_input_error_naming_the_export_shape(engine, vae):
    with pytest.raises(InputError, match=r"hidden_states has shape \(2, 16, 16, 16\); expected \(2, 16, 32, 32\) "
                                         r"\(a 128x128 px image; call the pipeline with height=256, width=256\)"):
        generate(make_pipeline(engine, vae), height=128, width=128)


def test_guidance_off_is_an_input_error_naming_the_exported_batch(engine, vae):
    with pytest.raises(InputError, match=r"batch 1; the engine runs batch 2 = 1 image with classifier-free guidance"):
        generate(make_pipeline(engine, vae), guidance_scale=1.0)


def test_other_precision_is_an_input_error(engine, step_inputs):
    step_inputs["hidden_states"] = step_inputs["hidden_states"].half()
    with pytest.raises(InputError, match=r"hidden_states is torch.float16; expected torch.float32"):
        engine(**step_inputs)


def test_skip_layer_guidance_is_refused(engine, step_inputs):
    with pytest.raises(ConfigError, match=r"\['skip_layers'\] cannot be applied to static bucket graphs"):
        engine(**step_inputs, skip_layers=[1])


def test_casting_the_engines_to_another_dtype_is_refused(engine):
    assert engine.to("cpu") is engine
    with pytest.raises(ConfigError, match=r"engines run torch.float32 \(fixed at export\)"):
        engine.to(torch.float16)


def test_modified_onnx_file_is_refused_as_stale(artifacts, tmp_path):
    copy = shutil.copytree(artifacts, tmp_path / "artifacts")
    with open(copy / "onnx" / "b1.onnx", "ab") as graph:
        graph.write(b"\0")
    with pytest.raises(StaleArtifactError, match=r"b1\.onnx: sha256 differs from the manifest"):
        ShivaEngineTransformer.from_artifacts(copy)


def test_missing_weights_file_is_refused(artifacts, tmp_path):
    copy = shutil.copytree(artifacts, tmp_path / "artifacts")
    (copy / "onnx" / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match=r"weights\.bin: listed by stage 'export' in the manifest but missing"):
        ShivaEngineTransformer.from_artifacts(copy)


def test_unknown_backend_is_a_config_error(artifacts):
    with pytest.raises(ConfigError, match=r"unknown backend 'tvm'; expected one of onnxruntime, "):
        ShivaEngineTransformer.from_artifacts(artifacts, backend="tvm")


def test_tensorrt_without_built_plans_is_refused(artifacts):
    # Where tensorrt is importable the missing plan is named; elsewhere the missing runtime is.
    with pytest.raises((ArtifactError, BackendUnavailableError), match=r"no trt engine for b0\.onnx|not importable"):
        ShivaEngineTransformer.from_artifacts(artifacts, backend="tensorrt")


# ------------------------------------------------------------------------------------------------ non-finite values
def test_nan_input_with_check_finite_is_an_input_error_naming_the_input(artifacts, step_inputs):
    step_inputs["hidden_states"][0, 0, 0, :3] = float("nan")
    step_inputs["pooled_projections"][1, 0] = float("-inf")
    with ShivaEngineTransformer.from_artifacts(artifacts, check_finite=True) as transformer:
        assert transformer.check_finite and transformer.active_buckets == ()
        with pytest.raises(InputError, match=r"hidden_states has 3 non-finite values \(NaN/Inf\); "
                                             r"pooled_projections has 1 non-finite values \(NaN/Inf\)$"):
            transformer(**step_inputs)
        assert transformer.active_buckets == ()  # refused before any engine ran


def test_nan_input_without_check_finite_runs_as_before(engine, step_inputs):
    assert engine.check_finite is False  # the default: no extra pass over the tensors
    step_inputs["hidden_states"][0, 0, 0, :3] = float("nan")
    (sample,) = engine(**step_inputs, return_dict=False)
    assert sample.shape == (2, 16, 32, 32)


def test_reference_with_check_finite_refuses_nan_input_and_names_a_non_finite_output(artifacts, step_inputs):
    from shiva_export.errors import NonFiniteError

    reference = load_pruned_reference(artifacts, check_finite=True)
    bad = dict(step_inputs, encoder_hidden_states=step_inputs["encoder_hidden_states"].clone())
    bad["encoder_hidden_states"][0, 0, 0] = float("inf")
    with pytest.raises(InputError, match=r"encoder_hidden_states has 1 non-finite values \(NaN/Inf\)$"):
        reference(**bad)
    assert torch.isfinite(reference(**step_inputs, return_dict=False)[0]).all()
    with torch.no_grad():  # a corrupted weight: finite inputs, NaN output
        reference.model.proj_out.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"bucket 0 returned \d+ non-finite values \(NaN/Inf\) from finite "
                                             r"inputs; run `python -m shiva_export check --out "):
        reference(**step_inputs)

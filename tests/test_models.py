"""Claims about shiva_export/models.py: built-in presets, local diffusers folders, token counts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.normalization import RMSNorm

from shiva_export.errors import ConfigError
from shiva_export.models import example_inputs, load_transformer, num_image_tokens, preset_names, read_preset

TINY_PRESETS = ["tiny-sd3", "tiny-sd35"]

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (diffusers keys, _class_name/_version dropped)
SD35_MEDIUM_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    "qk_norm": "rms_norm",
}


@pytest.fixture(scope="module")
def built():
    """Every tiny preset built once for this module: name -> (model, source)."""
    return {name: load_transformer(name) for name in TINY_PRESETS}


@pytest.fixture(params=TINY_PRESETS)
def tiny(request, built):
    """(preset name, model, source) for each tiny preset."""
    return (request.param, *built[request.param])


@pytest.fixture(scope="module")
def saved_tiny_sd35(built, tmp_path_factory):
    """tiny-sd35 saved as a pipeline-style folder: <root>/transformer/{config.json, *.safetensors}."""
    model, _ = built["tiny-sd35"]
    root = tmp_path_factory.mktemp("pipeline")
    model.save_pretrained(root / "transformer")
    return model, root


def _outputs(model, seed: int = 0) -> torch.Tensor:
    inputs = example_inputs(dict(model.config), 128, 128, batch=2, context_tokens=8, seed=seed)
    with torch.no_grad():
        return model(**inputs).sample


def test_tiny_presets_are_listed():
    assert set(TINY_PRESETS) | {"sd35-medium-shape"} <= set(preset_names())


def test_tiny_preset_builds_the_same_weights_from_its_seed(tiny):
    name, model, source = tiny
    torch.manual_seed(12345)                      # the global RNG state neither matters nor changes
    again, again_source = load_transformer(name)
    after = torch.rand(3)
    torch.manual_seed(12345)
    assert torch.equal(after, torch.rand(3))
    reference, theirs = model.state_dict(), again.state_dict()
    assert reference.keys() == theirs.keys()
    assert all(torch.equal(reference[key], theirs[key]) for key in reference)
    assert again_source.model_hash == source.model_hash
    preset = read_preset(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset["seed"])
        direct = SD3Transformer2DModel(**preset["config"])
    assert all(torch.equal(tensor, direct.state_dict()[key]) for key, tensor in reference.items())


def test_tiny_preset_has_a_few_million_parameters(tiny):
    _, model, _ = tiny
    count = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= count <= 10_000_000


def test_tiny_preset_is_in_eval_mode_and_frozen(tiny):
    _, model, _ = tiny
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_tiny_preset_source_records_kind_hash_and_defaults(built):
    (_, source), (_, other) = built["tiny-sd3"], built["tiny-sd35"]
    assert source.kind == "preset" and source.name == "tiny-sd3"
    assert source.model_hash != other.model_hash
    assert source.defaults == read_preset("tiny-sd3")["defaults"]


def test_tiny_sd35_has_dual_attention_in_the_first_half_of_blocks_and_rms_qk_norm(built):
    model, _ = built["tiny-sd35"]
    blocks = model.transformer_blocks
    half = len(blocks) // 2
    assert [b.use_dual_attention for b in blocks] == [True] * half + [False] * (len(blocks) - half)
    for block in blocks:
        assert isinstance(block.attn.norm_q, RMSNorm) and isinstance(block.attn.norm_k, RMSNorm)
        assert isinstance(block.attn.norm_added_q, RMSNorm) and isinstance(block.attn.norm_added_k, RMSNorm)
    for block in blocks[:half]:
        assert isinstance(block.attn2.norm_q, RMSNorm) and isinstance(block.attn2.norm_k, RMSNorm)


def test_tiny_sd3_has_neither_dual_attention_nor_qk_norm(built):
    model, _ = built["tiny-sd3"]
    assert not any(b.use_dual_attention for b in model.transformer_blocks)
    assert all(b.attn.norm_q is None for b in model.transformer_blocks)


def test_sd35_medium_shape_preset_equals_the_published_sd35_medium_config():
    preset = read_preset("sd35-medium-shape")            # read only: instantiating it means 2.5B parameters
    assert preset["class_name"] == "SD3Transformer2DModel"
    assert preset["config"] == SD35_MEDIUM_CONFIG
    config = preset["config"]
    assert config["num_attention_heads"] * config["attention_head_dim"] == config["caption_projection_dim"] == 1536


def test_sd35_medium_shape_has_4096_image_tokens_at_1024px():
    preset = read_preset("sd35-medium-shape")
    assert (preset["defaults"]["height"], preset["defaults"]["width"]) == (1024, 1024)
    assert num_image_tokens(preset["config"], 1024, 1024) == 4096


def test_sd35_medium_shape_freezes_keep_06_to_a_joint_attention_length_of_2816():
    """The preset's alignment (128, either) is what the H200 measurements chose: k = 2483 at keep 0.6, 1664 at 0.4."""
    from shiva_export.passes.freeze import FreezeConfig, k_table
    from shiva_export.pipeline import ArtifactConfig

    defaults = read_preset("sd35-medium-shape")["defaults"]
    resolved = ArtifactConfig(model="sd35-medium-shape").resolve(defaults)
    assert (resolved.align, resolved.align_to) == (128, "either")
    cfg = FreezeConfig(align=resolved.align, align_to=resolved.align_to, dense_layers=())
    assert k_table(torch.tensor([[0.6, 0.4]]), 4096, cfg, resolved.context_tokens).tolist() == [[2483, 1664]]
    assert ArtifactConfig(model="tiny-sd35").resolve(read_preset("tiny-sd35")["defaults"]).align_to == "k"


def test_unknown_preset_is_a_config_error_naming_the_known_presets():
    with pytest.raises(ConfigError, match=r"unknown model preset 'tiny-sd4'; expected one of \[.*'tiny-sd3'.*\]"):
        load_transformer("tiny-sd4")


@pytest.mark.parametrize("subdir", ["", "transformer"], ids=["pipeline-folder", "transformer-folder"])
def test_saved_tiny_model_loads_back_from_a_folder_with_identical_outputs(saved_tiny_sd35, subdir):
    original, root = saved_tiny_sd35
    loaded, source = load_transformer(str(root / subdir) if subdir else str(root))
    assert type(loaded).__name__ == "SD3Transformer2DModel"
    assert source.kind == "folder" and source.name == str(root / "transformer")
    assert source.defaults["height"] == original.config.sample_size * 8
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(_outputs(loaded), _outputs(original))


def test_folder_without_a_transformer_is_a_config_error(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"no transformer found \(expected .*/transformer/config.json"):
        load_transformer(str(tmp_path))


@pytest.mark.parametrize("subdir", ["", "transformer"], ids=["transformer-folder", "pipeline-folder"])
def test_folder_with_an_unsupported_model_class_is_a_config_error(tmp_path, subdir):
    folder = tmp_path / subdir
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "HunyuanDiT2DModel"}))
    from shiva_export.backbones import MODEL_CLASSES

    with pytest.raises(ConfigError, match=re.escape(f"model class 'HunyuanDiT2DModel' is not supported; "
                                                    f"expected one of {list(MODEL_CLASSES)}")):
        load_transformer(str(tmp_path))


@pytest.mark.parametrize("height, width", [(250, 256), (256, 120), (8, 256), (0, 256)])
def test_resolution_not_divisible_by_vae_times_patch_is_a_config_error(height, width):
    config = read_preset("tiny-sd3")["config"]
    with pytest.raises(ConfigError, match=rf"resolution {height}x{width} is not divisible by 16"):
        num_image_tokens(config, height, width)
    with pytest.raises(ConfigError, match=rf"resolution {height}x{width} is not divisible by 16"):
        example_inputs(config, height, width, batch=1, context_tokens=4)


def test_resolution_beyond_the_positional_table_is_a_config_error():
    config = read_preset("tiny-sd3")["config"]    # 64 positions x patch 2 x VAE 8 = 1024 px
    assert num_image_tokens(config, 1024, 1024) == 64 * 64
    with pytest.raises(ConfigError, match=r"resolution 1040x256 exceeds the model's positional table \(1024 px\)"):
        num_image_tokens(config, 1040, 256)


def test_example_inputs_have_pipeline_shapes_and_are_seeded():
    config = read_preset("tiny-sd35")["config"]
    inputs = example_inputs(config, 256, 128, batch=2, context_tokens=5, seed=3)
    assert inputs["hidden_states"].shape == (2, 16, 32, 16)
    assert inputs["encoder_hidden_states"].shape == (2, 5, 64)
    assert inputs["pooled_projections"].shape == (2, 64)
    assert inputs["timestep"].shape == (2,)
    again = example_inputs(config, 256, 128, batch=2, context_tokens=5, seed=3)
    assert all(torch.equal(inputs[name], again[name]) for name in inputs)
    assert num_image_tokens(config, 256, 128) == 16 * 8

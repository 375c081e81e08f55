"""Load the backbone: a built-in preset (random weights from a seed, nothing downloaded) or a local diffusers folder."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import torch

from shiva_export.errors import ConfigError
from shiva_export.io import sha256_file, sha256_json

SUPPORTED_CLASSES = ("SD3Transformer2DModel",)
VAE_SCALE_FACTOR = 8  # SD3/SD3.5 VAEs downsample by 8: image pixels -> latent pixels


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("shiva_export.presets").iterdir() if p.name.endswith(".json"))


def read_preset(name: str) -> dict:
    path = resources.files("shiva_export.presets") / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; expected one of {preset_names()} or a local diffusers folder")
    return json.loads(path.read_text())


def shipped_router(name: str) -> str | None:
    """The router/policy checkpoint trained by our own `train` verb and shipped for a preset, if any."""
    folder = resources.files("shiva_export.presets") / f"{name}.router"
    return str(folder) if (folder / "config.json").is_file() else None


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a backbone came from, and a hash that changes when its weights or config do."""

    name: str
    kind: str  # "preset" | "folder"
    model_hash: str
    defaults: dict


def resolve_model_dir(path: Path) -> Path:
    """A pipeline folder (with transformer/) or the transformer folder itself."""
    if not path.is_dir():
        raise ConfigError(f"model {str(path)!r} is neither a preset ({', '.join(preset_names())}) nor a folder")
    for candidate in (path / "transformer", path):
        config = candidate / "config.json"
        if config.is_file():
            class_name = json.loads(config.read_text()).get("_class_name")
            if class_name not in SUPPORTED_CLASSES:
                raise ConfigError(
                    f"{config}: model class {class_name!r} is not supported; expected one of {SUPPORTED_CLASSES}"
                )
            return candidate
    raise ConfigError(f"{path}: no transformer found (expected {path}/transformer/config.json or {path}/config.json)")


def folder_hash(model_dir: Path) -> str:
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    return sha256_json({p.name: sha256_file(p) for p in files})


def load_transformer(name_or_dir: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return (SD3Transformer2DModel in eval mode, ModelSource).

    Presets are initialised directly on `device` (a 2.5B-parameter preset initialises in seconds on a GPU);
    the weights depend on the seed and the device's random generator.
    """
    from diffusers import SD3Transformer2DModel

    path = Path(name_or_dir)
    if name_or_dir in preset_names() or not path.exists():
        preset = read_preset(name_or_dir)
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(preset["seed"])
            model = SD3Transformer2DModel(**preset["config"])
        source = ModelSource(name_or_dir, "preset", sha256_json(preset), preset["defaults"])
    else:
        model_dir = resolve_model_dir(path)
        model = SD3Transformer2DModel.from_pretrained(model_dir, torch_dtype=dtype).to(device)
        cfg = model.config
        size = cfg.sample_size * VAE_SCALE_FACTOR
        defaults = {"height": size, "width": size, "context_tokens": 333, "batch": 2}
        source = ModelSource(str(model_dir), "folder", folder_hash(model_dir), defaults)
    if type(model).__name__ not in SUPPORTED_CLASSES:
        raise ConfigError(f"model class {type(model).__name__} is not supported; expected {SUPPORTED_CLASSES}")
    if model.dtype != dtype:
        model = model.to(dtype)
    return model.eval().requires_grad_(False), source


def num_image_tokens(config, height: int, width: int) -> int:
    """Image tokens for an image of height x width pixels; refuses sizes the patching cannot tile."""
    step = VAE_SCALE_FACTOR * config["patch_size"]
    if height <= 0 or width <= 0 or height % step or width % step:
        raise ConfigError(
            f"resolution {height}x{width} is not divisible by {step} (VAE factor {VAE_SCALE_FACTOR} x patch size "
            f"{config['patch_size']}); choose e.g. {max(step, height // step * step)}x{max(step, width // step * step)}"
        )
    latent_max = config["pos_embed_max_size"] * config["patch_size"] * VAE_SCALE_FACTOR
    if height > latent_max or width > latent_max:
        raise ConfigError(f"resolution {height}x{width} exceeds the model's positional table ({latent_max} px)")
    return (height // step) * (width // step)


def example_inputs(config, height: int, width: int, batch: int, context_tokens: int, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded transformer inputs with the shapes a StableDiffusion3Pipeline feeds."""
    num_image_tokens(config, height, width)
    gen = torch.Generator().manual_seed(seed)
    lat_h, lat_w = height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR
    return {
        "hidden_states": torch.randn(batch, config["in_channels"], lat_h, lat_w, generator=gen).to(dtype),
        "encoder_hidden_states": torch.randn(batch, context_tokens, config["joint_attention_dim"], generator=gen).to(dtype),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=gen).to(dtype),
        "timestep": torch.full((batch,), 500.0),
    }

"""Load the backbone: a built-in preset (random weights from a seed, nothing downloaded) or a local diffusers folder."""

from __future__ import annotations

import dataclasses
import inspect
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from shiva_export.errors import ConfigError, ShivaError
from shiva_export.io import sha256_file, sha256_json
from shiva_export.schema import Int, ListOf, Nullable, Obj, Str, validate

SUPPORTED_CLASSES = ("SD3Transformer2DModel",)
VAE_SCALE_FACTOR = 8  # SD3/SD3.5 VAEs downsample by 8: image pixels -> latent pixels (a folder's VAE may differ)
SCHEDULER_CLASSES = ("FlowMatchEulerDiscreteScheduler",)   # what StableDiffusion3Pipeline accepts
CLIP_TOKENS = 77           # CLIP-L/G prompt tokens in SD3's prompt embeddings (the tokenizers' model_max_length)
T5_TOKENS = 256            # StableDiffusion3Pipeline's default max_sequence_length


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
class PipelineFacts:
    """What the pipeline around the transformer decides, and every stage must agree on: the scheduler (its class
    and config, so freeze and check step through the timesteps the pipeline will), the VAE's scale factor (image
    pixels per latent pixel) and latent channels, and the text tokens the pipeline feeds. Read from a pipeline
    folder, declared by a preset; `origin` says which, for messages."""

    scheduler: dict
    vae_scale_factor: int
    latent_channels: int
    context_tokens: int
    origin: str

    @property
    def shift(self) -> float:
        return float(self.scheduler.get("shift", 1.0))

    def effective_shift(self, image_seq_len: int) -> float:
        """The shift s of sigma = s u / (1 + (s - 1) u) the sampler applies at this image length: the config's, or
        with dynamic shifting exp(mu), mu from the length as the pipeline computes it (exponential time shift)."""
        import math

        from shiva_export.passes.freeze import dynamic_shift_mu

        if not self.scheduler.get("use_dynamic_shifting"):
            return self.shift
        return math.exp(dynamic_shift_mu(self.scheduler, image_seq_len))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a backbone came from, and a hash that changes when its weights or config do."""

    name: str
    kind: str  # "preset" | "folder"
    model_hash: str
    defaults: dict
    facts: PipelineFacts | None = None


MAX_JSON_BYTES = 16 << 20  # a config.json beyond this is not a config


def read_json(path: Path, error: type[ShivaError] = ConfigError) -> Any:
    """A JSON file we do not control, parsed; `error` (one line naming the file) if it cannot be."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size} bytes; expected a JSON file of at most {MAX_JSON_BYTES} bytes")
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None


_SIZE = Int(minimum=1, maximum=65536)
# SD3Transformer2DModel's config keys and the diffusers bookkeeping it reads (diffusers fills absent sizes with its
# defaults and ignores other keys)
MODEL_CONFIG = Obj(required={"_class_name": Str(choices=SUPPORTED_CLASSES)}, optional={
    "_diffusers_version": Str(), "_name_or_path": Str(), "_use_default_values": ListOf(Str()),
    "sample_size": _SIZE, "patch_size": Int(minimum=1, maximum=64), "in_channels": _SIZE,
    "num_layers": Int(minimum=1, maximum=1024), "attention_head_dim": _SIZE,
    "num_attention_heads": Int(minimum=1, maximum=1024), "joint_attention_dim": _SIZE,
    "caption_projection_dim": _SIZE, "pooled_projection_dim": _SIZE, "out_channels": Nullable(_SIZE),
    "pos_embed_max_size": _SIZE, "dual_attention_layers": ListOf(Int(minimum=0, maximum=1023), max_length=1024),
    "qk_norm": Nullable(Str(choices=("layer_norm", "fp32_layer_norm", "rms_norm", "rms_norm_across_heads"))),
}, extra=True)


def read_model_config(path: Path) -> dict:
    """A diffusers transformer config.json, checked before diffusers builds anything from it."""
    config = read_json(path)
    if isinstance(config, dict) and config.get("_class_name") not in SUPPORTED_CLASSES:
        raise ConfigError(f"{path}: model class {config.get('_class_name')!r} is not supported; expected one of "
                          f"{SUPPORTED_CLASSES}")
    validate(config, MODEL_CONFIG, str(path), error=ConfigError)
    from diffusers import SD3Transformer2DModel

    defaults = {name: param.default for name, param in
                inspect.signature(SD3Transformer2DModel.__init__).parameters.items() if name != "self"}
    cfg = {**defaults, **{key: value for key, value in config.items() if key in defaults}}
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    grid = cfg["sample_size"] // cfg["patch_size"]
    problems = [
        ("sample_size", cfg["sample_size"] % cfg["patch_size"] == 0,
         f"a multiple of patch_size {cfg['patch_size']}, got {cfg['sample_size']}"),
        ("pos_embed_max_size", grid <= cfg["pos_embed_max_size"],
         f">= sample_size / patch_size = {grid} (the default resolution must fit the positional table), "
         f"got {cfg['pos_embed_max_size']}"),
        ("num_attention_heads", inner <= 65536 and inner % 4 == 0,
         f"num_attention_heads x attention_head_dim a multiple of 4 and <= 65536 (the sin-cos position "
         f"embedding's width), got {cfg['num_attention_heads']} x {cfg['attention_head_dim']} = {inner}"),
        ("caption_projection_dim", cfg["caption_projection_dim"] == inner,
         f"num_attention_heads x attention_head_dim = {inner} (the text stream runs at the block width), "
         f"got {cfg['caption_projection_dim']}"),
        ("dual_attention_layers", all(layer < cfg["num_layers"] for layer in cfg["dual_attention_layers"]),
         f"layer indices below num_layers {cfg['num_layers']}, got {list(cfg['dual_attention_layers'])}"),
    ]
    for name, ok, expected in problems:
        if not ok:
            raise ConfigError(f"{path}: field {name}: expected {expected}")
    return config


def scheduler_config(config: dict, where: str) -> dict:
    """A scheduler config (scheduler_config.json, or a preset's) completed with the class's defaults, as JSON.

    Only the flow-matching Euler scheduler that StableDiffusion3Pipeline runs is accepted: freeze must step through
    exactly the timesteps the pipeline will."""
    if not isinstance(config, dict) or config.get("_class_name") not in SCHEDULER_CLASSES:
        name = config.get("_class_name") if isinstance(config, dict) else config
        raise ConfigError(f"{where}: scheduler class {name!r} is not supported; expected one of {SCHEDULER_CLASSES}")
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: the scheduler config does not load ({err})") from None
    full = {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}
    shift = full.get("shift")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ConfigError(f"{where}: field shift: expected a number > 0, got {shift!r}")
    return {"_class_name": SCHEDULER_CLASSES[0], **json.loads(json.dumps(full))}


def preset_facts(name: str, preset: dict) -> PipelineFacts:
    """The pipeline facts a preset declares (`pipeline` in its JSON)."""
    declared = preset.get("pipeline") or {}
    return PipelineFacts(scheduler=scheduler_config(declared.get("scheduler"), f"preset {name}"),
                         vae_scale_factor=int(declared["vae_scale_factor"]),
                         latent_channels=int(declared["latent_channels"]),
                         context_tokens=int(declared["context_tokens"]), origin=f"preset {name}")


def folder_facts(model_dir: Path, transformer_config) -> PipelineFacts:
    """Pipeline facts of a model folder: from the pipeline folder around `model_dir` (model_index.json beside
    transformer/), as StableDiffusion3Pipeline computes them; SD3's defaults for a transformer folder alone."""
    root = model_dir.parent if (model_dir.parent / "model_index.json").is_file() else model_dir
    if not (root / "model_index.json").is_file():
        return PipelineFacts(scheduler=scheduler_config({"_class_name": SCHEDULER_CLASSES[0], "shift": 3.0},
                                                        str(model_dir)),
                             vae_scale_factor=VAE_SCALE_FACTOR, latent_channels=int(transformer_config.in_channels),
                             context_tokens=CLIP_TOKENS + T5_TOKENS,
                             origin=f"SD3 defaults ({model_dir} is a transformer folder without its pipeline)")
    index = read_json(root / "model_index.json")
    if not isinstance(index, dict):
        raise ConfigError(f"{root / 'model_index.json'}: expected a JSON object")

    def present(component: str) -> bool:
        entry = index.get(component)
        return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and (root / component).is_dir()

    if not present("scheduler"):
        raise ConfigError(f"{root}: the pipeline folder has no scheduler (expected scheduler/scheduler_config.json)")
    scheduler = scheduler_config(read_json(root / "scheduler" / "scheduler_config.json"),
                                 str(root / "scheduler" / "scheduler_config.json"))
    factor, channels = VAE_SCALE_FACTOR, int(transformer_config.in_channels)
    if present("vae"):
        vae_path = root / "vae" / "config.json"
        vae = read_json(vae_path)
        blocks = vae.get("block_out_channels") if isinstance(vae, dict) else None
        if not isinstance(blocks, list) or not blocks:
            raise ConfigError(f"{vae_path}: field block_out_channels: expected a non-empty list, got {blocks!r}")
        factor = 2 ** (len(blocks) - 1)  # as StableDiffusion3Pipeline computes vae_scale_factor
        channels = vae.get("latent_channels", channels)
        if channels != transformer_config.in_channels:
            raise ConfigError(f"{vae_path}: field latent_channels: expected the transformer's in_channels "
                              f"{transformer_config.in_channels}, got {channels!r}")
    clip = CLIP_TOKENS
    tokenizer_config = root / "tokenizer" / "tokenizer_config.json"
    if present("tokenizer") and tokenizer_config.is_file():
        clip = read_json(tokenizer_config)
        clip = clip.get("model_max_length", CLIP_TOKENS) if isinstance(clip, dict) else None
        if isinstance(clip, bool) or not isinstance(clip, int) or not 1 <= clip <= 4096:
            raise ConfigError(f"{tokenizer_config}: field model_max_length: expected an integer in 1..4096 (CLIP's "
                              f"77), got {clip!r}")
    # without T5, StableDiffusion3Pipeline pads with CLIP-length zeros (its tokenizer_max_length)
    text = clip + (T5_TOKENS if present("text_encoder_3") else clip)
    return PipelineFacts(scheduler=scheduler, vae_scale_factor=factor, latent_channels=int(channels),
                         context_tokens=text, origin=f"pipeline folder {root}")


def resolve_model_dir(path: Path) -> Path:
    """A pipeline folder (with transformer/) or the transformer folder itself; its config.json is checked."""
    if not path.is_dir():
        raise ConfigError(f"model {str(path)!r} is neither a preset ({', '.join(preset_names())}) nor a folder")
    for candidate in (path / "transformer", path):
        config = candidate / "config.json"
        if config.is_file():
            read_model_config(config)
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
        facts = preset_facts(name_or_dir, preset)
        # the hash is the weights' identity (seed + architecture): pipeline facts are not weights, and a router
        # checkpoint trained before a preset declared them stays valid
        identity = sha256_json({key: value for key, value in preset.items() if key != "pipeline"})
        source = ModelSource(name_or_dir, "preset", identity, preset["defaults"], facts)
    else:
        model_dir = resolve_model_dir(path)
        model = load_weights(model_dir, dtype).to(device)
        facts = folder_facts(model_dir, model.config)
        size = model.config.sample_size * facts.vae_scale_factor
        defaults = {"height": size, "width": size, "context_tokens": facts.context_tokens, "batch": 2}
        source = ModelSource(str(model_dir), "folder", folder_hash(model_dir), defaults, facts)
    if type(model).__name__ not in SUPPORTED_CLASSES:
        raise ConfigError(f"model class {type(model).__name__} is not supported; expected {SUPPORTED_CLASSES}")
    if model.dtype != dtype:
        model = model.to(dtype)
    return model.eval().requires_grad_(False), source


def load_weights(model_dir: Path, dtype: torch.dtype):
    """SD3Transformer2DModel.from_pretrained (safetensors only: never unpickle), refusing weights that do not fill
    the model config.json describes (diffusers would initialise the missing tensors randomly)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()      # what it would warn about is refused below, in one line
    try:
        model, info = SD3Transformer2DModel.from_pretrained(model_dir, torch_dtype=dtype, use_safetensors=True,
                                                            output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError) as err:  # missing, corrupt or mismatched weights file
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(f"{model_dir}: the weights do not load ({reason}); expected the "
                          "diffusion_pytorch_model*.safetensors that were saved with its config.json") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            raise ConfigError(f"{model_dir}: the weights do not fit its config.json: {len(info[kind])} "
                              f"{kind.replace('_', ' ')} (e.g. {info[kind][:3]})")
    return model


def num_image_tokens(config, height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> int:
    """Image tokens for an image of height x width pixels; refuses sizes the patching cannot tile."""
    step = vae_scale_factor * config["patch_size"]
    if height <= 0 or width <= 0 or height % step or width % step:
        raise ConfigError(
            f"resolution {height}x{width} is not divisible by {step} (VAE factor {vae_scale_factor} x patch size "
            f"{config['patch_size']}); choose e.g. {max(step, height // step * step)}x{max(step, width // step * step)}"
        )
    latent_max = config["pos_embed_max_size"] * config["patch_size"] * vae_scale_factor
    if height > latent_max or width > latent_max:
        raise ConfigError(f"resolution {height}x{width} exceeds the model's positional table ({latent_max} px)")
    return (height // step) * (width // step)


def example_inputs(config, height: int, width: int, batch: int, context_tokens: int, seed: int = 0,
                   dtype: torch.dtype = torch.float32, vae_scale_factor: int = VAE_SCALE_FACTOR
                   ) -> dict[str, torch.Tensor]:
    """Seeded transformer inputs with the shapes a StableDiffusion3Pipeline feeds."""
    num_image_tokens(config, height, width, vae_scale_factor)
    gen = torch.Generator().manual_seed(seed)
    lat_h, lat_w = height // vae_scale_factor, width // vae_scale_factor
    return {
        "hidden_states": torch.randn(batch, config["in_channels"], lat_h, lat_w, generator=gen).to(dtype),
        "encoder_hidden_states": torch.randn(batch, context_tokens, config["joint_attention_dim"], generator=gen).to(dtype),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=gen).to(dtype),
        "timestep": torch.full((batch,), 500.0),
    }


def pipeline_root(path: str | Path) -> Path:
    """The diffusers pipeline folder at `path` (or around its transformer/ subfolder); one line if there is none."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / "model_index.json").is_file():
            return candidate
    if path.exists():
        raise ConfigError(f"{path}: not a diffusers pipeline folder (no model_index.json); expected a folder saved "
                          "with StableDiffusion3Pipeline.save_pretrained, with scheduler/, vae/ and the text encoders")
    raise ConfigError(f"{path}: no such pipeline folder")


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """StableDiffusion3Pipeline.from_pretrained(folder) with safetensors only (never unpickled), on `device`;
    the transformer is checked as `--model` checks it."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    root = pipeline_root(path)
    resolve_model_dir(root)  # the transformer's config.json, validated before anything is built
    index = read_json(root / "model_index.json")
    if not isinstance(index, dict) or index.get("_class_name") != "StableDiffusion3Pipeline":
        found = index.get("_class_name") if isinstance(index, dict) else index
        raise ConfigError(f"{root / 'model_index.json'}: field _class_name: expected 'StableDiffusion3Pipeline', "
                          f"got {found!r}")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(root, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError, ImportError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(f"{root}: the pipeline does not load ({reason})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)

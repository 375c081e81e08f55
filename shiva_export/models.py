"""Load the backbone: a built-in preset (random weights from a seed, nothing downloaded) or a local diffusers folder."""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from shiva_export.errors import ConfigError, ShivaError
from shiva_export.io import sha256_file, sha256_json

VAE_SCALE_FACTOR = 8  # the supported families' VAEs downsample by 8 (a folder's VAE may differ)
SCHEDULER_CLASSES = ("FlowMatchEulerDiscreteScheduler",)   # the flow-matching families' (an adapter's default)
# every scheduler class a stage can step through; only flow-matching ones have a `shift`. The multistep DPM-Solver
# must be deterministic (no SDE variants: freeze, check and the pipeline must visit the same latents).
KNOWN_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler")
SHIFTED_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
SIGMA_SCHEDULES = ("linspace",)  # "_sigmas" in a scheduler config: the pipeline passes its own sigma grid


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


def read_model_config(path: Path) -> dict:
    """A diffusers transformer config.json, checked by its family's adapter before diffusers builds anything."""
    from shiva_export import backbones

    config = read_json(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: content: expected an object (a diffusers transformer config), got "
                          f"{type(config).__name__}")
    return backbones.by_class(config.get("_class_name"), str(path)).validate_config(config, str(path))


def scheduler_config(config: dict, where: str, classes: tuple[str, ...] = SCHEDULER_CLASSES) -> dict:
    """A scheduler config (scheduler_config.json, or a preset's) completed with the class's defaults, as JSON.

    Only the scheduler classes the family's pipeline runs (`classes`, the adapter's `scheduler_classes`) are
    accepted: freeze must step through exactly the timesteps the pipeline will. A scheduler without a shift
    (DPM-Solver) records `shift` 1.0 (no shift)."""
    if not isinstance(config, dict) or config.get("_class_name") not in classes:
        name = config.get("_class_name") if isinstance(config, dict) else config
        raise ConfigError(f"{where}: scheduler class {name!r} is not supported; expected one of {classes}")
    import diffusers

    name = config["_class_name"]
    try:
        scheduler = getattr(diffusers, name).from_config(config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: the scheduler config does not load ({err})") from None
    full = {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}
    # JSON has no infinities: a non-finite value is left out when it is the class's default (DPM-Solver's
    # lambda_min_clipped = -inf), refused otherwise
    defaults = scheduler_defaults(name)
    for key, value in list(full.items()):
        if isinstance(value, float) and not math.isfinite(value):
            if defaults.get(key) != value:
                raise ConfigError(f"{where}: field {key}: expected a finite number, got {value!r}")
            del full[key]
    if name not in SHIFTED_SCHEDULERS:
        if str(full.get("algorithm_type", "")).startswith("sde"):
            raise ConfigError(f"{where}: field algorithm_type: expected a deterministic solver (dpmsolver, "
                              f"dpmsolver++), got {full['algorithm_type']!r}")
        if config.get("_sigmas") is not None:
            raise ConfigError(f"{where}: field _sigmas: applies to flow-matching schedulers only")
        return {"_class_name": name, **json.loads(json.dumps(full)), "shift": 1.0}
    shift = full.get("shift")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ConfigError(f"{where}: field shift: expected a number > 0, got {shift!r}")
    sigmas = config.get("_sigmas")
    if sigmas is not None and sigmas not in SIGMA_SCHEDULES:
        raise ConfigError(f"{where}: field _sigmas: expected one of {list(SIGMA_SCHEDULES)}, got {sigmas!r}")
    return {"_class_name": name, **json.loads(json.dumps(full)), **({"_sigmas": sigmas} if sigmas else {})}


def scheduler_defaults(name: str) -> dict:
    import inspect

    import diffusers

    return {key: param.default for key, param in inspect.signature(getattr(diffusers, name).__init__).parameters.items()
            if key != "self"}


def scheduler_has_shift(scheduler: dict | None) -> bool:
    """Whether a scheduler config's class is shifted (flow matching); None stands for what `passes.freeze.
    make_scheduler` makes without a config: diffusers' FlowMatchEulerDiscreteScheduler at the recorded shift."""
    return scheduler is None or scheduler.get("_class_name") in SHIFTED_SCHEDULERS


def preset_facts(name: str, preset: dict) -> PipelineFacts:
    """The pipeline facts a preset declares (`pipeline` in its JSON)."""
    declared = preset.get("pipeline") or {}
    from shiva_export import backbones

    classes = backbones.by_class(preset.get("class_name"), f"preset {name}").scheduler_classes
    return PipelineFacts(scheduler=scheduler_config(declared.get("scheduler"), f"preset {name}", classes),
                         vae_scale_factor=int(declared["vae_scale_factor"]),
                         latent_channels=int(declared["latent_channels"]),
                         context_tokens=int(declared["context_tokens"]), origin=f"preset {name}")


def folder_facts(model_dir: Path, transformer_config) -> PipelineFacts:
    """Pipeline facts of a model folder, from the pipeline folder around `model_dir` (model_index.json beside
    transformer/) as its pipeline computes them; the family's defaults for a transformer folder alone."""
    from shiva_export import backbones

    return backbones.for_config(transformer_config).folder_facts(model_dir, transformer_config)


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
    """Return (the diffusers transformer in eval mode, ModelSource); its family's adapter decides the class.

    Presets are initialised directly on `device` (a 2.5B-parameter preset initialises in seconds on a GPU);
    the weights depend on the seed and the device's random generator.
    """
    from shiva_export import backbones

    path = Path(name_or_dir)
    if name_or_dir in preset_names() or not path.exists():
        preset = read_preset(name_or_dir)
        adapter = backbones.by_class(preset.get("class_name"), f"preset {name_or_dir}")
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(preset["seed"])
            model = adapter.model_type()(**preset["config"])
        facts = preset_facts(name_or_dir, preset)
        # the hash is the weights' identity (seed + architecture): pipeline facts are not weights, and a router
        # checkpoint trained before a preset declared them stays valid
        identity = sha256_json({key: value for key, value in preset.items() if key != "pipeline"})
        source = ModelSource(name_or_dir, "preset", identity, preset["defaults"], facts)
    else:
        model_dir = resolve_model_dir(path)
        model = load_weights(model_dir, dtype).to(device)
        adapter = backbones.for_model(model)
        facts = folder_facts(model_dir, model.config)
        size = adapter.default_size(model.config, facts.vae_scale_factor)
        defaults = {"height": size, "width": size, "context_tokens": facts.context_tokens,
                    "batch": adapter.default_batch}
        source = ModelSource(str(model_dir), "folder", folder_hash(model_dir), defaults, facts)
    if model.dtype != dtype:
        model = model.to(dtype)
    return model.eval().requires_grad_(False), source


def load_weights(model_dir: Path, dtype: torch.dtype):
    """`from_pretrained` of the folder's transformer class (safetensors only: never unpickle), refusing weights that
    do not fill the model config.json describes (diffusers would initialise the missing tensors randomly)."""
    from diffusers.utils import logging as diffusers_logging

    from shiva_export import backbones

    model_type = backbones.by_class(read_json(model_dir / "config.json").get("_class_name")).model_type()
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()      # what it would warn about is refused below, in one line
    try:
        model, info = model_type.from_pretrained(model_dir, torch_dtype=dtype, use_safetensors=True,
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
    """Image tokens for an image of height x width pixels; refuses sizes the model cannot tile."""
    from shiva_export import backbones

    return backbones.for_config(config).num_image_tokens(config, height, width, vae_scale_factor)


def example_inputs(config, height: int, width: int, batch: int, context_tokens: int, seed: int = 0,
                   dtype: torch.dtype = torch.float32, vae_scale_factor: int = VAE_SCALE_FACTOR
                   ) -> dict[str, torch.Tensor]:
    """Seeded transformer inputs with the shapes the family's pipeline feeds (graph inputs, then the constants)."""
    from shiva_export import backbones

    adapter = backbones.for_config(config)
    adapter.num_image_tokens(config, height, width, vae_scale_factor)
    specs = adapter.input_specs(config, height, width, batch, context_tokens, vae_scale_factor, "fp32")
    gen = torch.Generator().manual_seed(seed)
    feed = {}
    for name, spec in specs.items():
        if spec.role == "timestep":
            feed[name] = torch.full(spec.shape, adapter.transformer_timestep(500.0))
        elif name == "guidance" or spec.role == "mask":
            feed[name] = adapter.conditioning({name: spec}, batch, 1, gen)[name]
        else:
            feed[name] = torch.randn(spec.shape, generator=gen).to(dtype)
    return {**feed, **adapter.constants(config, height, width, context_tokens, vae_scale_factor)}


def pipeline_root(path: str | Path) -> Path:
    """The diffusers pipeline folder at `path` (or around its transformer/ subfolder); one line if there is none."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / "model_index.json").is_file():
            return candidate
    if path.exists():
        raise ConfigError(f"{path}: not a diffusers pipeline folder (no model_index.json); expected a folder saved "
                          "with the pipeline's save_pretrained, with scheduler/, vae/ and the text encoders")
    raise ConfigError(f"{path}: no such pipeline folder")


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The folder's diffusers pipeline (`from_pretrained`, safetensors only: never unpickled) on `device`; the
    transformer is checked as `--model` checks it, and its family must be the pipeline's."""
    from diffusers.utils import logging as diffusers_logging

    from shiva_export import backbones

    root = pipeline_root(path)
    model_dir = resolve_model_dir(root)  # the transformer's config.json, validated before anything is built
    index = read_json(root / "model_index.json")
    found = index.get("_class_name") if isinstance(index, dict) else index
    adapter = backbones.for_pipeline_class(found, str(root / "model_index.json"))
    transformer_class = read_json(model_dir / "config.json").get("_class_name")
    if transformer_class != adapter.model_class:
        raise ConfigError(f"{model_dir / 'config.json'}: field _class_name: expected {adapter.model_class!r} (the "
                          f"transformer of a {adapter.pipeline_class}), got {transformer_class!r}")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe = adapter.pipeline_type().from_pretrained(root, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError, ImportError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(f"{root}: the pipeline does not load ({reason})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)

"""`data`: training data for `train --data` from a pipeline folder, in the format of docs/training-data.md.

Prompts (one per line) are encoded by the pipeline's own text encoders (`encode_prompt`, as the pipeline feeds the
transformer), the empty prompt too (`null.safetensors`, for CFG dropout). Latents come from the given images through
the pipeline's VAE, normalised as the pipeline normalises them (`(z - shift_factor) * scaling_factor`), or, with no
images, from the dense pipeline itself (teacher samples: its final latents, `output_type="latent"`, which are
already in that space). Every sample's randomness is keyed by (seed, sample index), so a sample does not depend on
the shard size or on where a run was interrupted. Shards are written atomically one by one and recorded in
`.shiva-data.json` with the hash of the inputs; a rerun skips finished shards, `index.json` is written last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch

from shiva_export.errors import ConfigError
from shiva_export.io import atomic_output, sha256_file, sha256_json, write_json
from shiva_export.training_data import (CONTEXT, DATA_FORMAT, DATA_VERSION, INDEX_FILE, LATENTS, MASK, NULL_FILE,
                                        POOLED)

logger = logging.getLogger(__name__)

STATE_FILE = ".shiva-data.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PROMPTS = 1_000_000


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What decides the samples (P2): a change means another data set, not a resume."""

    shard_size: int = 256
    steps: int = 28                  # teacher samples: sampler steps
    # teacher samples: the pipeline's guidance_scale (a CFG scale with the empty prompt as negative, or a distilled
    # model's guidance input); None: the family's default (the adapter's default_guidance for its default batch)
    guidance_scale: float | None = None
    height: int | None = None        # image pixels; None: the pipeline's default (sample_size x VAE factor)
    width: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("shard_size", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.seed < 0:
            raise ConfigError(f"--seed {self.seed} must be >= 0")
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)} must be >= 1")


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped; one line if there are none or the file is unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the prompts ({err}); expected a UTF-8 text file, one prompt per "
                          "line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{path}: no prompts; expected one prompt per line")
    if len(prompts) > MAX_PROMPTS:
        raise ConfigError(f"{path}: {len(prompts)} prompts; expected at most {MAX_PROMPTS}")
    return prompts


def list_images(folder: str | Path, count: int) -> list[Path]:
    """The image files of `folder` sorted by name: image i pairs with prompt i, so there must be as many."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: not a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(images) != count:
        raise ConfigError(f"--images {folder}: {len(images)} image files ({', '.join(IMAGE_SUFFIXES)}) for {count} "
                          "prompts; expected one image per prompt (image i, sorted by name, pairs with line i)")
    return images


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of sample `index`: keyed by (seed, index), not by the order samples are made in."""
    digest = hashlib.sha256(f"shiva-data:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1]: resized to cover the size, then centre-cropped (PIL's ImageOps.fit)."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            fitted = ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.BICUBIC)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable image ({err})") from None
    array = np.asarray(fitted, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def _pipeline_hash(root: Path) -> str:
    """Identity of a pipeline folder: its configs' content and its weight files' names and sizes (hashing
    gigabytes of weights on every run would cost minutes)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            relative = path.relative_to(root).as_posix()
            entries[relative] = sha256_file(path) if path.suffix in (".json", ".txt") else path.stat().st_size
    return sha256_json(entries)


def make_data(model: str | Path, prompts_file: str | Path, out: str | Path, images: str | Path | None = None,
              config: DataConfig = DataConfig(), device: str | None = None, force: bool = False,
              progress: bool = True) -> dict:
    """Write (or finish) the training-data folder `out`; returns its index.json content."""
    import json

    from tqdm import tqdm

    from shiva_export.engines.backends.base import compute_device
    from shiva_export.models import load_pipeline, pipeline_root

    root, out = pipeline_root(model), Path(out)
    prompts = read_prompts(prompts_file)
    image_files = list_images(images, len(prompts)) if images is not None else None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    device = compute_device(device)
    inputs = sha256_json({"pipeline": _pipeline_hash(root), "prompts": prompts, "config": dataclasses.asdict(config),
                          "images": None if image_files is None else [sha256_file(p) for p in image_files],
                          "format": [DATA_FORMAT, DATA_VERSION]})
    state_path = out / STATE_FILE
    state = {"inputs": inputs, "shards": {}}
    stored = {}
    if state_path.is_file():
        try:
            stored = json.loads(state_path.read_text())
        except (OSError, ValueError):
            stored = {}
    if stored.get("inputs") == inputs:
        state["shards"] = dict(stored.get("shards") or {})   # resume: finished shards are kept
    elif out.is_dir() and any(out.iterdir()):
        if not force:
            made_here = "made from other inputs (pipeline, prompts, images or options)" if stored else \
                "not made by `data`"
            raise ConfigError(f"--out {out} holds files {made_here}; pass --force to replace them, or choose "
                              "another --out")
        for old in [*out.glob("shard-*.safetensors"), out / INDEX_FILE, out / NULL_FILE, state_path]:
            old.unlink(missing_ok=True)

    from shiva_export import backbones

    pipe = load_pipeline(root, device=device)
    adapter = backbones.for_model(pipe.transformer)
    vae = pipe.vae
    factor = pipe.vae_scale_factor
    size = adapter.default_size(pipe.transformer.config, factor)
    height, width = config.height or size, config.width or size
    adapter.num_image_tokens(pipe.transformer.config, height, width, factor)   # one line if the size cannot tile
    guidance = adapter.default_guidance(adapter.default_batch) if config.guidance_scale is None \
        else config.guidance_scale
    out.mkdir(parents=True, exist_ok=True)

    @torch.inference_mode()
    def encode(prompt: str) -> dict[str, torch.Tensor]:
        """The prompt's text tensors (one sample), by name: the context and, as the family's pipeline makes them,
        pooled text and / or the caption mask (stored as fp32 0 / 1)."""
        encoded = adapter.encode_prompts(pipe, [prompt], device)
        unknown = sorted(set(encoded) - {CONTEXT, POOLED, MASK})
        if CONTEXT not in encoded or unknown:
            raise ConfigError(f"{root}: training data holds {CONTEXT}, {POOLED} and / or {MASK}; "
                              f"{adapter.pipeline_class}'s prompts give {sorted(encoded)}, not supported yet")
        return {name: value[0].float().cpu() for name, value in encoded.items()}

    null = encode("")
    if not (out / NULL_FILE).is_file() or NULL_FILE not in state["shards"]:
        _save(out / NULL_FILE, null)
        state["shards"][NULL_FILE] = sha256_file(out / NULL_FILE)
        write_json(state_path, state)

    @torch.inference_mode()
    def latents_of(index: int, text: dict[str, torch.Tensor]) -> torch.Tensor:
        generator = sample_generator(config.seed, index)
        if image_files is not None:
            pixels = _load_image(image_files[index], height, width).to(device, vae.dtype)
            posterior = vae.encode(pixels).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
            latent = posterior.mean + posterior.std * noise
            shift = getattr(vae.config, "shift_factor", None) or 0.0   # a VAE without one (SDXL's) shifts by 0
            return ((latent - shift) * vae.config.scaling_factor)[0].float().cpu()
        conditioning = {name: value[None].to(device) for name, value in text.items()}
        unconditional = {name: value[None].to(device) for name, value in null.items()}
        return adapter.teacher_latents(pipe, conditioning, unconditional, guidance_scale=guidance,
                                       steps=config.steps, height=height, width=width,
                                       generator=generator)[0].float().cpu()

    shards, count = [], len(prompts)
    done = sum(min(config.shard_size, count - start) for number, start in enumerate(range(0, count, config.shard_size))
               if _finished(out, state, number))
    with tqdm(total=count, initial=done, desc="data", unit="sample", disable=None if progress else True) as bar:
        for number, start in enumerate(range(0, count, config.shard_size)):
            name = _shard_name(number)
            end = min(start + config.shard_size, count)
            shards.append({"file": name, "count": end - start})
            if _finished(out, state, number):
                continue
            rows: dict[str, list[torch.Tensor]] = {LATENTS: [], **{key: [] for key in null}}
            for index in range(start, end):
                text = encode(prompts[index])
                rows[LATENTS].append(latents_of(index, text))
                for key, value in text.items():
                    rows[key].append(value)
                bar.update()
            _save(out / name, {key: torch.stack(value) for key, value in rows.items()})
            state["shards"][name] = sha256_file(out / name)
            write_json(state_path, state)  # a killed run resumes after this shard
    from safetensors import safe_open

    with safe_open(str(out / shards[0]["file"]), framework="pt") as handle:
        latent_shape = handle.get_slice(LATENTS).get_shape()
        rows_shape = handle.get_slice(CONTEXT).get_shape()
    index = {"format": DATA_FORMAT, "version": DATA_VERSION, "latent_channels": latent_shape[1],
             "latent_height": latent_shape[2], "latent_width": latent_shape[3], "context_tokens": rows_shape[1],
             "context_dim": rows_shape[2], **({"pooled_dim": int(null[POOLED].shape[0])} if POOLED in null else {}),
             **({"caption_mask": True} if MASK in null else {}), "shards": shards,
             "source": {"pipeline": str(root), "prompts": len(prompts),
                        "latents": "images through the VAE" if image_files is not None else "teacher samples",
                        "height": height, "width": width, "seed": config.seed,
                        **({} if image_files is not None else {"steps": config.steps,
                                                                "guidance_scale": guidance})}}
    write_json(out / INDEX_FILE, index)
    logger.info("data: %d samples in %d shard(s) at %s (%s)", count, len(shards), out, index["source"]["latents"])
    return index


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _finished(out: Path, state: dict, number: int) -> bool:
    name = _shard_name(number)
    path = out / name
    return name in state["shards"] and path.is_file() and sha256_file(path) == state["shards"][name]


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp))


"""Training inputs: precomputed latents + text embeddings on disk, or data-free random inputs for distillation.

On-disk format (docs/training-data.md): a folder with ``index.json`` and safetensors shards. Every sample is
addressed by a global index, and every draw is keyed by a counter (seed, step, micro-batch), never by a running
random stream, so a run gives the same batches whatever the number of processes or accumulation steps, and after
a resume.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from shiva_export.errors import ArtifactError, ConfigError
from shiva_export.io import atomic_directory, write_json

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
NULL_FILE = "null.safetensors"
DATA_FORMAT = "shiva-latents"
DATA_VERSION = 1
LATENTS, CONTEXT, POOLED, MASK = "latents", "encoder_hidden_states", "pooled_projections", "encoder_attention_mask"
VAE_SCALE_FACTOR = 8


@dataclasses.dataclass(frozen=True)
class Batch:
    """Clean latents x0 in the transformer's layout (`LatentLayout.to_model`: image-shaped [B,C,H,W], or packed
    tokens [B,N,C p^2]), text context [B,M,Dj], and, as the model takes them, pooled text [B,Dp] and the caption
    mask [B,M] (1 real token, 0 padding) for one micro-batch."""

    latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    pooled_projections: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None

    def text(self) -> dict[str, torch.Tensor]:
        """The text inputs the model takes, by name."""
        out = {CONTEXT: self.encoder_hidden_states, POOLED: self.pooled_projections, MASK: self.encoder_attention_mask}
        return {name: value for name, value in out.items() if value is not None}


@dataclasses.dataclass(frozen=True)
class LatentLayout:
    """What a model's training inputs look like, read from its backbone adapter's `input_specs`.

    Latents are image-shaped VAE latents [C, h, w] on disk and in the data-free source, whatever the family; the
    transformer takes them as they are (patchified inside the model: pack 1) or packed into tokens of
    pack x pack latent pixels, [h/p * w/p, C p^2], as its pipeline packs them (pack p, read from the adapter's
    hidden_states spec).
    """

    latent_channels: int    # C of the image-shaped latents (the VAE's latent channels)
    context_dim: int        # encoder_hidden_states width
    pooled_dim: int | None  # pooled_projections width; None: the model takes no pooled text vector
    pack: int               # 1: the transformer takes [B, C, h, w]; p: [B, h/p * w/p, C p^2]
    masked: bool = False    # the model takes a caption mask (encoder_attention_mask [B, M]) with the context

    @property
    def text_names(self) -> tuple[str, ...]:
        """The text tensors of a sample (on disk and in a Batch)."""
        return (CONTEXT,) + ((POOLED,) if self.pooled_dim is not None else ()) + ((MASK,) if self.masked else ())

    @property
    def channels_name(self) -> str:
        """The model's latent width as its config names it (for messages)."""
        if self.pack == 1:
            return "in_channels"
        return (f"in_channels / {self.pack * self.pack} (the transformer takes {self.pack}x{self.pack} latent patches "
                f"packed into one token)")

    def to_model(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] image-shaped latents -> the transformer's `hidden_states` layout."""
        return pack_latents(latents, self.pack)


def pack_latents(latents: torch.Tensor, pack: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/p)(w/p), C p p], channels-then-patch order (diffusers' _pack_latents); the identity for pack 1."""
    if pack == 1:
        return latents
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // pack, pack, width // pack, pack).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // pack) * (width // pack), channels * pack * pack)


def latent_layout(model_config: Any, vae_scale_factor: int = VAE_SCALE_FACTOR) -> LatentLayout:
    """The LatentLayout of a transformer config (its family's input_specs at the model's default size)."""
    import math

    from shiva_export import backbones

    adapter = backbones.for_config(model_config)
    size = adapter.default_size(model_config, vae_scale_factor)
    specs = adapter.input_specs(model_config, size, size, 1, 1, vae_scale_factor, "fp32")
    latent = tuple(specs["hidden_states"].shape[1:])
    context = int(specs[CONTEXT].shape[-1])
    pooled = int(specs[POOLED].shape[-1]) if POOLED in specs else None
    masks = [name for name, spec in specs.items() if spec.role == "mask"]
    if masks and masks != [MASK]:
        raise ConfigError(f"{adapter.model_class}: caption mask input {masks}; training data names it {MASK!r}")
    if len(latent) == 3:                       # [C, h, w]: image-shaped
        return LatentLayout(int(latent[0]), context, pooled, 1, bool(masks))
    tokens, width = latent                     # [N, C p^2]: packed tokens of p x p latent pixels
    side = size // vae_scale_factor
    pack = math.isqrt(side * side // tokens)
    if pack * pack * tokens != side * side or width % (pack * pack):
        raise ConfigError(f"{adapter.model_class}: hidden_states {list(latent)} at {size}x{size} px is neither "
                          "[C, h, w] nor packed latent patches [h/p * w/p, C p^2]")
    return LatentLayout(int(width) // (pack * pack), context, pooled, pack, bool(masks))


def check_latent_size(model_config: Any, height: int, width: int, where: str,
                      vae_scale_factor: int = VAE_SCALE_FACTOR) -> int:
    """Latent height/width must tile into the model's tokens (and fit its positional table, if it has one);
    returns the number of image tokens."""
    from shiva_export import backbones

    adapter = backbones.for_config(model_config)
    try:
        return adapter.num_image_tokens(model_config, height * vae_scale_factor, width * vae_scale_factor,
                                        vae_scale_factor)
    except ConfigError as err:
        raise ConfigError(f"{where}: latent size {height}x{width} does not fit the model ({err})") from None


class DataFreeSource:
    """Random latents, context and pooled text drawn from the caller's generator: distillation only.

    Latents are drawn image-shaped [C, h, w] (C the VAE's latent channels) and handed over in the transformer's
    layout (packed into tokens where the model takes packed latents, see LatentLayout).

    Latents are N(0, 1) noise times a smooth random envelope exp(contrast * z), z a coarse Gaussian field (one value
    per 8x8 latent pixels, bilinearly upsampled), normalised to unit mean square per sample. Real latents have
    textured and flat regions; i.i.d. noise has none, so on it no token is more important than another and token
    selection could not be learned or judged. contrast = 0 gives plain i.i.d. N(0, 1) latents.
    """

    has_targets = False

    def __init__(self, model_config: Mapping[str, Any], height: int, width: int, context_tokens: int,
                 contrast: float = 1.0, vae_scale_factor: int = VAE_SCALE_FACTOR):
        if height % vae_scale_factor or width % vae_scale_factor:
            raise ConfigError(f"data-free size {height}x{width} px is not a multiple of the VAE factor "
                              f"{vae_scale_factor}")
        if context_tokens < 1:
            raise ConfigError(f"context_tokens={context_tokens} must be >= 1")
        if contrast < 0:
            raise ConfigError(f"data-free contrast {contrast:g} must be >= 0")
        self.layout = latent_layout(model_config, vae_scale_factor)
        self.latent_hw = (height // vae_scale_factor, width // vae_scale_factor)
        check_latent_size(model_config, *self.latent_hw, where="data-free inputs", vae_scale_factor=vae_scale_factor)
        self.context_tokens, self.contrast = context_tokens, contrast

    def envelope(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """[count, 1, H, W] smooth positive amplitude field with unit mean square."""
        height, width = self.latent_hw
        coarse = torch.randn(count, 1, max(1, height // 8), max(1, width // 8), generator=generator)
        field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        envelope = torch.exp(self.contrast * field)
        return envelope / envelope.pow(2).mean(dim=(2, 3), keepdim=True).sqrt()

    def batch(self, positions: Sequence[int], generator: torch.Generator) -> Batch:
        count = len(positions)
        channels, (height, width) = self.layout.latent_channels, self.latent_hw
        latents = torch.randn(count, channels, height, width, generator=generator)
        if self.contrast:  # the envelope lives on the latent image, before any packing into tokens
            latents = latents * self.envelope(count, generator)
        context = torch.randn(count, self.context_tokens, self.layout.context_dim, generator=generator)
        pooled = mask = None
        if self.layout.pooled_dim is not None:
            pooled = torch.randn(count, self.layout.pooled_dim, generator=generator)
        if self.layout.masked:   # captions of 1..M real tokens, the rest padding (embeddings there too, masked out)
            lengths = torch.randint(1, self.context_tokens + 1, (count, 1), generator=generator)
            mask = (torch.arange(self.context_tokens) < lengths).float()
        return Batch(self.layout.to_model(latents), context, pooled, mask)

    def null_embeddings(self) -> dict[str, torch.Tensor] | None:
        return None


class LatentDataset:
    """Precomputed samples in safetensors shards, read lazily one sample at a time (see docs/training-data.md).

    Latents are stored image-shaped [n, C, h, w] for every family (C: the VAE's latent channels, in_channels / p^2
    for a model that takes p x p packed latent patches) and handed over in the transformer's layout (LatentLayout.to_model)."""

    has_targets = True

    def __init__(self, root: str | Path, model_config: Mapping[str, Any], seed: int = 0,
                 vae_scale_factor: int = VAE_SCALE_FACTOR):
        from safetensors import safe_open

        self.root, self.seed = Path(root), seed
        if not self.root.is_dir():
            raise ArtifactError(f"training data folder {str(self.root)!r} does not exist; expected a folder with "
                                f"{INDEX_FILE} and safetensors shards (docs/training-data.md), or omit --data to "
                                "distil data-free")
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise ArtifactError(f"{self.root}: no {INDEX_FILE}; expected the layout of docs/training-data.md")
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ArtifactError(f"{index_path}: unreadable ({err}); expected JSON as in docs/training-data.md") from err
        if index.get("format") != DATA_FORMAT or index.get("version") != DATA_VERSION:
            raise ArtifactError(f"{index_path}: format {index.get('format')!r} version {index.get('version')!r}; "
                                f"expected {DATA_FORMAT!r} version {DATA_VERSION}")
        self.layout = layout = latent_layout(model_config, vae_scale_factor)
        self._check_width(index_path, "latent_channels", index.get("latent_channels"), layout.latent_channels,
                          layout.channels_name)
        self._check_width(index_path, "context_dim", index.get("context_dim"), layout.context_dim,
                          "joint_attention_dim (text embedding width)")
        if layout.pooled_dim is not None:
            self._check_width(index_path, "pooled_dim", index.get("pooled_dim"), layout.pooled_dim,
                              "pooled_projection_dim")
        self.latent_hw = (int(index["latent_height"]), int(index["latent_width"]))
        check_latent_size(model_config, *self.latent_hw, where=str(index_path), vae_scale_factor=vae_scale_factor)
        self.context_tokens = int(index["context_tokens"])
        shapes = {CONTEXT: [self.context_tokens, layout.context_dim], POOLED: [layout.pooled_dim],
                  MASK: [self.context_tokens]}
        self.shape = {LATENTS: [layout.latent_channels, *self.latent_hw],
                      **{name: shapes[name] for name in layout.text_names}}
        self._handles, self._starts, total = [], [], 0
        for entry in index.get("shards") or []:
            path = self.root / entry["file"]
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own error types for missing or corrupt files
                raise ArtifactError(f"{path}: cannot open as safetensors ({err})") from err
            count = int(entry["count"])
            for name, shape in self.shape.items():
                if name not in handle.keys():
                    raise ArtifactError(f"{path}: no tensor {name!r}; expected {list(self.shape)}")
                actual = list(handle.get_slice(name).get_shape())
                if actual != [count, *shape]:
                    raise ConfigError(f"{path}: {name} has shape {actual}; expected {[count, *shape]} "
                                      f"(index.json and the model)")
            self._handles.append(handle)
            self._starts.append(total)
            total += count
        if total == 0:
            raise ArtifactError(f"{index_path}: lists no samples")
        self.count = total
        self._null = self._load_null()
        self._epoch: tuple[int, torch.Tensor] | None = None

    @staticmethod
    def _check_width(where: Path, key: str, value: Any, expected: int, model_name: str) -> None:
        if value is None:
            raise ArtifactError(f"{where}: missing {key!r}; expected the fields of docs/training-data.md")
        if int(value) != expected:
            raise ConfigError(f"{where}: {key} is {value} but the model's {model_name} is {expected}; "
                              "the data was encoded for another model")

    def _load_null(self) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self.root / NULL_FILE
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        names = self.layout.text_names
        if any(tensors.get(name) is None or list(tensors[name].shape) != self.shape[name] for name in names):
            raise ConfigError(f"{path}: expected " + " and ".join(f"{name} {self.shape[name]}" for name in names))
        return {name: tensors[name].float() for name in names}

    def null_embeddings(self) -> dict[str, torch.Tensor] | None:
        """The empty prompt's text tensors (one sample, by name) for caption dropout, or None (then zeros are used,
        with a caption mask keeping the first token)."""
        return self._null

    def _locate(self, index: int) -> tuple[Any, int]:
        shard = bisect.bisect_right(self._starts, index) - 1
        return self._handles[shard], index - self._starts[shard]

    def sample_indices(self, positions: Sequence[int]) -> list[int]:
        """Global sample position -> dataset index: a fresh seeded permutation every epoch."""
        out = []
        for position in positions:
            epoch, offset = divmod(int(position), self.count)
            if self._epoch is None or self._epoch[0] != epoch:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._epoch = (epoch, torch.randperm(self.count, generator=generator))
            out.append(int(self._epoch[1][offset]))
        return out

    def read(self, indices: Sequence[int]) -> Batch:
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.shape}
        for index in indices:
            handle, row = self._locate(index)
            for name in self.shape:
                parts[name].append(handle.get_slice(name)[row:row + 1].float())
        joined = {name: torch.cat(values) for name, values in parts.items()}
        return Batch(self.layout.to_model(joined[LATENTS]), joined[CONTEXT], joined.get(POOLED), joined.get(MASK))

    def batch(self, positions: Sequence[int], generator: torch.Generator) -> Batch:
        """The samples at these global positions (the generator is not used: the order is the epoch permutation)."""
        return self.read(self.sample_indices(positions))


def write_latent_dataset(root: str | Path, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         pooled_projections: torch.Tensor | None, shard_size: int = 1024,
                         null_embeddings: tuple[torch.Tensor, torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
                         encoder_attention_mask: torch.Tensor | None = None) -> Path:
    """Write tensors in the on-disk format (atomically: the folder appears whole). Returns the folder.

    pooled_projections: None for a model without a pooled text vector; encoder_attention_mask [n, M]: the caption
    masks of a model that takes them. null_embeddings: the empty prompt's (context, pooled), or its text tensors by
    name."""
    from safetensors.torch import save_file

    count = latents.shape[0]
    columns = {LATENTS: latents, CONTEXT: encoder_hidden_states, POOLED: pooled_projections,
               MASK: encoder_attention_mask}
    columns = {name: value for name, value in columns.items() if value is not None}
    if any(value.shape[0] != count for value in columns.values()) or latents.dim() != 4 \
            or (MASK in columns and tuple(columns[MASK].shape) != tuple(encoder_hidden_states.shape[:2])):
        raise ConfigError("write_latent_dataset: expected latents [n,C,H,W], encoder_hidden_states [n,M,D] and "
                          "pooled_projections [n,P] (or encoder_attention_mask [n,M]) with the same n")
    if isinstance(null_embeddings, tuple):
        null_embeddings = {CONTEXT: null_embeddings[0], POOLED: null_embeddings[1]}
    with atomic_directory(root) as tmp:
        shards = []
        for number, start in enumerate(range(0, count, shard_size)):
            name = f"shard-{number:05d}.safetensors"
            end = min(start + shard_size, count)
            save_file({key: value[start:end].contiguous() for key, value in columns.items()}, str(tmp / name))
            shards.append({"file": name, "count": end - start})
        if null_embeddings is not None:
            save_file({key: value.contiguous() for key, value in null_embeddings.items() if value is not None},
                      str(tmp / NULL_FILE))
        index = {
            "format": DATA_FORMAT, "version": DATA_VERSION,
            "latent_channels": latents.shape[1], "latent_height": latents.shape[2], "latent_width": latents.shape[3],
            "context_tokens": encoder_hidden_states.shape[1], "context_dim": encoder_hidden_states.shape[2],
        }
        if pooled_projections is not None:
            index["pooled_dim"] = pooled_projections.shape[1]
        if encoder_attention_mask is not None:
            index["caption_mask"] = True
        write_json(tmp / INDEX_FILE, {**index, "shards": shards})
    return Path(root)

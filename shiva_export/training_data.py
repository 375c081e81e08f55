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
LATENTS, CONTEXT, POOLED = "latents", "encoder_hidden_states", "pooled_projections"
VAE_SCALE_FACTOR = 8


@dataclasses.dataclass(frozen=True)
class Batch:
    """Clean latents x0 [B,C,H,W], text context [B,M,Dj] and pooled text [B,Dp] for one micro-batch."""

    latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    pooled_projections: torch.Tensor


def _model_sizes(model_config: Mapping[str, Any]) -> dict[str, int]:
    get = model_config.get if isinstance(model_config, Mapping) else lambda k: getattr(model_config, k)
    return {name: int(get(name)) for name in
            ("in_channels", "joint_attention_dim", "pooled_projection_dim", "patch_size", "pos_embed_max_size")}


def check_latent_size(model_config: Mapping[str, Any], height: int, width: int, where: str) -> None:
    """Latent height/width must tile into patches and fit the model's positional table."""
    sizes = _model_sizes(model_config)
    patch, table = sizes["patch_size"], sizes["pos_embed_max_size"] * sizes["patch_size"]
    if height < patch or width < patch or height % patch or width % patch:
        raise ConfigError(f"{where}: latent size {height}x{width} is not a multiple of the patch size {patch}")
    if height > table or width > table:
        raise ConfigError(f"{where}: latent size {height}x{width} exceeds the model's positional table ({table})")


class DataFreeSource:
    """Random latents, context and pooled text drawn from the caller's generator: distillation only.

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
        self.sizes = _model_sizes(model_config)
        self.latent_hw = (height // vae_scale_factor, width // vae_scale_factor)
        check_latent_size(model_config, *self.latent_hw, where="data-free inputs")
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
        channels, (height, width) = self.sizes["in_channels"], self.latent_hw
        latents = torch.randn(count, channels, height, width, generator=generator)
        if self.contrast:
            latents = latents * self.envelope(count, generator)
        return Batch(
            latents=latents,
            encoder_hidden_states=torch.randn(count, self.context_tokens, self.sizes["joint_attention_dim"],
                                              generator=generator),
            pooled_projections=torch.randn(count, self.sizes["pooled_projection_dim"], generator=generator),
        )

    def null_embeddings(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


class LatentDataset:
    """Precomputed samples in safetensors shards, read lazily one sample at a time (see docs/training-data.md)."""

    has_targets = True

    def __init__(self, root: str | Path, model_config: Mapping[str, Any], seed: int = 0):
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
        sizes = _model_sizes(model_config)
        self._check_width(index_path, "latent_channels", index.get("latent_channels"), sizes["in_channels"],
                          "in_channels")
        self._check_width(index_path, "context_dim", index.get("context_dim"), sizes["joint_attention_dim"],
                          "joint_attention_dim (text embedding width)")
        self._check_width(index_path, "pooled_dim", index.get("pooled_dim"), sizes["pooled_projection_dim"],
                          "pooled_projection_dim")
        self.latent_hw = (int(index["latent_height"]), int(index["latent_width"]))
        check_latent_size(model_config, *self.latent_hw, where=str(index_path))
        self.context_tokens = int(index["context_tokens"])
        self.shape = {LATENTS: [sizes["in_channels"], *self.latent_hw],
                      CONTEXT: [self.context_tokens, sizes["joint_attention_dim"]],
                      POOLED: [sizes["pooled_projection_dim"]]}
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
        self._null = self._load_null(sizes)
        self._epoch: tuple[int, torch.Tensor] | None = None

    @staticmethod
    def _check_width(where: Path, key: str, value: Any, expected: int, model_name: str) -> None:
        if value is None:
            raise ArtifactError(f"{where}: missing {key!r}; expected the fields of docs/training-data.md")
        if int(value) != expected:
            raise ConfigError(f"{where}: {key} is {value} but the model's {model_name} is {expected}; "
                              "the data was encoded for another model")

    def _load_null(self, sizes: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self.root / NULL_FILE
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        context, pooled = tensors.get(CONTEXT), tensors.get(POOLED)
        if context is None or pooled is None or list(context.shape) != self.shape[CONTEXT] \
                or list(pooled.shape) != self.shape[POOLED]:
            raise ConfigError(f"{path}: expected {CONTEXT} {self.shape[CONTEXT]} and {POOLED} {self.shape[POOLED]}")
        return context.float(), pooled.float()

    def null_embeddings(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The empty prompt's embeddings for caption dropout, or None (then zeros are used)."""
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
        return Batch(*(torch.cat(parts[name]) for name in (LATENTS, CONTEXT, POOLED)))

    def batch(self, positions: Sequence[int], generator: torch.Generator) -> Batch:
        """The samples at these global positions (the generator is not used: the order is the epoch permutation)."""
        return self.read(self.sample_indices(positions))


def write_latent_dataset(root: str | Path, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         pooled_projections: torch.Tensor, shard_size: int = 1024,
                         null_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Write tensors in the on-disk format (atomically: the folder appears whole). Returns the folder."""
    from safetensors.torch import save_file

    count = latents.shape[0]
    if encoder_hidden_states.shape[0] != count or pooled_projections.shape[0] != count or latents.dim() != 4:
        raise ConfigError("write_latent_dataset: expected latents [n,C,H,W], encoder_hidden_states [n,M,D] and "
                          "pooled_projections [n,P] with the same n")
    with atomic_directory(root) as tmp:
        shards = []
        for number, start in enumerate(range(0, count, shard_size)):
            name = f"shard-{number:05d}.safetensors"
            end = min(start + shard_size, count)
            save_file({LATENTS: latents[start:end].contiguous(),
                       CONTEXT: encoder_hidden_states[start:end].contiguous(),
                       POOLED: pooled_projections[start:end].contiguous()}, str(tmp / name))
            shards.append({"file": name, "count": end - start})
        if null_embeddings is not None:
            save_file({CONTEXT: null_embeddings[0].contiguous(), POOLED: null_embeddings[1].contiguous()},
                      str(tmp / NULL_FILE))
        write_json(tmp / INDEX_FILE, {
            "format": DATA_FORMAT, "version": DATA_VERSION,
            "latent_channels": latents.shape[1], "latent_height": latents.shape[2], "latent_width": latents.shape[3],
            "context_tokens": encoder_hidden_states.shape[1], "context_dim": encoder_hidden_states.shape[2],
            "pooled_dim": pooled_projections.shape[1], "shards": shards,
        })
    return Path(root)

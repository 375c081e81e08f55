"""The backbone adapter interface: everything one DiT family does differently, asked for by every stage.

A stage never names a family: it asks `backbones.for_config(config)` (a diffusers transformer config, a preset's,
or the one recorded in an artifact) and calls the adapter. An adapter answers five questions:

1. The model: its diffusers class and pipeline class, how its config is validated, which blocks are prunable, in
   which order (routers go per adjacent pair of that order), the router's input widths, and which of the blocks'
   Linear layers `train` gives DoRA adapters (`adapter_targets`).
2. The token streams inside a pruned block: what besides the image tokens must be gathered with the kept indices
   (Flux's RoPE rows; nothing for SD3) and how to run the block on them (`prepare_block_call`); what the router is
   conditioned on (`router_inputs`: the block's timestep embedding and its context tokens, with per-token weights
   where some are padding, e.g. PixArt's caption mask); how a block returns its streams (`block_output` /
   `block_result`: a (context, image) pair for MMDiT blocks, the image tokens alone for a cross-attention block).
3. The transformer's inputs: names, static shapes and dtypes for an image size, the constants folded into the
   graph (Flux's `img_ids` / `txt_ids`), what the sampler integrates (`hidden_states`), how the scheduler's
   timestep t in [0, 1000] becomes the transformer's `timestep` input and back, and which part of the output the
   sampler integrates (`sampler_output`: PixArt's learned-sigma channels are dropped).
4. The analytic FLOP model (`dims(config)`: per-block and embedding FLOPs, exact under flops.py's convention).
5. The pipeline around it: the facts a pipeline folder decides (scheduler, VAE factor, text length), how it loads,
   and how prompts become conditioning.
6. Training (`trainable`): how clean latents are noised at a scheduler timestep (`noised`) and what the model learns
   to predict there (`training_target`): rectified flow by default, a DDPM schedule for PixArt; the text inputs
   training feeds are those of `input_specs` (pooled text and / or a caption mask).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping

import torch

from shiva_export.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One transformer input of a static graph."""

    shape: tuple[int, ...]
    dtype: str            # "fp32" | "fp16" | "bf16": "model" inputs take the export dtype, the rest stay fp32
    role: str             # "latents" (integrated by the sampler), "timestep", "conditioning" (fixed per run), or
                          # "mask": which context tokens are real (1) or padding (0), fixed per run, fed as fp32


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """A key of a diffusers config (FrozenDict, attribute access) or of a plain mapping."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


class Backbone(abc.ABC):
    """One DiT family (see the module docstring). Instances are stateless; `backbones.REGISTRY` holds one each."""

    family: str                 # short name: "sd3", "flux", "pixart"
    model_class: str            # diffusers transformer class name, as in a config's `_class_name`
    pipeline_class: str         # diffusers pipeline class the runtime drops into
    block_classes: tuple[str, ...]
    default_batch: int          # 2: [uncond; cond] classifier-free guidance; 1: guidance-distilled
    config_keys: tuple[str, ...]   # keys that identify the family in a config without `_class_name`
    scheduler_classes: tuple[str, ...] = ("FlowMatchEulerDiscreteScheduler",)   # what its pipeline may run
    trainable: bool = False     # the train verb supports the family (its noising, target and inputs below)

    # --- the model -------------------------------------------------------------------------------------------
    def model_type(self):
        import diffusers

        return getattr(diffusers, self.model_class)

    @abc.abstractmethod
    def validate_config(self, config: dict, where: str) -> dict:
        """A config.json dict checked (one-line ConfigError naming the field) before diffusers builds anything."""

    @abc.abstractmethod
    def blocks(self, transformer) -> list[torch.nn.Module]:
        """The blocks routed and pruned, in execution order (block 0 stays dense)."""

    @abc.abstractmethod
    def num_blocks(self, config) -> int:
        ...

    @abc.abstractmethod
    def router_dims(self, config) -> tuple[int, int, int]:
        """(token width, temb width, context-token width) seen inside the blocks."""

    @abc.abstractmethod
    def adapter_targets(self) -> str:
        """The peft `target_modules` regex (matched in full against module names) of the Linear layers that get DoRA
        adapters in training stage 3: every attention and FFN / MLP projection inside the prunable blocks; never the
        AdaLN modulation, the embedders, the output projection or the routers."""

    def patch_block(self, block) -> None:
        """Prepare a block that gets a pruning hook (e.g. an attention processor for per-sample RoPE)."""

    def unpatch_block(self, block) -> None:
        """Undo patch_block."""

    # --- inside a pruned block --------------------------------------------------------------------------------
    def prepare_block_call(self, block, call: dict, indices: torch.Tensor, shared_rows: bool) -> None:
        """Adjust a pruned block's call (kwargs by name) to run on the kept image tokens `indices` [B, k].

        shared_rows: every sample keeps the same tokens (batch 1, or one CFG pair), decided statically. Default:
        nothing besides the hidden states depends on token positions."""

    def router_inputs(self, call: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the router of a pruned block is conditioned on, from the block's call (kwargs by name): the
        timestep embedding [B, Dt], the context tokens [B, S, Dc] and per-token weights [B, S] (1 real, 0 padding)
        or None when every context token counts. The router pools the context by its (weighted) mean."""
        return call["temb"], call["encoder_hidden_states"], None

    def block_output(self, result) -> tuple[Any, torch.Tensor]:
        """(context stream out or None, image tokens out) of a block's return value."""
        context_out, hidden_out = result
        return context_out, hidden_out

    def block_result(self, context_out, hidden_out: torch.Tensor):
        """The block's return value from its streams (the inverse of block_output)."""
        return context_out, hidden_out

    # --- inputs -----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def num_image_tokens(self, config, height: int, width: int, vae_scale_factor: int) -> int:
        """Image tokens for height x width pixels; one-line ConfigError for sizes the model cannot tile."""

    @abc.abstractmethod
    def default_size(self, config, vae_scale_factor: int) -> int:
        """The pipeline's default image side in pixels."""

    @abc.abstractmethod
    def input_specs(self, config, height: int, width: int, batch: int, context_tokens: int, vae_scale_factor: int,
                    dtype: str) -> dict[str, InputSpec]:
        """The graph inputs in order."""

    def constants(self, config, height: int, width: int, context_tokens: int, vae_scale_factor: int
                  ) -> dict[str, torch.Tensor]:
        """Transformer keyword inputs fixed by the static shapes, folded into the graphs (not graph inputs)."""
        return {}

    def fixed_shapes(self, transformer, constants: dict[str, torch.Tensor]):
        """A context in which the transformer may precompute what the constants fix (a graph then holds it as a
        constant table, e.g. Flux's RoPE). Default: nothing to precompute."""
        import contextlib

        return contextlib.nullcontext()

    def transformer_timestep(self, t: float) -> float:
        """The scheduler's timestep t (0..1000) as the pipeline feeds it to the transformer."""
        return float(t)

    def scheduler_timestep(self, value: float) -> float:
        """The inverse of transformer_timestep: which scheduler timestep a transformer call is."""
        return float(value)

    def sampler_output(self, config, sample: torch.Tensor) -> torch.Tensor:
        """The part of the transformer's output that the pipeline's sampler integrates (after guidance). Default:
        all of it."""
        return sample

    def conditioning(self, specs: Mapping[str, InputSpec], images: int, halves: int, generator: torch.Generator,
                     guidance: float | None = None) -> dict[str, torch.Tensor]:
        """Seeded conditioning inputs for `images` images ([uncond; cond] halves when halves == 2), fp32; a mask
        input keeps every context token."""
        out = {}
        for name, spec in specs.items():
            if spec.role == "conditioning":
                out[name] = torch.randn((halves, images, *spec.shape[1:]), generator=generator).flatten(0, 1)
            elif spec.role == "mask":
                out[name] = torch.ones((halves * images, *spec.shape[1:]))
        return out

    # --- training ---------------------------------------------------------------------------------------------
    # The train verb draws scheduler timesteps t in [0, 1000] and clean latents x0 (the transformer's layout) and asks
    # the family how its training process noises them and what the transformer learns to predict. Default: rectified
    # flow (sigma = t / 1000), the velocity noise - x0 as the target. `sampler_output` decides which output channels
    # the losses compare (the ones the pipeline's sampler integrates).

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               scheduler: Mapping[str, Any] | None = None) -> torch.Tensor:
        """x_t for clean latents [B, ...], noise like them and scheduler timesteps [B] (0..1000); `scheduler`: the
        pipeline folder's scheduler config (models.PipelineFacts.scheduler) where the process depends on it."""
        sigma = (timesteps.float() / 1000.0).reshape(-1, *[1] * (latents.dim() - 1))
        return (1 - sigma) * latents + sigma * noise

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                        scheduler: Mapping[str, Any] | None = None) -> torch.Tensor:
        """What the transformer's `sampler_output` regresses at x_t = noised(latents, noise, timesteps): the
        flow-matching velocity by default."""
        return noise - latents

    # --- FLOPs ------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def dims(self, config):
        """The FLOP model's dimensions: an object with num_layers, default_num_tokens, block_flops_breakdown(layer,
        k, context_tokens, num_tokens, router_dim) and embedding_flops(num_tokens, context_tokens)."""

    # --- the pipeline -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def folder_facts(self, model_dir, transformer_config):
        """models.PipelineFacts of the pipeline folder around model_dir (defaults for a transformer folder)."""

    def pipeline_type(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    @abc.abstractmethod
    def encode_prompts(self, pipe, prompts: list[str], device) -> dict[str, torch.Tensor]:
        """Conditioning tensors for `prompts` from the pipeline's own encoders (training data)."""

    def cfg_pairs(self, batch: int) -> bool:
        """Whether a transformer batch is [uncond; cond] halves (classifier-free guidance in the batch)."""
        return self.default_batch == 2 and batch % 2 == 0

    def guidance_kind(self, config, batch: int) -> str:
        """How a guidance scale acts on a transformer batch: "cfg" (uncond + g (cond - uncond) over [uncond; cond]
        halves), "embedded" (a guidance-distilled model's guidance input) or "none" (no guidance at all)."""
        return "cfg" if self.cfg_pairs(batch) else "none"

    def default_guidance(self, batch: int) -> float:
        """The pipeline's guidance_scale for this batch (a CFG scale, or a distilled model's guidance input)."""
        return 7.0 if self.cfg_pairs(batch) else 1.0

    def pipeline_call_options(self, context_tokens: int) -> dict:
        """Keyword arguments a pipeline call needs to feed the exported shapes (e.g. FluxPipeline's
        max_sequence_length); SD3's defaults give its own."""
        return {}

    @abc.abstractmethod
    def teacher_latents(self, pipe, conditioning: dict, unconditional: dict, guidance_scale: float, steps: int,
                        height: int, width: int, generator) -> torch.Tensor:
        """The dense pipeline's final latents [1, C, h, w] (normalised as the VAE expects them, unpacked) for the
        conditioning (`encode_prompts` of a prompt; `unconditional`: of the empty prompt, for CFG families)."""

    # --- inference-only layouts (GPU benchmarks) ---------------------------------------------------------------
    def fuse_projections(self, transformer) -> int:
        """Merge projections that read the same input into one GEMM, in place, for inference; returns how many blocks
        changed. Outputs equal the unfused model's to rounding."""
        raise ConfigError(f"{self.family}: no fused projection layout (only FLUX.1 has one)")

    def check(self, ok: bool, where: str, field: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: field {field}: expected {expected}")

"""PixArt-Sigma (diffusers PixArtTransformer2DModel: adaLN-single, cross-attention to T5 tokens) as an adapter.

Blocks are diffusers' `BasicTransformerBlock` with ``norm_type="ada_norm_single"``: self-attention over the image
tokens, cross-attention from the image tokens to the caption tokens (with the caption mask as an additive bias), and
an FFN; the modulation is the model-wide adaLN-single output (6 D per sample) plus the block's own table. A pruned
block runs all three on the k kept image tokens only (cross-attention: kept tokens as queries over every caption
token, under the caption mask); the adaLN modulation is per sample, so it applies to the kept tokens as it is;
dropped tokens pass through. The block returns the image tokens alone (there is no text stream to carry).

Router conditioning: the block's adaLN-single timestep embedding (its [B, 6 D] `timestep` input) and the mean of
the projected caption tokens over the *real* tokens (the caption mask's 1s): PixArt has no pooled text vector, and
padding must not move the router (a padded caption keeps the tokens the unpadded caption keeps).

Inputs are what PixArtSigmaPipeline feeds: latents [B, 4, h, w], T5 embeddings [B, S, 4096], the scheduler's
timestep t (0..1000, unscaled) and the caption mask [B, S] (1 keep, 0 padding; a graph input in fp32, the runtime
casts the pipeline's int64 mask). `added_cond_kwargs` carries no tensors for PixArt-Sigma
(`use_additional_conditions` false). The output has 2 x 4 channels (learned sigma); the pipeline's sampler
integrates the first half (`sampler_output`), the runtime returns all of it as the transformer does.

Scheduler: the pipeline folder's (PixArtSigmaPipeline ships the multistep DPM-Solver++); freeze evaluates the
policy at its timesteps for the step count.

Training: PixArt-Sigma is a DDPM-family model, not flow matching: `noised` is sqrt(a_t) x0 + sqrt(1 - a_t) eps with
a_t the scheduler's alphas_cumprod (its betas), `training_target` the noise (prediction_type epsilon); the losses
compare the sampler's 4 channels (`sampler_output`). The training data carry the caption mask in place of a pooled
text vector (input_specs has no pooled_projections, and a "mask" input).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch

from shiva_export.backbones.base import Backbone, InputSpec, cfg_get
from shiva_export.backbones.sd3 import TIME_PROJ_DIM, _pipeline_index, linear_flops
from shiva_export.errors import ConfigError
from shiva_export.schema import Bool, Float, Int, ListOf, Nullable, Obj, Str, validate

VAE_SCALE_FACTOR = 8           # the SDXL VAE PixArt-Sigma uses
T5_TOKENS = 300                # PixArtSigmaPipeline's default max_sequence_length
DEFAULT_GUIDANCE = 4.5         # PixArtSigmaPipeline's default guidance_scale
FF_MULT = 4                    # FeedForward(mult=4, "gelu-approximate")
MASK_BIAS = -10000.0           # PixArtTransformer2DModel: mask m -> bias (1 - m) * -10000
# PixArt-Sigma-XL-2-1024-MS scheduler/scheduler_config.json (the class's defaults fill the rest)
SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
             "beta_schedule": "linear", "beta_start": 0.0001, "lower_order_final": True, "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "solver_order": 2, "solver_type": "midpoint",
             "timestep_spacing": "linspace", "steps_offset": 0}

_SIZE = Int(minimum=1, maximum=65536)
MODEL_CONFIG = Obj(required={"_class_name": Str(choices=("PixArtTransformer2DModel",))}, optional={
    "_diffusers_version": Str(), "_name_or_path": Str(), "_use_default_values": ListOf(Str()),
    "num_attention_heads": Int(minimum=1, maximum=1024), "attention_head_dim": _SIZE, "in_channels": _SIZE,
    "out_channels": Nullable(_SIZE), "num_layers": Int(minimum=1, maximum=1024), "dropout": Float(minimum=0),
    "norm_num_groups": _SIZE, "cross_attention_dim": Nullable(_SIZE), "attention_bias": Bool(),
    "sample_size": _SIZE, "patch_size": Int(minimum=1, maximum=64), "activation_fn": Str(),
    "num_embeds_ada_norm": Nullable(_SIZE), "upcast_attention": Bool(), "norm_type": Str(choices=("ada_norm_single",)),
    "norm_elementwise_affine": Bool(), "norm_eps": Float(minimum=0), "interpolation_scale": Nullable(Float(minimum=0)),
    "use_additional_conditions": Nullable(Bool()), "caption_channels": Nullable(_SIZE),
    "attention_type": Nullable(Str(choices=("default",))),
}, extra=True)


def _defaults() -> dict:
    import diffusers

    return {name: param.default for name, param in
            inspect.signature(diffusers.PixArtTransformer2DModel.__init__).parameters.items() if name != "self"}


def _full_config(config) -> dict:
    """The config with the class's defaults filled in (a FrozenDict, a mapping or a recorded dict)."""
    return {name: (default if cfg_get(config, name) is None else cfg_get(config, name))
            for name, default in _defaults().items()}


@dataclasses.dataclass(frozen=True)
class PixArtDims:
    """PixArtTransformer2DModel sizes for the FLOP model (flops.py's convention). Per block, for one sample with k
    kept image tokens and S caption tokens: self-attention q/k/v/out on k tokens and attention over k; cross-attention
    q/out on k tokens, k/v on the S caption tokens, attention k x S; FFN (D -> 4D -> D) on k tokens; the adaLN-single
    modulation is element-wise (0). The router scores all N tokens (temb width 6 D). Non-block: patch embedding (N
    tokens), adaLN-single (timestep MLP and its 6 D linear), caption projection (2 linears on S tokens), proj_out."""

    num_layers: int
    num_heads: int
    head_dim: int
    patch_size: int
    sample_size: int
    in_channels: int
    out_channels: int
    caption_channels: int
    cross_attention_dim: int

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def default_num_tokens(self) -> int:
        return (self.sample_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, cfg) -> "PixArtDims":
        full = _full_config(cfg)
        if full["caption_channels"] is None:
            raise ConfigError("model config: missing caption_channels; expected a PixArt-Sigma transformer config")
        return cls(num_layers=int(full["num_layers"]), num_heads=int(full["num_attention_heads"]),
                   head_dim=int(full["attention_head_dim"]), patch_size=int(full["patch_size"]),
                   sample_size=int(full["sample_size"]), in_channels=int(full["in_channels"]),
                   out_channels=int(full["out_channels"] or full["in_channels"]),
                   caption_channels=int(full["caption_channels"]),
                   cross_attention_dim=int(full["cross_attention_dim"] or full["num_attention_heads"]
                                           * full["attention_head_dim"]))

    def block_flops_breakdown(self, layer: int, k: int, s: int, num_tokens: int | None, router_dim: int
                              ) -> dict[str, int]:
        d = self.inner_dim
        routed = num_tokens is not None and k < num_tokens
        return {
            "self_qkvo": linear_flops(k, d, 4 * d),
            "self_attention": 4 * k * k * d,
            "cross_q_out": linear_flops(k, d, 2 * d),
            "cross_kv": linear_flops(s, self.cross_attention_dim, 2 * d),
            "cross_attention": 4 * k * s * d,
            "ffn": 2 * linear_flops(k, d, FF_MULT * d),
            "router": router_flops(num_tokens, d, router_dim) if routed else 0,
        }

    def embedding_flops(self, n: int, s: int) -> dict[str, int]:
        d = self.inner_dim
        return {
            "patch_embed": linear_flops(n, self.in_channels * self.patch_size ** 2, d),
            "adaln_single": linear_flops(1, TIME_PROJ_DIM, d) + linear_flops(1, d, d) + linear_flops(1, d, 6 * d),
            "caption_projection": linear_flops(s, self.caption_channels, d) + linear_flops(s, d, d),
            "proj_out": linear_flops(n, d, self.patch_size ** 2 * self.out_channels),
        }


def router_flops(num_tokens: int, d: int, router_dim: int) -> int:
    """The router on all N tokens (Proj_x, score head), Proj_t on the 6 D adaLN-single embedding, Proj_p on the
    pooled caption (D); the masked mean is element-wise."""
    return (linear_flops(num_tokens, d, router_dim) + linear_flops(num_tokens, router_dim, 1)
            + linear_flops(1, 6 * d, router_dim) + linear_flops(1, d, router_dim))


def _scheduler(scheduler) -> dict:
    """The scheduler config with PixArt-Sigma's values for what it leaves out."""
    return {**SCHEDULER, **{key: value for key, value in dict(scheduler or {}).items() if value is not None}}


def alpha_bar(timesteps: torch.Tensor, scheduler=None) -> torch.Tensor:
    """alphas_cumprod of the scheduler's beta schedule at timesteps [B] (0..num_train_timesteps - 1, float; linear
    interpolation between the integer timesteps), fp32."""
    cfg = _scheduler(scheduler)
    count, start, end = int(cfg["num_train_timesteps"]), float(cfg["beta_start"]), float(cfg["beta_end"])
    if cfg["beta_schedule"] == "linear":
        betas = torch.linspace(start, end, count, dtype=torch.float64)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, count, dtype=torch.float64) ** 2
    else:
        raise ConfigError(f"scheduler beta_schedule {cfg['beta_schedule']!r}: train supports linear or scaled_linear")
    table = torch.cumprod(1.0 - betas, dim=0)
    position = timesteps.detach().double().cpu().clamp(0, count - 1)
    low = position.floor().long()
    high = (low + 1).clamp(max=count - 1)
    frac = position - low
    return ((1 - frac) * table[low] + frac * table[high]).float().to(timesteps.device)


class PixArt(Backbone):
    family = "pixart"
    model_class = "PixArtTransformer2DModel"
    pipeline_class = "PixArtSigmaPipeline"
    block_classes = ("BasicTransformerBlock",)
    default_batch = 2
    config_keys = ("caption_channels", "num_embeds_ada_norm")
    scheduler_classes = ("DPMSolverMultistepScheduler",)
    trainable = True

    def validate_config(self, config: dict, where: str) -> dict:
        validate(config, MODEL_CONFIG, where, error=ConfigError)
        cfg = _full_config(config)
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.check(cfg["caption_channels"] is not None, where, "caption_channels",
                   "the T5 width (PixArt-Sigma: 4096); without it the model has no caption projection")
        self.check(cfg["sample_size"] % cfg["patch_size"] == 0, where, "sample_size",
                   f"a multiple of patch_size {cfg['patch_size']}, got {cfg['sample_size']}")
        self.check((cfg["cross_attention_dim"] or inner) == inner, where, "cross_attention_dim",
                   f"num_attention_heads x attention_head_dim = {inner} (captions are projected to the block width), "
                   f"got {cfg['cross_attention_dim']}")
        additional = cfg["use_additional_conditions"]
        if additional is None:
            additional = cfg["sample_size"] == 128   # diffusers' default: PixArt-Alpha 1024's micro-conditions
        self.check(not additional, where, "use_additional_conditions",
                   "false (PixArt-Sigma; PixArtSigmaPipeline passes no resolution / aspect-ratio conditions)")
        self.check(inner % 4 == 0, where, "num_attention_heads",
                   f"num_attention_heads x attention_head_dim a multiple of 4 (the sin-cos position embedding), got "
                   f"{inner}")
        self.check(cfg["out_channels"] in (None, cfg["in_channels"], 2 * cfg["in_channels"]), where, "out_channels",
                   f"in_channels {cfg['in_channels']} or twice it (learned sigma), got {cfg['out_channels']}")
        return config

    def adapter_targets(self) -> str:
        # self- and cross-attention projections and the FFN of every BasicTransformerBlock
        return r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"

    def blocks(self, transformer) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)

    def num_blocks(self, config) -> int:
        return int(_full_config(config)["num_layers"])

    def router_dims(self, config) -> tuple[int, int, int]:
        full = _full_config(config)
        inner = int(full["num_attention_heads"]) * int(full["attention_head_dim"])
        return inner, 6 * inner, inner

    def router_inputs(self, call: dict):
        """The block's adaLN-single embedding [B, 6 D], the projected captions and, from the caption bias the
        transformer made of the mask ((1 - m) * -10000, [B, 1, S]), the mask m again as weights."""
        bias = call.get("encoder_attention_mask")
        weights = None
        if bias is not None:
            bias = bias.reshape(bias.shape[0], -1)
            weights = (1.0 + bias.float() / -MASK_BIAS).clamp(0.0, 1.0)
        return call["timestep"], call["encoder_hidden_states"], weights

    def block_output(self, result):
        return None, result

    def block_result(self, context_out, hidden_out):
        return hidden_out

    def num_image_tokens(self, config, height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> int:
        patch = int(_full_config(config)["patch_size"])
        step = vae_scale_factor * patch
        if height <= 0 or width <= 0 or height % step or width % step:
            raise ConfigError(
                f"resolution {height}x{width} is not divisible by {step} (VAE factor {vae_scale_factor} x patch size "
                f"{patch}); choose e.g. {max(step, height // step * step)}x{max(step, width // step * step)}")
        return (height // step) * (width // step)

    def default_size(self, config, vae_scale_factor: int) -> int:
        return int(_full_config(config)["sample_size"]) * vae_scale_factor

    def input_specs(self, config, height, width, batch, context_tokens, vae_scale_factor, dtype):
        full = _full_config(config)
        lat_h, lat_w = height // vae_scale_factor, width // vae_scale_factor
        return {
            "hidden_states": InputSpec((batch, int(full["in_channels"]), lat_h, lat_w), dtype, "latents"),
            "encoder_hidden_states": InputSpec((batch, context_tokens, int(full["caption_channels"])), dtype,
                                               "conditioning"),
            "timestep": InputSpec((batch,), "fp32", "timestep"),
            "encoder_attention_mask": InputSpec((batch, context_tokens), "fp32", "mask"),
        }

    def sampler_output(self, config, sample: torch.Tensor) -> torch.Tensor:
        """PixArtSigmaPipeline: with learned sigma (out_channels = 2 x in_channels) the sampler takes the first
        half of the channels."""
        full = _full_config(config)
        if (full["out_channels"] or full["in_channels"]) // 2 == full["in_channels"]:
            return sample.chunk(2, dim=1)[0]
        return sample

    def noised(self, latents, noise, timesteps, scheduler=None):
        """The DDPM forward process of the pipeline's scheduler: sqrt(a_t) x0 + sqrt(1 - a_t) noise, a_t its
        alphas_cumprod at t (interpolated between integer timesteps; training draws t continuously)."""
        alpha = alpha_bar(timesteps, scheduler).reshape(-1, *[1] * (latents.dim() - 1))
        return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise

    def training_target(self, latents, noise, timesteps, scheduler=None):
        """The scheduler's prediction_type: epsilon (PixArt-Sigma), or v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
        prediction = _scheduler(scheduler)["prediction_type"]
        if prediction == "epsilon":
            return noise
        if prediction == "v_prediction":
            alpha = alpha_bar(timesteps, scheduler).reshape(-1, *[1] * (latents.dim() - 1))
            return alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
        raise ConfigError(f"scheduler prediction_type {prediction!r}: train supports epsilon or v_prediction")

    def conditioning(self, specs, images, halves, generator, guidance=None):
        """Random caption embeddings; caption masks as the pipeline makes them: the empty negative prompt keeps one
        token (T5's </s>), a prompt about half of them; padded positions hold embeddings too (masked out)."""
        out = super().conditioning(specs, images, halves, generator)
        for name, spec in specs.items():
            if spec.role == "mask":
                tokens = spec.shape[1]
                mask = torch.zeros((halves, images, tokens))
                mask[-1, :, :max(1, tokens // 2)] = 1.0      # the prompts
                if halves == 2:
                    mask[0, :, :1] = 1.0                      # the empty negative prompt
                out[name] = mask.flatten(0, 1)
        return out

    def default_guidance(self, batch: int) -> float:
        return DEFAULT_GUIDANCE if self.cfg_pairs(batch) else 1.0

    def pipeline_call_options(self, context_tokens: int) -> dict:
        """The exported caption length, and no resolution binning (it would move height/width to an aspect-ratio
        bin the static graphs were not exported for)."""
        return {"max_sequence_length": int(context_tokens), "use_resolution_binning": False}

    def dims(self, config) -> PixArtDims:
        return PixArtDims.from_config(config)

    def folder_facts(self, model_dir: Path, transformer_config):
        from shiva_export.models import PipelineFacts, scheduler_config

        root = model_dir.parent if (model_dir.parent / "model_index.json").is_file() else model_dir
        channels = int(_full_config(transformer_config)["in_channels"])
        if not (root / "model_index.json").is_file():
            return PipelineFacts(scheduler=scheduler_config(SCHEDULER, str(model_dir), self.scheduler_classes),
                                 vae_scale_factor=VAE_SCALE_FACTOR, latent_channels=channels,
                                 context_tokens=T5_TOKENS,
                                 origin=f"PixArt-Sigma defaults ({model_dir} is a transformer folder without its "
                                        "pipeline)")
        _, scheduler, factor, latent = _pipeline_index(root, channels, self.scheduler_classes)
        if latent != channels:
            raise ConfigError(f"{root / 'vae' / 'config.json'}: field latent_channels: expected the transformer's "
                              f"in_channels {channels}, got {latent!r}")
        return PipelineFacts(scheduler=scheduler, vae_scale_factor=factor, latent_channels=latent,
                             context_tokens=T5_TOKENS, origin=f"pipeline folder {root}")

    def encode_prompts(self, pipe, prompts, device, max_sequence_length: int = T5_TOKENS):
        context, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                 max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": context, "encoder_attention_mask": mask}

    def teacher_latents(self, pipe, conditioning, unconditional, guidance_scale, steps, height, width, generator):
        context = conditioning["encoder_hidden_states"]
        # negative_prompt=None: the pipeline's default "" may not be given together with negative_prompt_embeds
        return pipe(prompt_embeds=context, prompt_attention_mask=conditioning["encoder_attention_mask"],
                    negative_prompt=None, negative_prompt_embeds=unconditional["encoder_hidden_states"],
                    negative_prompt_attention_mask=unconditional["encoder_attention_mask"],
                    guidance_scale=guidance_scale, num_inference_steps=steps, height=height, width=width,
                    generator=generator, output_type="latent", use_resolution_binning=False,
                    max_sequence_length=context.shape[1]).images

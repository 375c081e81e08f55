"""SD3 / SD3.5 (diffusers SD3Transformer2DModel, MMDiT and MMDiT-X blocks) as a backbone adapter."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch

from shiva_export.backbones.base import Backbone, InputSpec, cfg_get
from shiva_export.errors import ConfigError
from shiva_export.schema import Int, ListOf, Nullable, Obj, Str, validate

VAE_SCALE_FACTOR = 8   # SD3/SD3.5 VAEs downsample by 8 (a folder's VAE may differ)
CLIP_TOKENS = 77       # CLIP-L/G prompt tokens in SD3's prompt embeddings (the tokenizers' model_max_length)
T5_TOKENS = 256        # StableDiffusion3Pipeline's default max_sequence_length
FF_MULT = 4            # diffusers FeedForward(mult=4, activation_fn="gelu-approximate")
TIME_PROJ_DIM = 256    # CombinedTimestepTextProjEmbeddings: Timesteps(num_channels=256)
# DoRA targets (peft target_modules): every linear projection of the joint attention (and SD3.5's attn2) and of the
# FFNs (image and context streams) in the transformer blocks; not the AdaLN modulation, the embedders or the routers.
ADAPTER_TARGETS = (r".*transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                   r"|to_add_out)|ff(_context)?\.net\.(0\.proj|2))")

_SIZE = Int(minimum=1, maximum=65536)
MODEL_CONFIG = Obj(required={"_class_name": Str(choices=("SD3Transformer2DModel",))}, optional={
    "_diffusers_version": Str(), "_name_or_path": Str(), "_use_default_values": ListOf(Str()),
    "sample_size": _SIZE, "patch_size": Int(minimum=1, maximum=64), "in_channels": _SIZE,
    "num_layers": Int(minimum=1, maximum=1024), "attention_head_dim": _SIZE,
    "num_attention_heads": Int(minimum=1, maximum=1024), "joint_attention_dim": _SIZE,
    "caption_projection_dim": _SIZE, "pooled_projection_dim": _SIZE, "out_channels": Nullable(_SIZE),
    "pos_embed_max_size": _SIZE, "dual_attention_layers": ListOf(Int(minimum=0, maximum=1023), max_length=1024),
    "qk_norm": Nullable(Str(choices=("layer_norm", "fp32_layer_norm", "rms_norm", "rms_norm_across_heads"))),
}, extra=True)


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


@dataclasses.dataclass(frozen=True)
class SD3Dims:
    """The sizes of an SD3Transformer2DModel that its FLOPs depend on (see flops.py for the convention).

    The last block (``context_pre_only``) still projects context queries and attends with them (diffusers computes
    and drops that output), but has no ``to_add_out`` and no context FFN; its context AdaLN is
    ``AdaLayerNormContinuous`` (D -> 2D) instead of ``AdaLayerNormZero`` (D -> 6D; 9D for the image side of a
    dual-attention block). Non-block parts: patch embedding (conv, all N tokens), timestep + pooled-text embedding
    MLPs, the context embedder, the output AdaLN and ``proj_out`` (all N tokens, after the scatter-back)."""

    num_layers: int
    num_heads: int
    head_dim: int
    patch_size: int
    sample_size: int
    in_channels: int
    out_channels: int
    joint_attention_dim: int
    caption_projection_dim: int
    pooled_projection_dim: int
    dual_attention_layers: frozenset[int]
    qk_norm: str | None  # element-wise only: 0 FLOPs under our convention, kept for the record

    REQUIRED = ("num_layers", "attention_head_dim", "num_attention_heads", "patch_size", "sample_size", "in_channels",
                "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def default_num_tokens(self) -> int:
        """Image tokens at the model's native resolution (sample_size latent pixels per side)."""
        return (self.sample_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, cfg) -> "SD3Dims":
        missing = [key for key in cls.REQUIRED if cfg_get(cfg, key) is None]
        if missing:
            raise ConfigError(f"model config: missing {missing}; expected a diffusers SD3Transformer2DModel config")
        dims = cls(
            num_layers=int(cfg_get(cfg, "num_layers")), num_heads=int(cfg_get(cfg, "num_attention_heads")),
            head_dim=int(cfg_get(cfg, "attention_head_dim")), patch_size=int(cfg_get(cfg, "patch_size")),
            sample_size=int(cfg_get(cfg, "sample_size")), in_channels=int(cfg_get(cfg, "in_channels")),
            out_channels=int(cfg_get(cfg, "out_channels") or cfg_get(cfg, "in_channels")),
            joint_attention_dim=int(cfg_get(cfg, "joint_attention_dim")),
            caption_projection_dim=int(cfg_get(cfg, "caption_projection_dim")),
            pooled_projection_dim=int(cfg_get(cfg, "pooled_projection_dim")),
            dual_attention_layers=frozenset(int(i) for i in (cfg_get(cfg, "dual_attention_layers") or ())),
            qk_norm=cfg_get(cfg, "qk_norm"),
        )
        if min(dims.num_layers, dims.num_heads, dims.head_dim, dims.patch_size, dims.in_channels) < 1:
            raise ConfigError(f"model config: sizes must be >= 1, got {dims}")
        if dims.caption_projection_dim != dims.inner_dim:
            # JointTransformerBlock feeds the context stream to Linear(inner_dim, ...): the model cannot run otherwise.
            raise ConfigError(
                f"model config: caption_projection_dim={dims.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {dims.inner_dim} for an SD3 MMDiT")
        return dims

    def block_flops_breakdown(self, layer: int, k: int, s: int, num_tokens: int | None, router_dim: int
                              ) -> dict[str, int]:
        d = self.inner_dim
        dual = layer in self.dual_attention_layers
        last = layer == self.num_layers - 1  # context_pre_only
        routed = num_tokens is not None and k < num_tokens
        return {
            # AdaLN linears on temb, once per sample: image side 6D (9D with attn2), context side 6D (2D when last).
            "adaln": linear_flops(1, d, (9 if dual else 6) * d) + linear_flops(1, d, (2 if last else 6) * d),
            "image_qkvo": linear_flops(k, d, 4 * d),
            "context_qkv": linear_flops(s, d, 3 * d),  # add_q_proj exists even when context_pre_only
            "context_out": 0 if last else linear_flops(s, d, d),
            "joint_attention": 4 * (s + k) ** 2 * d,
            "image_attn2": (linear_flops(k, d, 4 * d) + 4 * k * k * d) if dual else 0,
            "image_ffn": 2 * linear_flops(k, d, FF_MULT * d),
            "context_ffn": 0 if last else 2 * linear_flops(s, d, FF_MULT * d),
            "router": router_flops(num_tokens, d, router_dim) if routed else 0,
        }

    def embedding_flops(self, n: int, s: int) -> dict[str, int]:
        d = self.inner_dim
        patch_pixels = self.patch_size * self.patch_size
        return {
            "patch_embed": linear_flops(n, self.in_channels * patch_pixels, d),
            "time_text_embed": (linear_flops(1, TIME_PROJ_DIM, d) + linear_flops(1, d, d)
                                + linear_flops(1, self.pooled_projection_dim, d) + linear_flops(1, d, d)),
            "context_embedder": linear_flops(s, self.joint_attention_dim, self.caption_projection_dim),
            "norm_out": linear_flops(1, d, 2 * d),
            "proj_out": linear_flops(n, d, patch_pixels * self.out_channels),
        }


def router_flops(num_tokens: int, d: int, router_dim: int) -> int:
    """The router (bottleneck d', D8) scores all N image tokens: Proj_x (D -> d') and the score head (d' -> 1) per
    token, Proj_t and Proj_p (D -> d' each) per sample."""
    return (linear_flops(num_tokens, d, router_dim) + linear_flops(num_tokens, router_dim, 1)
            + 2 * linear_flops(1, d, router_dim))


class SD3(Backbone):
    family = "sd3"
    model_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    block_classes = ("JointTransformerBlock",)
    default_batch = 2
    config_keys = ("caption_projection_dim",)
    trainable = True

    def validate_config(self, config: dict, where: str) -> dict:
        validate(config, MODEL_CONFIG, where, error=ConfigError)
        defaults = {name: param.default for name, param in
                    inspect.signature(self.model_type().__init__).parameters.items() if name != "self"}
        cfg = {**defaults, **{key: value for key, value in config.items() if key in defaults}}
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        grid = cfg["sample_size"] // cfg["patch_size"]
        self.check(cfg["sample_size"] % cfg["patch_size"] == 0, where, "sample_size",
                   f"a multiple of patch_size {cfg['patch_size']}, got {cfg['sample_size']}")
        self.check(grid <= cfg["pos_embed_max_size"], where, "pos_embed_max_size",
                   f">= sample_size / patch_size = {grid} (the default resolution must fit the positional table), "
                   f"got {cfg['pos_embed_max_size']}")
        self.check(inner <= 65536 and inner % 4 == 0, where, "num_attention_heads",
                   f"num_attention_heads x attention_head_dim a multiple of 4 and <= 65536 (the sin-cos position "
                   f"embedding's width), got {cfg['num_attention_heads']} x {cfg['attention_head_dim']} = {inner}")
        self.check(cfg["caption_projection_dim"] == inner, where, "caption_projection_dim",
                   f"num_attention_heads x attention_head_dim = {inner} (the text stream runs at the block width), "
                   f"got {cfg['caption_projection_dim']}")
        self.check(all(layer < cfg["num_layers"] for layer in cfg["dual_attention_layers"]), where,
                   "dual_attention_layers",
                   f"layer indices below num_layers {cfg['num_layers']}, got {list(cfg['dual_attention_layers'])}")
        return config

    def blocks(self, transformer) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)

    def num_blocks(self, config) -> int:
        return int(cfg_get(config, "num_layers"))

    def router_dims(self, config) -> tuple[int, int, int]:
        inner = int(cfg_get(config, "num_attention_heads")) * int(cfg_get(config, "attention_head_dim"))
        return inner, inner, int(cfg_get(config, "caption_projection_dim"))

    def adapter_targets(self) -> str:
        return ADAPTER_TARGETS

    def num_image_tokens(self, config, height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> int:
        patch = int(cfg_get(config, "patch_size"))
        step = vae_scale_factor * patch
        if height <= 0 or width <= 0 or height % step or width % step:
            raise ConfigError(
                f"resolution {height}x{width} is not divisible by {step} (VAE factor {vae_scale_factor} x patch size "
                f"{patch}); choose e.g. {max(step, height // step * step)}x{max(step, width // step * step)}")
        latent_max = int(cfg_get(config, "pos_embed_max_size")) * patch * vae_scale_factor
        if height > latent_max or width > latent_max:
            raise ConfigError(f"resolution {height}x{width} exceeds the model's positional table ({latent_max} px)")
        return (height // step) * (width // step)

    def default_size(self, config, vae_scale_factor: int) -> int:
        return int(cfg_get(config, "sample_size")) * vae_scale_factor

    def input_specs(self, config, height, width, batch, context_tokens, vae_scale_factor, dtype):
        lat_h, lat_w = height // vae_scale_factor, width // vae_scale_factor
        return {
            "hidden_states": InputSpec((batch, int(cfg_get(config, "in_channels")), lat_h, lat_w), dtype, "latents"),
            "encoder_hidden_states": InputSpec((batch, context_tokens, int(cfg_get(config, "joint_attention_dim"))),
                                               dtype, "conditioning"),
            "pooled_projections": InputSpec((batch, int(cfg_get(config, "pooled_projection_dim"))), dtype,
                                            "conditioning"),
            "timestep": InputSpec((batch,), "fp32", "timestep"),
        }

    def dims(self, config) -> SD3Dims:
        return SD3Dims.from_config(config)

    def folder_facts(self, model_dir: Path, transformer_config):
        from shiva_export.models import PipelineFacts, read_json, scheduler_config

        root = model_dir.parent if (model_dir.parent / "model_index.json").is_file() else model_dir
        in_channels = int(cfg_get(transformer_config, "in_channels"))
        if not (root / "model_index.json").is_file():
            return PipelineFacts(scheduler=scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                             "shift": 3.0}, str(model_dir)),
                                 vae_scale_factor=VAE_SCALE_FACTOR, latent_channels=in_channels,
                                 context_tokens=CLIP_TOKENS + T5_TOKENS,
                                 origin=f"SD3 defaults ({model_dir} is a transformer folder without its pipeline)")
        index, scheduler, factor, channels = _pipeline_index(root, in_channels)
        if channels != in_channels:
            raise ConfigError(f"{root / 'vae' / 'config.json'}: field latent_channels: expected the transformer's "
                              f"in_channels {in_channels}, got {channels!r}")
        clip = CLIP_TOKENS
        tokenizer_config = root / "tokenizer" / "tokenizer_config.json"
        if _present(index, root, "tokenizer") and tokenizer_config.is_file():
            clip = read_json(tokenizer_config)
            clip = clip.get("model_max_length", CLIP_TOKENS) if isinstance(clip, dict) else None
            if isinstance(clip, bool) or not isinstance(clip, int) or not 1 <= clip <= 4096:
                raise ConfigError(f"{tokenizer_config}: field model_max_length: expected an integer in 1..4096 "
                                  f"(CLIP's 77), got {clip!r}")
        # without T5, StableDiffusion3Pipeline pads with CLIP-length zeros (its tokenizer_max_length)
        text = clip + (T5_TOKENS if _present(index, root, "text_encoder_3") else clip)
        return PipelineFacts(scheduler=scheduler, vae_scale_factor=factor, latent_channels=channels,
                             context_tokens=text, origin=f"pipeline folder {root}")

    def encode_prompts(self, pipe, prompts, device):
        context, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                   do_classifier_free_guidance=False)
        return {"encoder_hidden_states": context, "pooled_projections": pooled}

    def teacher_latents(self, pipe, conditioning, unconditional, guidance_scale, steps, height, width, generator):
        return pipe(prompt_embeds=conditioning["encoder_hidden_states"],
                    pooled_prompt_embeds=conditioning["pooled_projections"],
                    negative_prompt_embeds=unconditional["encoder_hidden_states"],
                    negative_pooled_prompt_embeds=unconditional["pooled_projections"], guidance_scale=guidance_scale,
                    num_inference_steps=steps, height=height, width=width, generator=generator,
                    output_type="latent").images


def _present(index: dict, root: Path, component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and (root / component).is_dir()


def _pipeline_index(root: Path, in_channels: int, scheduler_classes: tuple[str, ...] | None = None
                    ) -> tuple[dict, dict, int, int]:
    """model_index.json, the scheduler config, and the VAE's scale factor and latent channels of a pipeline folder
    (as the diffusers pipelines compute vae_scale_factor: 2 ** (len(block_out_channels) - 1))."""
    from shiva_export.models import read_json, scheduler_config

    index = read_json(root / "model_index.json")
    if not isinstance(index, dict):
        raise ConfigError(f"{root / 'model_index.json'}: expected a JSON object")
    if not _present(index, root, "scheduler"):
        raise ConfigError(f"{root}: the pipeline folder has no scheduler (expected scheduler/scheduler_config.json)")
    scheduler = scheduler_config(read_json(root / "scheduler" / "scheduler_config.json"),
                                 str(root / "scheduler" / "scheduler_config.json"),
                                 *(() if scheduler_classes is None else (scheduler_classes,)))
    factor, channels = VAE_SCALE_FACTOR, in_channels
    if _present(index, root, "vae"):
        vae_path = root / "vae" / "config.json"
        vae = read_json(vae_path)
        blocks = vae.get("block_out_channels") if isinstance(vae, dict) else None
        if not isinstance(blocks, list) or not blocks:
            raise ConfigError(f"{vae_path}: field block_out_channels: expected a non-empty list, got {blocks!r}")
        factor = 2 ** (len(blocks) - 1)
        channels = vae.get("latent_channels", channels)
    return index, scheduler, factor, channels

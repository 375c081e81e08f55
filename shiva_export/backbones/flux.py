"""FLUX.1 (diffusers FluxTransformer2DModel: double-stream then single-stream blocks, 3-axis RoPE) as an adapter.

Pruning (D17): image tokens only, in both block kinds; the text stream runs in full. The RoPE cos/sin rows of the
kept image tokens are gathered with the same indices (text rows kept): one [S + k, D] table when every sample keeps
the same tokens (batch 1, one CFG pair), a [B, S + k, D] table otherwise, applied row by row in one batch by
`BatchedRopeFluxAttnProcessor`. Block 0 stays dense; routers go per adjacent pair of the blocks in order (double
then single), conditioned on the block's temb (timestep, guidance and pooled CLIP) and the mean text token.

Inputs are what FluxPipeline feeds: packed latents [B, N, 4 C] (2x2 latent patches), T5 embeddings [B, S, 4096],
pooled CLIP [B, 768], timestep t / 1000, and guidance (guidance-distilled models). `img_ids` / `txt_ids` depend only
on the static shapes and are folded into the graphs, with the RoPE table computed from them (`FixedRope`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from pathlib import Path

import torch

from shiva_export.backbones.base import Backbone, InputSpec, cfg_get
from shiva_export.backbones.sd3 import TIME_PROJ_DIM, _pipeline_index, linear_flops, router_flops
from shiva_export.errors import ConfigError
from shiva_export.schema import Bool, Int, ListOf, Nullable, Obj, Str, validate

VAE_SCALE_FACTOR = 8
T5_TOKENS = 512               # FluxPipeline's default max_sequence_length
DEFAULT_GUIDANCE = 3.5        # FluxPipeline's default guidance_scale (the distilled guidance input)
DEFAULT_SAMPLE_SIZE = 128      # FluxPipeline.default_sample_size: 1024 px with the factor-8 VAE
PACK = 2                      # FluxPipeline packs 2x2 latent pixels into one token
MLP_RATIO = 4
# DoRA targets (peft target_modules): in the double-stream blocks every linear projection of the joint attention
# (image q/k/v/out, text add_q/k/v and to_add_out) and of both FFNs; in the single-stream blocks q/k/v, the MLP input
# (proj_mlp) and the fused attention-output / MLP-output projection (proj_out). Not the AdaLN modulation (norm*.linear),
# the embedders, the model's own proj_out or the routers.
ADAPTER_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                   r"|to_add_out)|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)")
# FluxPipeline's scheduler (FLUX.1-dev/schnell scheduler_config.json); "_sigmas": the pipeline passes
# sigmas = linspace(1, 1/n, n) to set_timesteps (with mu from the image length), not the scheduler's own grid
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True,
             "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
             "_sigmas": "linspace"}

_SIZE = Int(minimum=1, maximum=65536)
MODEL_CONFIG = Obj(required={"_class_name": Str(choices=("FluxTransformer2DModel",))}, optional={
    "_diffusers_version": Str(), "_name_or_path": Str(), "_use_default_values": ListOf(Str()),
    "patch_size": Int(minimum=1, maximum=64), "in_channels": _SIZE, "out_channels": Nullable(_SIZE),
    "num_layers": Int(minimum=0, maximum=1024), "num_single_layers": Int(minimum=0, maximum=1024),
    "attention_head_dim": _SIZE, "num_attention_heads": Int(minimum=1, maximum=1024),
    "joint_attention_dim": _SIZE, "pooled_projection_dim": _SIZE, "guidance_embeds": Bool(),
    "axes_dims_rope": ListOf(Int(minimum=2, maximum=4096), max_length=3),
}, extra=True)


@dataclasses.dataclass(frozen=True)
class FluxDims:
    """FluxTransformer2DModel sizes for the FLOP model (flops.py's convention). Per block, for one sample:

    * double-stream block l < num_double: AdaLN-Zero on both streams (D -> 6D each); image q/k/v/out and FFN
      (D -> 4D -> D) on k tokens; text q/k/v/out and FFN on S tokens; joint attention over S + k.
    * single-stream block: AdaLN-Zero-Single (D -> 3D); q/k/v (no out projection), the MLP in (D -> 4D) and the
      fused output projection (5D -> D) on S + k tokens; attention over S + k.
    * non-block: x_embedder (N tokens), timestep / guidance / pooled-text MLPs, context embedder (S tokens),
      output AdaLN (D -> 2D) and proj_out (N tokens). RoPE is element-wise: 0 FLOPs."""

    num_double: int
    num_single: int
    num_heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    patch_size: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance_embeds: bool
    default_num_tokens: int = 4096   # 1024x1024 px, FluxPipeline's default size

    @property
    def num_layers(self) -> int:
        return self.num_double + self.num_single

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_config(cls, cfg) -> "FluxDims":
        defaults = {name: param.default for name, param in
                    inspect.signature(Flux().model_type().__init__).parameters.items() if name != "self"}

        def get(key):
            value = cfg_get(cfg, key)
            return defaults[key] if value is None else value

        dims = cls(num_double=int(get("num_layers")), num_single=int(get("num_single_layers")),
                   num_heads=int(get("num_attention_heads")), head_dim=int(get("attention_head_dim")),
                   in_channels=int(get("in_channels")), out_channels=int(cfg_get(cfg, "out_channels") or
                                                                        get("in_channels")),
                   patch_size=int(get("patch_size")), joint_attention_dim=int(get("joint_attention_dim")),
                   pooled_projection_dim=int(get("pooled_projection_dim")),
                   guidance_embeds=bool(get("guidance_embeds")))
        if dims.num_layers < 1:
            raise ConfigError("model config: num_layers + num_single_layers must be >= 1")
        return dims

    def block_flops_breakdown(self, layer: int, k: int, s: int, num_tokens: int | None, router_dim: int
                              ) -> dict[str, int]:
        d = self.inner_dim
        routed = num_tokens is not None and k < num_tokens
        router = router_flops(num_tokens, d, router_dim) if routed else 0
        if layer < self.num_double:
            return {
                "adaln": 2 * linear_flops(1, d, 6 * d),
                "image_qkvo": linear_flops(k, d, 4 * d),
                "context_qkvo": linear_flops(s, d, 4 * d),
                "joint_attention": 4 * (s + k) ** 2 * d,
                "image_ffn": 2 * linear_flops(k, d, 4 * d),
                "context_ffn": 2 * linear_flops(s, d, 4 * d),
                "router": router,
            }
        tokens = s + k
        return {
            "adaln": linear_flops(1, d, 3 * d),
            "qkv": linear_flops(tokens, d, 3 * d),
            "joint_attention": 4 * tokens ** 2 * d,
            "mlp_in": linear_flops(tokens, d, MLP_RATIO * d),
            "proj_out": linear_flops(tokens, d + MLP_RATIO * d, d),
            "router": router,
        }

    def embedding_flops(self, n: int, s: int) -> dict[str, int]:
        d = self.inner_dim
        mlp = linear_flops(1, TIME_PROJ_DIM, d) + linear_flops(1, d, d)
        return {
            "x_embedder": linear_flops(n, self.in_channels, d),
            "time_text_embed": (mlp * (2 if self.guidance_embeds else 1) + linear_flops(1, self.pooled_projection_dim, d)
                                + linear_flops(1, d, d)),
            "context_embedder": linear_flops(s, self.joint_attention_dim, d),
            "norm_out": linear_flops(1, d, 2 * d),
            "proj_out": linear_flops(n, d, self.patch_size ** 2 * self.out_channels),
        }


def latent_image_ids(grid_h: int, grid_w: int) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids: (0, row, column) per packed token, [h w, 3] float32."""
    ids = torch.zeros(grid_h, grid_w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(grid_h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(grid_w)[None, :]
    return ids.reshape(grid_h * grid_w, 3)


class FixedRope(torch.nn.Module):
    """The model's RoPE table for the static ids, computed once: what `pos_embed(cat(txt_ids, img_ids))` returns.

    Swapped in for `transformer.pos_embed` while a graph is traced, so the graph holds the fp32 cos/sin table as a
    constant (diffusers computes it in float64, which TensorRT has no kernels for)."""

    def __init__(self, pos_embed: torch.nn.Module, ids: torch.Tensor):
        super().__init__()
        with torch.no_grad():
            cos, sin = pos_embed(ids)
        self.register_buffer("cos", cos.float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[0] != self.cos.shape[0]:
            raise ConfigError(f"RoPE table is for {self.cos.shape[0]} tokens, the call has {ids.shape[0]}")
        return self.cos.to(ids.device), self.sin.to(ids.device)


class BatchedRopeFluxAttnProcessor:
    """diffusers' FluxAttnProcessor, plus per-sample RoPE tables [B, S, D] (samples that keep different tokens): the
    same computation, with each sample's rows applied in one batched RoPE (exact; only the pruned blocks get it)."""

    def __init__(self):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.inner = FluxAttnProcessor()

    # `transformer.set_attention_backend(name)` sets this on every processor that has it: it reaches the inner one
    @property
    def _attention_backend(self):
        return self.inner._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        self.inner._attention_backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if image_rotary_emb is None or image_rotary_emb[0].dim() == 2:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, dispatch_attention_fn

        # FluxAttnProcessor's body (diffusers 0.42), with `apply_rotary_emb` taking a table per sample
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
            key = torch.cat([attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
            value = torch.cat([encoder_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
        cos, sin = image_rotary_emb
        query, key = rope_rows(query, cos, sin), rope_rows(key, cos, sin)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend,
                                              parallel_config=self.inner._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text, hidden_states.shape[1] - text], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' `apply_rotary_emb(x, (cos, sin), sequence_dim=1)` for x [B, S, H, D] with a table per sample,
    cos / sin [B, S, D]: the same operations in the same order, element by element."""
    cos, sin = cos[:, :, None, :].to(x.device), sin[:, :, None, :].to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


class FusedInputProjection(torch.nn.Module):
    """One GEMM for projections that read the same input: a single-stream block's q, k, v and MLP input (the layout
    of BFL's reference implementation, `linear1`, D -> 3D + 4D), or a double-stream attention's q/k/v of one
    stream. Each projection becomes a `FusedColumns` view; the `lead` one, which the block calls first, computes
    the whole GEMM, and the others return their columns of that same call. The weights are one tensor; each
    projection's weight and bias are views of it."""

    def __init__(self, projections: list[torch.nn.Linear], lead: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.cat([p.weight.detach() for p in projections]), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.cat([p.bias.detach() for p in projections]), requires_grad=False)
        self.widths, self.lead = [p.out_features for p in projections], lead
        self.cache: tuple[torch.Tensor, list[torch.Tensor], set[int]] | None = None

    def columns(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = sum(self.widths[:index])
        return (self.weight[start:start + self.widths[index]], self.bias[start:start + self.widths[index]])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every projection of x, from one GEMM."""
        return list(torch.nn.functional.linear(x, self.weight, self.bias).split(self.widths, dim=-1))

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Projection `index` of x: the lead computes all of them at once; another one takes its columns of the GEMM
        the lead just computed from this very input (the last to do so releases it), else computes its own (and
        releases a GEMM of another input)."""
        if index == self.lead:
            parts = self(x)
            self.cache = (x, parts, set(range(len(parts))) - {index})
            return parts[index]
        if self.cache is not None and self.cache[0] is x and index in self.cache[2]:
            part, waiting = self.cache[1][index], self.cache[2]
            waiting.discard(index)
            if not waiting:
                self.cache = None
            return part
        self.cache = None
        return torch.nn.functional.linear(x, *self.columns(index))


class FusedColumns(torch.nn.Module):
    """One projection (to_q, proj_mlp, add_k_proj, ...) of a `FusedInputProjection`."""

    def __init__(self, fused: FusedInputProjection, index: int):
        super().__init__()
        self.index = index
        self.fused = [fused]   # not a submodule: the block or attention owns it (as `fused_input` / `fused_context`)

    @property
    def weight(self) -> torch.Tensor:
        return self.fused[0].columns(self.index)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0].take(self.index, x)


def _fuse(owner: torch.nn.Module, name: str, holders: list[tuple[torch.nn.Module, str]], lead: int) -> None:
    """Replaces each (module, attribute) Linear of `holders` by its columns of one FusedInputProjection, which
    `owner` holds as `name`."""
    fused = FusedInputProjection([getattr(module, attr) for module, attr in holders], lead)
    setattr(owner, name, fused)
    for index, (module, attr) in enumerate(holders):
        setattr(module, attr, FusedColumns(fused, index))


class Flux(Backbone):
    family = "flux"
    model_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    block_classes = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    default_batch = 1
    trainable = True
    config_keys = ("num_single_layers", "axes_dims_rope", "guidance_embeds")

    def validate_config(self, config: dict, where: str) -> dict:
        validate(config, MODEL_CONFIG, where, error=ConfigError)
        defaults = {name: param.default for name, param in
                    inspect.signature(self.model_type().__init__).parameters.items() if name != "self"}
        cfg = {**defaults, **{key: value for key, value in config.items() if key in defaults}}
        axes = list(cfg["axes_dims_rope"])
        self.check(cfg["patch_size"] == 1, where, "patch_size",
                   f"1 (FluxPipeline packs 2x2 latent patches itself), got {cfg['patch_size']}")
        self.check(cfg["num_layers"] + cfg["num_single_layers"] >= 1, where, "num_layers",
                   "num_layers + num_single_layers >= 1")
        self.check(len(axes) == 3 and sum(axes) == cfg["attention_head_dim"] and all(a % 2 == 0 for a in axes),
                   where, "axes_dims_rope", f"3 even sizes summing to attention_head_dim {cfg['attention_head_dim']} "
                   f"(the RoPE width), got {axes}")
        self.check(cfg["in_channels"] % (PACK * PACK) == 0, where, "in_channels",
                   f"a multiple of 4 (packed 2x2 latent patches), got {cfg['in_channels']}")
        return config

    def blocks(self, transformer) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)

    def num_blocks(self, config) -> int:
        return int(cfg_get(config, "num_layers", 19)) + int(cfg_get(config, "num_single_layers", 38))

    def router_dims(self, config) -> tuple[int, int, int]:
        inner = int(cfg_get(config, "num_attention_heads")) * int(cfg_get(config, "attention_head_dim"))
        return inner, inner, inner

    def adapter_targets(self) -> str:
        return ADAPTER_TARGETS

    def patch_block(self, block) -> None:
        block.attn.set_processor(BatchedRopeFluxAttnProcessor())

    def unpatch_block(self, block) -> None:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        block.attn.set_processor(FluxAttnProcessor())

    def prepare_block_call(self, block, call: dict, indices: torch.Tensor, shared_rows: bool) -> None:
        rope = call.get("image_rotary_emb")
        if rope is None:
            return
        text = call["encoder_hidden_states"].shape[1]
        cos, sin = rope
        text_rows = torch.arange(text, device=indices.device)
        if shared_rows:
            rows = torch.cat([text_rows, indices[0] + text])
            call["image_rotary_emb"] = (cos.index_select(0, rows), sin.index_select(0, rows))
        else:
            rows = torch.cat([text_rows.expand(indices.shape[0], text), indices + text], dim=1)
            call["image_rotary_emb"] = (cos[rows], sin[rows])

    def fuse_projections(self, transformer) -> int:
        """Projections that read the same input become one GEMM (`FusedInputProjection`), in every block, dense and
        pruned alike, for inference (weights frozen; not for training or export): each single-stream block's q/k/v
        and MLP input (D -> 3D + 4D), and each double-stream attention's image q/k/v and text q/k/v (D -> 3D each).
        Every layer is checked before any is changed: a refusal leaves the model as it was."""
        groups = []   # (where, owner, name, [(module, attribute)], lead) of each group still separate
        for prefix, stack in (("transformer_blocks", transformer.transformer_blocks),
                              ("single_transformer_blocks", transformer.single_transformer_blocks)):
            for i, block in enumerate(stack):
                attn, where = block.attn, f"{prefix}.{i}"
                if getattr(attn, "fused_projections", False):
                    raise ConfigError(f"fuse_projections: {where}: the attention's q/k/v are already one GEMM "
                                      "(fuse_qkv_projections); use one layout or the other")
                qkv = [(attn, "to_q"), (attn, "to_k"), (attn, "to_v")]
                if hasattr(block, "proj_mlp"):   # single-stream: the block projects its MLP input first
                    candidates = [(where, block, "fused_input", [*qkv, (block, "proj_mlp")], 3)]
                else:                            # double-stream: q, k, v of each stream in turn
                    candidates = [(where, attn, "fused_input", qkv, 0),
                                  (where, attn, "fused_context",
                                   [(attn, "add_q_proj"), (attn, "add_k_proj"), (attn, "add_v_proj")], 0)]
                groups += [g for g in candidates if not isinstance(getattr(*g[3][0]), FusedColumns)]
        for where, _, _, holders, _ in groups:
            for module, attr in holders:
                layer = getattr(module, attr)
                if type(layer) is not torch.nn.Linear or layer.bias is None:
                    raise ConfigError(f"fuse_projections: {where}: {attr} is a {type(layer).__name__}, expected a "
                                      "plain Linear with a bias (merge adapters into the weights first)")
        for _, owner, name, holders, lead in groups:
            _fuse(owner, name, holders, lead)
        return len(self.blocks(transformer))

    def grid(self, height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
        step = vae_scale_factor * PACK
        if height <= 0 or width <= 0 or height % step or width % step:
            raise ConfigError(
                f"resolution {height}x{width} is not divisible by {step} (VAE factor {vae_scale_factor} x 2, the "
                f"packed latent patch); choose e.g. {max(step, height // step * step)}x"
                f"{max(step, width // step * step)}")
        return height // step, width // step

    def num_image_tokens(self, config, height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> int:
        grid_h, grid_w = self.grid(height, width, vae_scale_factor)
        return grid_h * grid_w

    def default_size(self, config, vae_scale_factor: int) -> int:
        return DEFAULT_SAMPLE_SIZE * vae_scale_factor

    def input_specs(self, config, height, width, batch, context_tokens, vae_scale_factor, dtype):
        tokens = self.num_image_tokens(config, height, width, vae_scale_factor)
        specs = {
            "hidden_states": InputSpec((batch, tokens, int(cfg_get(config, "in_channels"))), dtype, "latents"),
            "encoder_hidden_states": InputSpec((batch, context_tokens, int(cfg_get(config, "joint_attention_dim"))),
                                               dtype, "conditioning"),
            "pooled_projections": InputSpec((batch, int(cfg_get(config, "pooled_projection_dim"))), dtype,
                                            "conditioning"),
            "timestep": InputSpec((batch,), "fp32", "timestep"),
        }
        if cfg_get(config, "guidance_embeds"):
            specs["guidance"] = InputSpec((batch,), "fp32", "conditioning")
        return specs

    def constants(self, config, height, width, context_tokens, vae_scale_factor):
        grid_h, grid_w = self.grid(height, width, vae_scale_factor)
        return {"img_ids": latent_image_ids(grid_h, grid_w), "txt_ids": torch.zeros(context_tokens, 3)}

    @contextlib.contextmanager
    def fixed_shapes(self, transformer, constants: dict[str, torch.Tensor]):
        """transformer.pos_embed is a FixedRope of the constant ids inside the block (restored after)."""
        original = transformer.pos_embed
        if isinstance(original, FixedRope):   # nested: already fixed
            yield
            return
        ids = torch.cat([constants["txt_ids"], constants["img_ids"]], dim=0).to(transformer.device)
        transformer.pos_embed = FixedRope(original, ids)
        try:
            yield
        finally:
            transformer.pos_embed = original

    def guidance_kind(self, config, batch: int) -> str:
        return "embedded" if cfg_get(config, "guidance_embeds") else "none"

    def default_guidance(self, batch: int) -> float:
        return DEFAULT_GUIDANCE

    def pipeline_call_options(self, context_tokens: int) -> dict:
        return {"max_sequence_length": int(context_tokens)}

    def transformer_timestep(self, t: float) -> float:
        return float(t) / 1000.0

    def scheduler_timestep(self, value: float) -> float:
        return float(value) * 1000.0

    def conditioning(self, specs, images, halves, generator, guidance=None):
        out = super().conditioning({n: s for n, s in specs.items() if n != "guidance"}, images, halves, generator)
        if "guidance" in specs:
            out["guidance"] = torch.full((halves * images,), DEFAULT_GUIDANCE if guidance is None else guidance)
        return out

    def dims(self, config) -> FluxDims:
        return FluxDims.from_config(config)

    def folder_facts(self, model_dir: Path, transformer_config):
        from shiva_export.models import PipelineFacts, scheduler_config

        root = model_dir.parent if (model_dir.parent / "model_index.json").is_file() else model_dir
        packed = int(cfg_get(transformer_config, "in_channels"))
        if not (root / "model_index.json").is_file():
            return PipelineFacts(scheduler=scheduler_config(SCHEDULER, str(model_dir)),
                                 vae_scale_factor=VAE_SCALE_FACTOR, latent_channels=packed // (PACK * PACK),
                                 context_tokens=T5_TOKENS,
                                 origin=f"FLUX.1 defaults ({model_dir} is a transformer folder without its pipeline)")
        index, scheduler, factor, channels = _pipeline_index(root, packed // (PACK * PACK))
        scheduler = {**scheduler, "_sigmas": "linspace"}
        if channels * PACK * PACK != packed:
            raise ConfigError(f"{root / 'vae' / 'config.json'}: field latent_channels: expected the transformer's "
                              f"in_channels / 4 = {packed // 4} (packed 2x2 patches), got {channels!r}")
        text = T5_TOKENS   # FluxPipeline's default max_sequence_length (--context-tokens for another)
        return PipelineFacts(scheduler=scheduler, vae_scale_factor=factor, latent_channels=channels,
                             context_tokens=text, origin=f"pipeline folder {root}")

    def encode_prompts(self, pipe, prompts, device, max_sequence_length: int = T5_TOKENS):
        context, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": context, "pooled_projections": pooled}

    def teacher_latents(self, pipe, conditioning, unconditional, guidance_scale, steps, height, width, generator):
        """Guidance-distilled: guidance_scale is the embedded guidance, no unconditional pass; FluxPipeline returns
        packed latents for output_type="latent", unpacked here as its decoder does."""
        packed = pipe(prompt_embeds=conditioning["encoder_hidden_states"],
                      pooled_prompt_embeds=conditioning["pooled_projections"], guidance_scale=guidance_scale,
                      num_inference_steps=steps, height=height, width=width, generator=generator,
                      output_type="latent", max_sequence_length=conditioning["encoder_hidden_states"].shape[1]).images
        return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)

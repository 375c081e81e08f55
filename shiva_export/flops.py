"""Analytic FLOP model of diffusers' SD3Transformer2DModel under Shiva-DiT token pruning, to price k schedules.

The freeze pass uses it to choose buckets and to report realised FLOPs against the learned and dense ones;
reports use it to compare with the paper's FLOP columns.

Conventions:
    * One multiply-add is 2 FLOPs. Only matrix products count: every ``nn.Linear`` (bias adds excluded), the
      patch-embedding convolution, and the two attention products (Q K^T and P V, 2 * Lq * Lkv * inner_dim each).
      Normalisations (LayerNorm, RMS qk-norm), AdaLN modulation and gates, activations (GELU-tanh, SiLU), softmax,
      residual adds, sinusoidal embeddings, top-k, gathers and scatters count 0. This is the convention of
      ``torch.utils.flop_counter.FlopCounterMode`` (with the math SDPA backend); the tests check this model against
      it exactly on tiny models. The excluded element-wise work is well under 1% of the total.
    * Numbers are for one forward pass of the transformer (one denoising step) over the whole batch given;
      classifier-free guidance doubles the transformer batch. Multiply by the step count for a whole sample.
    * Pruning semantics (shiva-dit.md D1/D2): in a block with k kept image tokens, the image stream (q/k/v/out
      projections, the image-only ``attn2`` of MMDiT-X blocks, the FFN) runs on k tokens; joint attention is over
      S + k tokens (S context tokens); the context stream always runs on all S tokens. ``k == N`` is the dense block.
    * The router (shiva_export/router.py, bottleneck d' = 64, D8) runs on every block with k < N and scores all N
      image tokens: ``Proj_x`` (D -> d') and the score head (d' -> 1) per token, ``Proj_t`` and ``Proj_p``
      (D -> d' each) per sample. A block with k == N needs no selection and runs no router.
    * The last block (``context_pre_only``) still projects context queries and attends with them (diffusers computes
      and drops that output), but has no ``to_add_out`` and no context FFN; its context AdaLN is
      ``AdaLayerNormContinuous`` (D -> 2D) instead of ``AdaLayerNormZero`` (D -> 6D; 9D for the image side of a
      dual-attention block).
    * Non-block parts: patch embedding (conv, all N tokens), timestep + pooled-text embedding MLPs, the context
      embedder (joint_attention_dim -> caption_projection_dim over S tokens), the output AdaLN and ``proj_out`` (all N
      tokens, after the scatter-back).

FLOPs are Python ints (exact). ``cfg`` is a diffusers model config (``transformer.config``) or any mapping with the
same keys.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Mapping, Sequence

from shiva_export.errors import ConfigError

ROUTER_DIM = 64  # d' of the Shiva router (D8)
FF_MULT = 4  # diffusers FeedForward(mult=4, activation_fn="gelu-approximate")
TIME_PROJ_DIM = 256  # CombinedTimestepTextProjEmbeddings: Timesteps(num_channels=256)

_REQUIRED_KEYS = (
    "num_layers", "attention_head_dim", "num_attention_heads", "patch_size", "sample_size", "in_channels",
    "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
)


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The sizes of an SD3Transformer2DModel that its FLOPs depend on, read once from its config."""

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

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def default_num_tokens(self) -> int:
        """Image tokens at the model's native resolution (sample_size latent pixels per side)."""
        return (self.sample_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | "ModelDims") -> "ModelDims":
        if isinstance(cfg, ModelDims):
            return cfg
        missing = [key for key in _REQUIRED_KEYS if _get(cfg, key) is None]
        if missing:
            raise ConfigError(f"model config: missing {missing}; expected a diffusers SD3Transformer2DModel config")
        dims = cls(
            num_layers=int(_get(cfg, "num_layers")),
            num_heads=int(_get(cfg, "num_attention_heads")),
            head_dim=int(_get(cfg, "attention_head_dim")),
            patch_size=int(_get(cfg, "patch_size")),
            sample_size=int(_get(cfg, "sample_size")),
            in_channels=int(_get(cfg, "in_channels")),
            out_channels=int(_get(cfg, "out_channels") or _get(cfg, "in_channels")),
            joint_attention_dim=int(_get(cfg, "joint_attention_dim")),
            caption_projection_dim=int(_get(cfg, "caption_projection_dim")),
            pooled_projection_dim=int(_get(cfg, "pooled_projection_dim")),
            dual_attention_layers=frozenset(int(i) for i in (_get(cfg, "dual_attention_layers") or ())),
            qk_norm=_get(cfg, "qk_norm"),
        )
        if min(dims.num_layers, dims.num_heads, dims.head_dim, dims.patch_size, dims.in_channels) < 1:
            raise ConfigError(f"model config: sizes must be >= 1, got {dims}")
        if dims.caption_projection_dim != dims.inner_dim:
            # JointTransformerBlock feeds the context stream to Linear(inner_dim, ...): the model cannot run otherwise.
            raise ConfigError(
                f"model config: caption_projection_dim={dims.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {dims.inner_dim} for an SD3 MMDiT"
            )
        return dims


def _get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _count(value: Any, name: str, minimum: int) -> int:
    try:
        number = operator.index(value)
    except TypeError as err:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from err
    if number < minimum:
        raise ConfigError(f"{name}={number} must be >= {minimum}")
    return number


def _check_layer(dims: ModelDims, layer: int) -> int:
    layer = _count(layer, "layer", 0)
    if layer >= dims.num_layers:
        raise ConfigError(f"layer {layer} is out of range; the model has {dims.num_layers} blocks")
    return layer


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def block_flops_breakdown(cfg: Mapping[str, Any] | ModelDims, layer: int, k: int, context_tokens: int, *,
                          num_tokens: int | None = None, router_dim: int = ROUTER_DIM) -> dict[str, int]:
    """FLOPs of JointTransformerBlock ``layer`` for one sample, by part (see the module docstring).

    Args:
        k: image tokens the block runs on (kept tokens; N for a dense block).
        context_tokens: S, the text tokens; they always run in full.
        num_tokens: N, image tokens before selection. When given and ``k < N`` the router cost (scoring N tokens)
            is included; when omitted the block is priced without a router.
        router_dim: the router bottleneck d'.
    """
    dims = ModelDims.from_config(cfg)
    layer = _check_layer(dims, layer)
    k = _count(k, "k", 0)
    s = _count(context_tokens, "context_tokens", 1)
    if num_tokens is not None:
        num_tokens = _count(num_tokens, "num_tokens", 1)
        if k > num_tokens:
            raise ConfigError(f"layer {layer}: k={k} exceeds the image tokens N={num_tokens}")
    d = dims.inner_dim
    dual = layer in dims.dual_attention_layers
    last = layer == dims.num_layers - 1  # context_pre_only
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
        "router": (linear_flops(num_tokens, d, router_dim) + linear_flops(num_tokens, router_dim, 1)
                   + 2 * linear_flops(1, d, router_dim)) if routed else 0,
    }


def block_flops(cfg: Mapping[str, Any] | ModelDims, layer: int, k: int, context_tokens: int, *,
                num_tokens: int | None = None, router_dim: int = ROUTER_DIM) -> int:
    """FLOPs of block ``layer`` for one sample running on k image tokens and S context tokens.

    See ``block_flops_breakdown`` for the arguments; this is the sum of its parts.
    """
    return sum(block_flops_breakdown(cfg, layer, k, context_tokens, num_tokens=num_tokens,
                                     router_dim=router_dim).values())


def embedding_flops(cfg: Mapping[str, Any] | ModelDims, num_tokens: int, context_tokens: int) -> dict[str, int]:
    """FLOPs of the non-block parts for one sample, by part."""
    dims = ModelDims.from_config(cfg)
    n = _count(num_tokens, "num_tokens", 1)
    s = _count(context_tokens, "context_tokens", 1)
    d = dims.inner_dim
    patch_pixels = dims.patch_size * dims.patch_size
    return {
        "patch_embed": linear_flops(n, dims.in_channels * patch_pixels, d),
        "time_text_embed": (linear_flops(1, TIME_PROJ_DIM, d) + linear_flops(1, d, d)
                            + linear_flops(1, dims.pooled_projection_dim, d) + linear_flops(1, d, d)),
        "context_embedder": linear_flops(s, dims.joint_attention_dim, dims.caption_projection_dim),
        "norm_out": linear_flops(1, d, 2 * d),
        "proj_out": linear_flops(n, d, patch_pixels * dims.out_channels),
    }


def model_flops(cfg: Mapping[str, Any] | ModelDims, k_per_layer: Sequence[int], context_tokens: int, batch: int, *,
                num_tokens: int | None = None, router_dim: int = ROUTER_DIM) -> int:
    """FLOPs of one transformer forward (one denoising step) for the whole batch.

    Args:
        k_per_layer: kept image tokens per block, length num_layers; N means dense.
        context_tokens: S.
        batch: the transformer batch (2 per image with classifier-free guidance).
        num_tokens: N, image tokens of the latent; defaults to the model's native resolution
            ((sample_size / patch_size)^2, 4096 for SD3.5-Medium). Blocks with k < N also pay the router.
    """
    dims = ModelDims.from_config(cfg)
    batch = _count(batch, "batch", 1)
    n = dims.default_num_tokens if num_tokens is None else _count(num_tokens, "num_tokens", 1)
    ks = list(k_per_layer)
    if len(ks) != dims.num_layers:
        raise ConfigError(f"k_per_layer has {len(ks)} entries; expected one per block ({dims.num_layers})")
    per_sample = sum(embedding_flops(dims, n, context_tokens).values())
    per_sample += sum(block_flops(dims, layer, k, context_tokens, num_tokens=n, router_dim=router_dim)
                      for layer, k in enumerate(ks))
    return batch * per_sample


def dense_model_flops(cfg: Mapping[str, Any] | ModelDims, num_tokens: int, context_tokens: int, batch: int) -> int:
    """FLOPs of one unpruned forward: every block on all N image tokens, no router."""
    dims = ModelDims.from_config(cfg)
    return model_flops(dims, [num_tokens] * dims.num_layers, context_tokens, batch, num_tokens=num_tokens)

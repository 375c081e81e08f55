"""Analytic FLOP model of a DiT under Shiva-DiT token pruning, to price k schedules; each family's block and
embedding FLOPs live in its backbone adapter (`dims(config)`), the convention and the sums here.

The freeze pass uses it to choose buckets and to report realised FLOPs against the learned and dense ones;
reports use it to compare with the paper's FLOP columns.

Conventions:
    * One multiply-add is 2 FLOPs. Only matrix products count: every ``nn.Linear`` (bias adds excluded), the
      patch-embedding convolution, and the two attention products (Q K^T and P V, 2 * Lq * Lkv * inner_dim each).
      Normalisations (LayerNorm, RMS qk-norm), AdaLN modulation and gates, activations (GELU-tanh, SiLU), softmax,
      residual adds, sinusoidal and rotary embeddings, top-k, gathers and scatters count 0. This is the convention
      of ``torch.utils.flop_counter.FlopCounterMode`` (with the math SDPA backend); the tests check this model
      against it exactly on tiny models. The excluded element-wise work is well under 1% of the total.
    * Numbers are for one forward pass of the transformer (one denoising step) over the whole batch given;
      classifier-free guidance doubles the transformer batch. Multiply by the step count for a whole sample.
    * Pruning semantics (D1/D2): in a block with k kept image tokens, the image stream runs on k tokens; attention
      is over S + k tokens (S context tokens); the context stream always runs on all S tokens. ``k == N`` is the
      dense block.
    * The router (shiva_export/router.py, bottleneck d' = 64, D8) runs on every block with k < N and scores all N
      image tokens. A block with k == N needs no selection and runs no router.

FLOPs are Python ints (exact). ``cfg`` is a diffusers model config (``transformer.config``) or any mapping with the
same keys.
"""

from __future__ import annotations

import operator
from typing import Any, Mapping, Sequence

from shiva_export.errors import ConfigError

ROUTER_DIM = 64  # d' of the Shiva router (D8)


class ModelDims:
    """The FLOP dimensions of a model config: its backbone adapter's dims object (num_layers, default_num_tokens,
    block_flops_breakdown, embedding_flops)."""

    @staticmethod
    def from_config(cfg: Mapping[str, Any] | Any):
        if hasattr(cfg, "block_flops_breakdown"):
            return cfg
        from shiva_export import backbones

        return backbones.for_config(cfg).dims(cfg)


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


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


def block_flops_breakdown(cfg: Mapping[str, Any] | Any, layer: int, k: int, context_tokens: int, *,
                          num_tokens: int | None = None, router_dim: int = ROUTER_DIM) -> dict[str, int]:
    """FLOPs of block ``layer`` (in the adapter's block order) for one sample, by part (see the module docstring).

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
    return dims.block_flops_breakdown(layer, k, s, num_tokens, router_dim)


def block_flops(cfg: Mapping[str, Any] | Any, layer: int, k: int, context_tokens: int, *,
                num_tokens: int | None = None, router_dim: int = ROUTER_DIM) -> int:
    """FLOPs of block ``layer`` for one sample running on k image tokens and S context tokens.

    See ``block_flops_breakdown`` for the arguments; this is the sum of its parts.
    """
    return sum(block_flops_breakdown(cfg, layer, k, context_tokens, num_tokens=num_tokens,
                                     router_dim=router_dim).values())


def embedding_flops(cfg: Mapping[str, Any] | Any, num_tokens: int, context_tokens: int) -> dict[str, int]:
    """FLOPs of the non-block parts for one sample, by part."""
    dims = ModelDims.from_config(cfg)
    n = _count(num_tokens, "num_tokens", 1)
    s = _count(context_tokens, "context_tokens", 1)
    return dims.embedding_flops(n, s)


def model_flops(cfg: Mapping[str, Any] | Any, k_per_layer: Sequence[int], context_tokens: int, batch: int, *,
                num_tokens: int | None = None, router_dim: int = ROUTER_DIM) -> int:
    """FLOPs of one transformer forward (one denoising step) for the whole batch.

    Args:
        k_per_layer: kept image tokens per block, length num_layers; N means dense.
        context_tokens: S.
        batch: the transformer batch (2 per image with classifier-free guidance).
        num_tokens: N, image tokens of the latent; defaults to the model's native resolution
            (the family's default size, the adapter's dims). Blocks with k < N also pay the router.
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


def dense_model_flops(cfg: Mapping[str, Any] | Any, num_tokens: int, context_tokens: int, batch: int) -> int:
    """FLOPs of one unpruned forward: every block on all N image tokens, no router."""
    dims = ModelDims.from_config(cfg)
    return model_flops(dims, [num_tokens] * dims.num_layers, context_tokens, batch, num_tokens=num_tokens)

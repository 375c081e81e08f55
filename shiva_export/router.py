"""Context-Aware Router (Shiva-DiT Eqs. 8-9): one per pair of adjacent layers, bottleneck d' = 64 (D8)."""

from __future__ import annotations

import torch
from torch import nn

from shiva_export import kernels
from shiva_export.errors import ConfigError


class ContextAwareRouter(nn.Module):
    """s_i = w^T LayerNorm(SiLU(Proj_x(x_i) + Proj_t(temb) + Proj_p(pooled) + l_layer)).

    The global signals enter as an additive shift; scores are computed in fp32 whatever the backbone dtype, so a
    reduced-precision engine ranks tokens like the fp32 reference.
    """

    def __init__(self, token_dim: int, temb_dim: int, context_dim: int, hidden_dim: int = 64, layers_per_router: int = 2):
        super().__init__()
        self.proj_x = nn.Linear(token_dim, hidden_dim)
        self.proj_t = nn.Linear(temb_dim, hidden_dim)
        self.proj_p = nn.Linear(context_dim, hidden_dim)
        self.layer_embedding = nn.Embedding(layers_per_router, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.score = nn.Linear(hidden_dim, 1)
        nn.init.normal_(self.layer_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor, pooled_context: torch.Tensor, slot: int) -> torch.Tensor:
        """tokens [B,N,D], temb [B,Dt], pooled_context [B,Dc] -> scores [B,N] (fp32)."""
        if kernels.usable(tokens) and kernels.router_supported(self, tokens):  # CUDA inference: two fused kernels
            return kernels.router_scores(self, tokens, temb, pooled_context, slot)
        dtype = self.proj_x.weight.dtype
        shift = self.proj_t(temb.to(dtype)) + self.proj_p(pooled_context.to(dtype)) + self.layer_embedding.weight[slot]
        hidden = nn.functional.silu(self.proj_x(tokens.to(dtype)) + shift.unsqueeze(1))
        return self.score(self.norm(hidden)).squeeze(-1).float()


class RouterBank(nn.Module):
    """All routers of one backbone; layer l uses router l // group_size with layer-identity slot l % group_size."""

    def __init__(self, num_layers: int, token_dim: int, temb_dim: int, context_dim: int, hidden_dim: int = 64,
                 group_size: int = 2):
        super().__init__()
        sizes = {"num_layers": num_layers, "token_dim": token_dim, "temb_dim": temb_dim, "context_dim": context_dim,
                 "hidden_dim": hidden_dim, "group_size": group_size}
        bad = {name: size for name, size in sizes.items() if isinstance(size, bool) or not isinstance(size, int)
               or size < 1}
        if bad:
            raise ConfigError(f"router sizes {bad} must be integers >= 1")
        self.num_layers, self.group_size = num_layers, group_size
        count = (num_layers + group_size - 1) // group_size
        self.routers = nn.ModuleList(
            ContextAwareRouter(token_dim, temb_dim, context_dim, hidden_dim, group_size) for _ in range(count)
        )

    @classmethod
    def for_transformer(cls, transformer, hidden_dim: int = 64, group_size: int = 2) -> "RouterBank":
        from shiva_export import backbones

        adapter = backbones.for_model(transformer)
        token_dim, temb_dim, context_dim = adapter.router_dims(transformer.config)
        return cls(adapter.num_blocks(transformer.config), token_dim, temb_dim, context_dim, hidden_dim, group_size)

    def forward(self, layer: int, tokens: torch.Tensor, temb: torch.Tensor, pooled_context: torch.Tensor) -> torch.Tensor:
        return self.routers[layer // self.group_size](tokens, temb, pooled_context, layer % self.group_size)

    def score_context(self, layer: int, tokens: torch.Tensor, temb: torch.Tensor,
                      context: torch.Tensor) -> torch.Tensor:
        """Scores from the context tokens [B, L, Dc] (pooled by their mean): ``forward(..., context.mean(1))``. A
        caller with padded context tokens pools them itself (`patching.pooled_context`) and passes [B, 1, Dc]."""
        router = self.routers[layer // self.group_size]
        if kernels.usable(tokens, context) and kernels.router_supported(router, tokens):
            return kernels.router_scores(router, tokens, temb, context, layer % self.group_size)  # mean fused in
        return self(layer, tokens, temb, context.mean(dim=1))

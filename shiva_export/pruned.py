"""The pruned PyTorch model every stage starts from: backbone + routers + ratio policy, patched by hooks."""

from __future__ import annotations

import dataclasses

import torch

from shiva_export.errors import ConfigError
from shiva_export.models import ModelSource, load_transformer
from shiva_export.patching import PruningConfig, PruningState, apply_token_pruning
from shiva_export.policy import AdaptiveRatioPolicy
from shiva_export.router import RouterBank

DEFAULT_TARGET_KEEP = 0.6


@dataclasses.dataclass
class PrunedModel:
    transformer: torch.nn.Module
    routers: RouterBank
    policy: AdaptiveRatioPolicy
    state: PruningState
    source: ModelSource
    checkpoint_hash: str | None

    @property
    def config(self):
        return self.transformer.config

    def to_dtype(self, dtype: torch.dtype, router_fp32: bool = True) -> "PrunedModel":
        """Cast the backbone. router_fp32 keeps the routers in fp32 (tokens ranked as in the fp32 reference, at the
        cost of an fp32 copy of the tokens and an fp32 GEMM per block); False runs them in the backbone's dtype."""
        self.transformer.to(dtype)
        self.routers.to(torch.float32 if router_fp32 else dtype)
        self.policy.float()
        return self


def load_pruned_model(model: str, router_checkpoint: str | None = None, cfg_consistent: bool = False,
                      target_keep: float = DEFAULT_TARGET_KEEP, seed: int = 0, device: str = "cpu") -> PrunedModel:
    """Backbone from a preset/folder; routers+policy from a checkpoint, or seeded untrained ones.

    The checkpoint's config.json is checked before the backbone is built, so a damaged one fails at once.
    """
    if router_checkpoint:
        from shiva_export.checkpoint import read_config

        read_config(router_checkpoint)
    from shiva_export import backbones

    transformer, source = load_transformer(model, device=device)
    blocks = backbones.for_model(transformer).num_blocks(transformer.config)
    if blocks < 2:  # block 0 always runs dense (D3): a pruning hook would have nothing to attach to
        raise ConfigError(f"{model}: the transformer has {blocks} block; block 0 stays dense, so there is nothing "
                          "to prune (expected a model with at least 2 transformer blocks)")
    if router_checkpoint:
        from shiva_export.checkpoint import load_adapters, load_router_checkpoint

        routers, policy, meta = load_router_checkpoint(router_checkpoint, transformer, source)
        # the router was trained with the stage-3 adapters on: export the weights it was trained with
        transformer = load_adapters(router_checkpoint, transformer, source).to(device)
        checkpoint_hash = meta["checkpoint_hash"]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            routers = RouterBank.for_transformer(transformer)
            policy = AdaptiveRatioPolicy(blocks, target_keep)
        checkpoint_hash = None
    routers.to(device).eval().requires_grad_(False)
    policy.to(device).eval().requires_grad_(False)
    state = apply_token_pruning(transformer, routers,
                                PruningConfig(dense_layers=policy.dense_layers, cfg_consistent=cfg_consistent))
    return PrunedModel(transformer, routers, policy, state, source, checkpoint_hash)

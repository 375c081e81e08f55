"""Adaptive Ratio Policy (Eqs. 10-11), the EMA budget loss (Eqs. 12-13) and stratified sampling (Eq. 15, App. B)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from shiva_export.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000
CENTRE_POINTS = 64  # timesteps the time term is centred over (uniform on [0, 1000])


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float().reshape(-1, 1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaptiveRatioPolicy(nn.Module):
    """logit r_{t,l} = Phi_time(e_t) + Phi_layer(e_l) + b_anchor; r clamped to [r_min, 1]; dense layers keep 1.

    Decoupled additive form: the temporal trend is shared by every depth (the paper rejects FiLM here). Both
    branch outputs start at zero, so an untrained policy returns the target keep ratio everywhere.
    """

    def __init__(self, num_layers: int, target_keep: float = 0.6, r_min: float = 0.1,
                 dense_layers: Sequence[int] = (0,), hidden_dim: int = 256):
        super().__init__()
        if not 0 < target_keep <= 1:
            raise ConfigError(f"target keep ratio {target_keep:g} is outside (0, 1]")
        if not 0 < r_min <= target_keep:
            raise ConfigError(f"r_min {r_min:g} must be in (0, target_keep={target_keep:g}]")
        if num_layers < 1 or hidden_dim < 2 or hidden_dim % 2:
            raise ConfigError(f"policy sizes num_layers={num_layers}, hidden_dim={hidden_dim}; expected num_layers "
                              ">= 1 and an even hidden_dim >= 2 (the timestep embedding's sin-cos pairs)")
        bad = [layer for layer in dense_layers if not 0 <= layer < num_layers]
        if bad:
            raise ConfigError(f"dense layers {bad} are out of range for a {num_layers}-layer policy")
        self.num_layers, self.r_min, self.hidden_dim = num_layers, r_min, hidden_dim
        self.dense_layers = tuple(sorted(set(dense_layers)))
        self.time_mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))
        self.layer_table = nn.Embedding(num_layers, hidden_dim)
        self.layer_mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))
        anchor = math.log(target_keep / (1 - target_keep)) if target_keep < 1 else 6.0
        self.anchor = nn.Parameter(torch.tensor(anchor))
        self.keep_all = target_keep >= 1
        for head in (self.time_mlp[-1], self.layer_mlp[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        mask = torch.ones(num_layers, dtype=torch.bool)
        mask[list(self.dense_layers)] = False
        self.register_buffer("pruned_mask", mask, persistent=False)

    def logits(self, timesteps: torch.Tensor) -> torch.Tensor:
        """timesteps [T] in scheduler units (0..1000) -> logits [T, L].

        The time term is centred on its mean over a fixed grid of timesteps and the layer term on its mean over the
        pruned layers, so the anchor alone carries the level and the branches only the shape. The function class is
        that of Eq. 11; what changes is the optimisation: training can give the budget loss's gradient to the anchor
        alone (budget_gradient="anchor"), so its noise no longer drowns the time branch's weak signal.
        """
        timesteps = timesteps.reshape(-1).float()
        grid = (torch.arange(CENTRE_POINTS, dtype=torch.float32, device=timesteps.device) + 0.5) \
            * (NUM_TRAIN_TIMESTEPS / CENTRE_POINTS)
        time_all = self.time_mlp(sinusoidal_embedding(torch.cat([timesteps, grid]), self.hidden_dim))
        time_term = time_all[:len(timesteps)] - time_all[len(timesteps):].mean()                  # [T, 1]
        layers = torch.arange(self.num_layers, device=self.anchor.device)
        layer_term = self.layer_mlp(self.layer_table(layers)).reshape(1, -1)                  # [1, L]
        if bool(self.pruned_mask.any()):
            layer_term = layer_term - layer_term[:, self.pruned_mask].mean()
        return time_term + layer_term + self.anchor

    def forward(self, timesteps: torch.Tensor, logit_noise: float = 0.0, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Ratios [T, L]; logit_noise > 0 adds N(0, sigma^2) to the logits (stage 2 exploration, Eq. 29).

        ``noise``: the standard-normal draw to use (broadcast to [T, L]) instead of drawing one from ``generator``,
        for callers that need the draw itself (training's score-function term).
        """
        logits = self.logits(timesteps)
        if logit_noise:
            if noise is None:
                noise = torch.randn(logits.shape, generator=generator,
                                    device=logits.device if generator is None else "cpu")
            logits = logits + logit_noise * noise.to(logits.device)
        ratios = torch.sigmoid(logits).clamp(self.r_min, 1.0)
        if self.keep_all:  # logit(1) is infinite: a target of 1 means "never prune", not sigmoid(6) = 0.9975
            ratios = ratios - ratios.detach() + 1.0
        return torch.where(self.pruned_mask, ratios, torch.ones_like(ratios))

    def layer_branch_parameters(self) -> list[nn.Parameter]:
        return [*self.layer_table.parameters(), *self.layer_mlp.parameters()]

    @torch.no_grad()
    def ratios(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The deterministic lookup the freeze pass evaluates at the sampler's timesteps."""
        return self.forward(torch.as_tensor(timesteps, dtype=torch.float32))


class BudgetLoss(nn.Module):
    """L_budget = lambda_b * r_bar * sg[2 (mu - R_target)], mu an EMA (beta = 0.2) of the batch mean ratio (D10).

    Only the long-run mean is tied to the target, so individual batches (e.g. all high-noise) may differ from it.
    """

    def __init__(self, target_keep: float, beta: float = 0.2, weight: float = 1.0):
        super().__init__()
        if not 0 < target_keep <= 1:
            raise ConfigError(f"target keep ratio {target_keep:g} is outside (0, 1]")
        self.target_keep, self.beta, self.weight = target_keep, beta, weight
        self.register_buffer("ema", torch.tensor(float(target_keep)))

    def forward(self, batch_mean_ratio: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.ema.mul_(1 - self.beta).add_(self.beta * batch_mean_ratio.detach().float())
        return self.weight * batch_mean_ratio * (2 * (self.ema - self.target_keep)).detach()


def _check_strata(count: int, offset: int, total_strata: int | None) -> int:
    total = total_strata or count
    if count < 1 or offset < 0 or offset + count > total:
        raise ConfigError(f"strata {offset}..{offset + count - 1} are outside 0..{total - 1}; "
                          f"expected count >= 1 and 0 <= offset <= total_strata - count")
    return total


def stratified_timesteps(count: int, generator: torch.Generator, offset: int = 0, total_strata: int | None = None,
                         num_train_timesteps: int = 1000) -> torch.Tensor:
    """t_i ~ U[i T / B, (i + 1) T / B] (Eq. 15) for strata offset .. offset + count of total_strata (D11)."""
    total = _check_strata(count, offset, total_strata)
    strata = torch.arange(offset, offset + count, dtype=torch.float32)
    return (strata + torch.rand(count, generator=generator)) * (num_train_timesteps / total)


def stratified_ratios(count: int, r_min: float, r_max: float, generator: torch.Generator, offset: int = 0,
                      total_strata: int | None = None) -> torch.Tensor:
    """One keep ratio per group from disjoint sub-intervals of [r_min, r_max] (router warm-up, App. B.1)."""
    total = _check_strata(count, offset, total_strata)
    width = (r_max - r_min) / total
    strata = torch.arange(offset, offset + count, dtype=torch.float32)
    return r_min + (strata + torch.rand(count, generator=generator)) * width

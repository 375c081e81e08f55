"""The methods of the fidelity study (issue #18): what a user would run instead of Shiva-DiT, at several operating
points, each as a denoiser with the transformer's call signature.

A denoiser is called by the sampler exactly like the transformer, once per sampler step, steps in order:
``denoiser(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t, return_dict=False)[0]``. It
counts its calls since ``reset()`` (the run script calls it before each trajectory) to know the step index, refuses
more calls than the ``steps`` it was built for, and after a full trajectory ``flops_per_image()`` gives the
transformer FLOPs that trajectory spent per image (CFG's two halves included). FLOPs follow the project's
convention (``shiva_export/flops.py``: matrix products only, one multiply-add = 2) and are *measured*: forward
pre-hooks on each block's AdaLN (``norm1``), ``attn.to_q``, ``attn2.to_q``, ``ff`` and ``ff_context`` input
projections record which parts of which block ran on how many image tokens, and the FLOP model's per-part
formulas (``block_flops_breakdown``) price them; embeddings and the output head run on every call; Shiva's routers
are priced where the pruning state recorded a layer run with k < N; ToMe adds its matching product.
``tests/test_fidelity_methods.py`` checks this against torch's FlopCounterMode on every method.

Only SD3-family transformers (``SD3Transformer2DModel``, MMDiT / MMDiT-X blocks) are supported. A ``model``
argument is a ``PrunedModel`` (its transformer, run in dense mode outside the method's own calls) or a transformer.
Methods that add hooks to a transformer own it until ``close()``; another method refuses to run on it meanwhile.

Methods and their fidelity to the original:

* ``dense(model, steps)``: the unmodified transformer; a smaller ``steps`` is "fewer sampler steps".
* ``shiva_adaptive(pruned, schedule)``: Shiva-DiT as deployed here: the learned policy frozen by the project's
  freeze pass (``freeze_schedule``; per-step, per-layer k, aligned and bucketed, or ``bucketed=False`` for the
  aligned per-step table) run in static mode with hard top-k on the trained routers, CFG halves selecting one set
  (``max(s_uncond, s_cond)``). Same as the paper up to the project's recorded decisions (README "The method").
* ``shiva_uniform(pruned, keep, steps)``: the same routers with k = round(keep N) in every pruned layer and step
  (the paper's fixed-ratio baseline uses the same routers trained for it; ours were trained with the policy).
* ``random_select`` / ``grid_select``: the same k per (step, layer) as a Shiva operating point (a schedule) or a
  uniform keep, the same pruning machinery (PruningState's ``scorer`` replaces the routers, so gather / block on
  kept tokens / scatter-back are identical), but the kept set is a seeded uniformly random subset, redrawn per
  (step, layer), or a regular grid: tokens ranked by a Bayer (ordered-dither) matrix over the token grid, so
  keep 1/4 is exactly the stride-2 lattice, 1/16 the stride-4 lattice, 1/2 a checkerboard, and other k spread as
  evenly; ``cycle=True`` moves the lattice by one token per layer (offsets (0,0), (1,1), (0,1), (1,0) by
  (step + layer) mod 4) so that dropped tokens are processed by neighbouring layers. Block 0 stays dense.
* ``tome(model, ratio, steps)``: Token Merging for SD (Bolya & Hoffman 2023), our port of ``tomesd`` 0.1.3 to the
  SD3 ``JointTransformerBlock``: per block, the image tokens are split by a 2x2 stride into dst (one random token
  per window, seeded generator, redrawn per block call; the top-left token when the batch is odd, as tomesd) and
  src; cosine similarity on the block's input hidden states (tomesd's metric; the ViT original used the attention
  keys); the r = floor(ratio N) src tokens with the most similar dst are averaged into it (``scatter_reduce``
  mean, the dst itself included) before the joint attention, SD3.5's image-only ``attn2`` and the FFN, and copied
  back (unmerge) after, before the gate and the residual add; matching is per sample, the text tokens are never
  merged, no proportional attention (tomesd has none). Differences from tomesd: tomesd merges before self-attention
  only by default (``merge_mlp=False``) and only in the highest-resolution UNet blocks; here every block but
  block 0 merges before its attention and FFN. ``tome_ratio_for_flops`` picks the ratio whose FLOPs (matching
  product included) are closest to a target fraction of dense.
* ``first_block_cache(model, threshold, steps)``: diffusers' own ``apply_first_block_cache`` (ParaAttention's
  First-Block-Cache): block 0 always runs; if the relative L1 change of its residual since the last full step is
  at most ``threshold``, the other blocks are skipped and the cached residual of the last full step is added.
  One decision per call for the whole CFG batch. SD3's last block (``context_pre_only``) returns ``None`` for the
  context stream, which diffusers' tail hook subtracts (TypeError in diffusers 0.42); a passthrough hook under
  the cache hooks returns that block's input context instead, which SD3's forward discards, so the image stream
  and the cache's decisions are exactly diffusers'.
* ``taylorseer(model, steps, interval, order, warmup)``: diffusers' ``apply_taylorseer_cache`` (TaylorSeer, Liu et
  al. 2025): full steps during the first ``warmup`` steps and then every ``interval`` steps, order-``order``
  Taylor forecasts (finite differences between full steps) in between. As in the paper, the outputs of every
  block's attention (both streams), ``attn2``, FFN and context FFN are forecast; diffusers' default would forecast
  the joint attention only. Factors are kept in fp32 (diffusers defaults to bf16).
* ``shiva_plus_cache(pruned, schedule, threshold)``: ``shiva_adaptive`` with First-Block-Cache on the same blocks
  (cache hooks outside the pruning hooks in one HookRegistry: a computed block runs pruned, a skipped one not at
  all); threshold 0 equals Shiva alone bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch

from shiva_export import flops
from shiva_export.errors import ConfigError
from shiva_export.passes.freeze import TIMESTEP_ATOL, FreezeConfig, Schedule, freeze
from shiva_export.patching import (PruningConfig, apply_token_pruning, get_pruning_state, remove_token_pruning,
                                   scored_by, static_k)
from shiva_export.pruned import PrunedModel

OWNER = "_fidelity_owner"        # transformer attribute: the method whose hooks it carries
METER = "_fidelity_meter"        # transformer attribute: the shared _Meter
PASSTHROUGH_HOOK = "fidelity.context_passthrough"
TAYLORSEER_MODULES = r"transformer_blocks\.\d+\.(attn|attn2|ff|ff_context)"
# the FLOP model's parts of one block, by the module whose input the meter sees
PARTS = {"adaln": ("adaln",), "attn": ("image_qkvo", "context_qkv", "context_out", "joint_attention"),
         "attn2": ("image_attn2",), "ff": ("image_ffn",), "ff_context": ("context_ffn",)}


# --- validation ------------------------------------------------------------------------------------------------------

def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _keep(keep: Any) -> float:
    keep = _number(keep, "keep ratio")
    if not 0 < keep <= 1:
        raise ConfigError(f"keep ratio {keep:g} is outside (0, 1]")
    return keep


def _threshold(threshold: Any) -> float:
    threshold = _number(threshold, "cache threshold")
    if threshold < 0:
        raise ConfigError(f"cache threshold {threshold:g} must be >= 0")
    return threshold


def _transformer_of(model):
    transformer = model.transformer if isinstance(model, PrunedModel) else model
    if type(transformer).__name__ != "SD3Transformer2DModel":
        raise ConfigError(f"{type(transformer).__name__}: the fidelity methods support SD3Transformer2DModel only")
    return transformer


# --- FLOP meter ------------------------------------------------------------------------------------------------------

class _Meter:
    """Forward pre-hooks on each block's part inputs: while a metered call runs, record[(layer, part)] = (batch,
    tokens) of what ran (the last call of that part in the call)."""

    def __init__(self, transformer):
        self.record: dict | None = None
        for layer, block in enumerate(transformer.transformer_blocks):
            probes = {"adaln": block.norm1, "attn": block.attn.to_q,
                      "attn2": None if block.attn2 is None else block.attn2.to_q, "ff": block.ff.net[0].proj,
                      "ff_context": None if block.ff_context is None else block.ff_context.net[0].proj}
            for part, module in probes.items():
                if module is not None:
                    module.register_forward_pre_hook(self._probe(layer, part))

    def _probe(self, layer: int, part: str):
        def hook(module, args):
            if self.record is not None:
                self.record[layer, part] = tuple(args[0].shape[:2])
        return hook

    @contextlib.contextmanager
    def recording(self, record: dict):
        self.record = record
        try:
            yield record
        finally:
            self.record = None


def _meter_for(transformer) -> _Meter:
    meter = getattr(transformer, METER, None)
    if meter is None:
        meter = _Meter(transformer)
        setattr(transformer, METER, meter)
    return meter


def dense_flops_per_image(config, steps: int, num_tokens: int, context_tokens: int, cfg: bool = True) -> int:
    """The FLOP model's dense trajectory per image: steps x (2 with CFG) x one sample's forward."""
    return _integer(steps, "steps", 1) * (2 if cfg else 1) * flops.dense_model_flops(config, num_tokens,
                                                                                     context_tokens, 1)


# --- the denoiser --------------------------------------------------------------------------------------------------

class Denoiser:
    """One method at one operating point; see the module docstring."""

    def __init__(self, name: str, model, steps: int, cfg: bool = True):
        self.name, self.model = name, model
        self.transformer = _transformer_of(model)
        self.steps = _integer(steps, "steps", 1)
        self.cfg = bool(cfg)
        self.dims = flops.ModelDims.from_config(self.transformer.config)
        self._meter = _meter_for(self.transformer)
        self._prices: dict = {}
        self.closed = False
        self.reset()

    @property
    def config(self):
        return self.transformer.config

    @property
    def step(self) -> int:
        """Calls since reset(): the index of the next sampler step."""
        return len(self.call_flops)

    def reset(self) -> None:
        """Start a new trajectory: step 0, FLOPs cleared, the method's own state (caches, generators) reset."""
        self.call_flops: list[int] = []
        self.images: int | None = None
        self._reset()

    def flops_per_image(self) -> int:
        """Transformer FLOPs of the finished trajectory per image (both CFG halves), measured per call."""
        if self.step != self.steps:
            raise ConfigError(f"{self.name}: flops_per_image() after {self.step} of {self.steps} steps; run a whole "
                              "trajectory after reset()")
        return sum(self.call_flops) // self.images

    def close(self) -> None:
        """Remove the hooks this method added (none for hook-free methods)."""
        if not self.closed:
            self._close()
            if getattr(self.transformer, OWNER, None) is self:
                delattr(self.transformer, OWNER)
            self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{self.name}: {self.steps} steps>"

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 pooled_projections: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True, **kwargs):
        owner = getattr(self.transformer, OWNER, None)
        if self.closed:
            raise ConfigError(f"{self.name}: called after close()")
        if owner not in (None, self):
            raise ConfigError(f"{self.name}: the transformer carries the hooks of {owner!r}; close() that first")
        step = self.step
        if step >= self.steps:
            raise ConfigError(f"{self.name}: call {step + 1} but the method was built for {self.steps} steps; call "
                              "reset() before each trajectory")
        batch = hidden_states.shape[0]
        images = batch // 2 if self.cfg else batch
        if self.cfg and batch % 2:
            raise ConfigError(f"{self.name}: CFG batch must be [uncond; cond] (even), got batch {batch}")
        if self.images not in (None, images):
            raise ConfigError(f"{self.name}: batch changed within a trajectory ({self.images} -> {images} images)")
        patch = self.dims.patch_size
        grid = (hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch)
        num_tokens, context_tokens = grid[0] * grid[1], encoder_hidden_states.shape[1]
        record: dict = {}
        with torch.no_grad(), self._meter.recording(record), self._running(step, grid, timestep):
            out = self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   pooled_projections=pooled_projections, timestep=timestep,
                                   return_dict=return_dict, **kwargs)
        total = batch * sum(flops.embedding_flops(self.dims, num_tokens, context_tokens).values())
        total += sum(count * self._price(layer, part, tokens, context_tokens)
                     for (layer, part), (count, tokens) in record.items())
        self.call_flops.append(total + self._extra_flops(batch, num_tokens, context_tokens))
        self.images = images
        return out

    def _price(self, layer: int, part: str, tokens: int, context_tokens: int) -> int:
        key = layer, part, tokens, context_tokens
        if key not in self._prices:
            breakdown = flops.block_flops_breakdown(self.dims, layer, 0 if part in ("adaln", "ff_context") else tokens,
                                                    context_tokens)
            self._prices[key] = sum(breakdown[name] for name in PARTS[part])
        return self._prices[key]

    # what a method changes
    def _reset(self) -> None:
        pass

    def _running(self, step: int, grid: tuple[int, int], timestep: torch.Tensor):
        return contextlib.nullcontext()

    def _extra_flops(self, batch: int, num_tokens: int, context_tokens: int) -> int:
        return 0

    def _close(self) -> None:
        pass

    def _own(self) -> None:
        owner = getattr(self.transformer, OWNER, None)
        if owner is not None:
            raise ConfigError(f"{self.name}: the transformer already carries the hooks of {owner!r}; close() it first")
        setattr(self.transformer, OWNER, self)


def dense(model, steps: int, cfg: bool = True) -> Denoiser:
    """The unmodified transformer (a PrunedModel's in dense mode) for ``steps`` sampler steps."""
    return Denoiser(f"dense(steps={steps})", model, steps, cfg)


# --- Shiva and same-k baselines ------------------------------------------------------------------------------------

def freeze_schedule(pruned: PrunedModel, scheduler, steps: int, latent_size: int | Sequence[int],
                    context_tokens: int, *, align: int = 16, max_buckets: int = 4, batch: int = 2) -> Schedule:
    """The project's freeze pass on the pruned model's policy: what ``shiva_adaptive`` runs.

    scheduler: the sampler's diffusers scheduler (or its config dict; FlowMatchEuler at its own shift), so the policy
    is evaluated at exactly the timesteps the sampler visits. latent_size: the latent's pixels, int or (h, w).
    align / max_buckets: as the build's --align / --buckets (tiny-sd35's defaults); align=1 and max_buckets=steps
    run the policy's counts floor(N r) unrounded and unbucketed."""
    from shiva_export.models import scheduler_config

    config = dict(scheduler) if isinstance(scheduler, dict) else {**scheduler.config,
                                                                  "_class_name": type(scheduler).__name__}
    config = scheduler_config(config, "the sampler's scheduler")
    height, width = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    cfg = FreezeConfig(num_steps=steps, shift=config["shift"], scheduler=config, align=align,
                       max_buckets=max_buckets, dense_layers=pruned.policy.dense_layers)
    return freeze(pruned.policy.ratios, pruned.config, height, width, batch, context_tokens, cfg,
                  checkpoint_hash=pruned.checkpoint_hash, vae_scale_factor=1)


class _KPlan:
    """k per layer for each step: a frozen schedule's (bucketed or aligned), or k = round(keep N) everywhere."""

    def __init__(self, plan, steps: int | None, dense_layers: Sequence[int], num_layers: int, bucketed: bool = True):
        self.dense_layers, self.num_layers = tuple(dense_layers), num_layers
        if isinstance(plan, Schedule):
            if steps not in (None, plan.num_steps):
                raise ConfigError(f"steps={steps} but the schedule was frozen for {plan.num_steps} steps")
            if tuple(plan.freeze_config.dense_layers) != self.dense_layers or plan.num_layers != num_layers:
                raise ConfigError(f"the schedule's dense layers {list(plan.freeze_config.dense_layers)} of "
                                  f"{plan.num_layers} do not match the model's {list(self.dense_layers)} of "
                                  f"{num_layers}")
            self.schedule, self.keep, self.steps = plan, None, plan.num_steps
            self.table = plan.realised_k if bucketed else plan.k_table
            self.label = f"schedule {plan.schedule_hash[:8]}{'' if bucketed else ' aligned'}"
        else:
            if steps is None:
                raise ConfigError("a uniform keep ratio needs steps")
            self.schedule, self.keep, self.steps = None, _keep(plan), _integer(steps, "steps", 1)
            self.label = f"keep {self.keep:g}"

    def k(self, step: int, num_tokens: int, timestep: torch.Tensor) -> tuple[int, ...]:
        if self.schedule is None:
            kept = max(1, round(self.keep * num_tokens))
            return tuple(num_tokens if l in self.dense_layers else kept for l in range(self.num_layers))
        if num_tokens != self.schedule.num_tokens:
            raise ConfigError(f"the latent has {num_tokens} image tokens; the schedule was frozen for "
                              f"{self.schedule.num_tokens}")
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        if abs(t - self.schedule.timesteps[step]) > TIMESTEP_ATOL:
            raise ConfigError(f"step {step}: timestep {t:g}, but the schedule's step {step} is at "
                              f"{self.schedule.timesteps[step]:g}; the sampler's steps/shift differ from the freeze's")
        return tuple(self.table[step])


class _Pruned(Denoiser):
    """Static-k pruning through the project's hooks; the kept set from the routers or from ``_scorer``."""

    uses_router = True

    def __init__(self, name: str, model, plan, steps: int | None, cfg: bool, bucketed: bool = True):
        transformer = _transformer_of(model)
        state = get_pruning_state(transformer)
        if state is None and self.uses_router:
            raise ConfigError(f"{name.split('(')[0]}: needs a PrunedModel (trained routers)")
        if state is not None and cfg and not state.config.cfg_consistent:
            raise ConfigError(f"{name.split('(')[0]}: CFG needs CFG-consistent selection; load the model with "
                              "cfg_consistent=True")
        dense_layers = (0,) if state is None else state.config.dense_layers
        self.plan = _KPlan(plan, steps, dense_layers, len(transformer.transformer_blocks), bucketed)
        self.last_indices: dict[int, torch.Tensor] = {}
        self.last_kept: dict[int, int] = {}
        super().__init__(name.format(plan=self.plan.label), model, self.plan.steps, cfg)
        self._owned_pruning = state is None
        if state is None:   # a plain transformer: the project's pruning hooks, whose routers are never called
            self._own()
            from shiva_export.router import RouterBank

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                routers = RouterBank.for_transformer(transformer)
            state = apply_token_pruning(transformer, routers, PruningConfig(dense_layers=(0,), cfg_consistent=cfg))
        self.state = state

    def _scorer(self, step: int, grid: tuple[int, int]):
        return None

    @contextlib.contextmanager
    def _running(self, step, grid, timestep):
        k = self.plan.k(step, grid[0] * grid[1], timestep)
        scorer = self._scorer(step, grid)
        with static_k(self.transformer, k, record=True) as state, \
                (scored_by(self.transformer, scorer) if scorer else contextlib.nullcontext()):
            yield
            self.last_indices, self.last_kept = dict(state.indices), dict(state.processed_tokens)

    def _extra_flops(self, batch, num_tokens, context_tokens):
        if not self.uses_router:
            return 0
        return batch * sum(flops.block_flops_breakdown(self.dims, layer, k, context_tokens,
                                                       num_tokens=num_tokens)["router"]
                           for layer, k in self.last_kept.items())

    def _close(self):
        if self._owned_pruning:
            remove_token_pruning(self.transformer)


def shiva_adaptive(pruned: PrunedModel, schedule: Schedule, bucketed: bool = True, cfg: bool = True) -> Denoiser:
    """Shiva-DiT's learned schedule (``freeze_schedule``) in static mode on the trained routers."""
    return _Pruned("shiva_adaptive({plan})", _require_pruned(pruned), schedule, None, cfg, bucketed)


def shiva_uniform(pruned: PrunedModel, keep: float, steps: int, cfg: bool = True) -> Denoiser:
    """The trained routers with k = round(keep N) in every pruned layer and step."""
    return _Pruned("shiva_uniform({plan})", _require_pruned(pruned), keep, steps, cfg)


def _require_pruned(pruned) -> PrunedModel:
    if not isinstance(pruned, PrunedModel):
        raise ConfigError(f"expected a PrunedModel (load_pruned_model), got {type(pruned).__name__}")
    return pruned


class _RandomSelect(_Pruned):
    uses_router = False

    def __init__(self, model, plan, steps, seed: int, cfg: bool, bucketed: bool):
        self.seed = _integer(seed, "seed", 0)
        super().__init__(f"random_select({{plan}}, seed={seed})", model, plan, steps, cfg, bucketed)

    def _reset(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def _scorer(self, step, grid):
        def scores(layer, tokens, temb, pooled):  # one fresh uniform draw per (step, layer)
            return torch.rand(tokens.shape[:2], generator=self.generator).to(tokens.device)
        return scores


def random_select(model, plan, steps: int | None = None, seed: int = 0, bucketed: bool = True,
                  cfg: bool = True) -> Denoiser:
    """Same k as ``plan`` (a Schedule, or a uniform keep ratio with ``steps``), seeded uniformly random kept sets."""
    return _RandomSelect(model, plan, steps, seed, cfg, bucketed)


def bayer_ranks(height: int, width: int) -> torch.Tensor:
    """[height, width] ranks 0..hw-1 of the ordered-dither (Bayer) matrix: the first hw/4 ranks are the stride-2
    lattice (even row, even column), the first hw/16 the stride-4 lattice, the first hw/2 a checkerboard."""
    levels = max(1, math.ceil(math.log2(max(height, width))))
    y = torch.arange(height).reshape(-1, 1)
    x = torch.arange(width).reshape(1, -1)
    digit = torch.tensor([[0, 2], [3, 1]])
    value = torch.zeros(height, width, dtype=torch.int64)
    for level in range(levels):  # the finest level is the most significant digit
        value = value * 4 + digit[(y >> level) & 1, (x >> level) & 1]
    return value.reshape(-1).argsort().argsort().reshape(height, width)


GRID_OFFSETS = ((0, 0), (1, 1), (0, 1), (1, 0))


class _GridSelect(_Pruned):
    uses_router = False

    def __init__(self, model, plan, steps, cycle: bool, cfg: bool, bucketed: bool):
        self.cycle = bool(cycle)
        super().__init__(f"grid_select({{plan}}{', cycle' if cycle else ''})", model, plan, steps, cfg, bucketed)

    def _scorer(self, step, grid):
        ranks = bayer_ranks(*grid)

        def scores(layer, tokens, temb, pooled):  # higher = kept: the lowest ranks
            dy, dx = GRID_OFFSETS[(step + layer) % 4] if self.cycle else (0, 0)
            shifted = torch.roll(ranks, shifts=(dy, dx), dims=(0, 1)).reshape(1, -1)
            return (-shifted.float()).expand(tokens.shape[0], -1).to(tokens.device)
        return scores


def grid_select(model, plan, steps: int | None = None, cycle: bool = False, bucketed: bool = True,
                cfg: bool = True) -> Denoiser:
    """Same k as ``plan``, kept set a regular grid (Bayer order over the token grid; see the module docstring)."""
    return _GridSelect(model, plan, steps, cycle, cfg, bucketed)


# --- ToMe ------------------------------------------------------------------------------------------------------------

def _do_nothing(x: torch.Tensor) -> torch.Tensor:
    return x


def bipartite_soft_matching_random2d(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int,
                                     no_rand: bool = False, generator: torch.Generator | None = None):
    """tomesd 0.1.3's ``merge.bipartite_soft_matching_random2d``: (merge, unmerge) removing r image tokens of
    metric [B, N, C] on an h x w grid; dst = one token per sy x sx window (random, or top-left when no_rand)."""
    batch, num_tokens, _ = metric.shape
    if r <= 0:
        return _do_nothing, _do_nothing
    with torch.no_grad():
        hsy, wsx = h // sy, w // sx
        if no_rand:
            rand_idx = torch.zeros(hsy, wsx, 1, device=metric.device, dtype=torch.int64)
        else:
            rand_idx = torch.randint(sy * sx, size=(hsy, wsx, 1), generator=generator).to(metric.device)
        buffer_view = torch.zeros(hsy, wsx, sy * sx, device=metric.device, dtype=torch.int64)
        buffer_view.scatter_(dim=2, index=rand_idx, src=-torch.ones_like(rand_idx))
        buffer_view = buffer_view.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
        if hsy * sy < h or wsx * sx < w:
            buffer = torch.zeros(h, w, device=metric.device, dtype=torch.int64)
            buffer[:hsy * sy, :wsx * sx] = buffer_view
        else:
            buffer = buffer_view
        rand_idx = buffer.reshape(1, -1, 1).argsort(dim=1)   # dst (-1) first, then src (0); stable on ties
        num_dst = hsy * wsx
        a_idx, b_idx = rand_idx[:, num_dst:, :], rand_idx[:, :num_dst, :]

        def split(x):
            c = x.shape[-1]
            return (torch.gather(x, 1, a_idx.expand(batch, num_tokens - num_dst, c)),
                    torch.gather(x, 1, b_idx.expand(batch, num_dst, c)))

        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = split(metric)
        scores = a @ b.transpose(-1, -2)
        r = min(a.shape[1], r)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = torch.gather(node_idx[..., None], -2, src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        n, t1, c = src.shape
        unm = torch.gather(src, -2, unm_idx.expand(n, t1 - r, c))
        src = torch.gather(src, -2, src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        c = unm.shape[-1]
        src = torch.gather(dst, -2, dst_idx.expand(batch, r, c))
        out = torch.zeros(batch, num_tokens, c, device=x.device, dtype=x.dtype)
        out.scatter_(-2, b_idx.expand(batch, num_dst, c), dst)
        out.scatter_(-2, torch.gather(a_idx.expand(batch, a_idx.shape[1], 1), 1, unm_idx).expand(batch, unm_len, c),
                     unm)
        out.scatter_(-2, torch.gather(a_idx.expand(batch, a_idx.shape[1], 1), 1, src_idx).expand(batch, r, c), src)
        return out

    merge.matching_flops = 2 * batch * a.shape[1] * num_dst * metric.shape[-1]   # the a @ b^T product
    merge.kept = num_tokens - r
    return merge, unmerge


def _tome_r(ratio: float, num_tokens: int) -> int:
    return int(math.floor(ratio * num_tokens + 1e-9))   # tomesd: int(N * ratio); the epsilon absorbs ratio = r / N


def _tome_ratio(ratio: Any, sx: int, sy: int) -> float:
    ratio = _number(ratio, "ToMe ratio")
    most = 1 - 1 / (sx * sy)
    if not 0 <= ratio <= most:
        raise ConfigError(f"ToMe ratio {ratio:g} is outside [0, {most:g}] (at most the src tokens of a {sy}x{sx} "
                          "stride merge)")
    return ratio


class _ToMe(Denoiser):
    def __init__(self, model, ratio: float, steps: int, seed: int, sx: int, sy: int, cfg: bool):
        self.sx, self.sy = _integer(sx, "sx", 1), _integer(sy, "sy", 1)
        self.ratio, self.seed = _tome_ratio(ratio, self.sx, self.sy), _integer(seed, "seed", 0)
        super().__init__(f"tome(ratio={self.ratio:g})", model, steps, cfg)
        self._own()
        state = get_pruning_state(self.transformer)
        dense_layers = state.config.dense_layers if state is not None else (0,)
        self.grid, self.plans, self.handles = None, {}, []
        for layer, block in enumerate(self.transformer.transformer_blocks):
            if layer in dense_layers:
                continue
            self.handles.append(block.norm1.register_forward_pre_hook(self._planner(layer)))
            for module in (block.attn, block.attn2, block.ff):
                if module is not None:
                    self.handles.append(module.register_forward_pre_hook(self._merger(layer), with_kwargs=True))
                    self.handles.append(module.register_forward_hook(self._unmerger(layer)))

    def _reset(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        self.matching = 0

    def _planner(self, layer):
        def hook(module, args):  # norm1(hidden_states, ...): the block's input, tomesd's metric
            if self.grid is None:   # a call of the transformer outside this denoiser: no merging
                self.plans[layer] = _do_nothing, _do_nothing
                return
            x = args[0]
            h, w = self.grid
            merge, unmerge = bipartite_soft_matching_random2d(
                x, w, h, self.sx, self.sy, _tome_r(self.ratio, x.shape[1]), no_rand=x.shape[0] % 2 == 1,
                generator=self.generator)
            self.matching += getattr(merge, "matching_flops", 0)
            self.plans[layer] = merge, unmerge
        return hook

    def _merger(self, layer):
        def hook(module, args, kwargs):
            merge = self.plans[layer][0]
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": merge(kwargs["hidden_states"])}
            return (merge(args[0]), *args[1:]), kwargs
        return hook

    def _unmerger(self, layer):
        def hook(module, args, output):
            unmerge = self.plans[layer][1]
            return (unmerge(output[0]), *output[1:]) if isinstance(output, tuple) else unmerge(output)
        return hook

    @contextlib.contextmanager
    def _running(self, step, grid, timestep):
        self.grid, self.matching = grid, 0
        try:
            yield
        finally:
            self.grid, self.plans = None, {}

    def _extra_flops(self, batch, num_tokens, context_tokens):
        return self.matching

    def _close(self):
        for handle in self.handles:
            handle.remove()


def tome(model, ratio: float, steps: int, seed: int = 0, sx: int = 2, sy: int = 2, cfg: bool = True) -> Denoiser:
    """ToMe for SD on every block but block 0: r = floor(ratio N) image tokens merged before attention and FFN."""
    return _ToMe(model, ratio, steps, seed, sx, sy, cfg)


def tome_flops_fraction(config, ratio: float, grid: tuple[int, int], context_tokens: int, sx: int = 2,
                        sy: int = 2, dense_layers: Sequence[int] = (0,)) -> float:
    """FLOPs of one ToMe forward over the dense one (the FLOP model; matching product included)."""
    dims = flops.ModelDims.from_config(config)
    h, w = grid
    n = h * w
    num_dst = (h // sy) * (w // sx)
    r = min(_tome_r(_tome_ratio(ratio, sx, sy), n), n - num_dst)
    merged = sum(flops.embedding_flops(dims, n, context_tokens).values())
    for layer in range(dims.num_layers):
        if layer in dense_layers or r == 0:
            merged += flops.block_flops(dims, layer, n, context_tokens)
        else:   # the block on n - r tokens, and the matching product a @ b^T of tomesd
            merged += flops.block_flops(dims, layer, n - r, context_tokens)
            merged += 2 * (n - num_dst) * num_dst * dims.inner_dim
    return merged / flops.dense_model_flops(dims, n, context_tokens, 1)


def tome_ratio_for_flops(config, target: float, grid: tuple[int, int], context_tokens: int, sx: int = 2,
                         sy: int = 2) -> float:
    """The ToMe ratio r / N whose FLOPs (matching included) are nearest ``target`` x dense, for an h x w token grid."""
    target = _number(target, "target FLOP fraction")
    h, w = grid
    n = h * w
    most = n - (h // sy) * (w // sx)
    fractions = [tome_flops_fraction(config, r / n, grid, context_tokens, sx, sy) for r in range(most + 1)]
    if not min(fractions) <= target <= 1:
        raise ConfigError(f"target FLOP fraction {target:g}: ToMe reaches {min(fractions):.3f}..1 of dense here")
    best = min(range(most + 1), key=lambda r: abs(fractions[r] - target))
    return best / n


# --- caches (diffusers' hooks) ---------------------------------------------------------------------------------------

class _ContextPassthrough:
    """Under First-Block-Cache on SD3's last block: its ``None`` context output becomes the block's input context
    (SD3's forward discards it), so diffusers' tail hook can take its residual. Built as a diffusers ModelHook."""

    @staticmethod
    def hook():
        from diffusers.hooks import ModelHook

        class ContextPassthrough(ModelHook):
            def new_forward(self, module, *args, **kwargs):
                context, hidden = self.fn_ref.original_forward(*args, **kwargs)
                return (kwargs["encoder_hidden_states"] if context is None else context), hidden

        return ContextPassthrough()


class _Cached(Denoiser):
    """A diffusers cache on the transformer's blocks; its state is keyed by the cache context this sets per call."""

    def __init__(self, name: str, model, steps: int, cfg: bool):
        super().__init__(name, model, steps, cfg)
        self._own()
        from diffusers.hooks import HookRegistry

        self.registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        self.hook_names = self._apply()
        self.registry.invalidate_child_registries_cache()
        self._reset()

    def _apply(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _reset(self):
        registry = getattr(self, "registry", None)
        if registry is not None:   # diffusers' own reset between sampling runs (pipelines' maybe_free_model_hooks)
            registry.reset_stateful_hooks(recurse=True)

    @contextlib.contextmanager
    def _running(self, step, grid, timestep):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.transformer, CacheContext("cfg-batch", step_index=step, num_inference_steps=self.steps))
        try:
            with self._inner(step, grid, timestep):
                yield
        finally:
            _set_cache_context(self.transformer, None)

    def _inner(self, step, grid, timestep):
        return contextlib.nullcontext()

    def _close(self):
        for name in self.hook_names:
            self.registry.remove_hook(name, recurse=True)
        self.registry.invalidate_child_registries_cache()


class _FirstBlockCache(_Cached):
    def __init__(self, model, threshold: float, steps: int, cfg: bool):
        self.threshold = _threshold(threshold)
        super().__init__(f"first_block_cache(threshold={self.threshold:g})", model, steps, cfg)

    def _apply(self):
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        last = self.transformer.transformer_blocks[-1]
        HookRegistry.check_if_exists_or_initialize(last).register_hook(_ContextPassthrough.hook(), PASSTHROUGH_HOOK)
        apply_first_block_cache(self.transformer, FirstBlockCacheConfig(threshold=self.threshold))
        return _FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK, PASSTHROUGH_HOOK


def first_block_cache(model, threshold: float, steps: int, cfg: bool = True) -> Denoiser:
    """diffusers' First-Block-Cache: skip blocks 1.. when block 0's residual changed by at most ``threshold``."""
    return _FirstBlockCache(model, threshold, steps, cfg)


class _TaylorSeer(_Cached):
    def __init__(self, model, steps: int, interval: int, order: int, warmup: int, cfg: bool):
        self.interval = _integer(interval, "TaylorSeer interval", 1)
        self.order = _integer(order, "TaylorSeer order", 0)
        self.warmup = _integer(warmup, "TaylorSeer warmup", 1)
        super().__init__(f"taylorseer(interval={interval}, order={order}, warmup={warmup})", model, steps, cfg)

    def _apply(self):
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        apply_taylorseer_cache(self.transformer, TaylorSeerCacheConfig(
            cache_interval=self.interval, disable_cache_before_step=self.warmup, max_order=self.order,
            taylor_factors_dtype=torch.float32, cache_identifiers=[TAYLORSEER_MODULES]))
        return (_TAYLORSEER_CACHE_HOOK,)


def taylorseer(model, steps: int, interval: int = 5, order: int = 1, warmup: int = 3, cfg: bool = True) -> Denoiser:
    """diffusers' TaylorSeer on every block's attention, attn2, FFN and context FFN outputs."""
    return _TaylorSeer(model, steps, interval, order, warmup, cfg)


class _ShivaPlusCache(_FirstBlockCache):
    def __init__(self, pruned: PrunedModel, schedule: Schedule, threshold: float, bucketed: bool, cfg: bool):
        self.shiva = shiva_adaptive(pruned, schedule, bucketed, cfg)
        super().__init__(pruned, threshold, self.shiva.steps, cfg)
        self.name = f"shiva_plus_cache({self.shiva.plan.label}, threshold={self.threshold:g})"

    def _inner(self, step, grid, timestep):
        return self.shiva._running(step, grid, timestep)

    def _extra_flops(self, batch, num_tokens, context_tokens):
        return self.shiva._extra_flops(batch, num_tokens, context_tokens)

    @property
    def last_kept(self) -> dict[int, int]:
        return self.shiva.last_kept


def shiva_plus_cache(pruned: PrunedModel, schedule: Schedule, threshold: float, bucketed: bool = True,
                     cfg: bool = True) -> Denoiser:
    """Shiva's learned schedule with First-Block-Cache on the same blocks (the cache's hooks outside the pruning's)."""
    return _ShivaPlusCache(_require_pruned(pruned), schedule, threshold, bucketed, cfg)

"""Freeze a learned ratio policy into static k buckets: the schedule that every later stage compiles.

Shiva-DiT's policy gives a keep ratio r[t, l] for any (timestep, layer) (D9). A static engine needs one k per
layer, so freezing (D13, D14):

1. evaluates the policy at the real timesteps of diffusers' ``FlowMatchEulerDiscreteScheduler(shift)`` for one step
   count -> ratios [T, L];
2. turns them into token counts ``k = clamp(align_up(max(1, floor(N r))), k_min, N)``, dense layers N. ``floor(N r)``
   is the count the model was trained with (D6, ``topk.DifferentiableTopK``); rounding it *up* to the alignment
   means no layer ever drops more tokens than the model learned to drop;
3. groups the steps into at most B buckets of contiguous steps; a bucket's k per layer is the max over its steps, and
   the grouping minimises the realised FLOPs (exact dynamic programme);
4. records the policy's ratios, the k tables, the buckets, the learned / aligned / realised keep ratios and FLOPs,
   the shapes and the input hashes in a versioned, hashed ``Schedule`` (``shiva.schedule/1``).
"""

from __future__ import annotations

__all__ = [
    "FREEZE_CONFIG_SCHEMA",
    "SCHEDULE_SCHEMA",
    "ALIGN_TARGETS",
    "Bucket",
    "Bucketing",
    "FreezeConfig",
    "Schedule",
    "ScheduleSummary",
    "StepFlops",
    "constant_ratio_policy",
    "evaluate_policy",
    "freeze",
    "group_buckets",
    "k_table",
    "learned_counts",
    "scheduler_timesteps",
]

import dataclasses
import functools
import json
import logging
import math
import operator
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from shiva_export.errors import ArtifactError, ConfigError
from shiva_export.flops import ModelDims, block_flops, embedding_flops
from shiva_export.io import sha256_json, write_json
from shiva_export.models import VAE_SCALE_FACTOR, num_image_tokens

logger = logging.getLogger(__name__)

SCHEDULE_SCHEMA = "shiva.schedule/1"
FREEZE_CONFIG_SCHEMA = 1
# Frozen timesteps are float32 scheduler values; at 1000 steps and shift 3 neighbours are still >= 0.3 apart.
TIMESTEP_ATOL = 1e-2

RatioFn = Callable[[torch.Tensor], torch.Tensor]
CostFn = Callable[[np.ndarray], float]


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError as err:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from err
    if number < minimum:
        raise ConfigError(f"{name}={number} must be >= {minimum}")
    return number


# What a pruned layer's k is rounded up to: k a multiple of align ("k"), k + context tokens a multiple of align
# ("sequence": the joint attention's length), or whichever of the two comes first ("either"). cuDNN's fused attention
# on the H200 runs a length that is a multiple of 128 1.10-1.14x faster than one 16 tokens *shorter*
# (docs/benchmarks/h200/attention-lengths.md). In a dual-attention block k is also the length of the image-only
# attention, so neither target wins everywhere; "either" never rounds up further than "k" does.
ALIGN_TARGETS = ("k", "sequence", "either")
# realised minus aligned keep ratio beyond which freeze warns that the bucket count throws pruning away
BUCKETING_WARN_KEEP = 0.05


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
    """How learned ratios become fixed k buckets; travels inside every schedule (P2)."""

    num_steps: int = 28  # sampler steps; the stages pass the artifact's --steps
    shift: float = 3.0  # flow-matching timestep shift; the stages pass the pipeline scheduler's
    align: int = 64  # k of a pruned layer is rounded up to a multiple of this (tensor-core tiles)
    align_to: str = "k"  # what is a multiple of align: "k", "sequence" (k + context tokens) or "either"
    k_min: int | None = None  # smallest k of a pruned layer; None -> align
    max_buckets: int = 4  # most distinct k-vectors, i.e. engines to build
    dense_layers: tuple[int, ...] = (0,)  # blocks that are never pruned (D3)
    # the pipeline's scheduler config (models.scheduler_config, with `shift`); None: diffusers'
    # FlowMatchEulerDiscreteScheduler with its defaults at `shift` (the stages always pass the pipeline's)
    scheduler: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _int(self.num_steps, "FreezeConfig.num_steps", 1)
        _int(self.align, "FreezeConfig.align", 1)
        if self.align_to not in ALIGN_TARGETS:
            raise ConfigError(f"FreezeConfig.align_to must be one of {list(ALIGN_TARGETS)}, got {self.align_to!r}")
        _int(self.max_buckets, "FreezeConfig.max_buckets", 1)
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) or not (
                math.isfinite(self.shift) and self.shift > 0):
            raise ConfigError(f"FreezeConfig.shift must be a finite number > 0, got {self.shift!r}")
        object.__setattr__(self, "shift", float(self.shift))
        if self.scheduler is not None:
            if not isinstance(self.scheduler, Mapping) or self.scheduler.get("shift") != self.shift:
                raise ConfigError(f"FreezeConfig.scheduler must be a scheduler config whose shift is {self.shift:g}, "
                                  f"got {self.scheduler!r}")
            object.__setattr__(self, "scheduler", dict(self.scheduler))
        if self.k_min is None:
            object.__setattr__(self, "k_min", self.align)
        _int(self.k_min, "FreezeConfig.k_min", 1)
        if isinstance(self.dense_layers, (str, bytes)) or not isinstance(self.dense_layers, Iterable):
            raise ConfigError(
                f"FreezeConfig.dense_layers must be a sequence of block indices, got {self.dense_layers!r}")
        layers = tuple(sorted({_int(i, "FreezeConfig.dense_layers entry", 0) for i in self.dense_layers}))
        object.__setattr__(self, "dense_layers", layers)

    def to_json(self) -> dict:
        data = {"schema": FREEZE_CONFIG_SCHEMA, **dataclasses.asdict(self), "dense_layers": list(self.dense_layers)}
        if self.scheduler is None:  # schedules frozen before pipelines declared their scheduler read as before
            del data["scheduler"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FreezeConfig":
        """Inverse of to_json; raises ConfigError for an unknown schema, unknown keys or invalid values."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"freeze config must be a JSON object, got {type(data).__name__}")
        if data.get("schema") != FREEZE_CONFIG_SCHEMA:
            raise ConfigError(
                f"freeze config schema {data.get('schema')!r} is unknown; expected {FREEZE_CONFIG_SCHEMA}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - {"schema"})
        if unknown:
            raise ConfigError(f"freeze config has unknown keys {unknown}; expected {sorted(fields)}")
        return cls(**{key: value for key, value in data.items() if key != "schema"})


def make_scheduler(shift: float, scheduler: Mapping[str, Any] | None = None):
    """The pipeline's scheduler: built from its config (models.scheduler_config), or FlowMatchEuler(shift)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from shiva_export.models import scheduler_has_shift

    if scheduler is None:
        return FlowMatchEulerDiscreteScheduler(shift=float(shift))
    if not scheduler_has_shift(scheduler):   # e.g. DPM-Solver: its config alone decides the timesteps
        sampler = getattr(diffusers, scheduler["_class_name"]).from_config(
            {key: value for key, value in scheduler.items() if key != "shift"})
        sampler.pipeline_sigmas = None
        return sampler
    sampler = FlowMatchEulerDiscreteScheduler.from_config(
        {key: value for key, value in scheduler.items() if key != "_sigmas"} | {"shift": float(shift)})
    sampler.pipeline_sigmas = scheduler.get("_sigmas")   # read by set_pipeline_timesteps
    return sampler


def set_pipeline_timesteps(scheduler, num_steps: int, image_seq_len: int | None) -> None:
    """`scheduler.set_timesteps` as the pipeline calls it: with dynamic shifting, mu comes from the image sequence
    length (diffusers' calculate_shift over the scheduler config's base/max lengths and shifts); a scheduler made
    for a pipeline that passes its own sigmas (`_sigmas: linspace`, the adapter's folder facts) gets linspace(1, 1/n, n)."""
    config, kwargs = scheduler.config, {}
    if config.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ConfigError("a scheduler with dynamic shifting needs the image sequence length")
        kwargs["mu"] = dynamic_shift_mu(config, image_seq_len)
    if getattr(scheduler, "pipeline_sigmas", None) == "linspace" and not config.get("use_flow_sigmas", False):
        kwargs["sigmas"] = np.linspace(1.0, 1 / int(num_steps), int(num_steps))
    scheduler.set_timesteps(int(num_steps), **kwargs)


def dynamic_shift_mu(config: Mapping[str, Any], image_seq_len: int) -> float:
    """mu of a dynamically shifted scheduler at this image length: diffusers' calculate_shift, a line through
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), with the pipeline's defaults."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def scheduler_timesteps(num_steps: int, shift: float, scheduler: Mapping[str, Any] | None = None,
                        image_seq_len: int | None = None) -> torch.Tensor:
    """The timesteps (0..1000, float32) that the pipeline's scheduler visits in num_steps steps: exactly what
    the pipeline steps its scheduler through (diffusers' FlowMatchEulerDiscreteScheduler at `shift` when no
    scheduler config is given; with dynamic shifting, at this image sequence length)."""
    FreezeConfig(num_steps=num_steps, shift=shift, scheduler=scheduler)  # validates them
    sampler = make_scheduler(shift, scheduler)
    set_pipeline_timesteps(sampler, num_steps, image_seq_len)
    return sampler.timesteps.detach().clone()


def scheduler_text(cfg: FreezeConfig) -> str:
    from shiva_export.models import scheduler_has_shift

    scheduler = cfg.scheduler or {}
    if not scheduler_has_shift(cfg.scheduler):
        details = ", ".join(f"{key} {scheduler[key]}" for key in ("algorithm_type", "solver_order", "timestep_spacing")
                            if key in scheduler)
        return f"{scheduler['_class_name']} ({details})"
    dynamic = ", dynamic shifting" if scheduler.get("use_dynamic_shifting") else ""
    return f"{scheduler.get('_class_name', 'FlowMatchEulerDiscreteScheduler')} shift={cfg.shift:g}{dynamic}"


def _validated_ratios(ratios: Any, where: str = "ratios") -> torch.Tensor:
    table = torch.as_tensor(ratios).detach().cpu()
    if table.ndim != 2 or table.numel() == 0:
        raise ConfigError(f"{where}: expected a non-empty [steps, layers] table, got shape {tuple(table.shape)}")
    if not table.is_floating_point():
        table = table.double()
    bad = ~(torch.isfinite(table) & (table > 0) & (table <= 1))
    if bool(bad.any()):
        step, layer = (int(i) for i in bad.nonzero()[0])
        raise ConfigError(f"{where}: keep ratio {table[step, layer].item():.6g} at step {step}, layer {layer} is "
                          "outside (0, 1]; the policy must return ratios clamped to [r_min, 1]")
    return table


def learned_counts(ratios: Any, num_tokens: int) -> np.ndarray:
    """Tokens the trained model keeps: max(1, floor(N r)) with r and the product in float32, exactly as training
    computes it (D6, ``topk.DifferentiableTopK``)."""
    table = _validated_ratios(ratios).to(torch.float32)
    num_tokens = _int(num_tokens, "num_tokens (N)", 1)
    return torch.floor(num_tokens * table).clamp_min(1).to(torch.int64).numpy()


def k_table(ratios: Any, num_tokens: int, cfg: FreezeConfig, context_tokens: int = 0) -> np.ndarray:
    """Per-step, per-layer k [T, L]: clamp(align_up(max(1, floor(N r))), k_min, N); dense layers get N.

    Args:
        ratios: [T, L] keep ratios in (0, 1] (torch tensor or array).
        num_tokens: N, image tokens of the latent.
        cfg: alignment, k_min and dense layers. With ``align_to="sequence"`` the rounding makes k + S a multiple
            of the alignment instead of k; with ``"either"``, the smaller of the two rounded values.
        context_tokens: S, text tokens of the joint attention; unused with ``align_to="k"``.
    """
    counts = learned_counts(ratios, num_tokens)
    num_layers = counts.shape[1]
    outside = [layer for layer in cfg.dense_layers if layer >= num_layers]
    if outside:
        raise ConfigError(f"dense layers {outside} do not exist; the ratio table has {num_layers} layers")
    offset = _int(context_tokens, "context_tokens", 0)
    by_k = -(-counts // cfg.align) * cfg.align
    by_sequence = -(-(counts + offset) // cfg.align) * cfg.align - offset
    aligned = {"k": by_k, "sequence": by_sequence, "either": np.minimum(by_k, by_sequence)}[cfg.align_to]
    table = np.minimum(np.maximum(aligned, cfg.k_min), num_tokens)  # k_min > N: every layer runs dense
    table[:, list(cfg.dense_layers)] = num_tokens
    return table.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Bucketing:
    """Steps grouped into buckets of contiguous steps; each bucket runs at its k-vector."""

    step_to_bucket: tuple[int, ...]
    bucket_k: tuple[tuple[int, ...], ...]
    cost: float  # sum over steps of cost_fn(bucket k of the step)

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_k)

    def steps_of(self, bucket: int) -> tuple[int, ...]:
        return tuple(step for step, b in enumerate(self.step_to_bucket) if b == bucket)


def _validated_k_table(table: Any) -> np.ndarray:
    array = np.asarray(table)
    if array.ndim != 2 or array.size == 0:
        raise ConfigError(f"k table: expected a non-empty [steps, layers] table, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(f"k table: expected integer token counts, got dtype {array.dtype}")
    if (array < 0).any():
        raise ConfigError(f"k table: token counts must be >= 0, found {int(array.min())}")
    return array.astype(np.int64)


def group_buckets(k_table: Any, max_buckets: int, cost_fn: CostFn) -> Bucketing:
    """Group the steps into at most max_buckets buckets of contiguous steps with the least total realised cost.

    A bucket's k-vector is the elementwise max over its steps; the realised cost is the sum over steps of
    ``cost_fn(bucket k-vector)``. Runs of identical consecutive k-vectors always share a bucket, and the fewest
    buckets reaching the optimum are used (so a table with fewer runs than max_buckets gets fewer buckets).

    Solved exactly by dynamic programming over the R runs: O(max_buckets * R^2) and O(R^2) calls of cost_fn
    (memoised per distinct k-vector). Exact whenever cost_fn is non-decreasing in every k (FLOPs are): then a
    bucket boundary inside a run of identical steps never helps.

    Args:
        k_table: [T, L] integer token counts per step and layer.
        max_buckets: B >= 1.
        cost_fn: price of one step run at a k-vector [L] (e.g. ``StepFlops``); must return a finite number.
    """
    max_buckets = _int(max_buckets, "max_buckets (B)", 1)
    table = _validated_k_table(k_table)
    steps = table.shape[0]
    starts = [0] + [t for t in range(1, steps) if (table[t] != table[t - 1]).any()]
    lengths = np.diff(starts + [steps])
    runs = table[starts]
    num_runs = len(starts)

    memo: dict[bytes, float] = {}

    def price(vector: np.ndarray) -> float:
        key = vector.tobytes()
        if key not in memo:
            value = float(cost_fn(vector.copy()))
            if not math.isfinite(value):
                raise ConfigError(
                    f"cost_fn returned {value!r} for k-vector {vector.tolist()}; expected a finite number")
            memo[key] = value
        return memo[key]

    # segment[i, j]: total cost of runs i..j (inclusive) as one bucket.
    segment = np.full((num_runs, num_runs), np.inf)
    for i in range(num_runs):
        peak, count = runs[i].copy(), 0
        for j in range(i, num_runs):
            np.maximum(peak, runs[j], out=peak)
            count += int(lengths[j])
            segment[i, j] = count * price(peak)

    most = min(max_buckets, num_runs)
    best = np.full((most + 1, num_runs + 1), np.inf)  # best[b, j]: first j runs in exactly b buckets
    best[0, 0] = 0.0
    split = np.zeros((most + 1, num_runs + 1), dtype=np.int64)
    for b in range(1, most + 1):
        for j in range(b, num_runs + 1):
            candidates = best[b - 1, b - 1:j] + segment[b - 1:j, j - 1]  # last bucket = runs i..j-1
            offset = int(np.argmin(candidates))
            best[b, j], split[b, j] = candidates[offset], b - 1 + offset
    totals = best[1:, num_runs]
    optimum = float(totals.min())
    chosen = 1 + int(np.flatnonzero(totals <= optimum + 1e-12 * max(1.0, abs(optimum)))[0])

    bounds, j = [], num_runs
    for b in range(chosen, 0, -1):
        i = int(split[b, j])
        bounds.append((i, j))
        j = i
    bounds.reverse()

    step_to_bucket = np.empty(steps, dtype=np.int64)
    bucket_k, cost = [], 0.0
    for bucket, (first_run, end_run) in enumerate(bounds):
        first_step = starts[first_run]
        end_step = starts[end_run] if end_run < num_runs else steps
        step_to_bucket[first_step:end_step] = bucket
        peak = table[first_step:end_step].max(axis=0)
        bucket_k.append(tuple(int(k) for k in peak))
        cost += (end_step - first_step) * price(peak)
    return Bucketing(tuple(int(b) for b in step_to_bucket), tuple(bucket_k), cost)


class StepFlops:
    """FLOPs of one denoising step (whole batch) at a k-vector; the freeze pass's bucket cost.

    Separable over layers, so block costs are memoised per (layer, k) on the instance.
    """

    def __init__(self, model_config: Mapping[str, Any] | ModelDims, num_tokens: int, context_tokens: int, batch: int):
        self.dims = ModelDims.from_config(model_config)
        self.num_tokens = _int(num_tokens, "num_tokens (N)", 1)
        self.context_tokens = _int(context_tokens, "context_tokens", 1)
        self.batch = _int(batch, "batch", 1)
        self._base = sum(embedding_flops(self.dims, self.num_tokens, self.context_tokens).values())

        self._blocks: dict[tuple[int, int], int] = {}

    def _block(self, layer: int, k: int) -> int:
        if (layer, k) not in self._blocks:
            self._blocks[layer, k] = block_flops(self.dims, layer, k, self.context_tokens, num_tokens=self.num_tokens)
        return self._blocks[layer, k]

    def __call__(self, k_vector: Sequence[int]) -> int:
        ks = [int(k) for k in k_vector]
        if len(ks) != self.dims.num_layers:
            raise ConfigError(f"k-vector has {len(ks)} entries; expected one per block ({self.dims.num_layers})")
        return self.batch * (self._base + sum(self._block(layer, k) for layer, k in enumerate(ks)))

    def dense(self) -> int:
        return self([self.num_tokens] * self.dims.num_layers)


def evaluate_policy(ratio_fn: RatioFn, timesteps: torch.Tensor, num_layers: int) -> torch.Tensor:
    """ratio_fn(timesteps) -> [T, L] float32 ratios, checked for shape, range and determinism.

    float32 is the precision training selects with (``topk.DifferentiableTopK``), so the frozen counts match it.
    """
    with torch.no_grad():
        first = ratio_fn(timesteps.clone())
        second = ratio_fn(timesteps.clone())
    expected = (len(timesteps), num_layers)
    shape = tuple(torch.as_tensor(first).shape)
    if shape != expected:
        raise ConfigError(f"ratio policy returned shape {list(shape)} for {len(timesteps)} timesteps; expected "
                          f"[steps, layers] = {list(expected)}")
    table = _validated_ratios(first, "ratio policy").to(torch.float32)
    if not torch.equal(table, torch.as_tensor(second).detach().cpu().to(torch.float32)):
        raise ConfigError("ratio policy gave different ratios for the same timesteps; freeze needs a deterministic "
                          "policy (eval mode, no logit noise)")
    return table


def constant_ratio_policy(keep: float, num_layers: int, dense_layers: Iterable[int] = (0,)) -> RatioFn:
    """A policy keeping the same ratio at every step and pruned layer: the paper's "fixed ratio" baseline."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ConfigError(f"constant keep ratio {keep!r} is outside (0, 1]")
    row = torch.full((_int(num_layers, "num_layers", 1),), float(keep), dtype=torch.float32)
    row[[layer for layer in dense_layers if layer < num_layers]] = 1.0

    def ratios(timesteps: torch.Tensor) -> torch.Tensor:
        return row.expand(len(timesteps), -1).clone()

    return ratios


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One static engine shape: k per layer, and the steps that run on it."""

    index: int
    k: tuple[int, ...]
    steps: tuple[int, ...]
    flops_per_step: int

    def to_json(self) -> dict:
        return {"index": self.index, "k": list(self.k), "steps": list(self.steps),
                "flops_per_step": self.flops_per_step}


@dataclasses.dataclass(frozen=True)
class ScheduleSummary:
    """Learned vs aligned vs realised cost. Keep ratios average uniformly over pruned layers and steps (D10);
    FLOP ratios are whole-model FLOPs (routers included) over dense FLOPs, summed over steps.

    learned = the policy's ratios (FLOPs at the trained counts floor(N r)); aligned = after rounding up to the
    alignment; realised = after bucketing, what the engines run.
    """

    learned_keep_ratio: float
    aligned_keep_ratio: float
    realised_keep_ratio: float
    dense_flops_per_step: int
    dense_flops_total: int
    learned_flops_total: int
    aligned_flops_total: int
    realised_flops_total: int
    learned_flop_ratio: float
    aligned_flop_ratio: float
    realised_flop_ratio: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The frozen k schedule: which engine (bucket) runs each sampler step, and what it costs.

    The artifact is ``to_json()`` (schema ``shiva.schedule/1``) with ``schedule_hash`` = sha256 of the canonical
    content without the hash; ``load`` refuses unknown schemas, malformed or edited files (ArtifactError).
    """

    freeze_config: FreezeConfig
    num_tokens: int
    height: int
    width: int
    batch: int
    context_tokens: int
    timesteps: tuple[float, ...]
    ratios: tuple[tuple[float, ...], ...]  # [T, L] the policy's keep ratios
    k_table: tuple[tuple[int, ...], ...]  # [T, L] aligned k per step, before bucketing
    step_to_bucket: tuple[int, ...]
    buckets: tuple[Bucket, ...]
    summary: ScheduleSummary
    model_hash: str | None = None
    checkpoint_hash: str | None = None
    schema_version: str = SCHEDULE_SCHEMA

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_layers(self) -> int:
        return len(self.k_table[0])

    @property
    def realised_k(self) -> tuple[tuple[int, ...], ...]:
        """[T, L] k each step actually runs with: its bucket's k-vector."""
        return tuple(self.buckets[b].k for b in self.step_to_bucket)

    @functools.cached_property
    def schedule_hash(self) -> str:
        return sha256_json(self._content())

    def bucket_for_step(self, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise ConfigError(f"step {step!r} is out of range; the schedule has {self.num_steps} steps")
        return self.step_to_bucket[step]

    def bucket_for_timestep(self, t: float, atol: float = TIMESTEP_ATOL) -> int:
        """Bucket of the frozen step whose timestep is nearest t (scheduler units, 0..1000).

        Raises ConfigError if no frozen timestep is within atol: the sampler's step count or shift differs from
        the one the schedule was frozen for.
        """
        value = float(t)
        distance = np.abs(np.asarray(self.timesteps, dtype=np.float64) - value)
        step = int(np.argmin(distance))
        if not distance[step] <= atol:
            grid = [round(v, 3) for v in self.timesteps]
            shown = grid if len(grid) <= 12 else [*grid[:6], "...", *grid[-6:]]
            cfg = self.freeze_config
            raise ConfigError(
                f"timestep {value!r} is not within {atol:g} of any of the {self.num_steps} frozen timesteps "
                f"{shown} (steps={cfg.num_steps}, {scheduler_text(cfg)}); run the sampler with these settings or "
                "re-freeze with matching --steps/--shift")
        return self.step_to_bucket[step]

    def _content(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "freeze_config": self.freeze_config.to_json(),
            "num_tokens": self.num_tokens,
            "height": self.height,
            "width": self.width,
            "batch": self.batch,
            "context_tokens": self.context_tokens,
            "num_layers": self.num_layers,
            "timesteps": list(self.timesteps),
            "ratios": [list(row) for row in self.ratios],
            "k_table": [list(row) for row in self.k_table],
            "realised_k_table": [list(row) for row in self.realised_k],
            "step_to_bucket": list(self.step_to_bucket),
            "buckets": [bucket.to_json() for bucket in self.buckets],
            "summary": self.summary.to_json(),
            "model_hash": self.model_hash,
            "checkpoint_hash": self.checkpoint_hash,
        }

    def to_json(self) -> dict:
        return {**self._content(), "schedule_hash": self.schedule_hash}

    @classmethod
    def from_json(cls, data: Any, source: str = "schedule") -> "Schedule":
        """Parse and verify a schedule; ArtifactError names what is wrong (``source`` prefixes the message)."""
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEDULE_SCHEMA:
            raise ArtifactError(f"{source}: unknown schema_version {version!r}; expected {SCHEDULE_SCHEMA!r}. "
                                "Re-run `python -m shiva_export freeze` with this version of shiva_export")
        if "schedule_hash" not in data:
            raise ArtifactError(f"{source}: malformed schedule, missing key 'schedule_hash'")
        if sha256_json({key: value for key, value in data.items() if key != "schedule_hash"}) != data["schedule_hash"]:
            raise ArtifactError(f"{source}: content does not match schedule_hash (edited or corrupted); "
                                "re-run `python -m shiva_export freeze`")
        try:
            schedule = cls(
                freeze_config=FreezeConfig.from_json(data["freeze_config"]),
                num_tokens=_int(data["num_tokens"], "num_tokens", 1),
                height=_int(data["height"], "height", 1),
                width=_int(data["width"], "width", 1),
                batch=_int(data["batch"], "batch", 1),
                context_tokens=_int(data["context_tokens"], "context_tokens", 1),
                timesteps=tuple(_float(v, "timesteps") for v in data["timesteps"]),
                ratios=tuple(tuple(_float(v, "ratios") for v in row) for row in data["ratios"]),
                k_table=tuple(tuple(_int(v, "k_table entry", 0) for v in row) for row in data["k_table"]),
                step_to_bucket=tuple(_int(v, "step_to_bucket entry", 0) for v in data["step_to_bucket"]),
                buckets=tuple(
                    Bucket(index=_int(b["index"], "bucket index", 0),
                           k=tuple(_int(v, "bucket k", 0) for v in b["k"]),
                           steps=tuple(_int(v, "bucket step", 0) for v in b["steps"]),
                           flops_per_step=_int(b["flops_per_step"], "bucket flops_per_step", 0))
                    for b in data["buckets"]),
                summary=ScheduleSummary(**data["summary"]),
                model_hash=_optional_str(data.get("model_hash"), "model_hash"),
                checkpoint_hash=_optional_str(data.get("checkpoint_hash"), "checkpoint_hash"),
            )
            schedule._check_consistency()
        except KeyError as err:
            raise ArtifactError(f"{source}: malformed schedule, missing key {err}") from err
        except (ConfigError, TypeError, ValueError) as err:
            raise ArtifactError(f"{source}: malformed schedule: {err}") from err
        canonical = schedule._content()
        content = {key: value for key, value in data.items() if key != "schedule_hash"}
        if canonical != content:
            differing = sorted(key for key in set(canonical) | set(content) if canonical.get(key) != content.get(key))
            raise ArtifactError(f"{source}: malformed schedule: {differing} do not match the rest of the schedule")
        return schedule

    def _check_consistency(self) -> None:
        steps, cfg = self.num_steps, self.freeze_config
        if steps != cfg.num_steps:
            raise ConfigError(f"{steps} timesteps for a freeze config of {cfg.num_steps} steps")
        layers = len(self.k_table[0]) if self.k_table else 0
        for name, table in (("ratios", self.ratios), ("k_table", self.k_table)):
            if len(table) != steps or any(len(row) != layers for row in table) or layers == 0:
                raise ConfigError(f"{name} is not a [{steps}, layers] table")
        ratios = _validated_ratios(torch.tensor(self.ratios, dtype=torch.float32))
        if not np.array_equal(k_table(ratios, self.num_tokens, cfg, self.context_tokens), np.array(self.k_table)):
            raise ConfigError("k_table is not the aligned k of the ratios")
        if [b.index for b in self.buckets] != list(range(len(self.buckets))) or not self.buckets:
            raise ConfigError("buckets must be numbered 0..B-1")
        if len(self.buckets) > cfg.max_buckets:
            raise ConfigError(f"{len(self.buckets)} buckets exceed max_buckets={cfg.max_buckets}")
        if len(self.step_to_bucket) != steps or any(b >= len(self.buckets) for b in self.step_to_bucket):
            raise ConfigError("step_to_bucket does not map every step to a bucket")
        table = np.array(self.k_table)
        for bucket in self.buckets:
            members = tuple(s for s, b in enumerate(self.step_to_bucket) if b == bucket.index)
            if bucket.steps != members or not members or members != tuple(range(members[0], members[-1] + 1)):
                raise ConfigError(f"bucket {bucket.index} steps {list(bucket.steps)} are not the contiguous steps "
                                  "step_to_bucket assigns to it")
            if list(bucket.k) != table[list(members)].max(axis=0).tolist():
                raise ConfigError(f"bucket {bucket.index} k is not the max over its steps")
        self._check_summary()

    def _check_summary(self) -> None:
        """The summary's totals and ratios follow from the tables and the per-bucket FLOPs it was built from."""
        summary, dense = self.summary, self.freeze_config.dense_layers
        expected = {
            "dense_flops_total": summary.dense_flops_per_step * self.num_steps,
            "realised_flops_total": sum(len(b.steps) * b.flops_per_step for b in self.buckets),
            "learned_flop_ratio": summary.learned_flops_total / summary.dense_flops_total,
            "aligned_flop_ratio": summary.aligned_flops_total / summary.dense_flops_total,
            "realised_flop_ratio": summary.realised_flops_total / summary.dense_flops_total,
            "learned_keep_ratio": _keep_ratio(np.array(self.ratios), dense),
            "aligned_keep_ratio": _keep_ratio(np.array(self.k_table) / self.num_tokens, dense),
            "realised_keep_ratio": _keep_ratio(np.array(self.realised_k) / self.num_tokens, dense),
        }
        wrong = [name for name, value in expected.items()
                 if not math.isclose(getattr(summary, name), value, rel_tol=1e-12)]
        if wrong:
            raise ConfigError(f"summary {wrong} do not follow from the k tables and bucket FLOPs")

    def save(self, path: str | Path) -> Path:
        """Write the schedule atomically (P12)."""
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ArtifactError(f"{path}: cannot read schedule ({err.strerror}); run `python -m shiva_export freeze`") \
                from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                                "re-run `python -m shiva_export freeze`") from err
        return cls.from_json(data, source=str(path))


def _keep_ratio(table: np.ndarray, dense_layers: Sequence[int]) -> float:
    """Mean keep ratio over pruned layers and steps (uniform, D10); 1 when every layer is dense."""
    pruned = [layer for layer in range(table.shape[1]) if layer not in dense_layers]
    return float(table[:, pruned].mean()) if pruned else 1.0


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} entries must be numbers, got {value!r}")
    return float(value)


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string or null, got {value!r}")
    return value


def freeze(ratio_fn: RatioFn, model_config: Mapping[str, Any], height: int, width: int, batch: int,
           context_tokens: int, cfg: FreezeConfig = FreezeConfig(), model_hash: str | None = None,
           checkpoint_hash: str | None = None, vae_scale_factor: int = VAE_SCALE_FACTOR) -> Schedule:
    """Freeze ``ratio_fn`` into a bucketed k schedule for one sampler, resolution and batch.

    Args:
        ratio_fn: any callable timesteps [T] (scheduler units, float32) -> keep ratios [T, L] in (0, 1], e.g.
            ``AdaptiveRatioPolicy.ratios``; dense layers should return 1 (they get N regardless).
        model_config: the transformer's diffusers config (``transformer.config``).
        height, width: image size in pixels.
        batch: the transformer batch (2 per image with classifier-free guidance).
        context_tokens: S, text tokens (the pipeline's, `PipelineFacts.context_tokens`).
        cfg: step count, shift, alignment, k_min, bucket count and dense layers.
        model_hash, checkpoint_hash: recorded so later stages can refuse a schedule from other inputs.
        vae_scale_factor: the pipeline's image pixels per latent pixel.
    """
    dims = ModelDims.from_config(model_config)
    height, width = _int(height, "height", 1), _int(width, "width", 1)
    batch = _int(batch, "batch", 1)
    context_tokens = _int(context_tokens, "context_tokens", 1)
    num_tokens = num_image_tokens(model_config, height, width, vae_scale_factor)
    outside = [layer for layer in cfg.dense_layers if layer >= dims.num_layers]
    if outside:
        raise ConfigError(f"dense layers {outside} do not exist; the model has {dims.num_layers} blocks")

    timesteps = scheduler_timesteps(cfg.num_steps, cfg.shift, cfg.scheduler, image_seq_len=num_tokens)
    ratios = evaluate_policy(ratio_fn, timesteps, dims.num_layers)
    aligned = k_table(ratios, num_tokens, cfg, context_tokens)
    step_flops = StepFlops(dims, num_tokens, context_tokens, batch)
    bucketing = group_buckets(aligned, cfg.max_buckets, step_flops)

    learned = learned_counts(ratios, num_tokens)
    learned[:, list(cfg.dense_layers)] = num_tokens
    realised = np.array([bucketing.bucket_k[b] for b in bucketing.step_to_bucket], dtype=np.int64)
    dense_per_step = step_flops.dense()
    dense_total = dense_per_step * cfg.num_steps
    totals = {name: sum(step_flops(row) for row in table)
              for name, table in (("learned", learned), ("aligned", aligned), ("realised", realised))}
    summary = ScheduleSummary(
        learned_keep_ratio=_keep_ratio(ratios.double().numpy(), cfg.dense_layers),
        aligned_keep_ratio=_keep_ratio(aligned / num_tokens, cfg.dense_layers),
        realised_keep_ratio=_keep_ratio(realised / num_tokens, cfg.dense_layers),
        dense_flops_per_step=dense_per_step,
        dense_flops_total=dense_total,
        learned_flops_total=totals["learned"],
        aligned_flops_total=totals["aligned"],
        realised_flops_total=totals["realised"],
        learned_flop_ratio=totals["learned"] / dense_total,
        aligned_flop_ratio=totals["aligned"] / dense_total,
        realised_flop_ratio=totals["realised"] / dense_total,
    )
    buckets = tuple(Bucket(index=b, k=k, steps=bucketing.steps_of(b), flops_per_step=step_flops(k))
                    for b, k in enumerate(bucketing.bucket_k))
    schedule = Schedule(
        freeze_config=cfg,
        num_tokens=num_tokens,
        height=height,
        width=width,
        batch=batch,
        context_tokens=context_tokens,
        timesteps=tuple(float(t) for t in timesteps.tolist()),
        ratios=tuple(tuple(float(r) for r in row) for row in ratios.tolist()),
        k_table=tuple(tuple(int(k) for k in row) for row in aligned.tolist()),
        step_to_bucket=bucketing.step_to_bucket,
        buckets=buckets,
        summary=summary,
        model_hash=model_hash,
        checkpoint_hash=checkpoint_hash,
    )
    logger.info("froze %d steps into %d bucket(s): keep ratio learned %.3f, realised %.3f; FLOPs learned %.3f, "
                "realised %.3f of dense", cfg.num_steps, len(buckets), summary.learned_keep_ratio,
                summary.realised_keep_ratio, summary.learned_flop_ratio, summary.realised_flop_ratio)
    given_away = summary.realised_keep_ratio - summary.aligned_keep_ratio
    if given_away > BUCKETING_WARN_KEEP:
        logger.warning("%d bucket(s) run keep %.3f where the schedule asks for %.3f: bucketing gives away %.3f of "
                       "the keep ratio (FLOPs %.3f instead of %.3f of dense); --buckets %d or more keeps more of it",
                       len(buckets), summary.realised_keep_ratio, summary.aligned_keep_ratio, given_away,
                       summary.realised_flop_ratio, summary.aligned_flop_ratio,
                       min(cfg.num_steps, len(buckets) + 1))
    return schedule

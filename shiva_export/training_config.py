"""Configuration of `train`: every hyperparameter (TrainConfig, stored in each checkpoint) and the run options.

Torch-free on purpose: the CLI builds its parser from these fields on every invocation of any verb.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from shiva_export.errors import ConfigError
from shiva_export.schema import Bool, Float, Int, ListOf, Nullable, Obj, Str, validate

Precision = Literal["auto", "fp32", "bf16"]
CFG_DROPOUT = 0.1   # the paper's caption dropout, for families whose pipeline runs classifier-free guidance


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a run; written into each checkpoint (P2). Defaults: the paper's, else D12's.

    Stage lengths are not given by the paper (its Fig. 4a spans about 5k steps); ours are a choice.
    """

    target_keep: float = 0.6
    # stages, in optimizer steps
    warmup_steps: int = 1000          # stage 1: router warm-up, stratified ratios
    policy_steps: int = 1000          # stage 2: policy learning, logit noise
    joint_steps: int = 3000           # stage 3: joint tuning with DoRA adapters
    lr_warmup_steps: int = 200        # linear LR warm-up at the start of each stage (paper: 200)
    lr_decay: Literal["none", "cosine"] = "cosine"  # after the warm-up, per stage (paper: unspecified)
    # optimisation (AdamW)
    lr_router: float = 3e-4
    lr_policy: float = 1e-4
    # the policy's layer branch learns at lr_policy * this: its signal (which layers are cheap to prune) is the same
    # in every batch, the time branch's only in the differences between the batch's timesteps, so at equal Adam
    # steps the layer branch runs to the clamp (keep 1 or r_min per layer, where the gradient is zero) before the
    # time branch has learned anything (our choice; the paper gives one policy learning rate)
    lr_policy_layer_scale: float = 0.1
    lr_adapter: float = 1e-4          # paper: unspecified
    weight_decay: float = 0.0
    global_batch: int = 16            # samples per optimizer step over all processes (paper: 16)
    micro_batch: int = 1              # samples per forward; one timestep stratum per micro-batch (D11)
    # method
    r_min: float = 0.1                # policy clamp and lower end of the stage-1 ratio range
    r_max: float = 1.0
    dense_layers: tuple[int, ...] = (0,)
    tau_rank_start: float = 0.2       # cosine-annealed over the whole run (D12)
    tau_rank_end: float = 0.05
    tau_sel_start: float = 0.1
    tau_sel_end: float = 0.02
    ste_gate: Literal["input", "output"] = "output"  # where the STE gate sits (see topk.output_gate; D5 = input)
    score_noise: float = 0.1          # sigma in units of the batch's score std (D12)
    logit_noise: float = 1.0          # stage 2: r = sigmoid(logit + N(0, sigma^2)) (Eq. 29)
    policy_score_weight: float = 1.0  # stage 2: score-function estimate of the policy's loss gradient (0: STE only)
    joint_policy: Literal["anchor", "all"] = "anchor"  # stage 3 trains the policy's anchor only, or all of it
    stage3_recenter: bool = True      # entering stage 3, shift the anchor so the noise-free mean keep = target
    budget_beta: float = 0.2          # EMA weight of the new batch mean (Eq. 12)
    # the budget loss's gradient: through the batch's sampled ratios into the whole policy ("batch", Eq. 13 as
    # written), or into the anchor alone through the policy's mean over the training timestep distribution ("anchor":
    # the budget sets the level, the centred time and layer branches learn the shape from the losses only)
    budget_gradient: Literal["batch", "anchor"] = "anchor"
    lambda_budget: float = 1.0
    lambda_distill: float = 1.0
    lambda_diffusion: float = 1.0     # only with --data
    distill_every: int = 4            # feature distillation after every 4th block, plus the output (Eq. 31)
    router_hidden_dim: int = 64
    router_group_size: int = 2
    policy_hidden_dim: int = 256
    adapter_rank: int = 32
    adapter_alpha: float = 32.0
    # data
    data: str | None = None           # folder of precomputed latents (docs/training-data.md); None: data-free
    height: int | None = None         # data-free image size in pixels; None: the model's default
    width: int | None = None
    context_tokens: int | None = None
    data_free_contrast: float = 1.0   # data-free latents: log-amplitude spread of the smooth envelope (0: i.i.d.)
    timestep_shift: float | None = None   # flow-matching shift, sigma = s u / (1 + (s - 1) u); None: the pipeline's
    # distillation weight per timestep: "euler-step" = d(sigma)/du, how far the sampler's Euler step moves the latent
    # with the velocity predicted at that timestep (mean 1 over u); "none" = uniform (see trajectory_weight)
    timestep_weighting: Literal["none", "euler-step"] = "euler-step"
    # caption dropout with --data; None: the family's, CFG_DROPOUT (paper: 0.1) where the pipeline runs classifier-free
    # guidance, 0 for a guidance-distilled family (its pipeline never runs the empty prompt)
    cfg_dropout: float | None = None
    # evaluation (the summary's figures)
    eval_steps: int = 28              # sampler steps whose timesteps the policy is evaluated at
    eval_samples: int = 4
    precision: Precision = "auto"     # auto: bf16 autocast on GPU, fp32 on CPU
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", tuple(int(layer) for layer in self.dense_layers))
        if not 0 < self.target_keep <= 1:
            raise ConfigError(f"target keep ratio {self.target_keep:g} is outside (0, 1]; expected e.g. 0.6")
        if not 0 < self.r_min <= self.target_keep:
            raise ConfigError(f"r_min {self.r_min:g} must be in (0, target_keep={self.target_keep:g}]")
        if not self.r_min <= self.r_max <= 1:
            raise ConfigError(f"r_max {self.r_max:g} must be in [r_min={self.r_min:g}, 1]")
        steps = (self.warmup_steps, self.policy_steps, self.joint_steps, self.lr_warmup_steps)
        if min(steps) < 0 or self.total_steps < 1:
            raise ConfigError(f"stage lengths {steps[:3]} and lr_warmup_steps must be >= 0, with at least one step")
        if self.micro_batch < 1 or self.global_batch < 1 or self.global_batch % self.micro_batch:
            raise ConfigError(f"global_batch {self.global_batch} must be a positive multiple of micro_batch "
                              f"{self.micro_batch}")
        if min(self.lr_router, self.lr_policy, self.lr_adapter, self.weight_decay, self.lr_policy_layer_scale) < 0:
            raise ConfigError("learning rates, lr_policy_layer_scale and weight decay must be >= 0")
        temps = (self.tau_rank_start, self.tau_rank_end, self.tau_sel_start, self.tau_sel_end)
        if min(temps) <= 0:
            raise ConfigError(f"temperatures {temps} must be > 0")
        if self.policy_steps and self.policy_score_weight and self.logit_noise and self.micro_batches % 2:
            raise ConfigError(f"the stage-2 score term pairs micro-batches: global_batch / micro_batch = "
                              f"{self.micro_batches} must be even (or set policy_score_weight 0)")
        if min(self.score_noise, self.logit_noise, self.policy_score_weight, self.lambda_budget, self.lambda_distill,
               self.lambda_diffusion) < 0:
            raise ConfigError("noise scales and loss weights must be >= 0")
        if not 0 < self.budget_beta <= 1:
            raise ConfigError(f"budget_beta {self.budget_beta:g} must be in (0, 1]")
        if self.distill_every < 1 or self.router_group_size < 1 or self.router_hidden_dim < 1 \
                or self.policy_hidden_dim < 2 or self.adapter_rank < 1:
            raise ConfigError("distill_every, router sizes, policy_hidden_dim and adapter_rank must be >= 1")
        if self.policy_hidden_dim % 2:
            raise ConfigError(f"policy_hidden_dim {self.policy_hidden_dim} must be even (the timestep embedding's "
                              "sin-cos pairs)")
        if self.cfg_dropout is not None and not 0 <= self.cfg_dropout < 1:
            raise ConfigError(f"cfg_dropout {self.cfg_dropout:g} must be in [0, 1)")
        if self.eval_steps < 1 or self.eval_samples < 1:
            raise ConfigError("eval_steps and eval_samples must be >= 1")
        if self.timestep_shift is not None and self.timestep_shift <= 0:
            raise ConfigError(f"timestep_shift {self.timestep_shift:g} must be > 0")
        if self.timestep_weighting not in ("none", "euler-step"):
            raise ConfigError(f"timestep_weighting {self.timestep_weighting!r}; expected none or euler-step")
        if self.budget_gradient not in ("batch", "anchor"):
            raise ConfigError(f"budget_gradient {self.budget_gradient!r}; expected batch or anchor")
        if self.joint_policy not in ("anchor", "all"):
            raise ConfigError(f"joint_policy {self.joint_policy!r}; expected anchor or all")
        if self.lr_decay not in ("none", "cosine"):
            raise ConfigError(f"lr_decay {self.lr_decay!r}; expected none or cosine")
        if self.ste_gate not in ("input", "output"):
            raise ConfigError(f"ste_gate {self.ste_gate!r}; expected input or output")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision {self.precision!r}; expected auto, fp32 or bf16")
        # the ranges a checkpoint is read back with: a run never writes one it could not load
        validate(self.to_json(), train_spec(), "training config", error=ConfigError)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.policy_steps + self.joint_steps

    @property
    def base_learning_rates(self) -> dict[str, float]:
        """Learning rate of each optimizer param group, by group name, before the warm-up/decay scale."""
        return {"router": self.lr_router, "policy": self.lr_policy,
                "policy_layer": self.lr_policy * self.lr_policy_layer_scale, "adapters": self.lr_adapter}

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step over all processes: the number of timestep strata."""
        return self.global_batch // self.micro_batch

    def stage(self, step: int) -> int:
        """Stage (1, 2, 3) of the optimizer step with 0-based index ``step``."""
        if step < self.warmup_steps:
            return 1
        return 2 if step < self.warmup_steps + self.policy_steps else 3

    def stage_start(self, stage: int) -> int:
        return (0, self.warmup_steps, self.warmup_steps + self.policy_steps)[stage - 1]

    def temperatures(self, step: int) -> tuple[float, float]:
        """(tau_rank, tau_sel) at ``step``: cosine from the start to the end value over the whole run (D12)."""
        progress = step / max(1, self.total_steps - 1)
        weight = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return (self.tau_rank_end + (self.tau_rank_start - self.tau_rank_end) * weight,
                self.tau_sel_end + (self.tau_sel_start - self.tau_sel_end) * weight)

    def stage_length(self, stage: int) -> int:
        return (self.warmup_steps, self.policy_steps, self.joint_steps)[stage - 1]

    def lr_scale(self, step: int) -> float:
        """Linear warm-up from the first step of each stage, then (lr_decay="cosine") a cosine decay towards 0.

        The decay damps the budget loop at the end of a stage: the EMA and Adam's momentum lag the policy, so at a
        constant rate the mean keep ratio keeps circling the target instead of settling on it.
        """
        stage = self.stage(step)
        done, length = step - self.stage_start(stage), self.stage_length(stage)
        warm = self.lr_warmup_steps
        scale = min(1.0, (done + 1) / warm) if warm else 1.0
        if self.lr_decay == "cosine" and done >= warm and length > warm:
            scale *= 0.5 * (1 + math.cos(math.pi * (done - warm) / (length - warm)))
        return scale

    def to_json(self) -> dict:
        return {"schema": 1, **dataclasses.asdict(self), "dense_layers": list(self.dense_layers)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "training config") -> "TrainConfig":
        """From `to_json`'s form, checked field by field (TRAIN_FIELDS); absent fields take their defaults.

        ``source`` names where the data came from in errors (e.g. "<folder>/config.json: field train").
        """
        validate(data, train_spec(), source, error=ConfigError)
        try:
            return cls(**{key: value for key, value in data.items() if key != "schema"})
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


_STEPS = Int(minimum=0, maximum=10**9)
_LR = Float(minimum=0, maximum=1)
_WEIGHT = Float(minimum=0, maximum=1e6)
_TEMPERATURE = Float(minimum=0, maximum=100, exclusive_minimum=True)
_FRACTION = Float(minimum=0, maximum=1, exclusive_minimum=True)
_PIXELS = Nullable(Int(minimum=1, maximum=65536))


def _choices(name: str) -> Str:
    return Str(choices=typing.get_args(typing.get_type_hints(TrainConfig)[name]))


# Type and range of every TrainConfig field as it is stored in a checkpoint (cross-field rules: __post_init__)
TRAIN_FIELDS = {
    "target_keep": _FRACTION, "warmup_steps": _STEPS, "policy_steps": _STEPS, "joint_steps": _STEPS,
    "lr_warmup_steps": _STEPS, "lr_decay": _choices("lr_decay"),
    "lr_router": _LR, "lr_policy": _LR, "lr_policy_layer_scale": Float(minimum=0, maximum=1000), "lr_adapter": _LR,
    "weight_decay": Float(minimum=0, maximum=10),
    "global_batch": Int(minimum=1, maximum=65536), "micro_batch": Int(minimum=1, maximum=65536),
    "r_min": _FRACTION, "r_max": _FRACTION, "dense_layers": ListOf(Int(minimum=0, maximum=1023), max_length=1024),
    "tau_rank_start": _TEMPERATURE, "tau_rank_end": _TEMPERATURE, "tau_sel_start": _TEMPERATURE,
    "tau_sel_end": _TEMPERATURE, "ste_gate": _choices("ste_gate"),
    "score_noise": Float(minimum=0, maximum=100), "logit_noise": Float(minimum=0, maximum=100),
    "policy_score_weight": _WEIGHT, "joint_policy": _choices("joint_policy"), "stage3_recenter": Bool(),
    "budget_beta": _FRACTION, "budget_gradient": _choices("budget_gradient"),
    "lambda_budget": _WEIGHT, "lambda_distill": _WEIGHT, "lambda_diffusion": _WEIGHT,
    "distill_every": Int(minimum=1, maximum=1024), "router_hidden_dim": Int(minimum=1, maximum=65536),
    "router_group_size": Int(minimum=1, maximum=1024), "policy_hidden_dim": Int(minimum=2, maximum=65536),
    "adapter_rank": Int(minimum=1, maximum=65536),
    "adapter_alpha": Float(minimum=0, maximum=1e6, exclusive_minimum=True),
    "data": Nullable(Str()), "height": _PIXELS, "width": _PIXELS, "context_tokens": _PIXELS,
    "data_free_contrast": Float(minimum=0, maximum=100),
    "timestep_shift": Nullable(Float(minimum=0, maximum=1000, exclusive_minimum=True)),
    "timestep_weighting": _choices("timestep_weighting"), "cfg_dropout": Nullable(Float(minimum=0, maximum=1)),
    "eval_steps": Int(minimum=1, maximum=10000), "eval_samples": Int(minimum=1, maximum=65536),
    "precision": _choices("precision"), "seed": Int(minimum=0, maximum=2**63 - 1),
}
assert set(TRAIN_FIELDS) == {f.name for f in dataclasses.fields(TrainConfig)}, "TrainConfig fields without a spec"


def train_spec(required: Iterable[str] = ()) -> Obj:
    """Schema of `TrainConfig.to_json`: every field optional (its default) except `required`; no unknown keys."""
    fields = {"schema": Int(minimum=1, maximum=1), **TRAIN_FIELDS}
    required = set(required)
    return Obj(required={key: spec for key, spec in fields.items() if key in required},
               optional={key: spec for key, spec in fields.items() if key not in required})


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How this invocation runs; none of it changes the result, so none of it is compared on resume."""

    out: Path
    resume: bool = False
    stop_after: int | None = None     # stop (with a checkpoint) once this many optimizer steps are done
    save_every: int = 500
    progress: bool = True
    device: str | None = None         # None: cuda (this process's local GPU) if available, else cpu

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.save_every < 1:
            raise ConfigError(f"save_every {self.save_every} must be >= 1")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"stop_after {self.stop_after} must be >= 1")

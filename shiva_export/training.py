"""Three-stage training of the Shiva-DiT router, ratio policy and DoRA adapters (paper App. B.2; D10-D12).

Stage 1 (router warm-up): the policy is bypassed; every micro-batch gets a keep ratio from its own sub-interval of
[r_min, r_max]. Stage 2 (policy learning): the policy's ratios, with N(0, 1) logit noise, under the EMA budget loss;
the router keeps training. Stage 3 (joint tuning): no logit noise; DoRA adapters (peft) on every attention/FFN
linear of the blocks train with the router and the policy; the base weights stay frozen.

Losses: distillation from the frozen teacher (Eq. 31: LayerNorm'd features after every ``distill_every``-th block,
plus the output as a relative MSE), the flow-matching loss when real data is given, and the budget loss (Eq. 13).
The teacher is the same backbone with the pruning hooks in dense mode and, in stage 3, the adapters switched off by
peft's ``disable_adapter()``: no second copy of the weights (a 2.5B backbone would double its memory per GPU), and
since the base weights are frozen it is exactly the original model.

Where we depart from the paper or D5, each for a measured reason on tiny-sd35 (numbers in the closing report):
    * ste_gate="output": the STE gate sits on the block's update of the kept tokens (topk.output_gate), not on the
      block input (D5). AdaLN blocks are invariant to the scale of their input, so D5's surrogate has an exactly zero
      ideal gradient and its one-path estimate is +-<grad, x> of the residual stream; with it the router did not
      beat random selection, with the output gate it does.
    * policy_score_weight: in stage 2 the policy also learns from an antithetic score-function estimate built on the
      logit noise the stage already injects. The STE gradient to the ratio is first order and, under distillation,
      about 30x smaller than the loss's real response to the ratio.
    * joint_policy="anchor": in stage 3 (no logit noise, so no score term) only the policy's anchor trains: the
      budget loop then has a low gain and settles, instead of Adam circling the target with the whole policy.
    * lr_decay="cosine" after each stage's warm-up, which also damps the budget loop at the end of a stage.

Backbones: training names no DiT family. What differs between families comes from the model's backbone adapter
(shiva_export/backbones): the routed blocks (`blocks`) and router widths, the latents' layout (image-shaped, or
latent patches packed into tokens: training_data.LatentLayout, read from `input_specs`), the timestep convention
(`transformer_timestep`), the inputs fixed per run (`constants`, and conditioning such as a distilled guidance at
the pipeline's value), the text inputs (pooled text and / or a caption mask, as `input_specs` lists them), the
per-block call on the kept tokens (`prepare_block_call`, e.g. gathered RoPE rows), the DoRA targets
(`adapter_targets`), the training process (`noised`: how clean latents are noised at a timestep, flow matching or a
DDPM schedule; `training_target`: velocity or epsilon) and which output channels the losses compare
(`sampler_output`, the ones the pipeline's sampler integrates). The scheduler's timesteps t in [0, 1000], their
sampling and the losses' form are the same for every family.

Determinism: every random draw comes from a generator keyed by (seed, step, global micro-batch index), so results do
not depend on how micro-batches are spread over processes and accumulation steps (up to float summation order),
and a resumed run repeats an uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from shiva_export import checkpoint as ckpt
from shiva_export.errors import ArtifactError, ConfigError
from shiva_export.patching import (PruningConfig, apply_token_pruning, keep_ratios_to_k, scored_by, static_k,
                                   training_ratios)
from shiva_export.policy import AdaptiveRatioPolicy, BudgetLoss, stratified_ratios
from shiva_export.router import RouterBank
from shiva_export.training_config import CFG_DROPOUT, RunOptions, TrainConfig
from shiva_export.training_data import MASK, DataFreeSource, LatentDataset

logger = logging.getLogger(__name__)

# Thresholds of the summary's checks (the claims on the tiny model).
BUDGET_TOLERANCE = 0.03
STAGE3_MIN_REDUCTION = 0.30
SCHEDULE_MIN_RANGE = 0.05


# ----------------------------------------------------------------------------------------------- distributed


@dataclasses.dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistContext:
    """Join the torchrun job if there is one: NCCL on GPUs, gloo on CPU; pick this process's device."""
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if not dist.is_torchelastic_launched():
        chosen = torch.device(device) if device else torch.device("cuda" if use_cuda else "cpu")
        return DistContext(device=chosen)
    local_rank = dist.get_node_local_rank(fallback_rank=0)
    if use_cuda:
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), chosen, owns)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over processes, in place (a no-op for one process)."""
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def sum_gradients(params: Sequence[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum gradients over processes in one flat all-reduce (each process already divided by the global count)."""
    if ctx.world_size == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), ctx)
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset:offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()


# ----------------------------------------------------------------------------------------------- pieces


def keyed_generator(seed: int, *keys: Any) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, keys): counter-based, order-free randomness."""
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def shifted_timesteps(u: torch.Tensor, shift: float) -> torch.Tensor:
    """u in [0, 1] -> the flow-matching scheduler's timesteps (0..1000): sigma = s u / (1 + (s - 1) u)."""
    return 1000.0 * shift * u / (1 + (shift - 1) * u)


def scheduler_timesteps(num_steps: int, shift: float) -> torch.Tensor:
    """The timesteps diffusers' FlowMatchEulerDiscreteScheduler(shift) visits in num_steps steps (what freeze uses)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=float(shift))
    scheduler.set_timesteps(int(num_steps))
    return scheduler.timesteps.detach().float().clone()


def trajectory_weight(timesteps: torch.Tensor, shift: float) -> torch.Tensor:
    """(d(sigma)/du)^2 at the timesteps, normalised to mean 1 over u in [0, 1]: what a velocity error there costs
    the sampled latent.

    The sampler integrates the velocity predicted at sigma over an Euler step of length d(sigma), so an error e
    there moves the final latent by d(sigma) * e, and uncorrelated errors add up as sum d(sigma)^2 |e|^2. With the
    shifted schedule d(sigma)/du = (s - (s - 1) sigma)^2 / s: steps near sigma = 1 are s^2 times shorter than those
    near 0 (s = 3: 9x, 81x squared). Weighting the distillation by it makes the loss the error that reaches the
    image, so the policy can learn to prune harder where the sampler moves the latent least (the high-noise steps).
    """
    sigma = timesteps.float() / 1000.0
    slope = (shift - (shift - 1) * sigma).pow(2) / shift
    mean_square = shift ** 2 * (1 - shift ** -3) / (3 * (shift - 1)) if shift != 1 else 1.0
    return slope.pow(2) / mean_square


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean ||LN(h_s) - LN(h_t)||^2 over tokens (Eq. 31): LayerNorm first, so feature scale does not dominate."""
    width = student.shape[-1:]
    return (F.layer_norm(student.float(), width) - F.layer_norm(teacher.float(), width)).pow(2).mean()


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||y_s - y_t||^2 / ||y_t||^2: the output term of the distillation (its form is unspecified by the paper).

    Unlike a LayerNorm'd output, this keeps each position's scale, which is what the sampler integrates, and it is
    the error the summary reports.
    """
    teacher = teacher.float()
    return (student.float() - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12)


def _transformer_timesteps(adapter, timesteps: torch.Tensor) -> torch.Tensor:
    """Scheduler timesteps (0..1000) as the pipeline feeds them to the transformer (the adapter's
    transformer_timestep: as they are, or scaled to 0..1), in the dtype given."""
    return torch.tensor([adapter.transformer_timestep(value) for value in timesteps.tolist()], dtype=timesteps.dtype)


def null_text(text: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Caption dropout's stand-in where the data holds no empty-prompt embeddings: zero embeddings, and a caption
    mask keeping the first token (a tokenizer's end-of-text token: what an empty prompt keeps)."""
    out = {name: torch.zeros_like(value[0]) for name, value in text.items()}
    if MASK in out:
        out[MASK][0] = 1.0
    return out


@contextlib.contextmanager
def captured_block_outputs(transformer, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the image-stream output of the given blocks (the backbone's prunable blocks, in order) during a
    forward pass; hooks removed on exit (P10)."""
    from shiva_export import backbones

    blocks = backbones.for_model(transformer).blocks(transformer)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def keep(layer: int) -> Callable:
        def hook(module, args, output):
            store[layer] = output[1] if isinstance(output, tuple) else output
        return hook

    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(keep(layer)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def distill_layers(num_layers: int, every: int) -> list[int]:
    """Blocks whose output is distilled: after every ``every``-th block (0-based every-1, 2*every-1, ...)."""
    return [layer for layer in range(num_layers) if (layer + 1) % every == 0]


class RandomScorer(torch.nn.Module):
    """Baseline: uniformly random token scores (fresh, seeded generator per evaluation)."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, layer, tokens, temb, pooled_context) -> torch.Tensor:
        return torch.rand(tokens.shape[:2], generator=self.generator).to(tokens.device)


def bayer_matrix(size: int) -> torch.Tensor:
    """Ordered-dither matrix (values 0 .. size^2 - 1, size a power of 2): its k lowest entries are spread evenly."""
    matrix = torch.zeros(1, 1, dtype=torch.int64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([4 * matrix, 4 * matrix + 2], 1), torch.cat([4 * matrix + 3, 4 * matrix + 1], 1)])
    return matrix


class GridScorer(torch.nn.Module):
    """Baseline: a uniform-stride spatial grid, whatever k (k = N/4 selects exactly every 2nd row and column).

    Scores are the negated ordered-dither thresholds of the token grid, so the top-k tokens always form the most
    even 2-D lattice available at that budget.
    """

    def __init__(self, grid_height: int, grid_width: int):
        super().__init__()
        size = 1 << max(0, math.ceil(math.log2(max(grid_height, grid_width))))
        self.register_buffer("scores", -bayer_matrix(size)[:grid_height, :grid_width].reshape(-1).float(),
                             persistent=False)

    def forward(self, layer, tokens, temb, pooled_context) -> torch.Tensor:
        return self.scores.to(tokens.device).expand(tokens.shape[0], -1)


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch: its generator (still in use by the hooks' score noise), timesteps and keep ratios [b, L].

    In stage 2, ``noise`` is its logit-noise draw [L] and ``logits`` the policy's clean logits [L] (with grad), for
    the score-function term.
    """

    index: int
    sample_index: int                 # which inputs it draws: its own index, or its antithetic pair's
    generator: torch.Generator
    timesteps: torch.Tensor
    ratios: torch.Tensor
    noise: torch.Tensor | None = None
    logits: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Holds the backbone, router, policy, adapters and optimizer of one run; ``run()`` trains to the end."""

    def __init__(self, model: str, config: TrainConfig, options: RunOptions, dist: DistContext):
        from shiva_export import backbones
        from shiva_export.models import load_transformer

        self.options, self.dist, self.device = options, dist, dist.device
        bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        if bf16 and self.device.type != "cuda":
            raise ConfigError("precision bf16 needs a GPU; use --precision fp32 (or auto) on CPU")
        self.bf16 = bf16
        self.transformer, self.source = load_transformer(model, dtype=torch.bfloat16 if bf16 else torch.float32)
        from shiva_export import backbones

        adapter = backbones.for_model(self.transformer)
        if not adapter.trainable:
            trainable = [a.model_class for a in backbones.REGISTRY.values() if a.trainable]
            raise ConfigError(f"train --model {model}: training a {adapter.model_class} is not supported yet (its "
                              f"inputs are not the flow-matching, pooled-text ones the trainer feeds); expected one "
                              f"of {trainable}")
        mcfg = self.transformer.config
        self.adapter = backbones.for_model(self.transformer)
        self.data = self._open_data(config, mcfg)
        self.config = config = self._resolve_sizes(config, mcfg)
        self.num_layers = self.adapter.num_blocks(mcfg)
        bad = [layer for layer in config.dense_layers if not 0 <= layer < self.num_layers]
        if bad:
            raise ConfigError(f"dense layers {bad} are out of range for a {self.num_layers}-layer model")
        self.pruned_layers = [layer for layer in range(self.num_layers) if layer not in config.dense_layers]
        if not self.pruned_layers:
            raise ConfigError(f"dense_layers {list(config.dense_layers)} leaves no layer to prune")
        self.grid = self._token_grid(mcfg)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.call_inputs = self._call_inputs(mcfg)
        if config.cfg_dropout is None:  # the empty prompt is trained for only where the pipeline runs it (CFG)
            dropout = CFG_DROPOUT if self.adapter.cfg_pairs(self.adapter.default_batch) else 0.0
            self.config = config = dataclasses.replace(config, cfg_dropout=dropout)
        if config.timestep_shift is None:  # the sampler the router will be frozen for: the pipeline's own
            shift = self.source.facts.effective_shift(self.num_tokens)
            self.config = config = dataclasses.replace(config, timestep_shift=shift)
        if config.micro_batches % dist.world_size:
            raise ConfigError(f"global_batch / micro_batch = {config.micro_batches} micro-batches per step cannot be "
                              f"split over {dist.world_size} processes; choose a multiple of the process count")
        self.accumulation = config.micro_batches // dist.world_size

        self.routers = self._initial_routers().to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.policy = AdaptiveRatioPolicy(self.num_layers, config.target_keep, config.r_min, config.dense_layers,
                                              config.policy_hidden_dim).to(self.device)
        self.budget = BudgetLoss(config.target_keep, config.budget_beta, config.lambda_budget).to(self.device)
        self.state = apply_token_pruning(self.transformer, self.routers, PruningConfig(
            dense_layers=config.dense_layers, tau_rank=config.tau_rank_start, tau_sel=config.tau_sel_start,
            score_noise=config.score_noise, ste_gate=config.ste_gate))
        self.transformer.to(self.device)
        self.routers.float()
        self.peft = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_stage = 0
        self.step = 0
        self.evals: dict[str, dict[str, float]] = {}
        self.log: list[dict] = []
        self.wall_time = 0.0
        self.distilled = distill_layers(self.num_layers, config.distill_every)
        self.antithetic = config.policy_score_weight > 0 and config.logit_noise > 0

    # -- setup -----------------------------------------------------------------------------------------------

    def _open_data(self, config: TrainConfig, mcfg):
        factor = self.source.facts.vae_scale_factor
        if config.data is None:
            defaults = self.source.defaults
            return DataFreeSource(mcfg, config.height or defaults["height"], config.width or defaults["width"],
                                  config.context_tokens or defaults["context_tokens"], config.data_free_contrast,
                                  vae_scale_factor=factor)
        return LatentDataset(config.data, mcfg, seed=config.seed, vae_scale_factor=factor)

    def _token_grid(self, mcfg) -> tuple[int, int]:
        """(rows, columns) of image tokens, row-major as the backbone orders them (each token a square patch of
        latent pixels: the model's own patchify or the pipeline's packing)."""
        height, width = self.data.latent_hw
        factor = self.source.facts.vae_scale_factor
        tokens = self.adapter.num_image_tokens(mcfg, height * factor, width * factor, factor)
        side = math.isqrt(height * width // tokens)
        if side * side * tokens != height * width or height % side or width % side:
            raise ConfigError(f"{height}x{width} latents make {tokens} image tokens: not a grid of square patches")
        return height // side, width // side

    def _call_inputs(self, mcfg) -> dict[str, Any]:
        """Transformer inputs that are neither latents, timestep nor the data's text embeddings: the constants the
        static shapes fix (the adapter's `constants`, e.g. position ids) and conditioning the pipeline feeds at a
        fixed value (the adapter's `conditioning` for the inputs beyond the text embeddings, e.g. a distilled
        guidance at the pipeline's default). Per call they are expanded to the batch (``_model_inputs``)."""
        cfg, factor = self.config, self.source.facts.vae_scale_factor
        constants = self.adapter.constants(mcfg, cfg.height, cfg.width, cfg.context_tokens, factor)
        specs = self.adapter.input_specs(mcfg, cfg.height, cfg.width, 1, cfg.context_tokens, factor, "fp32")
        given = {"encoder_hidden_states", "pooled_projections"}
        extra = {name: spec for name, spec in specs.items() if spec.role == "conditioning" and name not in given}
        conditioning = self.adapter.conditioning(extra, 1, 1, torch.Generator().manual_seed(0)) if extra else {}
        return {"constants": {name: value.to(self.device) for name, value in constants.items()},
                "conditioning": {name: value.to(self.device) for name, value in conditioning.items()}}

    def _model_inputs(self, latents: torch.Tensor, text: Mapping[str, torch.Tensor],
                      timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """One transformer call's keyword inputs: noised latents (the backbone's layout), the text inputs by name
        (embeddings in the model's dtype, a caption mask in fp32), scheduler timesteps (0..1000, converted as the
        pipeline converts them) and the backbone's fixed inputs."""
        dtype, batch = self.transformer.dtype, latents.shape[0]
        inputs = {"hidden_states": latents.to(self.device, dtype)}
        for name, value in text.items():
            inputs[name] = value.to(self.device, torch.float32 if name == MASK else dtype)
        inputs["timestep"] = _transformer_timesteps(self.adapter, timesteps).to(self.device)
        inputs.update(self.call_inputs["constants"])
        for name, value in self.call_inputs["conditioning"].items():
            inputs[name] = value.expand(batch, *value.shape[1:])
        return inputs

    def _resolve_sizes(self, config: TrainConfig, mcfg) -> TrainConfig:
        """Fill height/width/context_tokens from the data (or the model's defaults) and refuse conflicts."""
        height, width = (size * self.source.facts.vae_scale_factor for size in self.data.latent_hw)
        actual = {"height": height, "width": width, "context_tokens": self.data.context_tokens}
        for name, value in actual.items():
            given = getattr(config, name)
            if given is not None and given != value:
                raise ConfigError(f"--{name.replace('_', '-')} {given} conflicts with the training data ({value}); "
                                  "omit it when --data is given")
        return dataclasses.replace(config, **actual)

    def _initial_routers(self) -> RouterBank:
        """The router bank at initialisation; recreated for the summary's untrained-router baseline."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return RouterBank.for_transformer(self.transformer, self.config.router_hidden_dim,
                                              self.config.router_group_size)

    def adapter_json(self) -> dict:
        return {"rank": self.config.adapter_rank, "alpha": self.config.adapter_alpha, "use_dora": True,
                "target_modules": self.adapter.adapter_targets()}

    def _attach_adapters(self) -> None:
        """Stage 3: wrap the backbone with DoRA adapters (B = 0, so the output is unchanged at first)."""
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed + 3)
            self.peft = get_peft_model(self.transformer, ckpt.lora_config(self.adapter_json()))
        self.peft.to(self.device)
        self.routers.requires_grad_(True)  # peft marks everything but the adapters frozen

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        if self.peft is None:
            return []
        return [p for name, p in self.transformer.named_parameters() if "lora_" in name]

    def _param_groups(self, stage: int) -> list[dict]:
        named = [("router", list(self.routers.parameters()))]
        if stage >= 2:
            layer_branch = {id(p) for p in self.policy.layer_branch_parameters()}
            trained = [p for p in self.policy.parameters() if p.requires_grad]
            named.append(("policy", [p for p in trained if id(p) not in layer_branch]))
            named.append(("policy_layer", [p for p in trained if id(p) in layer_branch]))
        if stage >= 3:
            named.append(("adapters", self.adapter_parameters()))
        lrs = self.config.base_learning_rates
        return [{"name": name, "params": params, "lr": lrs[name]} for name, params in named
                if params or name != "policy_layer"]

    def _enter_stage(self, stage: int) -> None:
        """A fresh AdamW per stage (each stage re-warms its learning rate); adapters appear at stage 3."""
        if stage == 3 and self.peft is None:
            self._attach_adapters()
        for param in self.policy.parameters():
            param.requires_grad_(stage == 2 or (stage == 3 and (self.config.joint_policy == "all"
                                                                or param is self.policy.anchor)))
        self.optimizer = torch.optim.AdamW(self._param_groups(stage), weight_decay=self.config.weight_decay)
        self.optimizer_stage = stage

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _teacher(self):
        """The frozen teacher: dense mode (no hooks active) and, in stage 3, adapters off."""
        return self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()

    # -- one optimizer step ----------------------------------------------------------------------------------

    def _micro_batches(self, step: int, stage: int) -> list[MicroBatch]:
        """This process's micro-batches: global index g = a * world + rank, timestep stratum g of G (D11).

        All samples of a micro-batch share one timestep and one logit-noise draw, hence one k per layer. In stage 2
        (score term on) micro-batches 2p and 2p + 1 form an antithetic pair: stratum p of G / 2, the same inputs and
        selection noise, logit noise +eps and -eps.
        """
        cfg = self.config
        total = cfg.micro_batches
        ratio_order = torch.randperm(total, generator=keyed_generator(cfg.seed, step, "ratio-strata"))
        paired = stage == 2 and self.antithetic
        out = []
        for a in range(self.accumulation):
            g = a * self.dist.world_size + self.dist.rank
            source = g // 2 if paired else g
            generator = keyed_generator(cfg.seed, step, *(("pair", source) if paired else (g,)))
            u = (source + torch.rand(1, generator=generator)) / (total // 2 if paired else total)
            timestep = shifted_timesteps(u, cfg.timestep_shift)
            noise = logits = None
            if stage == 1:
                ratio = stratified_ratios(1, cfg.r_min, cfg.r_max, generator, offset=int(ratio_order[g]),
                                          total_strata=total)
                ratios = torch.ones(1, self.num_layers)
                ratios[:, self.pruned_layers] = ratio.clamp(max=1.0)
                ratios = ratios.to(self.device)
            elif stage == 2 and cfg.logit_noise:
                noise = torch.randn(self.num_layers, generator=generator).to(self.device)
                if paired and g % 2:
                    noise = -noise
                ratios = self.policy(timestep.to(self.device), logit_noise=cfg.logit_noise, noise=noise)
                logits = self.policy.logits(timestep.to(self.device))[0]
            else:
                ratios = self.policy(timestep.to(self.device))
            out.append(MicroBatch(g, source, generator, timestep.expand(cfg.micro_batch),
                                  ratios.expand(cfg.micro_batch, -1), noise, logits))
        return out

    def _inputs(self, step: int, micro: MicroBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Transformer inputs at the micro-batch's timesteps, and the flow-matching target (data only)."""
        cfg = self.config
        generator = micro.generator
        first = (step * cfg.micro_batches + micro.sample_index) * cfg.micro_batch
        positions = list(range(first, first + cfg.micro_batch))
        batch = self.data.batch(positions, generator)
        x0 = batch.latents
        noise = torch.randn(x0.shape, generator=generator)
        scheduler = self._scheduler_config()
        noisy = self.adapter.noised(x0, noise, micro.timesteps, scheduler)
        text = batch.text()
        target = None
        if self.data.has_targets:
            target = self.adapter.training_target(x0, noise, micro.timesteps, scheduler).to(self.device)
            drop = torch.rand(cfg.micro_batch, generator=generator) < cfg.cfg_dropout
            null = self.data.null_embeddings() or null_text(text)
            text = {name: torch.where(drop.reshape(-1, *[1] * (value.dim() - 1)), null[name], value)
                    for name, value in text.items()}
        return self._model_inputs(noisy, text, micro.timesteps), target

    def _scheduler_config(self) -> Mapping[str, Any] | None:
        """The pipeline's scheduler config (what the adapter's training process may read)."""
        facts = self.source.facts
        return facts.scheduler if facts is not None else None

    def _output(self, sample: torch.Tensor) -> torch.Tensor:
        """The part of a transformer output the losses and errors compare: what the pipeline's sampler integrates."""
        return self.adapter.sampler_output(self.transformer.config, sample)

    def _losses(self, step: int, micro: MicroBatch, tau_rank: float, tau_sel: float,
                teachers: dict[int, tuple] | None = None) -> dict[str, torch.Tensor]:
        """``teachers``: teacher outputs by sample_index, shared by an antithetic pair (same inputs, same teacher)."""
        inputs, target = self._inputs(step, micro)
        cached = teachers.get(micro.sample_index) if teachers is not None else None
        if cached is None:
            with torch.no_grad(), self._teacher(), self._autocast(), \
                    captured_block_outputs(self.transformer, self.distilled) as teacher:
                teacher_out = self._output(self.transformer(**inputs).sample)
            if teachers is not None:
                teachers[micro.sample_index] = (teacher_out, teacher)
        else:
            teacher_out, teacher = cached
        with training_ratios(self.transformer, micro.ratios, tau_rank=tau_rank, tau_sel=tau_sel,
                             score_noise=self.config.score_noise, generator=micro.generator), \
                self._autocast(), captured_block_outputs(self.transformer, self.distilled) as student:
            student_out = self._output(self.transformer(**inputs).sample)
        distill = relative_mse(student_out, teacher_out)
        for layer in self.distilled:
            distill = distill + normalized_mse(student[layer], teacher[layer])
        if self.config.timestep_weighting == "euler-step":  # one timestep per micro-batch (D11)
            distill = distill * trajectory_weight(micro.timesteps[0], self.config.timestep_shift).to(distill.device)
        diffusion = F.mse_loss(student_out.float(), target.float()) if target is not None else torch.zeros((),
                                                                                                    device=self.device)
        return {"distill": distill, "diffusion": diffusion}

    def _score_term(self, micros: Sequence[MicroBatch], losses: torch.Tensor) -> torch.Tensor:
        """Antithetic score-function surrogate for the policy: its gradient wrt micro-batch g's clean logits is
        (L_g - L_g') / 2 * eps_g / sigma, g' = g xor 1 the partner with the same inputs and the opposite noise.

        With r = sigmoid(logit + sigma eps), E[L eps] / sigma is the gradient of the expected loss wrt the logit,
        so the policy sees how the losses actually change with the keep ratio. The STE gradient through pi is first
        order and nearly blind to this under distillation: a kept token that matches the teacher has a near-zero
        loss gradient, yet dropping it costs ||update||^2. Pairs share inputs, timestep and selection noise, so
        their loss difference is due to the ratios alone (common random numbers).
        """
        cfg, pruned = self.config, self.pruned_layers
        terms = [(losses[m.index] - losses[m.index ^ 1]) / 2 * (m.noise[pruned] * m.logits[pruned]).sum()
                 for m in micros]
        return cfg.policy_score_weight * sum(terms) / (cfg.logit_noise * cfg.micro_batches)

    def expected_keep(self, shift: float = 0.0, grad: bool = False, anchor_only: bool = False) -> torch.Tensor:
        """The policy's mean keep ratio (pruned layers, no noise) over the training timestep distribution.

        ``anchor_only``: with grad, the gradient flows into the anchor alone.
        """
        if self.policy.keep_all:
            return torch.tensor(1.0, device=self.device)
        grid = shifted_timesteps((torch.arange(1000, dtype=torch.float32) + 0.5) / 1000, self.config.timestep_shift)
        with torch.set_grad_enabled(grad):
            logits = self.policy.logits(grid.to(self.device))[:, self.pruned_layers].float()
            if anchor_only:
                anchor = self.policy.anchor
                logits = logits.detach() + (anchor - anchor.detach())
            return torch.sigmoid(logits + shift).clamp(self.config.r_min, 1.0).mean()

    @torch.no_grad()
    def _recenter_anchor(self) -> None:
        """Stage 2 -> 3: shift the anchor so the noise-free expected keep ratio equals the target; reset the EMA.

        Stage 2's EMA tracked the mean of sigmoid(logit + noise); without the noise the mean moves (Jensen), and
        stage 3 trains only the anchor at a low gain, so it starts on budget instead of spending its steps getting
        there. The time and layer branches (the learned shape) are unchanged.
        """
        low, high = -20.0, 20.0
        for _ in range(60):  # bisection: the expected keep ratio increases with the shift
            middle = (low + high) / 2
            if float(self.expected_keep(middle)) < self.config.target_keep:
                low = middle
            else:
                high = middle
        self.policy.anchor.add_((low + high) / 2)
        self.budget.ema.fill_(self.config.target_keep)
        logger.info("stage 3: anchor shifted by %.4f to the target keep ratio", (low + high) / 2)

    def _mean_pruned(self, ratios: torch.Tensor) -> torch.Tensor:
        return ratios[:, self.pruned_layers].mean()

    def _attention_backends(self):
        """On CUDA, keep scaled-dot-product attention off cuDNN: training varies k per micro-batch and layer, and
        cuDNN builds a graph for every new sequence length (on an H200, sd35-medium-shape: 15 of a stage-2 step's
        19.7 s were cuDNN graph builds; flash/efficient attention made stage 2 8.7x faster)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def train_step(self) -> dict:
        with self._attention_backends():
            return self._train_step()

    def _train_step(self) -> dict:
        cfg, step = self.config, self.step
        stage = cfg.stage(step)
        if self.optimizer_stage != stage:
            if stage == 3 and cfg.stage3_recenter and cfg.target_keep < 1:
                self._recenter_anchor()
            self._enter_stage(stage)
        tau_rank, tau_sel = cfg.temperatures(step)
        scale = cfg.lr_scale(step)
        base_lr = cfg.base_learning_rates
        for group in self.optimizer.param_groups:
            group["lr"] = base_lr[group["name"]] * scale
        total = cfg.micro_batches

        micros = self._micro_batches(step, stage)
        local_keep = sum(self._mean_pruned(m.ratios) for m in micros)
        global_keep = all_reduce_sum(local_keep.detach().clone().reshape(1), self.dist)[0] / total
        budget_value = 0.0
        if stage >= 2:
            # Value: the global batch mean (synchronised for the EMA); gradient: only through this process's part,
            # so summing gradients over processes gives the gradient of the global mean.
            if cfg.budget_gradient == "anchor":
                # value: still the batch mean; gradient: into the anchor only, through the policy's mean keep ratio
                # over the whole training timestep distribution. The branches are centred (policy.logits), so the
                # anchor is the level the budget constrains and the branches learn the shape from the losses alone.
                level_mean = self.expected_keep(grad=True, anchor_only=True) / self.dist.world_size
                batch_mean = level_mean + (global_keep - level_mean.detach())
            else:
                batch_mean = local_keep / total + (global_keep - local_keep.detach() / total)
            budget = self.budget(batch_mean)
            budget.backward(retain_graph=True)
            budget_value = float(budget.detach())

        sums = torch.zeros(2, device=self.device)
        scored = stage == 2 and self.antithetic
        per_micro = torch.zeros(total, dtype=torch.float64, device=self.device)
        teachers: dict[int, tuple] | None = {} if scored else None
        for micro in micros:
            if scored:  # the policy learns the losses' response to its ratios from the score term
                micro = dataclasses.replace(micro, ratios=micro.ratios.detach())
            losses = self._losses(step, micro, tau_rank, tau_sel, teachers)
            loss = cfg.lambda_distill * losses["distill"] + cfg.lambda_diffusion * losses["diffusion"]
            (loss / total).backward()
            per_micro[micro.index] = loss.detach().double()
            sums += torch.stack([losses["distill"].detach(), losses["diffusion"].detach()]).float()
        sums = all_reduce_sum(sums, self.dist) / total
        if scored:
            self._score_term(micros, all_reduce_sum(per_micro, self.dist).float()).backward()
        sum_gradients(self.trainable, self.dist)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        distill, diffusion = float(sums[0]), float(sums[1])
        record = {
            "step": self.step, "stage": stage,
            "loss": cfg.lambda_distill * distill + cfg.lambda_diffusion * diffusion + budget_value,
            "distill": distill, "diffusion": diffusion, "budget": budget_value,
            "batch_keep": float(global_keep), "ema_keep": float(self.budget.ema),
            "tau_rank": tau_rank, "tau_sel": tau_sel,
            "lr": {group["name"]: group["lr"] for group in self.optimizer.param_groups},
        }
        self.log.append(record)
        return record

    # -- evaluation ------------------------------------------------------------------------------------------

    def eval_timesteps(self) -> torch.Tensor:
        """The timesteps the sampler visits in eval_steps steps. A pipeline that shifts dynamically or passes its own
        sigma grid (facts.scheduler's "_sigmas") visits its own grid, which freeze reproduces; with its shift (not a
        --timestep-shift of one's own) the evaluation uses that grid too; a scheduler without a shift (e.g.
        DPM-Solver) always visits its own. Otherwise FlowMatchEuler(shift)."""
        from shiva_export.models import scheduler_has_shift

        cfg, facts = self.config, self.source.facts
        scheduler = facts.scheduler if facts is not None else {}
        if (scheduler and not scheduler_has_shift(scheduler)) or ((scheduler.get("use_dynamic_shifting")
                                                                   or scheduler.get("_sigmas"))
                                                                  and cfg.timestep_shift
                                                                  == facts.effective_shift(self.num_tokens)):
            from shiva_export.passes.freeze import scheduler_timesteps as pipeline_timesteps

            return pipeline_timesteps(cfg.eval_steps, facts.shift, scheduler, self.num_tokens).float()
        return scheduler_timesteps(cfg.eval_steps, cfg.timestep_shift)

    @torch.no_grad()
    def schedule(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Policy keep ratios [T, L] (no noise) at the given timesteps, on CPU."""
        return self.policy.ratios(timesteps.to(self.device)).float().cpu()

    def _eval_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        cfg = self.config
        generator = keyed_generator(cfg.seed, "eval")
        positions = list(range(cfg.eval_samples))
        batch = self.data.batch(positions, generator)
        noise = torch.randn(batch.latents.shape, generator=generator)
        return {"latents": batch.latents, "text": batch.text()}, noise

    @torch.no_grad()
    def output_errors(self, conditions: Mapping[str, tuple[torch.nn.Module | None, bool]],
                      ratios: torch.Tensor | None = None) -> dict[str, Any]:
        """Relative output error vs the teacher, ||y - y_T||^2 / ||y_T||^2, at each of the sampler's timesteps.

        Every condition runs at the same per-layer k: the policy's (floor(N r), as in training) at each timestep,
        or ``ratios`` [T, L] instead.
        ``conditions``: name -> (scorer replacing the router or None for the learned router, adapters on).
        Returns name -> the plain mean over timesteps, plus "per_timestep" (name -> list) and "weighted" (name ->
        the mean weighted by ``trajectory_weight``, the share of each step's error that reaches the sample).
        """
        cfg = self.config
        batch, noise = self._eval_batch()
        timesteps = self.eval_timesteps()
        ratios = self.schedule(timesteps) if ratios is None else ratios
        per_step: dict[str, list[float]] = {name: [] for name in conditions}
        for index, t in enumerate(timesteps):
            at = torch.full((cfg.eval_samples,), float(t))
            noisy = self.adapter.noised(batch["latents"], noise, at, self._scheduler_config())
            inputs = self._model_inputs(noisy, batch["text"], at)
            with self._teacher(), self._autocast():
                reference = self._output(self.transformer(**inputs).sample).float()
            k = keep_ratios_to_k(ratios[index].tolist(), self.num_tokens, cfg.dense_layers)
            for name, (scorer, adapters) in conditions.items():
                adapter_ctx = contextlib.nullcontext() if adapters else self._teacher()
                scorer_ctx = scored_by(self.transformer, scorer) if scorer is not None else contextlib.nullcontext()
                with static_k(self.transformer, k), scorer_ctx, adapter_ctx, self._autocast():
                    output = self._output(self.transformer(**inputs).sample).float()
                per_step[name].append(float((output - reference).pow(2).sum() / reference.pow(2).sum()))
        weights = trajectory_weight(timesteps, cfg.timestep_shift).double()
        weights = (weights / weights.sum()).tolist()
        errors: dict[str, Any] = {name: sum(values) / len(values) for name, values in per_step.items()}
        errors["weighted"] = {name: sum(w * e for w, e in zip(weights, values)) for name, values in per_step.items()}
        errors["per_timestep"] = per_step
        return errors

    def evaluate_stage2(self) -> dict[str, float]:
        """Router + policy only: learned router vs random, grid and the untrained router at the same budget."""
        untrained = self._initial_routers().to(self.device)
        return self.output_errors({
            "learned": (None, False),
            "random": (RandomScorer(self.config.seed), False),
            "grid": (GridScorer(*self.grid), False),
            "untrained_router": (untrained, False),
        })

    def evaluate_final(self) -> dict[str, float]:
        """After stage 3: learned router + adapters vs the untrained router on the base model at the same k, and
        vs the untrained system (untrained router, one keep ratio everywhere: what a build without a trained router
        runs) at the learned schedule's mean keep over the sampler's steps.
        """
        untrained = self._initial_routers().to(self.device)
        conditions = {"learned": (None, True), "untrained_router": (untrained, False)}
        if self.peft is not None:
            conditions["learned_no_adapters"] = (None, False)
        learned = self.schedule(self.eval_timesteps())
        errors = self.output_errors(conditions, ratios=learned)
        uniform = torch.full_like(learned, float(learned[:, self.pruned_layers].mean()))
        system = self.output_errors({"untrained_system": (untrained, False)}, ratios=uniform)
        errors["budgets"] = {"learned": self.sampler_budget(learned), "untrained_system": self.sampler_budget(uniform)}
        errors["untrained_system"] = system["untrained_system"]
        for key in ("weighted", "per_timestep"):
            errors[key]["untrained_system"] = system[key]["untrained_system"]
        weighted = errors["weighted"]
        for baseline, suffix in (("untrained_router", ""), ("untrained_system", "_system")):
            errors[f"reduction_vs_untrained{suffix}"] = 1.0 - errors["learned"] / errors[baseline]
            errors[f"weighted_reduction_vs_untrained{suffix}"] = 1.0 - weighted["learned"] / weighted[baseline]
        return errors

    def _maybe_evaluate(self) -> None:
        """The summary's evaluations, once each: after stage 2 and at the end (rank 0 computes, all ranks record)."""
        cfg = self.config
        if self.step == cfg.warmup_steps + cfg.policy_steps:
            self._evaluate_once("after_stage2", self.evaluate_stage2)
        if self.step == cfg.total_steps and cfg.joint_steps:
            self._evaluate_once("after_stage3", self.evaluate_final)

    def _evaluate_once(self, key: str, evaluate: Callable[[], dict[str, float]]) -> None:
        if key in self.evals:
            return
        with self._attention_backends():
            self.evals[key] = evaluate() if self.dist.is_main else {}
        barrier(self.dist)

    def sampler_budget(self, table: torch.Tensor) -> dict[str, float]:
        """Mean keep (pruned layers) and FLOPs / dense FLOPs of a [T, L] keep table over the sampler's steps."""
        from shiva_export.flops import dense_model_flops, model_flops

        cfg, mcfg = self.config, self.transformer.config
        dense = dense_model_flops(mcfg, self.num_tokens, cfg.context_tokens, 1)
        flops = sum(model_flops(mcfg, keep_ratios_to_k(row.tolist(), self.num_tokens, cfg.dense_layers),
                                cfg.context_tokens, 1, num_tokens=self.num_tokens) for row in table)
        return {"mean_keep": float(table[:, self.pruned_layers].mean()), "flop_ratio": flops / (dense * len(table))}

    def summary(self) -> dict:
        """The run's figures: budget, schedule, FLOPs and the output errors vs the teacher."""
        cfg = self.config
        mean_keep = float(self.expected_keep())  # long-run mean: the expectation over the training timesteps
        timesteps = self.eval_timesteps()
        table = self.schedule(timesteps)
        per_step = table[:, self.pruned_layers].mean(dim=1)
        budget = self.sampler_budget(table)
        schedule_range = float(per_step.max() - per_step.min())
        checks = {"mean_keep_within_0.03": abs(mean_keep - cfg.target_keep) <= BUDGET_TOLERANCE,
                  "schedule_not_flat": schedule_range >= SCHEDULE_MIN_RANGE}
        stage2, stage3 = self.evals.get("after_stage2"), self.evals.get("after_stage3")
        if stage2:
            checks["stage2_beats_random"] = stage2["learned"] < stage2["random"]
            checks["stage2_beats_grid"] = stage2["learned"] < stage2["grid"]
        if stage3:
            checks["stage3_30pct_below_untrained"] = stage3["reduction_vs_untrained"] >= STAGE3_MIN_REDUCTION
        return {
            "model": self.source.name, "model_hash": self.source.model_hash, "target_keep": cfg.target_keep,
            "steps": {"stage1": cfg.warmup_steps, "stage2": cfg.policy_steps, "stage3": cfg.joint_steps,
                      "done": self.step},
            "global_batch": cfg.global_batch, "micro_batch": cfg.micro_batch, "world_size": self.dist.world_size,
            "num_image_tokens": self.num_tokens, "wall_time_s": round(self.wall_time, 2),
            "mean_keep": mean_keep, "mean_keep_ema": float(self.budget.ema),
            "mean_keep_at_sampler": budget["mean_keep"], "flop_ratio_at_sampler": budget["flop_ratio"],
            "schedule": {"timesteps": [round(float(t), 3) for t in timesteps],
                         "mean_keep": [round(float(r), 4) for r in per_step],
                         "per_layer": [[round(float(r), 4) for r in row] for row in table],
                         "range": schedule_range},
            "error_metric": "mean over the sampler's timesteps of ||y - y_teacher||^2 / ||y_teacher||^2 (final output)",
            "after_stage2": stage2, "after_stage3": stage3, "checks": checks,
            "final_loss": self.log[-1] if self.log else None,
        }

    # -- checkpoints -----------------------------------------------------------------------------------------

    def config_json(self) -> dict:
        import diffusers
        import peft

        import shiva_export
        return {"schema": ckpt.CHECKPOINT_SCHEMA, "model": ckpt.model_identity(self.transformer, self.source),
                "train": self.config.to_json(), "adapters": self.adapter_json(),
                "num_image_tokens": self.num_tokens,
                "versions": {"shiva_export": shiva_export.__version__, "torch": torch.__version__,
                             "diffusers": diffusers.__version__, "peft": peft.__version__}}

    def save(self, summary: dict | None = None) -> None:
        """Rank 0 writes the whole checkpoint atomically; the others wait."""
        if self.dist.is_main:
            from peft import get_peft_model_state_dict

            state = {"ema": self.budget.ema.detach().clone(), "rng.cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                state["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            groups: list[dict] = []
            if self.optimizer is not None:
                tensors, groups = ckpt.optimizer_to_tensors(self.optimizer)
                state.update(tensors)
            tensors = {ckpt.ROUTER_FILE: self.routers.state_dict(), ckpt.POLICY_FILE: self.policy.state_dict(),
                       ckpt.STATE_FILE: state}
            if self.peft is not None:
                tensors[ckpt.ADAPTER_FILE] = get_peft_model_state_dict(self.peft)
            trainer = {"step": self.step, "optimizer_stage": self.optimizer_stage, "param_groups": groups,
                       "evals": self.evals, "wall_time_s": self.wall_time, "total_steps": self.config.total_steps,
                       "finished": self.step == self.config.total_steps}
            json_files = {ckpt.STATE_JSON: trainer}
            if summary is not None:
                json_files[ckpt.SUMMARY_FILE] = summary
            ckpt.write_checkpoint(self.options.out, self.config_json(), tensors, json_files,
                                  {ckpt.LOG_FILE: self.log})
        barrier(self.dist)

    def restore(self, path: Path) -> None:
        """Load everything ``save`` wrote; the run then continues exactly where it stopped."""
        from peft import set_peft_model_state_dict

        config = ckpt.read_config(path)
        ckpt.check_model(config["model"], self.transformer, self.source, where=str(path))
        ckpt.load_state(self.routers, ckpt.read_tensors(path / ckpt.ROUTER_FILE), str(path / ckpt.ROUTER_FILE))
        ckpt.load_state(self.policy, ckpt.read_tensors(path / ckpt.POLICY_FILE), str(path / ckpt.POLICY_FILE))
        trainer = json.loads((path / ckpt.STATE_JSON).read_text())
        state = ckpt.read_tensors(path / ckpt.STATE_FILE)
        if (path / ckpt.ADAPTER_FILE).is_file():
            self._attach_adapters()
            result = set_peft_model_state_dict(self.peft, ckpt.read_tensors(path / ckpt.ADAPTER_FILE))
            if result.unexpected_keys:
                raise ConfigError(f"{path / ckpt.ADAPTER_FILE}: unexpected adapter tensors "
                                  f"{result.unexpected_keys[:3]}")
        self.budget.ema.copy_(state["ema"])
        torch.set_rng_state(state["rng.cpu"])
        if "rng.cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng.cuda"], self.device)
        self.step = int(trainer["step"])
        self.evals = trainer["evals"]
        self.wall_time = float(trainer["wall_time_s"])
        self.log = ckpt.read_jsonl(path / ckpt.LOG_FILE)[:self.step]
        if trainer["optimizer_stage"]:
            self._enter_stage(int(trainer["optimizer_stage"]))
            ckpt.optimizer_from_tensors(self.optimizer, state, trainer["param_groups"])

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to the end (or to ``stop_after``); returns the summary (or a stop record)."""
        from tqdm import tqdm

        cfg, options = self.config, self.options
        stage_ends = {cfg.warmup_steps, cfg.warmup_steps + cfg.policy_steps, cfg.total_steps}
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not (options.progress and self.dist.is_main))
        try:
            while self.step < cfg.total_steps:
                start = time.perf_counter()
                record = self.train_step()
                self.wall_time += time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.4f}", keep=f"{record['batch_keep']:.3f}")
                self._maybe_evaluate()
                stopping = options.stop_after is not None and self.step >= options.stop_after
                if self.step == cfg.total_steps:
                    break
                if stopping or self.step % options.save_every == 0 or self.step in stage_ends:
                    self.save()
                if stopping:
                    logger.info("stopped after step %d of %d; resume with --resume", self.step, cfg.total_steps)
                    return {"stopped_at": self.step, "total_steps": cfg.total_steps, "checkpoint": str(options.out)}
        finally:
            bar.close()
        self._maybe_evaluate()
        summary = self.summary()
        self.save(summary)
        return summary


def _checkpoint_exists(path: Path) -> bool:
    return (path / ckpt.CONFIG_FILE).is_file()


def resume_config(path: str | Path, overrides: Mapping[str, Any] = ()) -> tuple[str, TrainConfig]:
    """(model, config) of a checkpoint to resume; options given again must equal the stored ones."""
    stored = ckpt.read_config(path)
    config = TrainConfig.from_json(stored["train"])
    conflicts = {name: (value, getattr(config, name)) for name, value in dict(overrides).items()
                 if (tuple(value) if isinstance(value, list) else value) != getattr(config, name)}
    if conflicts:
        listed = ", ".join(f"{name}={given!r} (checkpoint: {saved!r})" for name, (given, saved) in conflicts.items())
        raise ConfigError(f"{path}: cannot resume with different hyperparameters: {listed}; drop these options or "
                          "start a new run in another --out")
    return stored["model"]["name"], config


def train(model: str, config: TrainConfig, options: RunOptions) -> dict | None:
    """Run (or resume) a training job in this process; joins the torchrun group when launched by torchrun.

    Returns the summary on rank 0 (None on other ranks); a stop record when ``options.stop_after`` cut it short.
    """
    import torch.distributed as dist

    ctx = init_distributed(options.device)
    try:
        out = options.out
        if options.resume and not _checkpoint_exists(out):
            raise ArtifactError(f"{out}: no checkpoint to resume (no {ckpt.CONFIG_FILE}); run without --resume first")
        if not options.resume and _checkpoint_exists(out):
            raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
        if not options.resume and out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder")
        trainer = Trainer(model, config, options, ctx)
        if options.resume:
            stored = TrainConfig.from_json(ckpt.read_config(out)["train"])
            if stored != trainer.config:
                diff = {f.name: (getattr(trainer.config, f.name), getattr(stored, f.name))
                        for f in dataclasses.fields(TrainConfig)
                        if getattr(trainer.config, f.name) != getattr(stored, f.name)}
                raise ConfigError(f"{out}: cannot resume with different hyperparameters (given, checkpoint): {diff}")
            trainer.restore(out)
            logger.info("resuming %s at step %d of %d", out, trainer.step, trainer.config.total_steps)
        summary = trainer.run()
        return summary if ctx.is_main else None
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()

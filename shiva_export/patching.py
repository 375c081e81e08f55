"""Token pruning on diffusers' DiT blocks through named, removable hooks (no edits to diffusers).

Each pruned block runs on the k kept image tokens only (what else must follow the kept indices, e.g. RoPE rows, its
backbone adapter says); the context stream runs in full (D2); outputs are scattered back and dropped tokens keep
their input (D1). Every supported block takes hidden_states and encoder_hidden_states by name; its adapter says what
the router is conditioned on (`router_inputs`) and how the block returns its streams (`block_output`).
Three modes share one code path: dense (hooks inert), static (fixed integer k per layer: the path the freeze
and export stages trace) and train (policy ratios, score noise, soft-rank STE).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook

from shiva_export import kernels
from shiva_export.errors import ConfigError
from shiva_export.router import RouterBank
from shiva_export.topk import (DifferentiableTopK, check_k, check_ratio, gather_rows, hard_topk_indices, output_gate,
                               scatter_rows)

PRUNING_HOOK = "shiva.token_pruning"

Mode = Literal["dense", "static", "train"]


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    """How blocks are pruned. Temperatures and noise are the D12 starting values (annealed by training)."""

    dense_layers: tuple[int, ...] = (0,)
    cfg_consistent: bool = False   # batch = [uncond; cond] halves of the same samples: select with max score (D4)
    tau_rank: float = 0.2
    tau_sel: float = 0.1
    score_noise: float = 0.1       # in units of the batch's score std, training only
    soft_rank_chunk: int = 1024
    ste_gate: Literal["input", "output"] = "input"   # train mode: D5 input gate, or topk.output_gate on the update


@dataclasses.dataclass
class PruningState:
    """Per-model mutable state the hooks read; changed only through the context managers below."""

    config: PruningConfig
    num_layers: int
    mode: Mode = "dense"
    k: tuple[int, ...] | None = None            # static mode, one per layer (dense layers: ignored)
    ratios: torch.Tensor | None = None           # train mode, [B, L] keep ratios from the policy
    tau_rank: float = 0.2
    tau_sel: float = 0.1
    score_noise: float = 0.0
    generator: torch.Generator | None = None
    scorer: Callable[..., torch.Tensor] | None = None   # replaces the routers (RouterBank's call signature)
    record: bool = False
    record_margins: bool = False                 # static, eager only: each pruned layer's boundary margin (below)
    inplace_scatter: bool = False                # static inference only: block inputs are overwritten
    row_scatter: str = "scatternd"               # static, torch path: topk.scatter_rows method (export picks)
    select_full_layers: bool = False             # static: run router + selection even where k == N (to time them)
    indices: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    processed_tokens: dict[int, int] = dataclasses.field(default_factory=dict)
    margins: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)   # layer -> [B] (boundary_margin)
    pi: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    # (block inputs the router conditioning was computed from, (temb, context, weights, pooled)): blocks of one
    # forward that share those inputs (a cross-attention DiT conditions every block on the same caption) reuse it;
    # cleared as each transformer forward starts
    router_memo: tuple | None = dataclasses.field(default=None, repr=False)
    memo_hook: Any = dataclasses.field(default=None, repr=False)

    @property
    def pruned_layers(self) -> list[int]:
        return [l for l in range(self.num_layers) if l not in self.config.dense_layers]


class TokenPruningHook(ModelHook):
    """Replaces one block's forward: route -> select k -> block on kept tokens -> scatter back."""

    def __init__(self, layer: int, routers: RouterBank, state: PruningState, block_signature: inspect.Signature,
                 adapter):
        super().__init__()
        self.layer, self.routers, self.state, self.signature = layer, routers, state, block_signature
        self.adapter = adapter
        self.topk = DifferentiableTopK()
        self.compiled_step = None   # set by compile_blocks: gather + block + in-place scatter in one compiled graph

    def router_conditioning(self, call: dict):
        """(temb, context, weights, pooled) for the router: the adapter's `router_inputs`, and with weights (padded
        context tokens) their masked mean. Computed once per forward for blocks that get the very same input
        tensors besides the image tokens (identity, not value: a block that feeds its successor new context
        tokens, as MMDiT blocks do, never matches)."""
        key = tuple((name, value) for name, value in call.items()
                    if name != "hidden_states" and isinstance(value, torch.Tensor))
        memo = self.state.router_memo
        if memo is not None and len(memo[0]) == len(key) and all(
                a[0] == b[0] and a[1] is b[1] for a, b in zip(memo[0], key)):
            return memo[1]
        temb, context, weights = self.adapter.router_inputs(call)
        result = (temb, context, weights, None if weights is None else pooled_context(context, weights))
        self.state.router_memo = (key, result)
        return result

    def new_forward(self, module, *args, **kwargs):
        state = self.state
        if state.mode == "dense":
            return self.fn_ref.original_forward(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        hidden = call["hidden_states"]
        temb, context, weights, pooled = self.router_conditioning(call)
        batch, num_tokens, _ = hidden.shape
        if state.mode == "static" and state.k[self.layer] == num_tokens and not state.select_full_layers:
            # every token kept: selection would be the identity, so the block runs as its dense self, with no
            # router, top-k, gather or scatter to pay for (what the FLOP model assumes for k == N)
            if state.record:
                state.indices[self.layer] = torch.arange(num_tokens, device=hidden.device).expand(batch, num_tokens)
                state.processed_tokens[self.layer] = num_tokens
            return self.fn_ref.original_forward(*args, **kwargs)

        if state.scorer is not None:
            scores = state.scorer(self.layer, hidden, temb, pooled if pooled is not None else context.mean(dim=1))
        elif pooled is not None:  # pooled once per forward; the fused path takes it as a one-token context
            scores = self.routers.score_context(self.layer, hidden, temb, pooled.unsqueeze(1))
        else:  # the routers take the context tokens: their fused CUDA path pools them itself
            scores = self.routers.score_context(self.layer, hidden, temb, context)
        if state.mode == "train" and state.score_noise > 0:
            noise = torch.randn(scores.shape, generator=state.generator).to(scores.device)
            scores = scores + state.score_noise * scores.detach().std() * noise
        flat = None  # [B*k] rows of the [B*N, D] view, set by the fused CUDA path
        if state.mode == "static":
            k = state.k[self.layer]
            check_k(k, num_tokens, where=f"layer {self.layer}: ")
            cfg = state.config.cfg_consistent
            if state.record_margins:
                state.margins[self.layer] = (boundary_margin(cfg_joint_scores(scores), k).repeat(2) if cfg
                                             else boundary_margin(scores, k))
            if (kernels.usable(scores, hidden) and hidden.is_contiguous() and not (cfg and batch % 2)
                    and kernels.select_supported(num_tokens)):
                # one Triton kernel: (CFG max,) top-k, ascending order, both halves and the flat row index
                indices, flat = kernels.select_topk(scores, k, cfg_consistent=cfg)
                kept = None  # gathered below, or inside the compiled step
            elif cfg:  # select once for both halves: half the sorting work
                half = hard_topk_indices(cfg_joint_scores(scores), k)
                indices = torch.cat([half, half], dim=0)
                kept = gather_rows(hidden, indices)
            else:
                indices = hard_topk_indices(scores, k)
                kept = gather_rows(hidden, indices)
            passed = hidden
        else:
            if state.config.cfg_consistent:
                scores = cfg_max(scores)
            ratio = state.ratios[:, self.layer]
            check_ratio(ratio, where=f"layer {self.layer}: ")
            k = max(1, int(torch.floor(num_tokens * ratio.detach().float().mean()).item()))
            self.topk.tau_rank, self.topk.tau_sel = state.tau_rank, state.tau_sel
            self.topk.chunk = state.config.soft_rank_chunk
            kept, passed, indices, pi = self.topk(hidden, scores, ratio, k, gate=state.config.ste_gate)
            state.pi[self.layer] = pi

        # every sample keeps the same tokens when the batch is one sample or one CFG pair (decided statically)
        shared_rows = batch == 1 or (state.config.cfg_consistent and batch == 2)
        self.adapter.prepare_block_call(module, call, indices, shared_rows)
        inplace = (state.inplace_scatter and state.mode == "static" and not torch.is_grad_enabled()
                   and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export())
        if flat is not None and inplace and self.compiled_step is not None:
            # compiled blocks: the row gather and the scatter fuse into the block's first and last kernels
            del call["hidden_states"]
            if state.record:
                state.indices[self.layer] = indices
                state.processed_tokens[self.layer] = k
            return self.compiled_step(type(module).forward, module, hidden, flat, call, self.adapter)
        if kept is None:
            kept = hidden.view(batch * num_tokens, -1).index_select(0, flat).view(batch, k, -1)
        call["hidden_states"] = kept
        context_out, kept_out = self.adapter.block_output(self.fn_ref.original_forward(**call))
        if state.mode == "train" and state.config.ste_gate == "output":
            kept_out = output_gate(kept, kept_out, pi, indices)
        if state.record:
            state.indices[self.layer] = indices
            state.processed_tokens[self.layer] = kept.shape[1]
        # opt-in for inference engines (inplace): write the block's rows into its own input, saving a full copy
        if flat is not None:  # fused path: a row-copy kernel (into a copy unless inplace)
            return self.adapter.block_result(
                context_out, kernels.scatter_rows_(passed if inplace else passed.clone(), flat, kept_out))
        return self.adapter.block_result(
            context_out, scatter_rows(passed, indices, kept_out, inplace=inplace, method=state.row_scatter))


def pooled_context(context: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The router's context signal: the mean context token [B, Dc], over the tokens whose weight is 1 when weights
    [B, S] are given (padding weighs 0 and adds nothing; a row without real tokens pools to 0)."""
    if weights is None:
        return context.mean(dim=1)
    weights = weights.to(context.dtype)
    total = (context * weights.unsqueeze(-1)).sum(dim=1)
    return total / weights.sum(dim=1, keepdim=True).clamp_min(1.0)


def _gathered_block_step(forward, block, hidden: torch.Tensor, flat: torch.Tensor, call: dict, adapter):
    """Static inference step of one pruned block on the flat kept rows, scattered back into ``hidden`` in place.

    Written for torch.compile (compile_blocks): one graph per block structure and k, in which inductor fuses the
    row gather into the block's first kernels and the scatter into its last. ``forward`` is the block class's own
    forward function (the module's ``forward`` attribute is the pruning hook).
    """
    batch, num_tokens, dim = hidden.shape
    kept = hidden.view(batch * num_tokens, dim).index_select(0, flat).view(batch, -1, dim)
    context_out, kept_out = adapter.block_output(forward(block, hidden_states=kept, **call))
    hidden.view(batch * num_tokens, dim).index_put_((flat,), kept_out.reshape(-1, dim).to(hidden.dtype))
    return adapter.block_result(context_out, hidden)


def boundary_margin(scores: torch.Tensor, k: int) -> torch.Tensor:
    """How far each row's selection is from a tie: (k-th highest score - (k+1)-th) / max |score|, fp32 [rows];
    inf where k keeps every token. A selection another implementation may legitimately make differently (its sums
    run in another order) is one whose margin is within that implementation's rounding (`engines.compare`)."""
    rows, num_tokens = scores.shape
    if k >= num_tokens:
        return torch.full((rows,), float("inf"), device=scores.device)
    scores = scores.detach().float()
    top = torch.topk(scores, k + 1, dim=-1, sorted=True).values
    return (top[:, k - 1] - top[:, k]) / scores.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)


def cfg_joint_scores(scores: torch.Tensor) -> torch.Tensor:
    """s = max(s_uncond, s_cond) per sample pair [B/2, N]: CFG halves then keep the same tokens (Eq. 32)."""
    batch = scores.shape[0]
    if batch % 2:
        raise ConfigError(f"CFG-consistent selection needs an even batch ([uncond; cond]), got batch {batch}")
    half = batch // 2
    return torch.maximum(scores[:half], scores[half:])


def cfg_max(scores: torch.Tensor) -> torch.Tensor:
    """cfg_joint_scores broadcast back to both halves."""
    joint = cfg_joint_scores(scores)
    return torch.cat([joint, joint], dim=0)


def _blocks(transformer) -> list[torch.nn.Module]:
    from shiva_export import backbones

    adapter = backbones.for_model(transformer)
    blocks = adapter.blocks(transformer)
    if not blocks:
        raise ConfigError(f"{type(transformer).__name__} has no transformer blocks")
    for block in blocks:
        if type(block).__name__ not in adapter.block_classes:
            raise ConfigError(f"block type {type(block).__name__} is not supported; expected {adapter.block_classes}")
    return blocks


def apply_token_pruning(transformer, routers: RouterBank, config: PruningConfig = PruningConfig()) -> PruningState:
    """Attach a pruning hook to every block not in config.dense_layers; returns the shared state (mode: dense)."""
    blocks = _blocks(transformer)
    if routers.num_layers != len(blocks):
        raise ConfigError(f"router bank is for {routers.num_layers} layers but the model has {len(blocks)}")
    bad = [l for l in config.dense_layers if not 0 <= l < len(blocks)]
    if bad:
        raise ConfigError(f"dense layers {bad} are out of range for a {len(blocks)}-layer model")
    if get_pruning_state(transformer) is not None:
        raise ConfigError("token pruning is already applied to this model; call remove_token_pruning first")
    from shiva_export import backbones

    adapter = backbones.for_model(transformer)
    state = PruningState(config=config, num_layers=len(blocks), tau_rank=config.tau_rank, tau_sel=config.tau_sel)
    for index, block in enumerate(blocks):
        if index in config.dense_layers:
            continue
        signature = inspect.signature(block.forward)
        adapter.patch_block(block)
        registry = HookRegistry.check_if_exists_or_initialize(block)
        registry.register_hook(TokenPruningHook(index, routers, state, signature, adapter), PRUNING_HOOK)
    transformer.shiva_routers = routers  # registered as a submodule: moves with .to() and is saved with the model

    def clear_memo(module, args):
        state.router_memo = None

    state.memo_hook = transformer.register_forward_pre_hook(clear_memo)
    return state


def compile_blocks(transformer, gather_scatter: bool = True, **compile_kwargs) -> None:
    """torch.compile (inductor) each block's own computation, for GPU inference benchmarks and deployment in PyTorch.

    What is compiled is diffusers' block forward (the work on the kept tokens) and, on the fused CUDA path with the
    in-place scatter, the row gather and scatter around it; the router and the Triton selection stay eager. The
    dense mode and the unhooked dense layers run the same compiled blocks, so dense and pruned compare on one
    backend (gather_scatter=False: the gather and scatter stay eager kernels too). Shapes are static
    (``dynamic=False``): blocks of one structure and token count share one compiled graph, so a model compiles a
    few graphs per k, not one per layer. Irreversible for the module (remove_token_pruning keeps compiled blocks).
    """
    import torch._dynamo

    kwargs = {"dynamic": False, **compile_kwargs}
    step = torch.compile(_gathered_block_step, **kwargs)   # fused CUDA path with inplace scatter (static inference)
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    for block in _blocks(transformer):
        registry = getattr(block, "_diffusers_hook", None)
        hook = registry.get_hook(PRUNING_HOOK) if registry is not None else None
        if hook is not None:
            hook.fn_ref.original_forward = torch.compile(hook.fn_ref.original_forward, **kwargs)
            hook.compiled_step = step if gather_scatter else None
        else:
            block.forward = torch.compile(block.forward, **kwargs)


def remove_token_pruning(transformer) -> None:
    from shiva_export import backbones

    adapter = backbones.for_model(transformer)
    state = get_pruning_state(transformer)
    if state is not None and state.memo_hook is not None:
        state.memo_hook.remove()
        state.memo_hook, state.router_memo = None, None
    for block in _blocks(transformer):
        registry = HookRegistry.check_if_exists_or_initialize(block)
        if registry.get_hook(PRUNING_HOOK) is not None:
            adapter.unpatch_block(block)
        registry.remove_hook(PRUNING_HOOK, recurse=False)
    if hasattr(transformer, "shiva_routers"):
        del transformer.shiva_routers


def get_pruning_state(transformer) -> PruningState | None:
    for block in _blocks(transformer):
        registry = getattr(block, "_diffusers_hook", None)
        hook = registry.get_hook(PRUNING_HOOK) if registry is not None else None
        if hook is not None:
            return hook.state
    return None


def _require_state(transformer) -> PruningState:
    state = get_pruning_state(transformer)
    if state is None:
        raise ConfigError("token pruning is not applied to this model; call apply_token_pruning first")
    return state


@contextlib.contextmanager
def _swapped(state: PruningState, **changes) -> Iterator[PruningState]:
    previous = {name: getattr(state, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(state, name, value)
        yield state
    finally:
        for name, value in previous.items():
            setattr(state, name, value)


def validate_k(state: PruningState, k_per_layer: Sequence[int], num_tokens: int | None = None) -> tuple[int, ...]:
    k = tuple(k_per_layer)
    if len(k) != state.num_layers:
        raise ConfigError(f"k has {len(k)} entries but the model has {state.num_layers} layers")
    for layer in state.pruned_layers:
        check_k(k[layer], num_tokens or max(k[layer], 1), where=f"layer {layer}: ")
    return k


@contextlib.contextmanager
def static_k(transformer, k_per_layer: Sequence[int], record: bool = False, inplace_scatter: bool = False,
             select_full_layers: bool = False, row_scatter: str = "scatternd",
             record_margins: bool = False) -> Iterator[PruningState]:
    """Run with a fixed integer k per layer: hard top-k only, no surrogate, no noise (the exported path).

    inplace_scatter: under no_grad, write each block's kept rows into the block's input tensor instead of a copy
    (faster; a forward hook that keeps a block's input sees it change).
    select_full_layers: a layer with k == N still runs its router and the identity selection (to measure their
    cost); by default it runs dense.
    row_scatter: how the torch path writes kept rows back (``topk.ROW_SCATTERS``); what an export traces.
    record_margins: also record each pruned layer's `boundary_margin` in ``state.margins`` (the check's reference;
    never while tracing an export).
    """
    state = _require_state(transformer)
    k = validate_k(state, k_per_layer)
    with _swapped(state, mode="static", k=k, record=record, indices={}, processed_tokens={}, margins={},
                  record_margins=record_margins, inplace_scatter=inplace_scatter,
                  select_full_layers=select_full_layers, row_scatter=row_scatter):
        yield state


@contextlib.contextmanager
def training_ratios(transformer, ratios: torch.Tensor, tau_rank: float | None = None, tau_sel: float | None = None,
                    score_noise: float | None = None, generator: torch.Generator | None = None,
                    record: bool = False) -> Iterator[PruningState]:
    """Run with policy ratios [B, L] (or [L]): hard top-k forward, soft-rank STE backward."""
    state = _require_state(transformer)
    ratios = ratios if ratios.dim() == 2 else ratios.unsqueeze(0)
    if ratios.shape[-1] != state.num_layers:
        raise ConfigError(f"ratios have {ratios.shape[-1]} layers but the model has {state.num_layers}")
    check_ratio(ratios[:, state.pruned_layers])
    cfg = state.config
    with _swapped(state, mode="train", ratios=ratios, record=record, indices={}, processed_tokens={}, pi={},
                  tau_rank=cfg.tau_rank if tau_rank is None else tau_rank,
                  tau_sel=cfg.tau_sel if tau_sel is None else tau_sel,
                  score_noise=cfg.score_noise if score_noise is None else score_noise, generator=generator):
        yield state


@contextlib.contextmanager
def scored_by(transformer, scorer: Callable[..., torch.Tensor]) -> Iterator[PruningState]:
    """Score tokens with ``scorer(layer, tokens, temb, pooled_context) -> [B, N]`` instead of the routers.

    For baselines at the same budget (random or grid selection, an untrained router); combine with static_k.
    """
    state = _require_state(transformer)
    with _swapped(state, scorer=scorer):
        yield state


def keep_ratios_to_k(ratios: Sequence[float], num_tokens: int, dense_layers: Sequence[int] = (0,)) -> tuple[int, ...]:
    """Uniform helper: k = max(1, floor(N r)) per layer; dense layers keep N."""
    out = []
    for layer, ratio in enumerate(ratios):
        check_ratio(ratio, where=f"layer {layer}: ")
        out.append(num_tokens if layer in dense_layers else max(1, int(num_tokens * ratio)))
    return tuple(out)

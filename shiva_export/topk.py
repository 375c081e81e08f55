"""Residual-based differentiable top-k (Shiva-DiT Sec. 3.1, App. A.2/B.2).

Forward: a hard, deterministic top-k (exactly k tokens per sample, ties to the lower index, D7), so shapes are
static. Backward: soft ranks (Eq. 5) -> inclusion probability pi (Eq. 30) -> residual-aware STE (Eq. 7 via D5),
so the router scores and the ratio (k) receive gradients from the path each token actually took.
"""

from __future__ import annotations

import torch

from shiva_export.errors import ConfigError

# TensorRT's TopK accepts K <= 3840; larger K is rewritten by passes/topk.py after export.
SOFT_RANK_CHUNK = 1024


def check_k(k: int, num_tokens: int, where: str = "") -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise ConfigError(f"{where}k must be a Python int (static per layer), got {type(k).__name__}")
    if not 1 <= k <= num_tokens:
        raise ConfigError(f"{where}k={k} is out of range; expected 1 <= k <= N={num_tokens}")


def check_ratio(ratio: torch.Tensor | float, where: str = "") -> None:
    values = torch.as_tensor(ratio).detach()
    if values.numel() and not bool(((values > 0) & (values <= 1)).all()):
        bad = values[~((values > 0) & (values <= 1))].flatten()[0].item()
        raise ConfigError(f"{where}keep ratio {bad:g} is outside (0, 1]")


def _exporting() -> bool:
    return torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def hard_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the k highest scores per row, in ascending token order.

    Set semantics: descending score, ties broken by the lower token index (D7). Eager mode uses a stable sort
    (exact tie rule); under export it emits ONNX TopK, whose spec has the same tie rule. The ascending order
    comes from a permutation scatter (unique indices), which is static, exact and legal in TensorRT.
    """
    batch, num_tokens = scores.shape
    check_k(k, num_tokens)
    if _exporting():
        top = torch.topk(scores, k, dim=-1, largest=True, sorted=True).indices
    else:
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return ascending_compaction(top, num_tokens)


def ascending_compaction(top: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Reorder each row's selected indices ascending without a sort over k (TopK K would exceed 3840)."""
    batch, k = top.shape
    keep = torch.zeros(batch, num_tokens, dtype=torch.int64, device=top.device)
    keep = keep.scatter(1, top, torch.ones_like(top))
    kept_slot = torch.cumsum(keep, dim=1) - 1                     # slot of a kept token in [0, k)
    dropped_slot = k + torch.cumsum(1 - keep, dim=1) - 1          # slot of a dropped token in [k, N)
    destination = torch.where(keep.bool(), kept_slot, dropped_slot)
    positions = torch.arange(num_tokens, device=top.device).expand(batch, num_tokens)
    order = torch.zeros_like(positions).scatter(1, destination, positions)  # a permutation: unique indices
    return order[:, :k]


def flat_row_index(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, k] token indices -> [B*k] rows of the [B*N, D] view (D15: row gather/scatter, no expanded index)."""
    batch = indices.shape[0]
    offsets = torch.arange(batch, device=indices.device).unsqueeze(1) * num_tokens
    return (indices + offsets).reshape(-1)


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    batch, num_tokens, dim = x.shape
    rows = flat_row_index(indices, num_tokens)
    return x.reshape(batch * num_tokens, dim).index_select(0, rows).reshape(batch, indices.shape[1], dim)


ROW_SCATTERS = ("scatternd", "where")


def scatter_rows(base: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, inplace: bool = False,
                 method: str = "scatternd") -> torch.Tensor:
    """base with rows[b, j] written at token indices[b, j]; other tokens keep base (identity skip, D1).

    method "scatternd" exports as one ScatterND on the [B*N, D] view; inplace=True writes into `base` (inference
    only), saving a full copy of the activations per block. method "where" (``where_scatter_rows``) exports as a
    row Gather and a Where instead, for runtimes whose ScatterND is slow. Both give identical values.
    """
    if method == "where":
        return where_scatter_rows(base, indices, rows)
    if method != "scatternd":
        raise ValueError(f"row scatter method {method!r} is unknown; expected one of {list(ROW_SCATTERS)}")
    batch, num_tokens, dim = base.shape
    flat = flat_row_index(indices, num_tokens)
    rows = rows.reshape(-1, dim).to(base.dtype)
    if inplace and base.is_contiguous():
        return base.view(batch * num_tokens, dim).index_copy_(0, flat, rows).view(batch, num_tokens, dim)
    out = base.reshape(batch * num_tokens, dim).index_put((flat,), rows)
    return out.reshape(batch, num_tokens, dim)


def where_scatter_rows(base: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """scatter_rows as a gather: every output row reads either its own input row or its kept row.

    kept[b, n] marks the selected tokens (ScatterElements of ones on [B, N]); slot = CumSum(kept) - 1 is a kept
    token's position in ``rows`` because ``indices`` ascend (D7); one row Gather of [B*N] rows and a Where build
    the output. ONNX Runtime's CUDA ScatterND copies one row slice per thread (0.8 ms per block at k = 2483,
    D = 1536 on an H200), while Gather and Where are ordinary bandwidth-bound kernels.
    """
    batch, num_tokens, dim = base.shape
    k = indices.shape[1]
    kept = torch.zeros(batch, num_tokens, dtype=torch.int64, device=base.device).scatter(
        1, indices, torch.ones_like(indices))
    slot = (torch.cumsum(kept, dim=1) - 1).clamp_min(0)
    offsets = torch.arange(batch, device=base.device, dtype=torch.int64).unsqueeze(1) * k
    gathered = rows.reshape(batch * k, dim).to(base.dtype).index_select(0, (slot + offsets).reshape(-1))
    return torch.where(kept.unsqueeze(-1).bool(), gathered.reshape(batch, num_tokens, dim), base)


class SoftRank(torch.autograd.Function):
    """Descending soft rank r_i = 1 + sum_{j != i} sigmoid((s_j - s_i) / tau) (Eq. 5), O(N) memory per chunk.

    The N x N pairwise table is never stored: forward and backward recompute it in row chunks (D6).
    Backward: dL/ds_m = (1/tau) sum_i sigma'((s_m - s_i)/tau) (g_i - g_m), from Eqs. 17-19.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, tau: float, chunk: int = SOFT_RANK_CHUNK) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.tau, ctx.chunk = tau, chunk
        ranks = torch.empty_like(scores)
        for start in range(0, scores.shape[1], chunk):
            s_i = scores[:, start:start + chunk, None]
            pairwise = torch.sigmoid((scores[:, None, :] - s_i) / tau)          # [B, c, N]
            ranks[:, start:start + chunk] = 0.5 + pairwise.sum(-1)              # drop the j == i term (0.5)
        return ranks

    @staticmethod
    def backward(ctx, grad_ranks: torch.Tensor):
        (scores,) = ctx.saved_tensors
        tau, chunk = ctx.tau, ctx.chunk
        grad_scores = torch.empty_like(scores)
        for start in range(0, scores.shape[1], chunk):
            s_m = scores[:, start:start + chunk, None]
            sig = torch.sigmoid((s_m - scores[:, None, :]) / tau)               # [B, c, N]
            deriv = sig * (1 - sig)
            g_m = grad_ranks[:, start:start + chunk, None]
            grad_scores[:, start:start + chunk] = (deriv * (grad_ranks[:, None, :] - g_m)).sum(-1) / tau
        return grad_scores, None, None


def soft_rank(scores: torch.Tensor, tau: float, chunk: int = SOFT_RANK_CHUNK) -> torch.Tensor:
    return SoftRank.apply(scores, tau, chunk)


def inclusion_probability(ranks: torch.Tensor, ratio: torch.Tensor, tau_sel: float) -> torch.Tensor:
    """pi_i = sigmoid((N r - rank_i) / (tau_sel N)) (Eq. 30): continuous in both the scores and the ratio r."""
    num_tokens = ranks.shape[-1]
    ratio = torch.as_tensor(ratio, dtype=ranks.dtype, device=ranks.device).reshape(-1, 1)
    return torch.sigmoid((num_tokens * ratio - ranks) / (tau_sel * num_tokens))


class DifferentiableTopK(torch.nn.Module):
    """Split tokens into the k kept (fed to the block) and the pass-through stream, with STE gates (D5).

    In the forward pass the values are exactly the hard split; in the backward pass
    dL/dpi_i = <grad_sel_i, x_i> for kept tokens and -<grad_rej_i, x_i> for dropped ones (Eq. 7),
    which reaches the scores through the soft ranks and the ratio through pi (Eq. 24).
    """

    def __init__(self, tau_rank: float = 0.2, tau_sel: float = 0.1, chunk: int = SOFT_RANK_CHUNK):
        super().__init__()
        self.tau_rank, self.tau_sel, self.chunk = tau_rank, tau_sel, chunk

    def forward(self, x: torch.Tensor, scores: torch.Tensor, ratio: torch.Tensor | float, k: int | None = None,
                surrogate: bool = True, gate: str = "input"):
        """x [B,N,D], scores [B,N], ratio scalar or [B] -> (x_kept [B,k,D], x_pass [B,N,D], indices [B,k], pi).

        gate="input" applies the D5 gates here; gate="output" returns the plain split and pi, and the caller gates
        the block's update with ``output_gate`` once the block has run.
        """
        num_tokens = x.shape[1]
        ratio = torch.as_tensor(ratio, dtype=torch.float32, device=x.device)
        check_ratio(ratio)
        if k is None:
            k = max(1, int(torch.floor(num_tokens * ratio.detach().mean()).item()))
        indices = hard_topk_indices(scores.detach(), k)
        kept = gather_rows(x, indices)
        if not surrogate:
            return kept, x, indices, None
        pi = inclusion_probability(soft_rank(scores.float(), self.tau_rank, self.chunk), ratio, self.tau_sel)
        if gate == "output":
            return kept, x, indices, pi
        gate = (pi - pi.detach()).to(x.dtype)                           # zero in value, pi in gradient
        kept = kept * (1 + torch.gather(gate, 1, indices)).unsqueeze(-1)
        passed = x * (1 - gate).unsqueeze(-1)
        return kept, passed, indices, pi


def output_gate(kept_in: torch.Tensor, kept_out: torch.Tensor, pi: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """STE gate on a block's update for the kept tokens: value kept_out exactly, dL/dpi_i = <dL/dout_i, out_i - in_i>.

    The alternative to D5's input gate for pre-norm blocks: AdaLN makes a block's branch invariant to the scale of
    its input, so under the input gate the surrogate's exact gradient is zero and Eq. 7's one-path estimate reduces
    to +-<grad, x_i> (the residual stream), which says nothing about the block's value for the token. Gating the
    update gives each kept token the first-order loss change of skipping the block; dropped tokens get none.
    """
    selected = torch.gather(pi, 1, indices)
    gate = (selected - selected.detach()).to(kept_out.dtype).unsqueeze(-1)   # zero in value, pi in gradient
    return kept_out + gate * (kept_out - kept_in)

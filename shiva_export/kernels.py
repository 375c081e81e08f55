"""Fused Triton kernels for the static-k inference path on CUDA (router, selection, row scatter).

The pure-torch code in ``topk.py`` / ``router.py`` stays the reference, the CPU path and the exported graph: these
kernels run only on CUDA tensors, when Triton imports, outside any tracing (torch.onnx, torch.export, dynamo) and
without autograd. Set ``SHIVA_TRITON=0`` (or ``set_enabled(False)``) to force the torch path, e.g. to benchmark both.

* ``select_topk``: one program per (joint) score row finds the k-th largest score by a 32-step bisection on an
  order-preserving integer key, takes every score above it and the lowest-index ties at it (the reference's tie
  rule, D7), and writes the kept indices in ascending token order by a prefix sum (no sort, no permutation
  scatter). With CFG-consistent selection it takes ``max(s_uncond, s_cond)`` itself and writes the indices for both
  halves, plus the flat ``[B*k]`` row index the gather and scatter use. Bit-identical to ``hard_topk_indices``.
* ``router_scores``: ``ContextAwareRouter`` in three kernels (the context mean; the global shift GEMVs; the token
  GEMM with the shift + SiLU + LayerNorm + score epilogue in fp32 registers) instead of about ten.
* ``scatter_rows_``: writes kept rows back into the block input in place (a row copy; ``index_copy_`` is 3-4x
  slower on an H200).

Timings and the GPU equivalence checks: docs/benchmarks/README.md, scripts/microbench_selection.py.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_ENABLED = os.environ.get("SHIVA_TRITON", "1") != "0"
_INTERPRETED_CPU = False   # tests only: CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)


def set_enabled(flag: bool) -> None:
    global _ENABLED
    _ENABLED = bool(flag)


@contextlib.contextmanager
def enabled(flag: bool):
    previous = _ENABLED
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install: the torch path is always correct
        return False
    return True


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    return (torch.compiler.is_compiling() or exporting or torch.onnx.is_in_onnx_export()
            or torch.jit.is_tracing() or torch._C._get_tracing_state() is not None)


def usable(*tensors: torch.Tensor) -> bool:
    """True where the fused kernels may replace the torch path: CUDA tensors, Triton, no tracing, no autograd."""
    if not _ENABLED or torch.is_grad_enabled() or _tracing():
        return False
    if any(type(t) is not torch.Tensor for t in tensors):  # fake / functional / proxy tensors of a tracer
        return False
    if not all(t.is_cuda for t in tensors) and not _INTERPRETED_CPU:
        return False
    return triton_available()


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def select_kernel(scores_ptr, idx_ptr, flat_ptr, num_tokens, k, rows,
                      CFG: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        valid = offs < num_tokens
        x = tl.load(scores_ptr + row * num_tokens + offs, mask=valid, other=0.0)
        if CFG:  # joint score of the pair (uncond row, cond row): max, NaN propagating like torch.maximum
            y = tl.load(scores_ptr + (row + rows) * num_tokens + offs, mask=valid, other=0.0)
            x = tl.where((x > y) | (x != x), x, y)
        x = tl.where(x == 0.0, 0.0, x)                     # -0.0 ties with +0.0, as in torch.sort
        half_range = tl.full((), 1, dtype=tl.int64) << 31
        bits = x.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(bits >= 0, bits + half_range, -bits - 1)   # unsigned order == float order, in [0, 2^32)
        key = tl.where(x != x, 2 * half_range - 1, key)     # NaN ranks above everything (torch.sort)
        key = tl.where(valid, key, -1)
        # k-th largest key: the largest t with count(key >= t) >= k, built bit by bit from the top
        thr = tl.zeros((), dtype=tl.int64)
        step = half_range
        for _ in range(32):
            cand = thr + step
            count = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(count >= k, cand, thr)
            step = step // 2
        above = key > thr
        tied = key == thr
        need = k - tl.sum(above.to(tl.int32), axis=0)
        tie_rank = tl.cumsum(tied.to(tl.int32), axis=0)    # ties go to the lower token index
        keep = above | (tied & (tie_rank <= need))
        slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1    # ascending token order
        tokens = offs.to(tl.int64)
        for copy in tl.static_range(2 if CFG else 1):
            batch = row + copy * rows
            tl.store(idx_ptr + batch * k + slot, tokens, mask=keep)
            tl.store(flat_ptr + batch * k + slot, tokens + batch * num_tokens, mask=keep)

    @triton.jit
    def scatter_kernel(base_ptr, rows_ptr, flat_ptr, num_rows, dim,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = r < num_rows
        mask = rmask[:, None] & (c[None, :] < dim)
        dest = tl.load(flat_ptr + r, mask=rmask, other=0)
        values = tl.load(rows_ptr + r.to(tl.int64)[:, None] * dim + c[None, :], mask=mask)
        tl.store(base_ptr + dest[:, None] * dim + c[None, :], values, mask=mask)

    @triton.jit
    def mean_kernel(context_ptr, out_ptr, dim, ctx_tokens: tl.constexpr, BLOCK_L: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        """Pooled context [B, Dc] (fp32) = mean over the L context tokens; one narrow column strip a program."""
        b = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < dim
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for l0 in range(0, ctx_tokens, BLOCK_L):
            rows = l0 + tl.arange(0, BLOCK_L)
            tile = tl.load(context_ptr + (b * ctx_tokens + rows.to(tl.int64))[:, None] * dim + d[None, :],
                           mask=(rows < ctx_tokens)[:, None] & dm[None, :], other=0.0)
            acc += tl.sum(tile.to(tl.float32), axis=0)
        tl.store(out_ptr + b * dim + d, acc / ctx_tokens, mask=dm)

    @triton.jit
    def shift_kernel(temb_ptr, pooled_ptr, wt_ptr, bt_ptr, wp_ptr, bp_ptr, emb_ptr, out_ptr,
                     temb_dim: tl.constexpr, ctx_dim: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for k0 in range(0, temb_dim, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < temb_dim
            t = tl.load(temb_ptr + b * temb_dim + kk, mask=km, other=0.0).to(tl.float32)
            w = tl.load(wt_ptr + h[:, None] * temb_dim + kk[None, :], mask=km[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * t[None, :], axis=1)
        for k0 in range(0, ctx_dim, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < ctx_dim
            p = tl.load(pooled_ptr + b * ctx_dim + kk, mask=km, other=0.0).to(tl.float32)
            w = tl.load(wp_ptr + h[:, None] * ctx_dim + kk[None, :], mask=km[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * p[None, :], axis=1)
        acc += tl.load(bt_ptr + h).to(tl.float32) + tl.load(bp_ptr + h).to(tl.float32)
        acc += tl.load(emb_ptr + h).to(tl.float32)
        tl.store(out_ptr + b * H + h, acc)

    @triton.jit
    def router_kernel(x_ptr, wx_ptr, bx_ptr, shift_ptr, lnw_ptr, lnb_ptr, ws_ptr, bs_ptr, out_ptr,
                      num_rows, num_tokens, eps, dim: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = r < num_rows
        h = tl.arange(0, H)
        acc = tl.zeros((BLOCK_M, H), dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < dim
            a = tl.load(x_ptr + r.to(tl.int64)[:, None] * dim + kk[None, :], mask=rmask[:, None] & km[None, :],
                        other=0.0)
            w = tl.load(wx_ptr + h[None, :] * dim + kk[:, None], mask=km[:, None], other=0.0)
            acc = tl.dot(a, w, acc)
        batch = r // num_tokens
        shift = tl.load(shift_ptr + batch[:, None] * H + h[None, :], mask=rmask[:, None], other=0.0)
        z = acc + tl.load(bx_ptr + h).to(tl.float32)[None, :] + shift
        z = z / (1.0 + tl.exp(-z))                                      # SiLU
        mean = tl.sum(z, axis=1) / H
        centred = z - mean[:, None]
        var = tl.sum(centred * centred, axis=1) / H
        normed = centred * (1.0 / tl.sqrt(var + eps))[:, None]
        normed = normed * tl.load(lnw_ptr + h).to(tl.float32)[None, :] + tl.load(lnb_ptr + h).to(tl.float32)[None, :]
        score = tl.sum(normed * tl.load(ws_ptr + h).to(tl.float32)[None, :], axis=1) + tl.load(bs_ptr).to(tl.float32)
        tl.store(out_ptr + r, score, mask=rmask)

    return select_kernel, scatter_kernel, shift_kernel, router_kernel, mean_kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


MAX_SELECT_TOKENS = 1 << 14   # one program holds the row in registers


def select_supported(num_tokens: int) -> bool:
    return num_tokens <= MAX_SELECT_TOKENS


def select_topk(scores: torch.Tensor, k: int, cfg_consistent: bool = False, num_warps: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, N] -> (indices [B, k] int64 ascending, flat [B*k] int64 rows of the [B*N, D] view).

    Same set and order as ``topk.hard_topk_indices`` (of ``cfg_joint_scores(scores)`` repeated for both halves
    when cfg_consistent). One program per row; N up to 2^14 fits one program.
    """
    select_kernel = _kernels()[0]
    scores = scores.float().contiguous()
    batch, num_tokens = scores.shape
    if not select_supported(num_tokens):
        raise ValueError(f"select_topk handles N <= {MAX_SELECT_TOKENS} tokens, got {num_tokens}")
    rows = batch // 2 if cfg_consistent else batch
    block = _next_pow2(num_tokens)
    indices = torch.empty(batch, k, dtype=torch.int64, device=scores.device)
    flat = torch.empty(batch * k, dtype=torch.int64, device=scores.device)
    warps = num_warps or (4 if block <= 1024 else (8 if block <= 4096 else 16))
    select_kernel[(rows,)](scores, indices, flat, num_tokens, k, rows, CFG=cfg_consistent, BLOCK=block,
                           num_warps=warps)
    return indices, flat


def scatter_rows_(base: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """base [B, N, D] (contiguous) with rows [B, k, D] written at the flat row indices [B*k], in place."""
    scatter_kernel = _kernels()[1]
    dim = base.shape[-1]
    rows = rows.reshape(-1, dim)
    if rows.dtype != base.dtype or not rows.is_contiguous():
        rows = rows.to(base.dtype).contiguous()
    num_rows = rows.shape[0]
    block_r, block_d = 16, 256
    grid = (triton_cdiv(num_rows, block_r), triton_cdiv(dim, block_d))
    scatter_kernel[grid](base, rows, flat, num_rows, dim, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return base


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def router_supported(router, tokens: torch.Tensor) -> bool:
    weight = router.proj_x.weight
    hidden = weight.shape[0]
    return (weight.dtype in (torch.float16, torch.bfloat16) and tokens.dtype == weight.dtype
            and hidden & (hidden - 1) == 0 and 16 <= hidden <= 128 and tokens.shape[-1] % 16 == 0)


def router_scores(router, tokens: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                  slot: int) -> torch.Tensor:
    """ContextAwareRouter.forward in fused kernels: [B, N, D] tokens -> [B, N] fp32 scores.

    context: the pooled context [B, Dc], or the context tokens [B, L, Dc], pooled here by their mean (one kernel).
    Then one kernel for the global shift (two GEMVs + biases) and one for the token GEMM with the shift + SiLU +
    LayerNorm + score epilogue. Intermediates stay in fp32 registers (the torch path rounds each op's output to the
    router dtype), so scores agree with it to fp16 rounding, and with the fp32 reference more closely.
    """
    _, _, shift_kernel, router_kernel, mean_kernel = _kernels()
    batch, num_tokens, dim = tokens.shape
    hidden = router.proj_x.weight.shape[0]
    tokens = tokens.contiguous()
    temb = temb.contiguous()
    context = context.contiguous()
    if context.dim() == 3:
        ctx_tokens, ctx_dim = context.shape[1], context.shape[2]
        pooled = torch.empty(batch, ctx_dim, dtype=torch.float32, device=tokens.device)
        block_d = 16
        mean_kernel[(batch, triton_cdiv(ctx_dim, block_d))](
            context, pooled, ctx_dim, ctx_tokens=ctx_tokens, BLOCK_L=min(_next_pow2(ctx_tokens), 512),
            BLOCK_D=block_d, num_warps=4)
    else:
        pooled = context
    temb_dim, ctx_dim = temb.shape[-1], pooled.shape[-1]
    shift = torch.empty(batch, hidden, dtype=torch.float32, device=tokens.device)
    block_h = 2   # many small programs, each one pass over its weight rows: latency, not bandwidth, bound
    shift_kernel[(batch, hidden // block_h)](
        temb, pooled, router.proj_t.weight, router.proj_t.bias, router.proj_p.weight, router.proj_p.bias,
        router.layer_embedding.weight[slot], shift, temb_dim=temb_dim, ctx_dim=ctx_dim,
        H=hidden, BLOCK_H=block_h, BLOCK_K=min(_next_pow2(max(temb_dim, ctx_dim)), 4096), num_warps=4)
    scores = torch.empty(batch, num_tokens, dtype=torch.float32, device=tokens.device)
    num_rows = batch * num_tokens
    block_m = 64
    router_kernel[(triton_cdiv(num_rows, block_m),)](
        tokens, router.proj_x.weight, router.proj_x.bias, shift, router.norm.weight, router.norm.bias,
        router.score.weight, router.score.bias, scores, num_rows, num_tokens, router.norm.eps, dim=dim,
        H=hidden, BLOCK_M=block_m, BLOCK_K=64, num_warps=4, num_stages=4)
    return scores

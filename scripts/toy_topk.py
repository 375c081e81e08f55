#!/usr/bin/env python
"""Synthetic check of the residual-aware differentiable top-k (Shiva-DiT App. A.3), on shiva_export.topk.

Task (one "block" deciding, per token, between the block and the identity skip; D1, D5):
  * N tokens of dimension D per sample; S of them, at random positions, are signal tokens x = m*1 + e (every
    coordinate has mean m = --signal-mean), the others are noise tokens x = e, with e ~ N(0, I_D).
  * The block is residual, B(x) = x + F(x), with F(x) = -P x + G(C x): P projects on the mean direction 1/sqrt(D)
    (F removes a token's offset, which is all a signal token carries) and G is a fixed random two-layer GELU MLP
    acting on the fluctuation part C x = (I - P) x (a side effect of gain --distortion).
  * Targets: a signal token must come out as B(x) (it needs the block), a noise token as x (it must pass
    unchanged). The per-token loss is the relative squared error |out - y|^2 / |x|^2, averaged over tokens, so
    processing a signal token saves about 1 unit and processing a noise token costs about 0.45 distortion^2
    units (7.3 at the default 4), while the sparsity penalty lambda * k / N charges lambda per kept token: the
    best k is S. The noise cost sets how fast k falls from --k-init (at lr_k 2.0, distortion >= 3 reaches S
    within 700 steps); near S the STE's pull-back from wrongly dropped signal tokens (about 2 units each) is
    stronger than lambda = 0.1, so k ends just above S rather than below it.
  * Router: a linear scorer D -> 1 (PyTorch's default initialisation, seeded), Adam. k is a continuous scalar
    trained by SGD through r = k / N in pi (Eq. 30); the hard top-k keeps floor(k) tokens. --warmup steps train
    the router only (k fixed at --k-init, no penalty), then --steps steps train router and k. Fresh tokens every
    step; training scores get Gaussian noise of 0.1 batch-score std (D12); tau_rank 0.2 -> 0.05 and
    tau_sel 0.1 -> 0.02 follow a cosine over all warm-up + adaptation steps (D12).
  * --lr-k defaults to 2.0 (N/100)^2: the paper's value at N = 100, the same ratio dynamics at other N.

Estimator check (Monte-Carlo): per trial a fresh sample, a fresh random router (weights N(0, 1/D)), k = --k-init
and the starting temperatures. The STE gradient dL/dpi comes from the real DifferentiableTopK (Eq. 7 via the D5
gates; the script asserts it equals <grad_sel, x> for kept and -<grad_rej, x> for dropped tokens). The ideal
gradient is that of the input-gating surrogate (Eqs. 21-22): every token runs BOTH paths, pi_i x_i through the
block and (1 - pi_i) x_i through the identity, out_i = B(pi_i x_i) + (1 - pi_i) x_i, at the same pi the model
computed, and dL/dpi_i = <grad_sel_i - grad_rej_i, x_i> by autograd. The reported cosine compares the two
gradients w.r.t. pi (per sample, over its N tokens); the cosine after mapping both through the soft-rank
Jacobian (w.r.t. the router scores) is reported too. Random router states, because at the trained router the
STE gradient is exactly zero (every kept token is signal and every path meets its target: no mistake to
correct), so the cosine is undefined there.

    python scripts/toy_topk.py --n 100 --d 16 --signal 20 --k-init 50 --seeds 0,1,2 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from shiva_export.topk import DifferentiableTopK, hard_topk_indices, scatter_rows

TAU_RANK = (0.2, 0.05)   # D12: start -> end, cosine schedule
TAU_SEL = (0.1, 0.02)


# ----------------------------------------------------------------------------------------------------------- task

class ToyTask:
    """Signal/noise tokens and a fixed residual block that helps signal tokens and harms noise tokens."""

    def __init__(self, num_tokens: int, dim: int, signal: int, signal_mean: float, distortion: float,
                 generator: torch.Generator):
        self.num_tokens, self.dim, self.signal, self.signal_mean = num_tokens, dim, signal, signal_mean
        self.direction = torch.ones(dim) / math.sqrt(dim)
        fluct = torch.eye(dim) - torch.outer(self.direction, self.direction)
        hidden = 4 * dim
        w1 = torch.randn(hidden, dim, generator=generator) / math.sqrt(dim)
        w2 = torch.randn(dim, hidden, generator=generator) / math.sqrt(hidden)
        self.w_in = w1 @ fluct                      # reads the fluctuation part only
        self.w_out = distortion * (fluct @ w2)      # writes into the fluctuation part only

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, D] and the signal mask [B, N] (S signal tokens at random positions per sample)."""
        x = torch.randn(batch, self.num_tokens, self.dim, generator=generator)
        order = torch.rand(batch, self.num_tokens, generator=generator).argsort(dim=1)
        is_signal = torch.zeros(batch, self.num_tokens, dtype=torch.bool)
        is_signal.scatter_(1, order[:, :self.signal], True)
        return x + self.signal_mean * is_signal.unsqueeze(-1).to(x.dtype), is_signal

    def update(self, x: torch.Tensor) -> torch.Tensor:
        offset = (x @ self.direction).unsqueeze(-1) * self.direction
        return -offset + F.gelu(x @ self.w_in.T) @ self.w_out.T

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.update(x)

    def loss(self, out: torch.Tensor, x: torch.Tensor, is_signal: torch.Tensor) -> torch.Tensor:
        """Mean over samples and tokens of |out - y|^2 / |x|^2, y = B(x) for signal and x for noise tokens."""
        x = x.detach()
        target = torch.where(is_signal.unsqueeze(-1), self.block(x), x)
        return (((out - target) ** 2).sum(-1) / (x ** 2).sum(-1)).mean()


class Router(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


def routed_forward(task: ToyTask, topk: DifferentiableTopK, x: torch.Tensor, scores: torch.Tensor,
                   k_value: torch.Tensor):
    """The pruned block: hard top-k of floor(k) tokens, block on the kept ones, identity for the rest (D1, D5)."""
    num_tokens = x.shape[1]
    k = min(num_tokens, max(1, math.floor(float(k_value.detach()))))
    kept, passed, indices, pi = topk(x, scores, k_value / num_tokens, k=k)
    return scatter_rows(passed, indices, task.block(kept)), indices, pi


def cosine_schedule(step: int, total: int, start: float, end: float) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


# ------------------------------------------------------------------------------------------------------- training

def train(task: ToyTask, args, generator: torch.Generator) -> tuple[Router, float]:
    router = Router(args.d)
    router_opt = torch.optim.Adam(router.parameters(), lr=args.lr_router)
    k_value = torch.tensor(float(args.k_init), requires_grad=True)
    k_opt = torch.optim.SGD([k_value], lr=args.lr_k)
    topk = DifferentiableTopK()
    total = args.warmup + args.steps
    for step in range(total):
        topk.tau_rank = cosine_schedule(step, total, *TAU_RANK)
        topk.tau_sel = cosine_schedule(step, total, *TAU_SEL)
        adapting = step >= args.warmup
        x, is_signal = task.sample(args.batch, generator)
        scores = router(x)
        if args.score_noise > 0:
            noise = torch.randn(scores.shape, generator=generator)
            scores = scores + args.score_noise * scores.detach().std() * noise
        k_in = k_value if adapting else k_value.detach()
        out, _, _ = routed_forward(task, topk, x, scores, k_in)
        loss = task.loss(out, x, is_signal)
        if adapting:
            loss = loss + args.lam * k_value / args.n
        router_opt.zero_grad()
        k_opt.zero_grad()
        loss.backward()
        router_opt.step()
        if adapting:
            k_opt.step()
            with torch.no_grad():
                k_value.clamp_(1.0, float(args.n))
    return router, float(k_value.detach())


@torch.no_grad()
def evaluate(task: ToyTask, router: Router, k_value: float, args, generator: torch.Generator) -> dict:
    x, is_signal = task.sample(args.eval_batch, generator)
    k = min(args.n, max(1, math.floor(k_value)))
    kept = torch.zeros_like(is_signal).scatter_(1, hard_topk_indices(router(x), k), True)
    hits = (kept & is_signal).sum().item()
    return {"precision": hits / kept.sum().item(), "recall": hits / is_signal.sum().item()}


# ---------------------------------------------------------------------------------------------- estimator check

def surrogate_grad(task: ToyTask, x: torch.Tensor, is_signal: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Exact dL/dpi of the input-gating surrogate (Eqs. 21-22): both paths run for every token."""
    pi = pi.detach().clone().requires_grad_(True)
    gate = pi.unsqueeze(-1)
    out = task.block(gate * x) + (1 - gate) * x
    (grad,) = torch.autograd.grad(task.loss(out, x, is_signal), pi)
    return grad


def executed_path_grad(task: ToyTask, x: torch.Tensor, is_signal: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Eq. 7 by hand on the hard forward: <grad_sel, x> for kept tokens, -<grad_rej, x> for dropped ones."""
    x_in = x.detach().clone().requires_grad_(True)
    mask = kept.unsqueeze(-1)
    out = torch.where(mask, task.block(x_in), x_in)
    (grad,) = torch.autograd.grad(task.loss(out, x, is_signal), x_in)
    inner = (grad * x).sum(-1)
    return torch.where(kept, inner, -inner)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    norm = a.norm() * b.norm()
    return None if norm == 0 else float((a * b).sum() / norm)


def estimator_check(task: ToyTask, args, generator: torch.Generator) -> dict:
    topk = DifferentiableTopK(TAU_RANK[0], TAU_SEL[0])
    k_value = torch.tensor(float(args.k_init))
    by_pi, by_scores = [], []
    for _ in range(args.trials):
        x, is_signal = task.sample(1, generator)
        weight = torch.randn(args.d, generator=generator) / math.sqrt(args.d)
        scores = (x @ weight).requires_grad_(True)
        out, indices, pi = routed_forward(task, topk, x, scores, k_value)
        (ste,) = torch.autograd.grad(task.loss(out, x, is_signal), pi, retain_graph=True)
        kept = torch.zeros_like(is_signal).scatter_(1, indices, True)
        manual = executed_path_grad(task, x, is_signal, kept)
        if not torch.allclose(ste, manual, rtol=1e-4, atol=1e-7 * float(manual.abs().max()) + 1e-12):
            raise AssertionError("DifferentiableTopK's gradient w.r.t. pi differs from Eq. 7 on the executed path")
        ideal = surrogate_grad(task, x, is_signal, pi)
        (ste_s,) = torch.autograd.grad(pi, scores, grad_outputs=ste, retain_graph=True)
        (ideal_s,) = torch.autograd.grad(pi, scores, grad_outputs=ideal)
        for store, pair in ((by_pi, (ste, ideal)), (by_scores, (ste_s, ideal_s))):
            value = cosine(*pair)
            if value is not None:
                store.append(value)
    return {"pi": by_pi, "scores": by_scores}


# ------------------------------------------------------------------------------------------------------------ CLI

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="tokens per sample (N)")
    parser.add_argument("--d", type=int, default=16, help="token dimension (D)")
    parser.add_argument("--signal", type=int, default=20, help="signal tokens per sample (S)")
    parser.add_argument("--signal-mean", type=float, default=10.0, help="per-coordinate mean of signal tokens")
    parser.add_argument("--k-init", type=float, default=50.0, help="initial k (kept fixed during warm-up)")
    parser.add_argument("--lam", type=float, default=0.1, help="sparsity penalty lambda * k / N")
    parser.add_argument("--warmup", type=int, default=100, help="router-only steps")
    parser.add_argument("--steps", type=int, default=700, help="adaptation steps (router and k)")
    parser.add_argument("--lr-router", type=float, default=0.1, help="Adam learning rate of the router")
    parser.add_argument("--lr-k", type=float, default=None,
                        help="SGD learning rate of k; default 2.0 * (N/100)^2, i.e. the paper's 2.0 at N = 100 and the "
                             "same dynamics of the ratio r = k/N at other N (a step moves r by lr_k * dL/dr / N^2)")
    parser.add_argument("--batch", type=int, default=4, help="samples per training step")
    parser.add_argument("--eval-batch", type=int, default=256, help="samples in the fresh evaluation batch")
    parser.add_argument("--score-noise", type=float, default=0.1, help="training score noise, in batch-score std")
    parser.add_argument("--distortion", type=float, default=4.0, help="gain of the block's side effect G")
    parser.add_argument("--trials", type=int, default=200, help="Monte-Carlo trials of the estimator check, per seed")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seed_list:
        parser.error("--seeds is empty")
    if args.n < 2:
        parser.error(f"--n must be >= 2, got {args.n}")
    if args.d < 2:
        parser.error(f"--d must be >= 2 (the block's side effect lives off the mean direction), got {args.d}")
    if not 1 <= args.signal <= args.n:
        parser.error(f"--signal must be in [1, n={args.n}], got {args.signal}")
    if not (math.isfinite(args.k_init) and 1 <= args.k_init <= args.n):
        parser.error(f"--k-init must be in [1, n={args.n}], got {args.k_init:g}")
    for name in ("warmup", "steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("batch", "eval_batch", "trials"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr_k is None:
        args.lr_k = 2.0 * (args.n / 100) ** 2
    for name in ("lr_router", "lr_k"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name):g}")
    for name in ("lam", "score_noise", "distortion"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name):g}")
    return args


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and population std, rounded; None when no trial had a non-zero gradient (e.g. S = N: no mistakes)."""
    if not values:
        return None, None
    t = torch.tensor(values, dtype=torch.float64)
    return round(float(t.mean()), 4), round(float(t.std(unbiased=False)), 4)


def run(args) -> dict:
    torch.set_num_threads(1)   # determinism across machines, and faster for these tiny tensors
    rows, cos_pi, cos_scores = [], [], []
    for seed in args.seed_list:
        torch.manual_seed(seed)
        task_gen = torch.Generator().manual_seed(seed)
        task = ToyTask(args.n, args.d, args.signal, args.signal_mean, args.distortion, task_gen)
        router, k_final = train(task, args, torch.Generator().manual_seed(10_000 + seed))
        metrics = evaluate(task, router, k_final, args, torch.Generator().manual_seed(20_000 + seed))
        check = estimator_check(task, args, torch.Generator().manual_seed(30_000 + seed))
        cos_pi += check["pi"]
        cos_scores += check["scores"]
        seed_cos = mean_std(check["pi"])
        rows.append({"seed": seed, "k": round(k_final, 4), "k_hard": min(args.n, max(1, math.floor(k_final))),
                     "precision": round(metrics["precision"], 4), "recall": round(metrics["recall"], 4),
                     "cosine_mean": seed_cos[0], "cosine_std": seed_cos[1]})
    pi_mean, pi_std = mean_std(cos_pi)
    s_mean, s_std = mean_std(cos_scores)
    settings = {name: getattr(args, name) for name in (
        "n", "d", "signal", "signal_mean", "k_init", "lam", "warmup", "steps", "lr_router", "lr_k", "batch",
        "eval_batch", "score_noise", "distortion", "trials")}
    settings.update(seeds=args.seed_list, tau_rank=list(TAU_RANK), tau_sel=list(TAU_SEL))
    return {
        "settings": settings,
        "seeds": rows,
        "k_mean": round(sum(r["k"] for r in rows) / len(rows), 4),
        "cosine_mean": pi_mean,
        "cosine_std": pi_std,
        "cosine_wrt": "pi",
        "cosine_trials": len(cos_pi),
        "cosine_scores_mean": s_mean,
        "cosine_scores_std": s_std,
    }


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_table(result: dict) -> None:
    s = result["settings"]
    print(f"toy top-k: N={s['n']} D={s['d']} signal={s['signal']} (mean {s['signal_mean']:g}) k_init={s['k_init']:g} "
          f"lambda={s['lam']:g} warmup={s['warmup']} steps={s['steps']} lr_router={s['lr_router']:g} "
          f"lr_k={s['lr_k']:g} batch={s['batch']}")
    print(f"{'seed':>6} {'k':>9} {'floor(k)':>9} {'precision':>10} {'recall':>8} {'cos(STE, ideal)':>16}")
    for r in result["seeds"]:
        print(f"{r['seed']:>6} {r['k']:>9.3f} {r['k_hard']:>9d} {r['precision']:>10.3f} {r['recall']:>8.3f} "
              f"{fmt(r['cosine_mean']):>9} +- {fmt(r['cosine_std'])}")
    print(f"cosine(STE, ideal two-path gradient) w.r.t. pi:     {fmt(result['cosine_mean'])} +- "
          f"{fmt(result['cosine_std'])} over {result['cosine_trials']} trials (paper: 0.825 +- 0.043)")
    print(f"cosine(STE, ideal two-path gradient) w.r.t. scores: {fmt(result['cosine_scores_mean'])} +- "
          f"{fmt(result['cosine_scores_std'])}")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    result = run(args)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    print(f"run time {elapsed:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

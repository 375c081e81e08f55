"""Where does the pruning overhead go? Profile one transformer step per configuration and list the top kernels.

    python scripts/profile_overhead.py --keeps 1.0,0.6 [--model sd35-medium-shape]

Prints, per configuration, the CUDA time per kernel family (torch.profiler, eager mode) so that the cost of the
router, selection (sort/compaction), gather and scatter can be compared with attention and the GEMMs.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from shiva_export import kernels
from shiva_export.export import ExportConfig, StaticBucket, example_feed
from shiva_export.models import num_image_tokens
from shiva_export.pruned import load_pruned_model

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from gpu_bench import uniform_k  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="sd35-medium-shape")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--context-tokens", type=int, default=333)
    parser.add_argument("--keeps", default="1.0,0.6")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--router-dtype", choices=["fp32", "model"], default="model",
                        help="routers in the backbone's fp16 (default, as the benchmarks) or fp32")
    parser.add_argument("--kernels", choices=["triton", "torch"], default="triton",
                        help="fused Triton selection/router/scatter (default on CUDA) or the pure-torch path")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pruned = load_pruned_model(args.model, cfg_consistent=True, device=device)
    if device == "cuda":
        pruned.to_dtype(torch.float16, router_fp32=args.router_dtype == "fp32")
    kernels.set_enabled(args.kernels == "triton")
    n = num_image_tokens(pruned.config, args.height, args.height)
    cfg = ExportConfig(args.height, args.height, 2, args.context_tokens, "fp16" if device == "cuda" else "fp32")
    feed = {k: v.to(device) for k, v in example_feed(pruned.config, cfg).items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    configs = {"dense": None, **{f"keep{float(k):g}": uniform_k(pruned.config.num_layers, n, float(k), 64)
                                 for k in args.keeps.split(",")}}
    with torch.inference_mode():
        for name, k in configs.items():
            fn = (lambda: pruned.transformer(**feed, return_dict=False)[0]) if k is None else \
                (lambda k=k: StaticBucket(pruned.transformer, k, inplace_scatter=True)(**feed))
            for _ in range(3):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
            sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            print(f"\n===== {name} =====")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())

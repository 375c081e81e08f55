"""Where does the pruning overhead go? Profile one transformer step per configuration and list the top kernels.

    python scripts/profile_overhead.py --keeps 1.0,0.6 [--model sd35-medium-shape] [--dtype bf16] [--projections fused]

Prints, per configuration, the CUDA time per kernel family (torch.profiler, eager mode) so that the cost of the
router, selection (sort/compaction), gather and scatter can be compared with attention and the GEMMs.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from shiva_export import kernels
from shiva_export.export import ExportConfig, example_feed, torch_dtype
from shiva_export.models import num_image_tokens, preset_names, read_preset
from shiva_export.pruned import load_pruned_model

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from gpu_bench import fuse_layout, torch_module, uniform_k  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="sd35-medium-shape")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--context-tokens", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--align", type=int, default=64)
    parser.add_argument("--align-to", choices=["k", "sequence", "either"], default="k")
    parser.add_argument("--keeps", default="1.0,0.6")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--router-dtype", choices=["fp32", "model"], default="model",
                        help="routers in the backbone's fp16 (default, as the benchmarks) or fp32")
    parser.add_argument("--kernels", choices=["triton", "torch"], default="triton",
                        help="fused Triton selection/router/scatter (default on CUDA) or the pure-torch path")
    parser.add_argument("--projections", choices=["separate", "fused"], default="separate",
                        help="the model's own projection layers, or the backbone's fused layout (as gpu_bench's "
                        "--projections fused)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = read_preset(args.model).get("defaults", {}) if args.model in preset_names() else {}
    args.batch = args.batch or defaults.get("batch", 2)
    args.context_tokens = args.context_tokens or defaults.get("context_tokens", 333)
    pruned = load_pruned_model(args.model, cfg_consistent=args.batch % 2 == 0, device=device)
    dtype = args.dtype if device == "cuda" else "fp32"
    pruned.to_dtype(torch_dtype(dtype), router_fp32=args.router_dtype == "fp32")
    if args.projections == "fused":
        fuse_layout(pruned.transformer)
    kernels.set_enabled(args.kernels == "triton")
    n = num_image_tokens(pruned.config, args.height, args.height)
    cfg = ExportConfig(args.height, args.height, args.batch, args.context_tokens, dtype)
    feed = {k: v.to(device) for k, v in example_feed(pruned.config, cfg).items()}
    constants = {k: v.to(device) for k, v in cfg.constants(pruned.config).items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    args.steps, args.buckets, args.width = 1, 1, args.height   # what gpu_bench's uniform_k reads
    configs = {"dense": None, **{f"keep{float(k):g}": uniform_k(pruned, args, n, float(k))
                                 for k in args.keeps.split(",")}}
    with torch.inference_mode():
        for name, k in configs.items():
            module = torch_module(pruned, k, constants)   # keep 1.0 runs router + selection + scatter
            fn = (lambda module=module: module(**feed))
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

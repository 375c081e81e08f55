"""Flag groups shared by the verbs that create or extend an artifact folder."""

from __future__ import annotations

import argparse

from shiva_export.models import preset_names
from shiva_export.records import DEFAULT_MODEL, ArtifactConfig

DEFAULT_OUT = "shiva_artifacts"


def add_out_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"artifact folder (default: ./{DEFAULT_OUT})")


def add_artifact_args(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model", "backbone and learned pruning policy")
    model.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"preset ({', '.join(preset_names())}) or a local diffusers folder (pipeline or "
                            "transformer)")
    model.add_argument("--router", default=None, help="router/policy checkpoint folder written by `train` (default: the router shipped for the "
                            "preset, if any; else untrained routers at --target-keep)")
    model.add_argument("--target-keep", type=float, default=None,
                       help="uniform keep ratio of untrained routers, instead of the router shipped for the preset "
                            f"(without --router; default {ArtifactConfig.target_keep} where no router ships)")
    freeze = parser.add_argument_group("freeze", "turning learned ratios into fixed k")
    freeze.add_argument("--steps", type=int, default=ArtifactConfig.steps, help="sampler steps")
    freeze.add_argument("--shift", type=float, default=None,
                        help="flow-matching scheduler shift (default: the pipeline folder's scheduler config, or the "
                             "one the preset or the model family declares)")
    freeze.add_argument("--buckets", type=int, default=ArtifactConfig.buckets, help="most static graphs (k-vectors)")
    freeze.add_argument("--align", type=int, default=None, help="round k up to a multiple of this (default: the model's: 16 for the tiny presets, "
                             "128 for the full-size ones, 64 for folders)")
    freeze.add_argument("--align-to", choices=("k", "sequence", "either"), default=None,
                        help="what --align rounds up: k, k + context tokens (the joint attention length), or either, "
                             "whichever comes first (default: the model's; k for most)")
    freeze.add_argument("--k-min", type=int, default=None, help="smallest k of a pruned layer (default: --align)")
    shape = parser.add_argument_group("export", "static shapes and precision of the graphs")
    shape.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    shape.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    shape.add_argument("--batch", type=int, default=None, help="transformer batch; for a CFG family 2 = one image with CFG (default: the "
                       "model's: 2 for a family with classifier-free guidance, 1 for a guidance-distilled one)")
    shape.add_argument("--context-tokens", type=int, default=None,
                       help="text tokens (default: the pipeline's, e.g. its text encoders' max lengths summed)")
    shape.add_argument("--dtype", default=ArtifactConfig.dtype, help="fp32, fp16 or bf16")
    shape.add_argument("--opset", type=int, default=ArtifactConfig.opset, help="ONNX opset (18..23)")
    shape.add_argument("--row-scatter", choices=("where", "scatternd"), default=ArtifactConfig.row_scatter,
                       help="how kept rows return to the sequence: a row Gather + Where (default; ONNX Runtime's "
                            "CUDA ScatterND is slow) or one ScatterND")
    add_out_arg(parser)


def add_device_arg(parser, onnxruntime: bool = True) -> None:
    """--device; with `onnxruntime` the verb also runs ONNX Runtime engine sets there (compute_device's rule)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the PyTorch reference and ONNX Runtime run (default: cuda when torch sees a CUDA "
                             "GPU and ONNX Runtime has its CUDA provider, i.e. onnxruntime-gpu is installed; else cpu)"
                        if onnxruntime else "where the pipeline's encoders run (default: cuda when torch sees a CUDA "
                             "GPU, else cpu)")


def artifact_config(args: argparse.Namespace, default_router: bool = True) -> ArtifactConfig:
    """default_router: without --router or --target-keep, use the checkpoint shipped for a preset (if any)."""
    router = args.router
    if router is None and args.target_keep is None and default_router:
        from shiva_export.models import shipped_router

        router = shipped_router(args.model)
    return ArtifactConfig(model=args.model, router=router, steps=args.steps, shift=args.shift,
                          buckets=args.buckets, align=args.align, align_to=args.align_to, k_min=args.k_min,
                          height=args.height, width=args.width, batch=args.batch, context_tokens=args.context_tokens, dtype=args.dtype,
                          opset=args.opset, row_scatter=args.row_scatter,
                          target_keep=ArtifactConfig.target_keep if args.target_keep is None else args.target_keep)

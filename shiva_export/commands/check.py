"""`check`: every bucket engine vs the PyTorch static-mode model on a real sampling trajectory.

Exit 0 every gate passed, 1 a gate failed (the message names the bucket and the metric), 2 unusable input.
"""

from __future__ import annotations

import argparse

from shiva_export.commands._args import add_device_arg, add_out_arg


def add_parser(subparsers) -> argparse.ArgumentParser:
    from shiva_export import backbones
    from shiva_export.engines.compare import CheckConfig
    from shiva_export.engines.runners import ENGINE_SET_CHOICES

    parser = subparsers.add_parser(
        "check", help="compare every bucket engine with the PyTorch static-mode model",
        description="Capture a sampling trajectory with the PyTorch pruned model in static mode (the schedule's "
                    "steps and shift, the family's guidance, seeded latents and prompt embeddings), run each "
                    "bucket's engine on its steps and the whole loop on the engine set, and gate max abs / cosine / "
                    "PSNR / token-selection agreement per precision. Writes OUT/check.json, OUT/check/ (Polygraphy "
                    "inputs.json + reference.json per bucket, raw .bin inputs for trtexec, repro.sh). Exit 0 all "
                    "gates pass, 1 a gate failed, 2 unusable input.")
    add_out_arg(parser)
    group = parser.add_argument_group("check", "what runs and how it is compared")
    group.add_argument("--backend", action="append", choices=ENGINE_SET_CHOICES, default=None,
                       help="engine set to check; repeat for several (default: onnxruntime = the exported graphs "
                            "on ONNX Runtime CPU). ort/trt/trt-rtx use engines built by `engine`")
    group.add_argument("--seed", type=int, default=CheckConfig.seed, help="seeds latents and prompt embeddings")
    group.add_argument("--guidance-scale", type=float, default=CheckConfig.guidance_scale,
                       help="guidance of the trajectory: a classifier-free guidance scale, or a guidance-distilled "
                            "model's guidance input (default: the family's for the exported batch: " + ", ".join(
                                f"{adapter.default_guidance(adapter.default_batch):g} for {adapter.pipeline_class}"
                                for adapter in backbones.REGISTRY.values()) + "; none for a batch without CFG)")
    group.add_argument("--no-trajectory", action="store_true", help="skip the whole-loop comparison")
    group.add_argument("--force", action="store_true", help="re-run even if check.json is fresh for these inputs")
    add_device_arg(group)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from shiva_export.engines.compare import CheckConfig, render_report, run_check
    from shiva_export.pipeline import Workspace
    from shiva_export.reference import capture_trajectory

    config = CheckConfig(seed=args.seed, guidance_scale=args.guidance_scale, full_trajectory=not args.no_trajectory)
    ws = Workspace(args.out)
    report = run_check(ws, backends=tuple(args.backend or ("onnxruntime",)), config=config, force=args.force,
                       device=args.device, reference=capture_trajectory)
    print(render_report(report.to_json()))
    print(f"\n{ws.path('check.json')}" + (" (reused: inputs unchanged; --force re-runs)" if report.reused else ""))
    return 0 if report else 1

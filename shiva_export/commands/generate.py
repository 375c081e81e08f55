"""`generate`: the pipeline with the dense transformer and with the engines, from one seed, side by side."""

from __future__ import annotations

import argparse
import math

from shiva_export.commands._args import add_device_arg
from shiva_export.engines.backends.names import BACKENDS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="images from the pipeline with the dense transformer and with the engines, side by side",
        description="Run the diffusers pipeline twice from the same seed: with its own dense PyTorch transformer and "
                    "with the artifact's engines as pipe.transformer. Writes OUT/generate/seed<S>-<hash>.png (dense | "
                    "pruned engine | difference x4) and a JSON beside it with each run's wall time and the PSNR / "
                    "SSIM of the engine image against the dense one.")
    parser.add_argument("--out", default="shiva_artifacts", help="artifact folder with engines")
    parser.add_argument("--prompt", required=True, help="the text prompt")
    parser.add_argument("--model", default=None,
                        help="the pipeline folder (default: the model the artifact was built from, if it is one)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial latents of both runs")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampler steps (default: the frozen step count, the only one the engines run)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="CFG scale (default: 7.0 for engines exported for CFG pairs, else 1.0)")
    parser.add_argument("--backend", default="onnxruntime",
                        choices=tuple(BACKENDS),
                        help="engines to run")
    parser.add_argument("--image-out", default=None, help="folder for the PNG and JSON (default: OUT/generate)")
    add_device_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shiva_export.generate import generate

    record = generate(args.out, args.prompt, model=args.model, seed=args.seed, steps=args.steps,
                      guidance_scale=args.guidance_scale, backend=args.backend, device=args.device,
                      out=args.image_out)
    psnr = "inf" if math.isinf(record["psnr_db"]) else f"{record['psnr_db']:.2f} dB"
    print(f"{record['png']}: dense {record['seconds']['dense']:.2f} s, engine ({record['backend']}, "
          f"{record['device']}) {record['seconds']['engine']:.2f} s; PSNR {psnr}, SSIM {record['ssim']:.4f}")
    print(record["json"])
    return 0

"""`data`: training data for `train --data` from a diffusers pipeline folder (docs/training-data.md)."""

from __future__ import annotations

import argparse
import json

from shiva_export.commands._args import add_device_arg


def add_parser(subparsers) -> None:
    from shiva_export import backbones
    from shiva_export.data import DataConfig

    parser = subparsers.add_parser(
        "data", help="encode prompts (and images) with a pipeline into the training-data format",
        description="Encode each prompt of --prompts with the pipeline's own text encoders, and make its latents: "
                    "from --images through the pipeline's VAE (image i, sorted by name, pairs with line i), or "
                    "without --images by sampling the dense pipeline itself (teacher samples). Writes --out in the "
                    "format `train --data` reads: sharded safetensors, index.json written last, the empty prompt's "
                    "embeddings for CFG dropout. A rerun with the same inputs resumes after the last finished shard.")
    parser.add_argument("--model", required=True, help="a diffusers pipeline folder (save_pretrained) of a supported family")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    parser.add_argument("--images", default=None,
                        help="folder of images, one per prompt (default: none; the pipeline samples teacher latents)")
    parser.add_argument("--out", required=True, help="training-data folder to write or resume")
    parser.add_argument("--shard-size", type=int, default=DataConfig.shard_size, help="samples per shard")
    parser.add_argument("--steps", type=int, default=DataConfig.steps, help="teacher samples: sampler steps")
    parser.add_argument("--guidance-scale", type=float, default=DataConfig.guidance_scale,
                        help="teacher samples: the pipeline's guidance_scale, a classifier-free guidance scale "
                             "(the empty prompt as negative) or a guidance-distilled model's guidance input (default: "
                             "the family's: " + ", ".join(f"{adapter.default_guidance(adapter.default_batch):g} for "
                                                          f"{adapter.pipeline_class}"
                                                          for adapter in backbones.REGISTRY.values()) + ")")
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels (default: the pipeline's, sample_size x VAE factor)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width in pixels (default: the pipeline's, sample_size x VAE factor)")
    parser.add_argument("--seed", type=int, default=DataConfig.seed, help="seeds every sample (by its index)")
    parser.add_argument("--force", action="store_true", help="replace data made from other inputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arg(parser, onnxruntime=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shiva_export.data import DataConfig, make_data

    config = DataConfig(shard_size=args.shard_size, steps=args.steps, guidance_scale=args.guidance_scale,
                        height=args.height, width=args.width, seed=args.seed)
    index = make_data(args.model, args.prompts, args.out, images=args.images, config=config, device=args.device,
                      force=args.force, progress=not args.no_progress)
    print(json.dumps({key: index[key] for key in ("latent_channels", "latent_height", "latent_width",
                                                  "context_tokens", "context_dim", "pooled_dim", "caption_mask",
                                                  "source") if key in index}, indent=2))
    print(f"{args.out}: {sum(s['count'] for s in index['shards'])} samples in {len(index['shards'])} shard(s); "
          f"train with `python -m shiva_export train --model {args.model} --data {args.out} ...`")
    return 0

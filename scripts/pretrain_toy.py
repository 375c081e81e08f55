"""Pretrain a preset's backbone on a synthetic "shapes" latent dataset, so that router training has a model with
learned structure to work on (the presets have random weights, whose tokens are all alike: docs/training-data.md).

Writes OUT/model (a diffusers transformer folder: `--model OUT/model`) and OUT/data (the on-disk latent format:
`--data OUT/data`). Each sample is a smooth low-amplitude background plus 1-3 objects: ellipses whose channel
signature and texture depend on their class; the context tokens name each object's class and position, so the
model has to read them. Flow-matching loss (SD3's: v = noise - x0, shifted timesteps), AdamW, CPU is enough.

    python scripts/pretrain_toy.py --out /tmp/toy --steps 300      # about 5 minutes on 2 CPU cores
    python -m shiva_export train --model /tmp/toy/model --data /tmp/toy/data --target-keep 0.6 --out /tmp/toy/ckpt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shiva_export.io import atomic_directory
from shiva_export.models import load_transformer
from shiva_export.training import shifted_timesteps
from shiva_export.training_data import write_latent_dataset

NUM_CLASSES = 8
LOG_FILE = "pretrain_log.json"
MAX_OBJECTS = 3


class ShapesWorld:
    """Fixed class signatures (channels, text) drawn once from the seed; samples drawn from a generator."""

    def __init__(self, channels: int, size: int, context_tokens: int, context_dim: int, pooled_dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.channels, self.size, self.context_tokens = channels, size, context_tokens
        self.signature = torch.randn(NUM_CLASSES, channels, generator=g) * 1.2
        self.texture_gain = torch.rand(NUM_CLASSES, generator=g) * 0.8 + 0.2
        self.class_text = torch.randn(NUM_CLASSES, context_dim, generator=g)
        self.position_text = torch.randn(4, context_dim, generator=g) / 2   # x, y, radius, "object" marker
        self.pad_text = torch.randn(context_dim, generator=g) / 4
        self.pooled_proj = torch.randn(context_dim, pooled_dim, generator=g) / math.sqrt(context_dim)
        grid = torch.arange(size, dtype=torch.float32)
        self.yy, self.xx = torch.meshgrid(grid, grid, indexing="ij")

    def sample(self, count: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size, ch = self.size, self.channels
        coarse = torch.randn(count, ch, size // 8, size // 8, generator=g)
        latents = 0.3 * F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        context = self.pad_text.expand(count, self.context_tokens, -1).clone()
        context += 0.05 * torch.randn(context.shape, generator=g)
        pooled_text = torch.zeros(count, context.shape[-1])
        for n in range(count):
            objects = int(torch.randint(1, MAX_OBJECTS + 1, (1,), generator=g))
            for o in range(objects):
                cls = int(torch.randint(NUM_CLASSES, (1,), generator=g))
                cx, cy = (torch.rand(2, generator=g) * (size - 8) + 4).tolist()
                radius = float(torch.rand(1, generator=g) * 6 + 3)
                inside = ((self.xx - cx) ** 2 + (self.yy - cy) ** 2 <= radius ** 2).float()
                texture = torch.randn(ch, size, size, generator=g) * self.texture_gain[cls]
                latents[n] = latents[n] * (1 - inside) + inside * (self.signature[cls][:, None, None] + texture)
                token = (self.class_text[cls] + self.position_text[3] + (cx / size - 0.5) * self.position_text[0]
                         + (cy / size - 0.5) * self.position_text[1] + (radius / 9) * self.position_text[2])
                context[n, o] = token
                pooled_text[n] += self.class_text[cls] / objects
        return latents, context, pooled_text @ self.pooled_proj


def flow_matching_loss(model, sample: tuple[torch.Tensor, ...], noise: torch.Tensor, sigma: torch.Tensor):
    """SD3's objective: predict v = noise - x0 at x_sigma = (1 - sigma) x0 + sigma noise."""
    x0, context, pooled = sample
    s = sigma[:, None, None, None]
    v = model(hidden_states=(1 - s) * x0 + s * noise, encoder_hidden_states=context, pooled_projections=pooled,
              timestep=sigma * 1000).sample
    return F.mse_loss(v, noise - x0)


def shapes_world(config, defaults: dict, seed: int) -> ShapesWorld:
    """The world a model of this config and preset defaults (its latent size and text length) is pretrained on."""
    return ShapesWorld(config.in_channels, defaults["height"] // 8, defaults["context_tokens"],
                       config.joint_attention_dim, config.pooled_projection_dim, seed)


def evaluate(model, world: ShapesWorld, seed: int) -> float:
    """The flow-matching loss on 64 held-out samples at 64 fixed noise levels (the same for every model of a seed)."""
    held_out = world.sample(64, torch.Generator().manual_seed(seed + 2))
    noise = torch.randn(held_out[0].shape, generator=torch.Generator().manual_seed(seed + 3))
    sigma = shifted_timesteps((torch.arange(64) + 0.5) / 64, 3.0) / 1000
    model.eval()
    with torch.no_grad():
        return float(flow_matching_loss(model, held_out, noise, sigma))


def write_data(folder: Path, world: ShapesWorld, samples: int, seed: int) -> None:
    """The training data written beside the model (on-disk latent format, `train --data`)."""
    latents, context, pooled = world.sample(samples, torch.Generator().manual_seed(seed + 4))
    write_latent_dataset(folder, latents, context, pooled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-sd35", help="preset (random weights) to start from")
    parser.add_argument("--out", required=True, help="folder for model/ and data/")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="pretraining steps (reproducible length)")
    length.add_argument("--minutes", type=float, default=None, help="pretraining wall-clock budget (default 6)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=512, help="samples written to OUT/data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps is None and args.minutes is None:
        args.minutes = 6.0
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and args.minutes <= 0):
        parser.error("--steps and --minutes must be positive")

    torch.manual_seed(args.seed)
    model, source = load_transformer(args.model)
    world = shapes_world(model.config, source.defaults, args.seed)
    model.train().requires_grad_(True)  # presets load frozen, for inference
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)

    def held_out_loss() -> float:
        loss = evaluate(model, world, args.seed)
        model.train()
        return loss

    log = [{"step": 0, "held_out_loss": held_out_loss()}]
    print(json.dumps(log[-1]))
    start, step = time.perf_counter(), 0
    while (step < args.steps) if args.steps is not None else (time.perf_counter() - start < args.minutes * 60):
        sample = world.sample(args.batch, g)
        noise = torch.randn(sample[0].shape, generator=g)
        sigma = shifted_timesteps(torch.rand(args.batch, generator=g), 3.0) / 1000
        loss = flow_matching_loss(model, sample, noise, sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 200 == 0:
            log.append({"step": step, "train_loss": float(loss.detach()), "held_out_loss": held_out_loss(),
                        "wall_s": round(time.perf_counter() - start, 1)})
            print(json.dumps(log[-1]), flush=True)
    log.append({"step": step, "held_out_loss": held_out_loss(), "wall_s": round(time.perf_counter() - start, 1)})
    print(json.dumps(log[-1]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    with atomic_directory(out / "model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / LOG_FILE).write_text(json.dumps({"from": args.model, "seed": args.seed, "batch": args.batch,
                                                "lr": args.lr, "log": log}))
    write_data(out / "data", world, args.samples, args.seed)
    print(f"wrote {out / 'model'} and {out / 'data'} ({args.samples} samples)")


if __name__ == "__main__":
    main()

"""The real-data model of the quality study (issue #18): scikit-learn's handwritten digits as latents, an SD3-family
transformer pretrained on them, a classifier that judges its samples, and the sampler every compared method runs.

Why: the quality-vs-speed study needs data nobody here made and a model that learned it. The digits set ships
inside the scikit-learn wheel (`sklearn.datasets.load_digits`: 1,797 8x8 images of 10 classes, nothing is
downloaded); a class-conditional flow-matching model on it produces images a classifier can check, so FID-style
statistics, class accuracy and PSNR / SSIM against the dense model's samples mean something.

* **Data.** Pixels 0..16 -> [0, 1], upscaled bicubically to the latent grid (default 32x32: 256 image tokens at
  patch size 2) and clipped to [0, 1]. A fixed stratified split (seed SPLIT_SEED, 20% of every class) holds out the
  test images for the classifier and for the real data's Fréchet statistics.
* **Channel map.** One pixel value p becomes the latent vector z = w (2p - 1) over the model's `in_channels`, w a
  fixed vector (seed MAP_SEED, N(0, 1) entries scaled to |w|^2 = C, so a channel has unit scale on average and the
  latents' mean square is about 0.7). `to_image` inverts it by least squares: p = (w . z / |w|^2 + 1) / 2, clipped
  to [0, 1]; it is exact on encoded images, and on samples it keeps the part of z the map can produce.
* **Conditioning.** Each class has a fixed embedding (N(0, 1) text tokens [T, joint_attention_dim] and a pooled
  vector), drawn from the run's seed, plus one more draw as the "null" prompt for classifier-free guidance; saved as
  OUT/classes.safetensors (`load_conditioning`).
* **Model.** tiny-sd35's configuration and seeded initialisation (`shiva_export.models.load_transformer`), trained
  exactly as scripts/pretrain_toy.py trains (SD3's flow matching: v = noise - x0 at shifted timesteps; AdamW,
  gradient clipping 1.0) with the class embedding replaced by the null one for 10% of the samples (CFG dropout) and
  a cosine learning-rate decay. Writes OUT/model (`--model OUT/model`), OUT/data (the training split in the on-disk
  latent format with the class embeddings as text and the null embedding: `train --data OUT/data`) and
  OUT/pretrain_log.json.
* **Classifier.** A small CNN on `to_image` of the training split's latents (random shifts of up to 2 pixels and
  light noise as augmentation), OUT/classifier.safetensors and OUT/classifier.json (test-split accuracy);
  `load_classifier(OUT)` gives `.features(images)` (the penultimate layer, for Fréchet distances) and `.predict`.
* **Sampling.** `sample` runs diffusers' FlowMatchEulerDiscreteScheduler with CFG at batch 2 (null; class) on any
  callable with SD3Transformer2DModel's signature, one sample at a time from its own seed.
* **Checks.** `--dense-check N` classifies N dense samples (OUT/dense_check.json, OUT/dense_samples.png);
  `--stage3-check` runs the demo protocol of tests/test_training.py (`train --data`) on the model and its data and
  writes the stage-3 figures to OUT/stage3.json (docs/training-data.md).

    python scripts/fidelity/digits.py --out /tmp/digits --dense-check 200 --stage3-check   # about 20 min, 2 cores
    python scripts/fidelity/digits.py --out /tmp/digits-ci --steps 3 --batch 4 --data-samples 16 --classifier-epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from shiva_export.errors import ArtifactError, ConfigError, ShivaError
from shiva_export.io import atomic_directory, atomic_output, write_json
from shiva_export.models import load_transformer
from shiva_export.training import shifted_timesteps
from shiva_export.training_data import write_latent_dataset

NUM_CLASSES = 10
SPLIT_SEED, MAP_SEED = 0, 1234     # fixed: the split and the channel map do not change with --seed
TEST_FRACTION = 0.2
LATENT_SIZE = 32
BASE_MODEL = "tiny-sd35"
SHIFT = 3.0                        # SD3's FlowMatchEuler shift, as in the preset's pipeline and in training
GUIDANCE_SCALE = 4.0
CFG_DROPOUT = 0.1
MODEL_DIR, DATA_DIR = "model", "data"
CLASSES_FILE, CLASSIFIER_FILE, CLASSIFIER_JSON = "classes.safetensors", "classifier.safetensors", "classifier.json"
PRETRAIN_LOG, DENSE_CHECK, STAGE3_JSON = "pretrain_log.json", "dense_check.json", "stage3.json"
# The demo protocol of tests/test_training.py (DEMO), as tests/test_training_pretrained.py runs it with --data;
# tests/test_fidelity_digits.py checks that the two stay equal.
STAGE3_PROTOCOL = {"--target-keep": "0.6", "--warmup-steps": "50", "--policy-steps": "200", "--joint-steps": "50",
                   "--lr-warmup-steps": "10", "--global-batch": "4", "--micro-batch": "1", "--eval-steps": "8",
                   "--lr-policy": "3e-3", "--lr-adapter": "1e-3"}


# ------------------------------------------------------------------------------------------ data and channel map


@dataclasses.dataclass(frozen=True)
class DigitSplit:
    """Upscaled digit images in [0, 1] ([n, H, W] float32) and labels ([n] int64), train and test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits(size: int = LATENT_SIZE) -> DigitSplit:
    """The digits at size x size (bicubic, clipped to [0, 1]) with the fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    if size < 8:
        raise ConfigError(f"digits: latent size {size} is below the images' 8x8")
    data = sklearn_digits()
    small = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)[:, 0].numpy()
    labels = data.target.astype(np.int64)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for cls in range(NUM_CLASSES):
        members = np.flatnonzero(labels == cls)
        order = torch.randperm(len(members), generator=g).numpy()
        test[members[order[:round(TEST_FRACTION * len(members))]]] = True
    return DigitSplit(images[~test], labels[~test], images[test], labels[test])


def channel_map(channels: int) -> torch.Tensor:
    """The fixed map w [C] from one pixel channel to C latent channels (|w|^2 = C)."""
    w = torch.randn(channels, generator=torch.Generator().manual_seed(MAP_SEED), dtype=torch.float64)
    return (w * math.sqrt(channels) / w.norm()).float()


def to_latents(images: np.ndarray | torch.Tensor, channels: int) -> torch.Tensor:
    """[n, H, W] images in [0, 1] -> [n, C, H, W] latents z = w (2p - 1)."""
    pixels = torch.as_tensor(np.asarray(images, dtype=np.float32))
    return channel_map(channels)[None, :, None, None] * (2 * pixels[:, None] - 1)


def to_image(latents: np.ndarray | torch.Tensor) -> np.ndarray:
    """[n, C, H, W] latents -> [n, H, W] float32 images in [0, 1]: the least-squares inverse of the channel map."""
    z = torch.as_tensor(latents).detach().float().cpu()
    if z.dim() != 4:
        raise ConfigError(f"to_image: expected latents [n, C, H, W], got shape {list(z.shape)}")
    w = channel_map(z.shape[1])
    u = torch.einsum("nchw,c->nhw", z, w) / w.pow(2).sum()
    return ((u + 1) / 2).clamp(0, 1).numpy()


# ------------------------------------------------------------------------------------------ class conditioning


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Text inputs per class ([10, T, D] context, [10, P] pooled), the null prompt's ([T, D], [P]) and the latent
    shape the model was trained at."""

    context: torch.Tensor
    pooled: torch.Tensor
    null_context: torch.Tensor
    null_pooled: torch.Tensor
    latent_channels: int
    latent_size: int

    def of(self, classes: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [n, T, D], pooled [n, P]) of these class labels."""
        index = torch.as_tensor(classes, dtype=torch.long)
        return self.context[index], self.pooled[index]


def make_conditioning(seed: int, context_tokens: int, context_dim: int, pooled_dim: int, latent_channels: int,
                      latent_size: int) -> Conditioning:
    """N(0, 1) embeddings per class and for the null prompt, from the seed."""
    g = torch.Generator().manual_seed(seed * 1000 + 17)
    context = torch.randn(NUM_CLASSES + 1, context_tokens, context_dim, generator=g)
    pooled = torch.randn(NUM_CLASSES + 1, pooled_dim, generator=g)
    return Conditioning(context[:NUM_CLASSES], pooled[:NUM_CLASSES], context[NUM_CLASSES], pooled[NUM_CLASSES],
                        latent_channels, latent_size)


def save_conditioning(path: Path, cond: Conditioning) -> None:
    from safetensors.torch import save_file

    tensors = {"encoder_hidden_states": cond.context, "pooled_projections": cond.pooled,
               "null_encoder_hidden_states": cond.null_context, "null_pooled_projections": cond.null_pooled}
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"latent_channels": str(cond.latent_channels), "latent_size": str(cond.latent_size)})


def load_conditioning(root: str | Path) -> Conditioning:
    """OUT/classes.safetensors: the class and null embeddings the model was trained with."""
    from safetensors import safe_open

    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; run scripts/fidelity/digits.py --out {root} first")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    try:
        return Conditioning(tensors["encoder_hidden_states"], tensors["pooled_projections"],
                            tensors["null_encoder_hidden_states"], tensors["null_pooled_projections"],
                            int(meta["latent_channels"]), int(meta["latent_size"]))
    except KeyError as err:
        raise ArtifactError(f"{path}: no {err.args[0]!r}; expected the class embeddings digits.py writes") from None


# ------------------------------------------------------------------------------------------ pretraining


def _on(device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in tensors)


def flow_matching_loss(model, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor,
                       sigma: torch.Tensor) -> torch.Tensor:
    """SD3's objective (as scripts/pretrain_toy.py): predict v = noise - x0 at x_sigma = (1 - sigma) x0 + sigma noise."""
    s = sigma[:, None, None, None]
    v = model(hidden_states=(1 - s) * x0 + s * noise, encoder_hidden_states=context, pooled_projections=pooled,
              timestep=sigma * 1000).sample
    return F.mse_loss(v, noise - x0)


def pretrain(out: str | Path, steps: int = 600, seed: int = 0, batch: int = 32, lr: float = 1e-3,
             data_samples: int | None = None, classifier_epochs: int = 20, log_every: int = 100,
             device: str = "cpu") -> dict:
    """Write OUT/{classes.safetensors, classifier.*, model/, data/, pretrain_log.json}; returns the log.
    Every random draw is made on the CPU from seeded generators, so `device` changes only where the math runs."""
    if steps < 1 or batch < 1 or lr <= 0 or classifier_epochs < 1 or (data_samples is not None and data_samples < 1):
        raise ConfigError("--steps, --batch, --lr, --classifier-epochs and --data-samples must be positive")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model, source = load_transformer(BASE_MODEL)
    model = model.to(device)
    cfg = model.config
    size, channels = LATENT_SIZE, cfg.in_channels
    split = load_digits(size)
    cond = make_conditioning(seed, source.defaults["context_tokens"], cfg.joint_attention_dim,
                             cfg.pooled_projection_dim, channels, size)
    save_conditioning(out / CLASSES_FILE, cond)
    classifier_report = train_classifier(out, split, seed=seed, epochs=classifier_epochs)
    print(json.dumps({"classifier": classifier_report}), flush=True)

    x_train, y_train = to_latents(split.train_images, channels), torch.from_numpy(split.train_labels)
    held = 128
    x_held, y_held = to_latents(split.test_images[:held], channels), torch.from_numpy(split.test_labels[:held])
    held_noise = torch.randn(x_held.shape, generator=torch.Generator().manual_seed(seed + 3))
    held_sigma = shifted_timesteps((torch.arange(len(x_held)) + 0.5) / len(x_held), SHIFT) / 1000

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(flow_matching_loss(model, *_on(device, x_held, *cond.of(y_held), held_noise, held_sigma)))
        model.train()
        return loss

    model.train().requires_grad_(True)   # presets load frozen, for inference
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(20, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    g = torch.Generator().manual_seed(seed + 1)
    log = [{"step": 0, "held_out_loss": held_out_loss()}]
    print(json.dumps(log[-1]), flush=True)
    train_start, curve = time.perf_counter(), []
    for step in range(1, steps + 1):
        pick = torch.randint(len(x_train), (batch,), generator=g)
        context, pooled = cond.of(y_train[pick])
        drop = torch.rand(batch, generator=g) < CFG_DROPOUT
        context = torch.where(drop[:, None, None], cond.null_context, context)
        pooled = torch.where(drop[:, None], cond.null_pooled, pooled)
        noise = torch.randn((batch, *x_train.shape[1:]), generator=g)
        sigma = shifted_timesteps(torch.rand(batch, generator=g), SHIFT) / 1000
        loss = flow_matching_loss(model, *_on(device, x_train[pick], context, pooled, noise, sigma))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        curve.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            log.append({"step": step, "train_loss": sum(curve[-log_every:]) / len(curve[-log_every:]),
                        "held_out_loss": held_out_loss(), "lr": schedule.get_last_lr()[0],
                        "wall_s": round(time.perf_counter() - train_start, 1)})
            print(json.dumps(log[-1]), flush=True)
    model.eval().cpu()
    with atomic_directory(out / MODEL_DIR) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    count = len(x_train) if data_samples is None else min(data_samples, len(x_train))
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + 4))[:count]
    write_latent_dataset(out / DATA_DIR, x_train[order], *cond.of(y_train[order]), shard_size=512,
                         null_embeddings=(cond.null_context, cond.null_pooled))
    record = {"from": BASE_MODEL, "settings": {"steps": steps, "seed": seed, "batch": batch, "lr": lr,
                                               "cfg_dropout": CFG_DROPOUT, "shift": SHIFT, "latent_size": size,
                                               "latent_channels": channels, "split_seed": SPLIT_SEED,
                                               "map_seed": MAP_SEED, "context_tokens": cond.context.shape[1]},
              "counts": {"train": len(x_train), "test": len(split.test_labels), "data_samples": count},
              "final_train_loss": log[-1].get("train_loss"), "final_held_out_loss": log[-1]["held_out_loss"],
              "initial_held_out_loss": log[0]["held_out_loss"], "train_curve": [round(v, 5) for v in curve],
              "log": log, "classifier": classifier_report,
              "pretrain_wall_s": round(time.perf_counter() - train_start, 1),
              "wall_s": round(time.perf_counter() - start, 1)}
    write_json(out / PRETRAIN_LOG, record)
    print(f"wrote {out / MODEL_DIR}, {out / DATA_DIR} ({count} samples), {out / CLASSES_FILE}, "
          f"{out / CLASSIFIER_FILE} in {record['wall_s']} s", flush=True)
    return record


def load_model(root: str | Path):
    """The pretrained transformer (eval mode, frozen) of OUT/model."""
    if not (Path(root) / MODEL_DIR).is_dir():
        raise ArtifactError(f"{Path(root) / MODEL_DIR}: missing; run scripts/fidelity/digits.py --out {root} first")
    return load_transformer(str(Path(root) / MODEL_DIR))[0]


# ------------------------------------------------------------------------------------------ classifier


class DigitClassifier(torch.nn.Module):
    """Three conv-ReLU-maxpool stages (16, 32, 64 channels), a 4x4 average pool, a FEATURES-wide hidden layer (the
    features of Fréchet distances) and the 10 class logits. Takes [n, H, W] images in [0, 1]."""

    FEATURES = 64

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, padding=1) for a, b in ((1, 16), (16, 32), (32, 64)))
        self.hidden = torch.nn.Linear(64 * 16, self.FEATURES)
        self.head = torch.nn.Linear(self.FEATURES, NUM_CLASSES)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None]
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return F.relu(self.hidden(F.adaptive_avg_pool2d(x, 4).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._hidden(images))

    @torch.no_grad()
    def _batched(self, images, fn) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if x.dim() != 3:
            raise ConfigError(f"classifier: expected images [n, H, W], got shape {list(x.shape)}")
        self.eval()
        return torch.cat([fn(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()

    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """[n, FEATURES] penultimate-layer activations (float64) of [n, H, W] images in [0, 1]."""
        return self._batched(images, self._hidden).astype(np.float64)

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """[n] predicted class labels."""
        return self._batched(images, lambda x: self(x).argmax(dim=1))


def _augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift every image by up to 2 pixels each way (zero fill) and add N(0, 0.05^2) noise."""
    n, h, w = images.shape
    padded = F.pad(images, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    shifted = padded[torch.arange(n)[:, None, None], rows, cols]
    return (shifted + 0.05 * torch.randn(shifted.shape, generator=g)).clamp(0, 1)


def train_classifier(out: str | Path, split: DigitSplit, seed: int = 0, epochs: int = 20, channels: int = 16) -> dict:
    """Train on to_image of the training split's latents; write OUT/classifier.safetensors and classifier.json."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed + 100)
        net = DigitClassifier()
    train_x = torch.from_numpy(to_image(to_latents(split.train_images, channels)))
    train_y = torch.from_numpy(split.train_labels)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 101)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(order), 64):
            pick = order[i:i + 64]
            loss = F.cross_entropy(net(_augment(train_x[pick], g)), train_y[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    test_x = to_image(to_latents(split.test_images, channels))
    report = {"test_accuracy": float(np.mean(net.predict(test_x) == split.test_labels)),
              "train_accuracy": float(np.mean(net.predict(train_x) == split.train_labels)),
              "test_count": len(split.test_labels), "epochs": epochs, "seed": seed,
              "wall_s": round(time.perf_counter() - start, 1)}
    with atomic_output(Path(out) / CLASSIFIER_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"class": "DigitClassifier", "features": str(DigitClassifier.FEATURES)})
    write_json(Path(out) / CLASSIFIER_JSON, report)
    return report


def load_classifier(root: str | Path) -> DigitClassifier:
    """The classifier of OUT/classifier.safetensors, in eval mode."""
    from safetensors.torch import load_file

    path = Path(root) / CLASSIFIER_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; run scripts/fidelity/digits.py --out {root} first")
    net = DigitClassifier()
    try:
        net.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise ArtifactError(f"{path}: not a DigitClassifier ({str(err).splitlines()[0]})") from None
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ sampling


TransformerFn = Callable[..., tuple]


@torch.no_grad()
def sample(transformer: TransformerFn, conditioning: Conditioning, classes: Sequence[int], seeds: Sequence[int],
           steps: int = 28, guidance_scale: float = GUIDANCE_SCALE, shift: float = SHIFT,
           progress: Callable[[int], None] | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Final latents [n, C, H, W] of one sample per (class, seed): diffusers' FlowMatchEulerDiscreteScheduler at
    `shift`, `steps` Euler steps, CFG at batch 2 (null prompt; class prompt): v = v_null + g (v_class - v_null).

    `transformer` is any callable with SD3Transformer2DModel's call signature (hidden_states, encoder_hidden_states,
    pooled_projections, timestep, return_dict=False) -> (output, ...): a pruned or patched model, an engine runner,
    another method's wrapper. The initial noise of a sample is N(0, 1) from torch.Generator().manual_seed(seed) (on
    the CPU), so a sample depends only on its class, its seed and the transformer. Inputs are moved to `device` (the
    transformer's); the latents come back on the CPU in fp32. `progress(i)` is called after each sample."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if len(classes) != len(seeds):
        raise ConfigError(f"sample: {len(classes)} classes but {len(seeds)} seeds")
    if steps < 1:
        raise ConfigError(f"sample: steps={steps} must be >= 1")
    if any(not 0 <= int(c) < NUM_CLASSES for c in classes):
        raise ConfigError(f"sample: class labels must be in 0..{NUM_CLASSES - 1}, got {sorted(set(classes))}")
    shape = (1, conditioning.latent_channels, conditioning.latent_size, conditioning.latent_size)
    null_context, null_pooled = _on(device, conditioning.null_context[None], conditioning.null_pooled[None])
    out = []
    for i, (cls, seed) in enumerate(zip(classes, seeds)):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(steps)
        context, pooled = conditioning.of([int(cls)])
        context, pooled = torch.cat([null_context, context.to(device)]), torch.cat([null_pooled, pooled.to(device)])
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))).to(device)
        for t in scheduler.timesteps:
            v = transformer(hidden_states=torch.cat([latents, latents]), encoder_hidden_states=context,
                            pooled_projections=pooled, timestep=t.expand(2).to(device), return_dict=False)[0]
            v_null, v_class = v.float().chunk(2)
            latents = scheduler.step(v_null + guidance_scale * (v_class - v_null), t, latents).prev_sample
        out.append(latents.float().cpu())
        if progress is not None:
            progress(i)
    return torch.cat(out)


def sample_plan(count: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Balanced classes (0, 1, ..., 9, 0, 1, ...) and seeds seed*100000 + i for `count` samples."""
    return [i % NUM_CLASSES for i in range(count)], [seed * 100_000 + i for i in range(count)]


def save_grid(path: Path, images: np.ndarray, columns: int = NUM_CLASSES) -> None:
    """A PNG of [n, H, W] images in [0, 1], `columns` per row, 2-pixel gaps."""
    from PIL import Image

    n, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = np.ones(((h + 2) * rows, (w + 2) * columns))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image
    with atomic_output(path) as tmp:
        Image.fromarray((canvas * 255 + 0.5).astype(np.uint8)).save(tmp, format="PNG")


def dense_check(root: str | Path, count: int = 200, steps: int = 28, guidance_scale: float = GUIDANCE_SCALE,
                seed: int = 0, device: str = "cpu") -> dict:
    """Classify `count` class-balanced dense samples of OUT/model; writes OUT/dense_check.json and a PNG grid."""
    import metrics

    if count < 1 or steps < 1:
        raise ConfigError("--dense-check and --sample-steps must be >= 1")
    root = Path(root)
    model, cond, classifier = load_model(root), load_conditioning(root), load_classifier(root)
    classes, seeds = sample_plan(count, seed)
    start = time.perf_counter()
    images = to_image(sample(model.to(device), cond, classes, seeds, steps=steps, guidance_scale=guidance_scale,
                             device=device))
    wall = time.perf_counter() - start
    split = load_digits(cond.latent_size)
    real = classifier.features(split.test_images)
    per_class = classifier.predict(images) == np.asarray(classes)
    report = {"count": count, "steps": steps, "guidance_scale": guidance_scale, "shift": SHIFT, "seed": seed,
              "accuracy": metrics.class_accuracy(classifier, images, classes),
              "per_class_accuracy": [float(per_class[np.asarray(classes) == c].mean()) for c in range(NUM_CLASSES)
                                     if c in classes],
              "frechet_vs_test_split": metrics.frechet_distance(classifier.features(images), real),
              "frechet_train_vs_test_split": metrics.frechet_distance(classifier.features(split.train_images), real),
              "sampling_wall_s": round(wall, 1)}
    write_json(root / DENSE_CHECK, report)
    save_grid(root / "dense_samples.png", images[:min(count, 100)])
    return report


# ------------------------------------------------------------------------------------------ stage-3 check


def stage3_check(root: str | Path, seed: int = 0) -> dict:
    """Run `train` with STAGE3_PROTOCOL on OUT/model and OUT/data (checkpoint in OUT/stage3) and write the
    summary's stage-2/3 figures and checks to OUT/stage3.json. The claim: stage 3's output error is >= 30% below
    the untrained router's at the same per-layer k (`after_stage3.reduction_vs_untrained` >= 0.30)."""
    from shiva_export import checkpoint as ckpt
    from shiva_export import cli

    root = Path(root)
    for name in (MODEL_DIR, DATA_DIR):
        if not (root / name).is_dir():
            raise ArtifactError(f"{root / name}: missing; run scripts/fidelity/digits.py --out {root} first")
    argv = ["train", "--model", str(root / MODEL_DIR), "--data", str(root / DATA_DIR), "--out",
            str(root / "stage3"), "--seed", str(seed), "--no-progress",
            *[part for item in STAGE3_PROTOCOL.items() for part in item]]
    start = time.perf_counter()
    code = cli.main(argv)
    if code != 0:
        raise ShivaError(f"stage-3 check: train exited {code}")
    summary = json.loads((root / "stage3" / ckpt.SUMMARY_FILE).read_text())
    stage3 = summary["after_stage3"]
    report = {"protocol": STAGE3_PROTOCOL, "seed": seed, "wall_s": round(time.perf_counter() - start, 1),
              "claim_met": stage3["reduction_vs_untrained"] >= 0.30,
              "reduction_vs_untrained": stage3["reduction_vs_untrained"],
              "weighted_reduction_vs_untrained": stage3["weighted_reduction_vs_untrained"],
              "after_stage2": {k: summary["after_stage2"][k] for k in ("learned", "random", "grid", "untrained_router")
                               if k in summary["after_stage2"]},
              "after_stage3": {k: v for k, v in stage3.items() if not isinstance(v, dict)},
              "schedule_mean_keep": summary["schedule"]["mean_keep"], "mean_keep": summary["mean_keep"],
              "checks": summary["checks"]}
    write_json(root / STAGE3_JSON, report)
    return report


# ------------------------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one line, exit 2 (main), as the project's verbs
        raise ConfigError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for model/, data/, classes, classifier and reports")
    parser.add_argument("--steps", type=int, default=600, help="pretraining steps (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data-samples", type=int, default=None, help="samples in OUT/data (default: the whole "
                        "training split, 1,438)")
    parser.add_argument("--classifier-epochs", type=int, default=20)
    parser.add_argument("--no-pretrain", action="store_true", help="reuse OUT's model, data and classifier")
    parser.add_argument("--dense-check", type=int, default=None, metavar="N",
                        help="classify N dense samples (OUT/dense_check.json)")
    parser.add_argument("--sample-steps", type=int, default=28)
    parser.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--stage3-check", action="store_true", help="run the stage-3 claim (OUT/stage3.json)")
    parser.add_argument("--device", default="cpu", help="where pretraining and sampling run (default cpu; the "
                        "results do not depend on it beyond rounding)")
    try:
        args = parser.parse_args(argv)
        if args.dense_check is not None and args.dense_check < 1:
            raise ConfigError(f"--dense-check {args.dense_check}: must be >= 1")
        if args.sample_steps < 1:
            raise ConfigError(f"--sample-steps {args.sample_steps}: must be >= 1")
        if args.no_pretrain:
            missing = [name for name in (MODEL_DIR, DATA_DIR, CLASSES_FILE, CLASSIFIER_FILE)
                       if not (Path(args.out) / name).exists()]
            if missing:
                raise ArtifactError(f"--no-pretrain: {args.out} has no {', '.join(missing)}; run without it first")
        else:
            pretrain(args.out, steps=args.steps, seed=args.seed, batch=args.batch, lr=args.lr,
                     data_samples=args.data_samples, classifier_epochs=args.classifier_epochs, device=args.device)
        if args.dense_check:
            print(json.dumps({"dense_check": dense_check(args.out, args.dense_check, args.sample_steps,
                                                         args.guidance_scale, args.seed, args.device)}), flush=True)
        if args.stage3_check:
            report = stage3_check(args.out, args.seed)
            print(json.dumps({key: report[key] for key in ("claim_met", "reduction_vs_untrained",
                                                           "weighted_reduction_vs_untrained", "wall_s")}))
    except ShivaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

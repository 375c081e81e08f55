"""`generate`: see what was built. The diffusers pipeline runs twice from the same seed, once with its own dense
PyTorch transformer and once with the artifact's engines as `pipe.transformer`; the images are written side by side
(dense | pruned engine | difference) as a PNG, with each run's wall time and PSNR / SSIM against dense in a JSON.

SSIM is Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 1 for
pixels in [0, 1], computed per RGB channel and averaged over channels and pixels ("valid" windows only).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from shiva_export.errors import ConfigError

logger = logging.getLogger(__name__)

GENERATE_DIR = "generate"
DIFF_GAIN = 4.0   # the difference panel shows |engine - dense| x this, clipped to 1


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]; inf when they are equal."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(image, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    axis = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-axis ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


def _filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a [H, W] image with the 1-D kernel along both axes."""
    size = len(kernel)
    rows = sum(kernel[i] * image[i:image.shape[0] - size + 1 + i, :] for i in range(size))
    return sum(kernel[i] * rows[:, i:rows.shape[1] - size + 1 + i] for i in range(size))


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Mean structural similarity of two [H, W, C] images in [0, 1] (1 when equal); see the module docstring."""
    a, b = np.asarray(reference, np.float64), np.asarray(image, np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ConfigError(f"ssim: expected two [H, W, C] images of one shape, got {a.shape} and {b.shape}")
    size = min(11, a.shape[0], a.shape[1])
    kernel = _gaussian_window(size, 1.5 * size / 11)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for channel in range(a.shape[2]):
        x, y = a[..., channel], b[..., channel]
        mx, my = _filter(x, kernel), _filter(y, kernel)
        sxx = _filter(x * x, kernel) - mx * mx
        syy = _filter(y * y, kernel) - my * my
        sxy = _filter(x * y, kernel) - mx * my
        values.append(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2)))
    return float(np.mean(values))


def side_by_side(dense: np.ndarray, engine: np.ndarray, gap: int = 4) -> np.ndarray:
    """[H, 3W + 2 gap, 3] uint8: dense | engine | |engine - dense| x DIFF_GAIN, on a white background."""
    diff = np.clip(np.abs(engine.astype(np.float64) - dense) * DIFF_GAIN, 0, 1)
    height, width = dense.shape[:2]
    canvas = np.ones((height, 3 * width + 2 * gap, 3))
    for slot, panel in enumerate((dense, engine, diff)):
        canvas[:, slot * (width + gap):slot * (width + gap) + width] = panel
    return (canvas * 255 + 0.5).astype(np.uint8)


def generate(artifacts: str | Path, prompt: str, model: str | Path | None = None, seed: int = 0,
             steps: int | None = None, guidance_scale: float | None = None, backend: str = "onnxruntime",
             device: str | None = None, out: str | Path | None = None) -> dict:
    """Run the pipeline with the dense transformer and with the engines; write the PNG and the JSON.

    Args:
        artifacts: the artifact folder (its engines, schedule and exported size).
        model: the pipeline folder (default: the model the artifact was built from, if that is a pipeline folder).
        steps: sampler steps (default and only choice that the engines run: the frozen step count).
        guidance_scale: the pipeline's guidance_scale, a CFG scale or a guidance-distilled model's guidance input
            (default: the family's for the exported batch, the adapter's `default_guidance`).
        out: output folder (default ARTIFACTS/generate).
    Returns the JSON record.
    """
    from PIL import Image

    from shiva_export.engines.backends.base import compute_device
    from shiva_export.engines.backends.names import BACKENDS
    from shiva_export.export import torch_dtype
    from shiva_export.io import atomic_output, write_json
    from shiva_export.models import load_pipeline, pipeline_root
    from shiva_export.pipeline import Workspace
    from shiva_export.records import ExportRecord
    from shiva_export.runtime import ShivaEngineTransformer

    if not prompt.strip():
        raise ConfigError("--prompt is empty; expected the text to generate an image for")
    ws = Workspace(artifacts, write=False)
    exported = ws.manifest.require(ExportRecord)
    export = exported.config
    schedule = ws.schedule()
    source = model if model is not None else ws.manifest.config.model
    if model is None and not (Path(source).exists() and _is_pipeline(Path(source))):
        raise ConfigError(f"{ws.root} was built from {source!r}, which is not a pipeline folder (no VAE or text "
                          "encoders); pass --model PIPELINE_DIR with the pipeline this transformer belongs to")
    steps = schedule.num_steps if steps is None else steps
    if steps != schedule.num_steps:
        raise ConfigError(f"--steps {steps}: the engines were frozen for {schedule.num_steps} sampler steps; omit "
                          f"--steps or re-freeze with --steps {steps}")
    from shiva_export import backbones

    adapter = backbones.for_config(exported.transformer_config)
    cfg_pairs = adapter.cfg_pairs(export.batch)
    guidance = adapter.default_guidance(export.batch) if guidance_scale is None else float(guidance_scale)
    if adapter.default_batch == 2 and cfg_pairs != (guidance > 1.0):
        raise ConfigError(f"--guidance-scale {guidance:g}: the engines run batch {export.batch} "
                          f"({'CFG pairs: a scale > 1' if cfg_pairs else 'no CFG: a scale <= 1'} is needed)")
    images = export.batch // (2 if cfg_pairs else 1)
    on_ort = BACKENDS.get(backend) == "ort"
    device = compute_device(device, onnxruntime=on_ort)
    dtype = torch_dtype(export.dtype)
    pipe = load_pipeline(pipeline_root(source), dtype=dtype, device=device)
    call = {"prompt": [prompt] * images, "num_inference_steps": steps, "guidance_scale": guidance,
            "height": export.height, "width": export.width, "output_type": "np",
            **adapter.pipeline_call_options(export.context_tokens)}

    def run(transformer) -> tuple[np.ndarray, float]:
        pipe.transformer = transformer
        generator = torch.Generator().manual_seed(seed)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            result = pipe(**call, generator=generator).images
        if device == "cuda":
            torch.cuda.synchronize()
        return np.clip(result[0], 0, 1), time.perf_counter() - started

    dense_transformer = pipe.transformer
    dense, dense_s = run(dense_transformer)
    providers = ["CUDAExecutionProvider"] if device == "cuda" and on_ort else None
    with ShivaEngineTransformer.from_artifacts(ws.root, backend=backend, providers=providers) as engine:
        pruned, engine_s = run(engine)
    pipe.transformer = dense_transformer
    folder = Path(out) if out is not None else ws.path(GENERATE_DIR)
    stem = f"seed{seed}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"
    png, record_path = folder / f"{stem}.png", folder / f"{stem}.json"
    with atomic_output(png) as tmp:
        Image.fromarray(side_by_side(dense, pruned)).save(tmp, format="PNG")
    record = {"prompt": prompt, "seed": seed, "steps": steps, "guidance_scale": guidance,
              "height": export.height, "width": export.width, "images_per_call": images,
              "backend": backend, "device": device, "dtype": export.dtype, "pipeline": str(pipeline_root(source)),
              "artifacts": str(ws.root), "panels": ["dense (PyTorch)", f"pruned ({backend})",
                                                    f"|pruned - dense| x {DIFF_GAIN:g}"],
              "seconds": {"dense": round(dense_s, 4), "engine": round(engine_s, 4)},
              "psnr_db": psnr(dense, pruned), "ssim": ssim(dense, pruned),
              "realised_keep_ratio": schedule.summary.realised_keep_ratio, "png": png.name}
    write_json(record_path, {**record, "psnr_db": None if math.isinf(record["psnr_db"]) else record["psnr_db"]})
    logger.info("generate: %s (dense %.2f s, engine %.2f s, PSNR %.2f dB, SSIM %.4f)", png, dense_s, engine_s,
                record["psnr_db"], record["ssim"])
    return {**record, "png": str(png), "json": str(record_path)}


def _is_pipeline(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path.parent / "model_index.json").is_file()

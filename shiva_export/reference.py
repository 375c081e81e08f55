"""The PyTorch reference: the stage ahead of the engine check that runs the pruned model itself.

`capture_trajectory` runs the pipelines' sampling loop (`engines.trajectory.denoise`) with the PyTorch pruned model
in static mode, each step pinned to its bucket's k vector as exported, and records every step's feed, outputs,
kept indices and how far each selection was from a tie (`patching.boundary_margin`). `engines.compare.run_check`
takes the result; the engines package runs no PyTorch model.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping

import numpy as np

from shiva_export.engines.trajectory import (StepRecord, Trajectory, _seeded_inputs, _to_numpy, _to_torch, denoise,
                                             export_config, resolve_guidance)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _model_in_dtype(pruned, dtype_name: str, device: str = "cpu") -> Iterator[None]:
    """Run the backbone in the export dtype (routers stay fp32, as exported) on `device`; restore fp32 on the CPU
    even on error. An fp32 reference on a GPU runs without TF32 (cuDNN convolutions default to it)."""
    import torch

    from shiva_export.export import torch_dtype

    dtype = torch_dtype(dtype_name)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if dtype != torch.float32:
        pruned.to_dtype(dtype)
    try:
        if device != "cpu":
            pruned.transformer.to(device)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        if device != "cpu":
            pruned.transformer.to("cpu")
        if dtype != torch.float32:
            pruned.to_dtype(torch.float32)


def capture_trajectory(ws, seed: int = 0, guidance_scale: float | None = None,
                       device: str = "cpu") -> Trajectory:
    """Run the sampler with the PyTorch pruned model in static mode on `device` and record every step.

    guidance_scale: a CFG scale, or a guidance-distilled model's guidance input, as the family applies it to the
    exported batch (`engines.trajectory.resolve_guidance`); None: the family's default for the batch.

    Each step calls ``StaticBucket(transformer, bucket.k, debug_indices=True, margins=True)`` (the module the graphs
    were traced from) pinned to its bucket's k vector, in the export dtype, so its outputs and kept indices are the
    reference for the bucket graphs and their debug twins; each step's boundary margins (how near each selection
    was to a tie) go to `StepRecord.margins` for the check's near-tie rule.
    """
    import torch

    from shiva_export.export import StaticBucket, output_names
    from shiva_export.pipeline import recorded_transformer_config

    schedule = ws.schedule()
    cfg = export_config(ws)
    pruned = ws.pruned
    state = pruned.state
    names = output_names(state.num_layers, state.pruned_layers, debug_indices=True)
    guidance = resolve_guidance(pruned.config, cfg.batch, guidance_scale)
    latents, conditioning = _seeded_inputs(cfg, pruned.config, seed, guidance.embedded)
    constants = cfg.constants(pruned.config)
    modules = {b.index: StaticBucket(pruned.transformer, b.k, debug_indices=True, constants=constants,
                                     margins=True).eval() for b in schedule.buckets}
    records: list[StepRecord] = []
    margins: dict[int, dict[int, np.ndarray]] = {}   # step -> pruned layer -> boundary margin per row

    def step_fn(step: int, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        bucket = schedule.step_to_bucket[step]
        with torch.inference_mode():
            result = modules[bucket](**{name: _to_torch(value).to(device) for name, value in feed.items()})
        out_dtype = latents.dtype
        margins[step] = {layer: value.cpu().numpy().astype(np.float32)
                         for layer, value in zip(state.pruned_layers, result[len(names):])}
        return {name: (_to_numpy(value, out_dtype) if name == "sample" else value.cpu().numpy().astype(np.int64))
                for name, value in zip(names, result)}

    def on_step(step: int, feed: dict, outputs: Mapping[str, np.ndarray]) -> None:
        records.append(StepRecord(step, schedule.step_to_bucket[step], float(feed["timestep"][0]),
                                  dict(feed), dict(outputs), margins.pop(step)))

    scale = guidance.cfg_scale
    with _model_in_dtype(pruned, cfg.dtype, device):
        final = denoise(step_fn, schedule, cfg, pruned.config, latents, conditioning, scale, on_step,
                        progress=f"trajectory (PyTorch, {device})")
    logger.info("captured a %d-step trajectory (seed %d, %s, %s, %s)", len(records), seed, guidance.describe(),
                cfg.dtype, device)
    return Trajectory(seed=int(seed), guidance_scale=scale, dtype=cfg.dtype, steps=tuple(records),
                      initial_latents=latents, final_latents=final, conditioning=dict(conditioning),
                      model_config=recorded_transformer_config(pruned.config))

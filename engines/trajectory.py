"""Check inputs from a real sampling trajectory, not from random tensors: the feeds an engine meets in deployment.

Random inputs at one timestep miss what matters for a pruned DiT: the router ranks tokens of *denoising*
latents, and each step runs on its own bucket's engine. So the check runs the sampler the family's pipeline runs
(its scheduler with the schedule's steps and shift; classifier-free guidance on a batch ``[uncond; cond]``, or a
guidance-distilled model's guidance input, as the adapter says) with the PyTorch pruned model in static mode (each step pinned to its bucket's k vector,
as exported), from seeded latents and seeded prompt embeddings, and records at every step the transformer's inputs
(in the graphs' exact dtypes), its outputs and the kept token indices per pruned layer.

``denoise`` is the one sampling loop: the PyTorch capture (``shiva_export.reference``, the stage ahead of the check)
and the engine loop in ``compare.py`` both run it, so scheduler and guidance arithmetic are identical and only the
transformer differs. Nothing here runs a PyTorch model.
"""

from __future__ import annotations

__all__ = [
    "Guidance",
    "REFERENCE_RUNNER",
    "StepRecord",
    "Trajectory",
    "denoise",
    "export_config",
    "resolve_guidance",
    "save_bucket_data",
    "save_run_results",
    "step_ranges",
]

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from shiva_export.errors import ArtifactError, ConfigError
from shiva_export.records import CHECK_INPUTS, CHECK_REFERENCE, ExportRecord

logger = logging.getLogger(__name__)

REFERENCE_RUNNER = "torch-static"   # runner name of the PyTorch static-mode outputs in reference.json
TIMESTEP_ATOL = 1e-2                # passes.freeze.TIMESTEP_ATOL: the frozen timesteps are the scheduler's

# The transformer call of one step: feed dict (numpy, graph dtypes) -> {"sample": ..., maybe indices_layer{l}}.
StepFn = Callable[[int, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One sampler step: what the transformer was fed and what the PyTorch static-mode model returned."""

    step: int
    bucket: int
    timestep: float
    feed: dict[str, np.ndarray]        # graph input name (export.input_names) -> array in the graph's dtype
    outputs: dict[str, np.ndarray]     # "sample" + "indices_layer{l}" per pruned layer (int64 [B, k])
    # pruned layer -> each row's boundary margin (patching.boundary_margin, fp32 [B]): how close the reference's
    # selection was to a tie; empty where the reference did not record it
    margins: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """A whole denoising run of the PyTorch static-mode model, step by step.

    Attributes:
        seed: seeds the initial latents and the prompt embeddings.
        guidance_scale: the classifier-free guidance scale the loop applied (1.0 when the batch has no
            [uncond; cond] halves; a guidance-distilled model's guidance input is in `conditioning`).
        dtype: the export dtype ("fp32", "fp16", "bf16"); latents stay in it between steps, as in diffusers.
        steps: one record per sampler step.
        initial_latents / final_latents: [images, C, H, W] before the first and after the last step.
    """

    seed: int
    guidance_scale: float
    dtype: str
    steps: tuple[StepRecord, ...]
    initial_latents: np.ndarray
    final_latents: np.ndarray
    conditioning: dict[str, np.ndarray]   # the inputs fixed for the run (text embeddings, guidance) of the batch
    model_config: dict                    # the transformer's config (its family feeds the timestep its own way)

    def bucket_steps(self, bucket: int) -> tuple[StepRecord, ...]:
        return tuple(s for s in self.steps if s.bucket == bucket)

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted({s.bucket for s in self.steps}))


@dataclasses.dataclass(frozen=True)
class Guidance:
    """The guidance a trajectory runs with, as the family's adapter applies it to the exported batch.

    kind: "cfg" (classifier-free guidance over [uncond; cond] halves at `scale`), "embedded" (a guidance-distilled
    model's guidance input, fed `scale`; no CFG) or "none" (no guidance; scale 1).
    """

    kind: str
    scale: float

    @property
    def cfg_scale(self) -> float:
        """The scale of the sampler's uncond + g (cond - uncond) (1.0 unless the batch has CFG halves)."""
        return self.scale if self.kind == "cfg" else 1.0

    @property
    def embedded(self) -> float | None:
        """The value of the model's guidance input, if it has one."""
        return self.scale if self.kind == "embedded" else None

    def describe(self) -> str:
        if self.kind == "cfg":
            return f"CFG scale {self.scale:g}"
        if self.kind == "embedded":
            return f"guidance {self.scale:g} (the model's guidance input, no CFG)"
        return "no guidance"

    def to_json(self) -> dict:
        return {"kind": self.kind, "scale": self.scale}


def resolve_guidance(model_config, batch: int, scale: float | None) -> Guidance:
    """The guidance of a trajectory at the exported batch: `scale`, or the family's default for the batch (the
    adapter's `default_guidance`, as `generate` uses); a scale for a batch that runs no guidance is refused."""
    from shiva_export import backbones

    adapter = backbones.for_config(model_config)
    kind = adapter.guidance_kind(model_config, batch)
    if kind == "none":
        if scale is not None and float(scale) != 1.0:
            raise ConfigError(f"--guidance-scale {scale:g}: the engines run batch {batch} without guidance (no "
                              "[uncond; cond] halves, no guidance input); omit --guidance-scale")
        return Guidance("none", 1.0)
    return Guidance(kind, float(adapter.default_guidance(batch) if scale is None else scale))


def export_config(ws):
    """The ExportConfig the graphs of `ws` were exported with (shapes and dtypes of their inputs)."""
    from shiva_export.export import ExportConfig

    try:
        return ExportConfig(**ws.manifest.require(ExportRecord).config.to_json())
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{ws.root}: the manifest's export record has no usable config ({err}); re-export") from err


def _numpy_dtype(name: str):
    if name == "bf16":
        import ml_dtypes  # numpy has no bfloat16; onnx ships ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"fp32": np.float32, "fp16": np.float16}[name])


def _to_numpy(tensor, dtype: np.dtype) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(dtype)
    return tensor.numpy().astype(dtype, copy=True)


def _to_torch(array: np.ndarray):
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _scheduler(schedule):
    """The pipeline's scheduler the schedule was frozen for, at its step count (and image length, for dynamic
    shifting); refused if its timesteps are not the frozen ones."""
    from shiva_export.passes.freeze import make_scheduler, set_pipeline_timesteps

    cfg = schedule.freeze_config
    scheduler = make_scheduler(cfg.shift, cfg.scheduler)
    set_pipeline_timesteps(scheduler, schedule.num_steps, schedule.num_tokens)
    got = scheduler.timesteps.double().numpy()
    want = np.asarray(schedule.timesteps, dtype=np.float64)
    if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=TIMESTEP_ATOL):
        raise ArtifactError(
            f"the scheduler's timesteps {np.round(got, 3).tolist()} differ from the frozen ones "
            f"{np.round(want, 3).tolist()}; the diffusers version changed since freeze. Re-run "
            "`python -m shiva_export export --force`")
    return scheduler


def _seeded_inputs(cfg, model_config, seed: int, guidance: float | None = None
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Initial latents [images, ...] and the batch's conditioning ([uncond; cond] when the batch is even and the
    family runs classifier-free guidance), in the graphs' dtypes; `guidance`: the value of a guidance input (None:
    the adapter's default)."""
    import torch

    from shiva_export import backbones

    adapter = backbones.for_config(model_config)
    specs = cfg.input_specs(model_config)
    batch = cfg.batch
    halves = 2 if batch % 2 == 0 and adapter.default_batch == 2 else 1
    images = batch // halves
    gen = torch.Generator().manual_seed(int(seed))
    latents = torch.randn((images, *specs["hidden_states"].shape[1:]), generator=gen)
    conditioning = adapter.conditioning(specs, images, halves, gen, guidance=guidance)
    conditioning = {name: _to_numpy(value, _numpy_dtype(specs[name].dtype)) for name, value in conditioning.items()}
    return _to_numpy(latents, _numpy_dtype(cfg.dtype)), conditioning


def denoise(step_fn: StepFn, schedule, cfg, model_config, latents: np.ndarray,
            conditioning: Mapping[str, np.ndarray], guidance_scale: float, on_step: Callable[[int, dict, Mapping[str, np.ndarray]], None] | None = None,
            progress: str | None = None) -> np.ndarray:
    """The pipelines' denoising loop around any transformer; returns the final latents.

    Mirrors the pipelines' ``__call__`` (the adapter's ``pipeline_class``): latents are duplicated for an
    [uncond; cond] batch, the timestep is the family's transformer input of t (``t`` or ``t / 1000``) expanded to
    the batch in fp32, guidance is ``uncond + g (cond - uncond)`` in the output dtype, the part of the output the
    sampler integrates is the adapter's (``sampler_output``) and the step is the scheduler's own (FlowMatch Euler
    upcasts to fp32 and casts back to the latents' dtype).

    Args:
        step_fn: (step index, feed) -> outputs with "sample"; the feed has the graphs' input names and dtypes.
        latents: initial latents [images, C, H, W] in the export dtype.
        conditioning: encoder_hidden_states / pooled_projections for the whole batch.
        on_step: called as on_step(step, feed, outputs) after each transformer call.
        progress: a progress bar with this label, one tick per step (shown on a terminal only).
    """
    import torch
    from tqdm import tqdm

    from shiva_export import backbones

    adapter = backbones.for_config(model_config)
    to_input = adapter.transformer_timestep
    scheduler = _scheduler(schedule)
    cfg_halves = cfg.batch // latents.shape[0]
    if cfg_halves not in (1, 2) or latents.shape[0] * cfg_halves != cfg.batch:
        raise ConfigError(f"latents for {latents.shape[0]} image(s) do not fit the exported batch {cfg.batch}")
    current = _to_torch(latents)
    bar = tqdm(total=len(scheduler.timesteps), desc=progress, unit="step", disable=None if progress else True)
    for step, t in enumerate(scheduler.timesteps):
        model_input = torch.cat([current] * cfg_halves) if cfg_halves == 2 else current
        feed = {"hidden_states": _to_numpy(model_input, latents.dtype), **conditioning,
                "timestep": np.full((cfg.batch,), to_input(float(t)), dtype=np.float32)}
        outputs = step_fn(step, feed)
        noise = _to_torch(np.asarray(outputs["sample"]))
        if cfg_halves == 2:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        noise = adapter.sampler_output(model_config, noise)   # e.g. without learned-sigma channels
        current = scheduler.step(noise.to(current.dtype), t, current, return_dict=False)[0]
        if on_step is not None:
            on_step(step, feed, outputs)
        bar.update()
    bar.close()
    return _to_numpy(current, latents.dtype)


def _blob_dir(root: Path, index: int) -> Path:
    # polygraphy --save-input-blob layout: <dir>/<zero-padded iteration>/<input name>.bin
    return root / f"{index:010d}"


def save_bucket_data(trajectory: Trajectory, bucket: int, folder: Path) -> dict[str, Path]:
    """Write one bucket's feeds and reference outputs in formats Polygraphy and trtexec read.

    * ``inputs.json``: ``polygraphy.json.save_json`` of the list of feed dicts (``polygraphy run --load-inputs``,
      ``polygraphy.comparator.StreamingDataLoader``), one per step of the bucket, in step order;
    * ``reference.json``: a Polygraphy ``RunResults`` with one runner, ``torch-static``, and one iteration per step
      (``polygraphy run --load-outputs``, ``RunResults.load``);
    * ``inputs/<step index>/<name>.bin`` and ``reference/<step index>/<name>.bin``: raw ``ndarray.tofile`` blobs,
      the layout of ``polygraphy run --save-input-blob``, for ``trtexec --loadInputs``.
    """
    from polygraphy.json import save_json

    records = trajectory.bucket_steps(bucket)
    if not records:
        raise ConfigError(f"bucket {bucket} runs no step of the trajectory")
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_polygraphy():
        save_json([r.feed for r in records], str(folder / CHECK_INPUTS), description="check inputs")
    save_run_results([r.outputs for r in records], REFERENCE_RUNNER, folder / CHECK_REFERENCE)
    for index, record in enumerate(records):
        for kind, tensors in (("inputs", record.feed), ("reference", record.outputs)):
            target = _blob_dir(folder / kind, index)
            target.mkdir(parents=True, exist_ok=True)
            for name, array in tensors.items():
                np.ascontiguousarray(array).tofile(target / f"{name}.bin")
    return {"inputs": folder / CHECK_INPUTS, "reference": folder / CHECK_REFERENCE,
            "blobs": folder / "inputs", "reference_blobs": folder / "reference"}


@contextlib.contextmanager
def _quiet_polygraphy() -> Iterator[None]:
    """Polygraphy logs every save at INFO on stdout; the CLI's output stays ours."""
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        yield


def save_run_results(outputs: Sequence[Mapping[str, np.ndarray]], runner_name: str, path: Path) -> Path:
    """Save per-iteration outputs as a Polygraphy `RunResults` JSON (`polygraphy run --load-outputs`)."""
    from polygraphy.comparator import RunResults

    results = RunResults()
    results.add([dict(o) for o in outputs], runner_name=runner_name)
    with _quiet_polygraphy():
        results.save(str(path))
    return Path(path)


def step_ranges(steps: Sequence[int]) -> str:
    """"0-1" for contiguous steps, "0,2,5" otherwise."""
    steps = list(steps)
    if steps and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else str(steps[0])
    return ",".join(map(str, steps))

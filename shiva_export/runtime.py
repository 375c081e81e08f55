"""Deployment runtime: an artifact folder's bucket engines behind the transformer interface of its diffusers pipeline.

`ShivaEngineTransformer.from_artifacts(folder)` replaces `pipe.transformer` of the pipeline its backbone family runs
in (the adapter's `pipeline_class`). Each call is one sampler step: the step's timestep picks the frozen bucket
(`Schedule.bucket_for_timestep`), the inputs are checked against the static export shapes, and the bucket's engine
runs. Inputs the graphs fold in as constants (the family's shape-fixed inputs, the adapter's `constants`) are
checked against the folded ones. `load_pruned_reference(folder)` is the
PyTorch pruned model behind the same interface and the same schedule (`static_k` per step), so an engine pipeline
and a PyTorch pipeline can be compared image for image.

What the pipelines (diffusers 0.42) need from their transformer, and where it is provided here (the union over the
adapters' pipeline classes; some also pass a guidance input or the shape-fixed inputs, and enter
`cache_context(name)`):
- config fields (`sample_size`, `patch_size`, `in_channels`, ...: default height/width, `check_inputs`, latent
  shape, text-embedding widths): `config`, a `FrozenDict` of the exported backbone's diffusers config, recorded by
  the export stage;
- being a `torch.nn.Module` with `.device` and `.dtype`: `pipe.device`, `pipe.dtype`, `pipe._execution_device` and
  `pipe.to()` only look at components that are modules;
- `forward(hidden_states, timestep, encoder_hidden_states, ..., return_dict=False)` with the keywords of every
  supported transformer class, returning `(sample,)`, and `skip_layers=` for skip-layer guidance (refused: a static graph
  cannot skip blocks).
"""

from __future__ import annotations

__all__ = [
    "BACKEND_ALIASES",
    "PrunedReferenceTransformer",
    "ShivaEngineTransformer",
    "StaticInputs",
    "load_pruned_reference",
]

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from shiva_export.errors import (ArtifactError, BackendUnavailableError, ConfigError, InputError, NonFiniteError,
                                 StaleArtifactError)
from shiva_export import backbones
from shiva_export.engines.backends.names import ENGINE_SET_ALIASES, TENSORRT_BACKENDS
from shiva_export.export import OUTPUT_NAME, ExportConfig, torch_dtype
from shiva_export.pipeline import Workspace, check_export_matches_schedule, recorded_transformer_config
from shiva_export.passes.freeze import scheduler_text
from shiva_export.records import ExportRecord

logger = logging.getLogger(__name__)

# The names users know -> engine set names of `engines.runners` (which also accepts its own names directly).
BACKEND_ALIASES = ENGINE_SET_ALIASES
_ORT_PROVIDERS = {"cpu": "cpu", "cpuexecutionprovider": "cpu", "cuda": "cuda", "cudaexecutionprovider": "cuda"}


@dataclasses.dataclass(frozen=True)
class StaticInputs:
    """The one input signature every bucket graph of an artifact accepts: static shapes, fixed precision."""

    height: int  # image pixels
    width: int
    batch: int
    context_tokens: int
    precision: str  # "fp32" | "fp16" | "bf16"
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]          # per input: the export precision, or fp32 (timestep, guidance)
    vae_scale_factor: int           # image pixels per latent pixel of the pipeline the graphs were exported for
    constants: dict[str, torch.Tensor]   # inputs folded into the graphs (the adapter's constants)
    family: str
    roles: dict[str, str] = dataclasses.field(default_factory=dict)   # per input: its InputSpec role

    @classmethod
    def from_export(cls, cfg: ExportConfig, transformer_config) -> "StaticInputs":
        specs = cfg.input_specs(transformer_config)
        shapes = {name: tuple(int(d) for d in spec.shape) for name, spec in specs.items()}
        return cls(cfg.height, cfg.width, cfg.batch, cfg.context_tokens, cfg.dtype, shapes,
                   {name: spec.dtype for name, spec in specs.items()}, cfg.vae_scale_factor,
                   cfg.constants(transformer_config), backbones.for_config(transformer_config).family,
                   {name: spec.role for name, spec in specs.items()})

    @property
    def fp32_inputs(self) -> tuple[str, ...]:
        """Inputs fed in fp32 whatever the precision: numbers per sample (timestep, guidance) and masks, cast by the
        runtime as the model's own embedding or mask conversion does."""
        return tuple(name for name in self.shapes if name in ("timestep", "guidance") or self.roles.get(name) == "mask")

    @property
    def adapter(self):
        return next(a for a in backbones.REGISTRY.values() if a.family == self.family)

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.precision)

    def describe(self) -> str:
        latents = "x".join(map(str, self.shapes["hidden_states"][1:]))
        return (f"batch {self.batch} ({_batch_meaning(self.batch, self.adapter)}), {self.height}x{self.width} px "
                f"(latents {latents}), {self.context_tokens} context tokens, {self.precision}")

    def check(self, feed: dict[str, Any], subject: str) -> None:
        """Raise one `InputError` listing every input whose batch, shape or dtype differs, in pipeline terms."""
        problems, tensors = [], {}
        for name in self.shapes:
            value = feed.get(name)
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            else:
                problems.append(f"{name} is {type(value).__name__}; expected a tensor of shape {self.shapes[name]}")
        batches = sorted({int(value.shape[0]) for value in tensors.values() if value.dim()})
        if any(b != self.batch for b in batches):
            problems.append(f"batch {'/'.join(map(str, batches))}; the engine runs batch {self.batch} = "
                            f"{_batch_meaning(self.batch, self.adapter)}")
        for name, value in tensors.items():
            shape, expected = tuple(value.shape), self.shapes[name]
            if len(shape) != len(expected) or shape[1:] != expected[1:]:
                problems.append(self._shape_problem(name, shape, expected))
            if self.roles.get(name) == "mask":  # 1 keep / 0 padding, any real, integer or bool dtype (cast to fp32)
                if value.is_complex():
                    problems.append(f"{name} is {value.dtype}; expected a 0/1 mask (integer, bool or real)")
            elif name in self.fp32_inputs:  # real numbers per sample, cast to fp32 as the model's embedding does
                if value.is_complex() or value.dtype == torch.bool:
                    problems.append(f"{name} is {value.dtype}; expected a real number per sample")
            elif value.dtype != self.dtype:
                problems.append(f"{name} is {value.dtype}; expected {self.dtype} (precision is fixed at export): pass "
                                f"prompt embeddings in {self.dtype}, the pipeline makes the latents in their dtype")
        if problems:
            raise InputError(f"{subject}: " + "; ".join(problems) + f". The engine was exported for {self.describe()}; "
                             "re-export (`python -m shiva_export export --height/--width/--batch/--context-tokens`) "
                             "for other shapes.")

    def _shape_problem(self, name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
        problem = f"{name} has shape {shape}; expected {expected}"
        if len(shape) != len(expected):
            return problem
        if name == "hidden_states" and shape[2:] != expected[2:] and len(shape) == 4:
            factor = self.vae_scale_factor
            pixels = f"{shape[2] * factor}x{shape[3] * factor}"
            problem += f" (a {pixels} px image; call the pipeline with height={self.height}, width={self.width})"
        elif name == "hidden_states" and shape[1] != expected[1]:
            problem += (f" ({shape[1]} image tokens, another image size; call the pipeline with height={self.height}, "
                        f"width={self.width})")
        if name == "encoder_hidden_states" and shape[1] != expected[1]:
            problem += (f" ({shape[1]} text tokens; pass prompt embeddings of {expected[1]} tokens, e.g. the "
                        f"pipeline's max_sequence_length)")
        return problem

    def check_constants(self, given: dict[str, Any], subject: str) -> None:
        """Inputs the graphs hold as constants (the adapter's `constants`) must be the folded ones."""
        for name, value in given.items():
            folded = self.constants.get(name)
            if value is None or folded is None:
                continue
            value = value[0] if value.dim() == 3 else value   # the pipelines' deprecated batched ids
            if tuple(value.shape) != tuple(folded.shape) or not torch.equal(value.detach().float().cpu(), folded):
                raise InputError(f"{subject}: {name} of shape {tuple(value.shape)} differs from the ids the graphs "
                                 f"were exported with ({tuple(folded.shape)}); call the pipeline with "
                                 f"height={self.height}, width={self.width} and {self.context_tokens} text tokens")


def _batch_meaning(batch: int, adapter) -> str:
    """What a transformer batch means to the pipeline (an even export batch of a CFG family is CFG pairs, D4)."""
    if adapter.default_batch == 1:
        return f"{batch} image{'s' * (batch > 1)}, guidance-distilled (guidance is an input, not a batch half)"
    if batch % 2:
        return f"{batch} image{'s' * (batch > 1)} without guidance (guidance_scale <= 1)"
    images = batch // 2
    return (f"{images} image{'s' * (images > 1)} with classifier-free guidance, i.e. guidance_scale > 1 and "
            f"prompts x num_images_per_prompt = {images}")


def _pipeline_config(transformer_config: dict, inputs: StaticInputs) -> FrozenDict:
    """The backbone's config, with `sample_size` set to the exported latent size when the export is square.

    A pipeline whose default height/width is `sample_size * vae_scale_factor` then asks, by default, for the only
    resolution a static engine runs (a pipeline with a fixed default size needs height/width passed).
    """
    config = {key: value for key, value in dict(transformer_config).items() if key != "_class_name"}
    if inputs.height == inputs.width and "sample_size" in config:
        config["sample_size"] = inputs.height // inputs.vae_scale_factor
    return FrozenDict(config)


class _BucketedTransformer(torch.nn.Module):
    """What the pipeline calls on `pipe.transformer`, with the bucket picked per call from the timestep.

    Subclasses say how one bucket runs (`_run_bucket`) and where it runs (`device`).
    """

    def __init__(self, root: Path, schedule, inputs: StaticInputs, transformer_config: dict):
        super().__init__()
        self.root = Path(root)
        self.schedule = schedule
        self.static_inputs = inputs
        self.config = _pipeline_config(transformer_config, inputs)
        # forward() refuses NaN/Inf inputs (InputError) and outputs (NonFiniteError); costs one pass over each tensor
        self.check_finite = False

    @property
    def dtype(self) -> torch.dtype:
        """Precision of hidden_states / encoder_hidden_states / pooled_projections (fixed at export)."""
        return self.static_inputs.dtype

    @property
    def num_inference_steps(self) -> int:
        """The sampler step count the schedule was frozen for; the pipeline must be called with it."""
        return self.schedule.num_steps

    def bucket_for(self, timestep: torch.Tensor) -> int:
        """The bucket of this step; ConfigError if the timestep is not on the frozen grid."""
        to_scheduler = self.static_inputs.adapter.scheduler_timestep
        values = sorted({to_scheduler(t) for t in timestep.detach().float().cpu().reshape(-1).tolist()})
        try:
            buckets = {self.schedule.bucket_for_timestep(t) for t in values}
        except ConfigError as err:
            cfg = self.schedule.freeze_config
            raise ConfigError(f"{self.root}: {err}. Call {self.static_inputs.adapter.pipeline_class} with "
                              f"num_inference_steps="
                              f"{cfg.num_steps} and the scheduler the artifact was frozen for "
                              f"({scheduler_text(cfg)})") from err
        if len(buckets) != 1:
            raise InputError(f"{self.root}: the batch's timesteps {values} fall in buckets {sorted(buckets)}; expected "
                             "one sampler step per call (every sample at the same timestep)")
        return buckets.pop()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                pooled_projections: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                block_controlnet_hidden_states: list | None = None, joint_attention_kwargs: dict | None = None,
                return_dict: bool = True, skip_layers: list[int] | None = None, guidance: torch.Tensor | None = None,
                img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None,
                controlnet_block_samples: list | None = None, controlnet_single_block_samples: list | None = None,
                controlnet_blocks_repeat: bool = False, encoder_attention_mask: torch.Tensor | None = None,
                added_cond_kwargs: dict | None = None, cross_attention_kwargs: dict | None = None,
                attention_mask: torch.Tensor | None = None):
        """The transformer forward of the pipeline's family (the keywords of every supported transformer class,
        a caption mask included); one sampler step on the bucket of `timestep`."""
        added = {key: value for key, value in (added_cond_kwargs or {}).items() if value is not None}
        extras = {"block_controlnet_hidden_states": block_controlnet_hidden_states, "skip_layers": skip_layers,
                  "joint_attention_kwargs": joint_attention_kwargs or None,
                  "controlnet_block_samples": controlnet_block_samples,
                  "controlnet_single_block_samples": controlnet_single_block_samples,
                  "cross_attention_kwargs": cross_attention_kwargs or None, "attention_mask": attention_mask,
                  "added_cond_kwargs": added or None}
        unsupported = {name: value for name, value in extras.items() if value is not None}
        if unsupported:
            raise ConfigError(f"{self.root}: {sorted(unsupported)} cannot be applied to static bucket graphs; "
                              "expected None (no ControlNet, skip-layer guidance, LoRA scale or IP-Adapter). Call the "
                              "pipeline without skip_guidance_layers / joint_attention_kwargs")
        given = {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
                 "pooled_projections": pooled_projections, "timestep": timestep, "guidance": guidance,
                 "encoder_attention_mask": encoder_attention_mask}
        feed = {name: given.get(name) for name in self.static_inputs.shapes}
        subject = f"{self.root} ({type(self).__name__})"
        extra = sorted(name for name, value in given.items() if value is not None and name not in feed)
        if extra:
            raise InputError(f"{subject}: {extra} given, but the graphs take no such input (exported inputs: "
                             f"{list(feed)})")
        self.static_inputs.check(feed, subject=subject)
        self.static_inputs.check_constants({"img_ids": img_ids, "txt_ids": txt_ids}, subject)
        if self.check_finite and (counts := _nonfinite(feed)):
            raise InputError(f"{subject}: " + "; ".join(f"{name} has {count} non-finite values (NaN/Inf)"
                                                        for name, count in counts.items()))
        bucket = self.bucket_for(timestep)
        for name in self.static_inputs.fp32_inputs:  # the graphs take them in fp32
            feed[name] = feed[name].to(torch.float32)
        sample = self._run_bucket(bucket, feed).to(hidden_states.device)
        if self.check_finite and (counts := _nonfinite({"sample": sample})):
            raise NonFiniteError(f"{subject}: bucket {bucket} returned {counts['sample']} non-finite values (NaN/Inf) "
                                 f"from finite inputs; run `python -m shiva_export check --out {self.root}`")
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    def _run_bucket(self, bucket: int, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """Some pipelines enter `transformer.cache_context("cond")` (diffusers' CacheMixin) around each call;
        static graphs cache nothing."""
        yield


def _nonfinite(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """{name: count of NaN/Inf values} of the tensors that hold any."""
    counts = {name: int(value.numel() - torch.isfinite(value).sum()) for name, value in tensors.items()}
    return {name: count for name, count in counts.items() if count}


class ShivaEngineTransformer(_BucketedTransformer):
    """Drop-in `pipe.transformer` that runs an artifact folder's static bucket engines (ONNX Runtime or TensorRT).

    The engines come from an `engines.runners.EngineSet` (one Polygraphy runner per bucket); a bucket's runner is
    created and activated on the first step that needs it, and `close()` (or the context manager) deactivates them.
    The engines' device and precision are fixed: `to(device)` does not move them (inputs are copied to the engine
    and results back to the inputs' device) and `to(dtype)` with another precision raises.

    Example:
        pipe.transformer = ShivaEngineTransformer.from_artifacts("shiva_artifacts")
        image = pipe(prompt, num_inference_steps=pipe.transformer.num_inference_steps).images[0]
    """

    def __init__(self, root: Path, schedule, inputs: StaticInputs, transformer_config: dict, engine_set):
        super().__init__(root, schedule, inputs, transformer_config)
        self.engine_set = engine_set
        # TensorRT runners take CUDA tensors; ONNX Runtime takes host arrays and copies them to its device itself.
        self._feed_device = torch.device("cuda" if engine_set.name in TENSORRT_BACKENDS else "cpu")
        self._runners: dict[int, Any] = {}

    @classmethod
    def from_artifacts(cls, folder: str | Path, backend: str = "onnxruntime",
                       providers: Sequence[str] | None = None, check_finite: bool = False) -> "ShivaEngineTransformer":
        """Verify an artifact folder and prepare (not load) one engine per bucket.

        Args:
            folder: the folder `python -m shiva_export export --out` wrote (manifest.json, schedule.json, onnx/).
            backend: "onnxruntime" (the exported ONNX graphs, no build needed), "tensorrt" / "tensorrt-rtx" (plans
                built by the engine stage), or any `engines.runners.ENGINE_SET_NAMES` entry.
            providers: ONNX Runtime only: ["CPUExecutionProvider"] (default) or ["CUDAExecutionProvider", ...];
                short names "cpu"/"cuda" work too. Only CPU may follow the first provider.
            check_finite: every step refuses inputs holding NaN/Inf (InputError naming the input) and a
                non-finite output (NonFiniteError); off by default (one extra pass over each tensor).

        Raises:
            ArtifactError: no manifest, a stage missing, or a listed file or engine missing.
            StaleArtifactError: a file's sha256 differs from the manifest, graphs from another schedule, or an
                engine built from other graphs.
            ConfigError / BackendUnavailableError: unknown backend or provider, runtime not installed.
        """
        from shiva_export.engines.runners import get_engine_set
        from shiva_export.pipeline import runnable_reason

        name, kwargs = _engine_set_request(backend, providers)
        ws = Workspace(folder, write=False)
        schedule = ws.schedule()  # verifies schedule.json against the manifest
        engine_set = get_engine_set(name, ws, **kwargs)  # verifies the exported files against the manifest
        engine_set.identity()  # built engines: each checked against its metadata sidecar now, not at the first step
        record = ws.manifest.require(ExportRecord)
        check_export_matches_schedule(ws, list(engine_set.graphs.values()), schedule)
        if record.transformer_config is None:
            raise ArtifactError(f"{ws.root}: the export record has no transformer_config (written by an older "
                                f"shiva_export); re-run `python -m shiva_export export --out {ws.root}`")
        if name in TENSORRT_BACKENDS and runnable_reason(name) is not None:  # verified, then refused here, not at step 1
            raise BackendUnavailableError(f"{ws.root}: the {name} engines are intact but cannot run on this "
                                          f"machine ({runnable_reason(name)})")
        inputs = StaticInputs.from_export(ExportConfig(**record.config.to_json()), record.transformer_config)
        logger.info("%s: %d bucket engine(s), %s on %s; %s", ws.root, len(engine_set.graphs), engine_set.name,
                    engine_set.device, inputs.describe())
        transformer = cls(ws.root, schedule, inputs, record.transformer_config, engine_set)
        transformer.check_finite = check_finite
        return transformer

    @property
    def device(self) -> torch.device:
        """Where the engines run; pipelines create their latents on `pipe.device`."""
        return torch.device(self.engine_set.device)

    @property
    def active_buckets(self) -> tuple[int, ...]:
        """Buckets whose engine has been loaded (engines load on first use)."""
        return tuple(sorted(self._runners))

    def activate(self, buckets: Sequence[int] | None = None) -> "ShivaEngineTransformer":
        """Load engines now instead of on their first step (all buckets by default), e.g. before timing."""
        for bucket in range(len(self.schedule.buckets)) if buckets is None else buckets:
            self._runner(bucket)
        return self

    def close(self) -> None:
        """Deactivate every loaded engine; a later step loads its engine again."""
        while self._runners:
            _, runner = self._runners.popitem()
            runner.deactivate()

    def __enter__(self) -> "ShivaEngineTransformer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if self.__dict__.get("_runners"):  # Polygraphy warns about runners collected while active
            self.close()

    def to(self, *args, **kwargs) -> "ShivaEngineTransformer":
        """Accept `pipe.to(device)`; refuse a precision the engines were not exported in."""
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)  # nn.Module.to's own argument parsing
        if dtype is not None and dtype != self.dtype:
            raise ConfigError(f"{self.root}: the engines run {self.dtype} (fixed at export); expected to({self.dtype}) "
                              f"or no dtype, got {dtype}. Re-export with --dtype for another precision")
        return self

    def _runner(self, bucket: int):
        runner = self._runners.get(bucket)
        if runner is None:
            start = time.perf_counter()
            runner = self.engine_set.runner(bucket)
            runner.activate()
            self._runners[bucket] = runner
            logger.info("%s: bucket %d engine loaded in %.2f s", self.root, bucket, time.perf_counter() - start)
        return runner

    def _run_bucket(self, bucket: int, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        runner = self._runner(bucket)
        outputs = runner.infer({name: value.detach().to(self._feed_device).contiguous()
                                for name, value in feed.items()})
        return outputs[OUTPUT_NAME].clone()  # TensorRT runners reuse their output buffers across calls


def _engine_set_request(backend: str, providers: Sequence[str] | str | None) -> tuple[str, dict]:
    """(engine set name, its keyword arguments) for `from_artifacts`'s backend and providers."""
    name = BACKEND_ALIASES.get(backend, backend)
    if name in ("onnxruntime", "ort"):
        provider = _ort_provider(providers)
        if name == "ort":
            return name, {"provider": provider}
        return ("onnxruntime" if provider == "cpu" else f"onnxruntime-{provider}"), {}
    if providers is not None:
        raise ConfigError(f"providers={providers!r} applies to ONNX Runtime only; backend is {backend!r}")
    return name, {}


def _ort_provider(providers: Sequence[str] | str | None) -> str:
    names = ["cpu"] if providers is None else [providers] if isinstance(providers, str) else list(providers)
    short = []
    for provider in names:
        key = _ORT_PROVIDERS.get(provider.lower()) if isinstance(provider, str) else None
        if key is None:
            raise ConfigError(f"ONNX Runtime provider {provider!r} is not supported; expected CPUExecutionProvider "
                              "or CUDAExecutionProvider ('cpu'/'cuda')")
        short.append(key)
    if not short or any(p != "cpu" for p in short[1:]):
        raise ConfigError(f"providers={list(names)}: expected one provider, optionally followed by "
                          "CPUExecutionProvider")
    return short[0]


class PrunedReferenceTransformer(_BucketedTransformer):
    """The PyTorch pruned model behind the engines' interface: each step runs `static_k(bucket k)` of its timestep.

    Same schedule, same static-input checks and same refusals as `ShivaEngineTransformer`, so a pipeline with
    either transformer computes the same thing; the difference between their images is the engines' numerics.
    """

    def __init__(self, root: Path, schedule, inputs: StaticInputs, pruned):
        super().__init__(root, schedule, inputs, recorded_transformer_config(pruned.config))
        self.model = pruned.transformer  # registered: .to() moves backbone and routers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _run_bucket(self, bucket: int, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        from shiva_export.patching import static_k

        constants = {name: value.to(self.device) for name, value in self.static_inputs.constants.items()}
        with torch.no_grad(), static_k(self.model, self.schedule.buckets[bucket].k):
            return self.model(**feed, **constants, return_dict=False)[0]


def load_pruned_reference(folder: str | Path, check_finite: bool = False) -> PrunedReferenceTransformer:
    """The artifact's PyTorch pruned model (backbone + routers as exported), driven by its frozen schedule.

    check_finite: as `ShivaEngineTransformer.from_artifacts`'s (NaN/Inf inputs and outputs refused).

    Raises StaleArtifactError if schedule.json changed since freeze, or the model or router checkpoint no longer
    hashes to what the schedule was frozen from.
    """
    ws = Workspace(folder, write=False)
    schedule = ws.schedule()
    identity = {"model_hash": ws.pruned.source.model_hash, "checkpoint_hash": ws.pruned.checkpoint_hash}
    frozen = {"model_hash": schedule.model_hash, "checkpoint_hash": schedule.checkpoint_hash}
    if identity != frozen:
        changed = sorted(key for key in identity if identity[key] != frozen[key])
        raise StaleArtifactError(f"{ws.root}: {', '.join(changed)} of {ws.config.model!r} differ from the ones "
                                 f"schedule.json was frozen from; re-run "
                                 f"`python -m shiva_export export --out {ws.root}`")
    cfg = ws.config
    inputs = StaticInputs.from_export(ExportConfig(cfg.height, cfg.width, cfg.batch, cfg.context_tokens, cfg.dtype,
                                                   vae_scale_factor=cfg.vae_scale_factor), ws.pruned.config)
    pruned = ws.pruned if inputs.dtype == torch.float32 else ws.pruned.to_dtype(inputs.dtype)
    reference = PrunedReferenceTransformer(ws.root, schedule, inputs, pruned)
    reference.check_finite = check_finite
    return reference

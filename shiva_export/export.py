"""Fully static ONNX export: one graph per schedule bucket, all sharing one external weight file.

Each bucket is the patched model in static mode (a Python int k per layer, so torch.export sees no
data-dependent shape), exported with torch.onnx.export(dynamo=True) at opset 23 (ONNX Attention and
RMSNormalization ops), then made TensorRT-safe by graph passes and checked by the static lint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch

from shiva_export.errors import ConfigError, StaticGraphError
from shiva_export.io import atomic_directory, sha256_file
from shiva_export import backbones
from shiva_export.models import VAE_SCALE_FACTOR, num_image_tokens
from shiva_export.patching import get_pruning_state, static_k, validate_k
from shiva_export.records import DENSE_FILE, WEIGHTS_FILE, DenseGraphRecord, GraphRecord, graph_file
from shiva_export.topk import ROW_SCATTERS

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUTPUT_NAME = "sample"
MIN_EXTERNAL_BYTES = 1024
WEIGHT_ALIGNMENT = 64


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Static shapes of every bucket graph. height/width are image pixels (latents: / vae_scale_factor); batch and
    context_tokens are the pipeline's (the stages resolve them from the model and its pipeline)."""

    height: int
    width: int
    batch: int
    context_tokens: int
    dtype: str = "fp32"
    opset: int = 23
    debug_indices: bool = False   # extra outputs indices_layer{l}: the kept token indices, for parity checks
    row_scatter: str = "where"    # kept rows back into the sequence: "where" (Gather + Where) or "scatternd"
    vae_scale_factor: int = VAE_SCALE_FACTOR   # the pipeline's: image pixels per latent pixel

    def validate(self, model_config) -> int:
        torch_dtype(self.dtype)
        if self.batch < 1:
            raise ConfigError(f"batch {self.batch} must be >= 1")
        if self.context_tokens < 1:
            raise ConfigError(f"context tokens {self.context_tokens} must be >= 1")
        if self.row_scatter not in ROW_SCATTERS:
            raise ConfigError(f"row scatter {self.row_scatter!r} is unknown; expected one of {list(ROW_SCATTERS)}")
        if not 18 <= self.opset <= 23:
            raise ConfigError(f"opset {self.opset} is not supported; expected 18..23 (23 gives fused Attention)")
        return num_image_tokens(model_config, self.height, self.width, self.vae_scale_factor)

    def input_specs(self, model_config) -> dict[str, backbones.InputSpec]:
        """The graph inputs, in order, as the model's family defines them."""
        return backbones.for_config(model_config).input_specs(model_config, self.height, self.width, self.batch,
                                                              self.context_tokens, self.vae_scale_factor, self.dtype)

    def input_shapes(self, model_config) -> dict[str, tuple[int, ...]]:
        return {name: spec.shape for name, spec in self.input_specs(model_config).items()}

    def input_dtypes(self, model_config) -> dict[str, str]:
        return {name: spec.dtype for name, spec in self.input_specs(model_config).items()}

    def constants(self, model_config) -> dict[str, torch.Tensor]:
        """Transformer inputs fixed by these shapes, folded into the graphs (the adapter's `constants`)."""
        return backbones.for_config(model_config).constants(model_config, self.height, self.width,
                                                            self.context_tokens, self.vae_scale_factor)


def input_names(model_config) -> list[str]:
    """The graph input names of a model's family, in order (their shapes do not matter for the names)."""
    adapter = backbones.for_config(model_config)
    return list(adapter.input_specs(model_config, 1024, 1024, 1, 1, 8, "fp32"))


def output_names(num_layers: int, pruned_layers: Sequence[int], debug_indices: bool) -> list[str]:
    return [OUTPUT_NAME] + ([f"indices_layer{l}" for l in pruned_layers] if debug_indices else [])


class _GraphInputs(torch.nn.Module):
    """The transformer called with the graph inputs by name plus the shape-fixed constants (registered as buffers,
    so they move with the module and are traced as constants)."""

    def __init__(self, transformer, constants: dict[str, torch.Tensor] | None):
        super().__init__()
        self.transformer = transformer
        self._constant_names = tuple(constants or {})
        for name, value in (constants or {}).items():
            self.register_buffer(f"const_{name}", value, persistent=False)

    def call(self, **inputs):
        inputs = {name: value for name, value in inputs.items() if value is not None}
        inputs.update({name: getattr(self, f"const_{name}") for name in self._constant_names})
        return self.transformer(**inputs, return_dict=False)[0]


class StaticBucket(_GraphInputs):
    """The patched transformer pinned to one bucket's k vector: the exact module torch.export traces.

    constants: the family's shape-fixed inputs (ExportConfig.constants, the adapter's `constants`)."""

    def __init__(self, transformer, k: Sequence[int], debug_indices: bool = False, inplace_scatter: bool = False,
                 select_full_layers: bool = False, row_scatter: str = "scatternd",
                 constants: dict[str, torch.Tensor] | None = None, margins: bool = False):
        super().__init__(transformer, constants)
        self.k, self.debug_indices = tuple(k), debug_indices
        self.inplace_scatter, self.select_full_layers = inplace_scatter, select_full_layers
        self.row_scatter, self.margins = row_scatter, margins

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections=None, timestep=None, guidance=None,
                encoder_attention_mask=None):
        """sample; with debug_indices also each pruned layer's kept indices [B, k]; with margins (eager runs, the
        check's reference) then also each pruned layer's `patching.boundary_margin` [B], in the same layer order."""
        with static_k(self.transformer, self.k, record=self.debug_indices, inplace_scatter=self.inplace_scatter,
                      select_full_layers=self.select_full_layers, row_scatter=self.row_scatter,
                      record_margins=self.margins) as state:
            sample = self.call(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                               pooled_projections=pooled_projections, timestep=timestep, guidance=guidance,
                               encoder_attention_mask=encoder_attention_mask)
            if not self.debug_indices:
                return sample
            indices = [state.indices[l] for l in state.pruned_layers]
            if not self.margins:
                return (sample, *indices)
            rows = sample.shape[0]
            full = torch.full((rows,), float("inf"), device=sample.device)   # a layer that kept every token
            return (sample, *indices, *[state.margins.get(l, full) for l in state.pruned_layers])


class DenseModel(_GraphInputs):
    """The unpruned backbone (hooks inert), exported beside the buckets as the speed and accuracy baseline."""

    def __init__(self, transformer, constants: dict[str, torch.Tensor] | None = None):
        super().__init__(transformer, constants)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections=None, timestep=None, guidance=None,
                encoder_attention_mask=None):
        return self.call(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                         pooled_projections=pooled_projections, timestep=timestep, guidance=guidance,
                         encoder_attention_mask=encoder_attention_mask)


def example_feed(model_config, cfg: ExportConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded graph inputs: normal conditioning and latents, the timestep of t = 500 (and the default guidance; a
    caption mask keeping every token)."""
    adapter = backbones.for_config(model_config)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(cfg.dtype)
    feed = {}
    for name, spec in cfg.input_specs(model_config).items():
        if spec.role == "timestep":
            feed[name] = torch.full(spec.shape, adapter.transformer_timestep(500.0))
        elif name == "guidance" or spec.role == "mask":
            feed[name] = adapter.conditioning({name: spec}, cfg.batch, 1, gen)[name]
        else:
            feed[name] = torch.randn(spec.shape, generator=gen).to(dtype)
    return feed


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints progress and warns about torchvision ops we never use; keep the CLI readable.

    Its optimizer also warns that it cannot deduplicate a constant graph output: the index outputs of a debug twin
    for layers that keep every token (arange(N)), expected and harmless.
    """
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration",
                                              "onnx_ir.passes.common.initializer_deduplication")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _linear_time_rewrites():
    """While torch.onnx.export optimizes, onnxscript's default rewrite rules without the multi-output ones.

    A rule whose pattern has several output nodes (in onnxscript 0.7: SlicesSplit, two Slices of one tensor -> one
    Split) is matched by enumerating the whole graph again for every candidate node: quadratic in graph size. Without
    it, a bucket graph of 57 narrow blocks (7,456 nodes) exports in 47 s instead of 181 s on a 2-core CPU, one of 24
    blocks in 26 s instead of 58 s (docs/benchmarks/README.md); and it rewrites nothing in our graphs: they are node
    for node the same without it (tests/test_export.py). The other rules and onnxscript's constant folding, cleanup
    and fusions run as the exporter runs them.
    """
    import onnxscript.rewriter as rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(rules, tuple):   # another onnxscript layout: leave its optimizer as it is
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(
        rule for rule in rules if getattr(getattr(rule, "_target_pattern", None), "has_single_output_node", True))
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def export_bucket(transformer, k: Sequence[int] | None, cfg: ExportConfig, graph_passes) -> ir.Model:
    """Trace one bucket (k=None: the dense baseline) to an onnx_ir model, then run `graph_passes` on it (the
    pipeline's pass manager, `passes.manager.tensorrt_safety`)."""
    state = get_pruning_state(transformer)
    if state is None:
        raise ConfigError("export needs a patched model: apply_token_pruning(transformer, routers) first")
    num_tokens = cfg.validate(transformer.config)
    adapter = backbones.for_model(transformer)
    constants = cfg.constants(transformer.config)
    if k is None:
        module, names = DenseModel(transformer, constants).eval(), [OUTPUT_NAME]
    else:
        k = validate_k(state, k, num_tokens)
        if state.config.cfg_consistent and cfg.batch % 2:
            raise ConfigError(f"CFG-consistent selection needs an even batch, got --batch {cfg.batch}")
        module = StaticBucket(transformer, k, cfg.debug_indices, row_scatter=cfg.row_scatter,
                              constants=constants).eval()
        names = output_names(state.num_layers, state.pruned_layers, cfg.debug_indices)
    module.to(transformer.device)
    feed = {name: value.to(transformer.device) for name, value in example_feed(transformer.config, cfg).items()}
    with _quiet_exporter(), _linear_time_rewrites(), torch.no_grad(), adapter.fixed_shapes(transformer, constants):
        program = torch.onnx.export(module, (), kwargs=feed, dynamo=True, opset_version=cfg.opset,
                                    input_names=list(feed), output_names=names, optimize=True)
    return graph_passes(program.model)


def _tensor_key(tensor: ir.TensorProtocol, data: bytes) -> str:
    digest = hashlib.sha256(data)
    digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
    return digest.hexdigest()


class SharedWeightWriter:
    """Appends initializers to one file, once per distinct content: every bucket graph points into it (D14)."""

    def __init__(self, path: Path):
        self.path = path
        self.offsets: dict[str, tuple[int, int]] = {}
        self.handle = open(path, "wb")
        self._sha256 = hashlib.sha256()   # of every byte written, in order: the file's sha256 without reading it back

    def _write(self, data: bytes) -> None:
        self.handle.write(data)
        self._sha256.update(data)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def externalize(self, model: ir.Model) -> None:
        for value in list(model.graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.nbytes < MIN_EXTERNAL_BYTES:
                continue
            data = tensor.tobytes()
            key = _tensor_key(tensor, data)
            if key not in self.offsets:
                pad = (-self.handle.tell()) % WEIGHT_ALIGNMENT
                self._write(b"\0" * pad)
                self.offsets[key] = (self.handle.tell(), len(data))
                self._write(data)
            offset, length = self.offsets[key]
            value.const_value = ir.ExternalTensor(self.path.name, offset, length, tensor.dtype,
                                                  shape=tensor.shape, name=value.name, base_dir=self.path.parent)

    def close(self) -> None:
        self.handle.close()


def drop_debug_outputs(model: ir.Model) -> None:
    """The production graph: same nodes, without the index outputs (they stay computed for the gathers)."""
    keep = [value for value in model.graph.outputs if value.name == OUTPUT_NAME]
    model.graph.outputs.clear()
    model.graph.outputs.extend(keep)
    ir.passes.common.RemoveUnusedNodesPass()(model)


def save_graph(model: ir.Model, path: Path, bucket: int | str, k: Sequence[int] | None) -> None:
    """Serialize without the exporter's per-node stack traces (they triple the file size), with the graph's
    identity (bucket, k) in the model's metadata_props (checked by the runtime before it runs the graph)."""
    import json

    from shiva_export.manifest import GRAPH_BUCKET_KEY, GRAPH_K_KEY

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
    model.metadata_props[GRAPH_BUCKET_KEY] = str(bucket)
    model.metadata_props[GRAPH_K_KEY] = json.dumps(None if k is None else [int(v) for v in k])
    proto = ir.serde.serialize_model(model)
    onnx.save_model(proto, str(path))


def check_static(path: Path) -> None:
    """Raise StaticGraphError if the lint finds errors: a non-static graph must never reach an engine build."""
    from shiva_export.passes.lint import format_report, lint_model

    report = lint_model(str(path))
    if report.errors:
        raise StaticGraphError(f"{path.name} is not fully static / TensorRT-legal:\n{format_report(report)}")



@contextlib.contextmanager
def interrupts_between_graphs():
    """Ctrl-C during an export stops it after the current graph, as a KeyboardInterrupt.

    torch.onnx's exporter tries several tracing strategies and takes an interrupt raised inside tracing for a
    failed strategy: the export then goes on and finishes (measured: 60 SIGINTs 2 s apart, exit 0). So the signal is
    only recorded while a graph is traced and raised by the returned check between graphs, and on exit.
    """
    import signal
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def record(signum, frame):
        if not received:
            log.warning("interrupt received: stopping after the current graph")
        received.append(signum)

    def check() -> None:
        if received:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, record)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
    check()


@dataclasses.dataclass(frozen=True)
class ExportedGraphs:
    """What `export_buckets` wrote: each bucket's graph record, dense's, and every file it wrote with its sha256
    (names relative to the folder it wrote: graphs, debug twins, dense.onnx, the shared weights file)."""

    graphs: tuple[GraphRecord, ...]
    dense: DenseGraphRecord | None
    files: tuple[tuple[str, str], ...]


def export_buckets(transformer, bucket_ks: Sequence[Sequence[int]], cfg: ExportConfig, out_dir: Path, *,
                   graph_passes, progress=None, dense: bool = True) -> ExportedGraphs:
    """Write out_dir/b{i}.onnx for every bucket (+ b{i}.debug.onnx with index outputs, + dense.onnx) and
    out_dir/weights.bin, atomically as one folder. graph_passes: run on every traced graph before it is saved
    (`passes.manager.tensorrt_safety(cfg.dtype)`); the static lint then checks every file."""
    out_dir = Path(out_dir)
    written: list[tuple[int | str, list[int] | None, str, str | None]] = []   # bucket, k, file, debug file
    with atomic_directory(out_dir) as tmp, interrupts_between_graphs() as check_interrupt:
        writer = SharedWeightWriter(tmp / WEIGHTS_FILE)
        try:
            for bucket, k in enumerate(bucket_ks):
                model = export_bucket(transformer, k, cfg, graph_passes)
                check_interrupt()
                writer.externalize(model)
                k = list(map(int, k))
                debug_file = graph_file(bucket, debug=True) if cfg.debug_indices else None
                if debug_file:
                    save_graph(model, tmp / debug_file, bucket, k)
                    drop_debug_outputs(model)
                save_graph(model, tmp / graph_file(bucket), bucket, k)
                written.append((bucket, k, graph_file(bucket), debug_file))
                if progress is not None:
                    progress.update(1)
            if dense:
                model = export_bucket(transformer, None, cfg, graph_passes)
                check_interrupt()
                writer.externalize(model)
                save_graph(model, tmp / DENSE_FILE, "dense", None)
                written.append(("dense", None, DENSE_FILE, None))
                if progress is not None:
                    progress.update(1)
        finally:
            writer.close()
        sha256 = {}
        for _, _, file, debug_file in written:
            for name in filter(None, (debug_file, file)):
                check_static(tmp / name)
                sha256[name] = sha256_file(tmp / name)
        sha256[WEIGHTS_FILE] = writer.sha256   # tens of GB for a 12B model: hashed while written, not read back
    graphs = tuple(GraphRecord(bucket=bucket, k=tuple(k), file=file, sha256=sha256[file], debug_file=debug,
                               debug_sha256=debug and sha256[debug])
                   for bucket, k, file, debug in written if bucket != "dense")
    dense_graph = next((DenseGraphRecord(file=file, sha256=sha256[file])
                        for bucket, _, file, _ in written if bucket == "dense"), None)
    return ExportedGraphs(graphs, dense_graph, tuple(sha256.items()))

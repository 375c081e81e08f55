"""TensorRT-RTX backend: builds portable `.plan` files anywhere (even without a GPU), runs them on RTX-class GPUs.

The only module allowed to import `tensorrt_rtx`.

Why not Polygraphy here: Polygraphy picks `tensorrt` or `tensorrt_rtx` once per process, from
`POLYGRAPHY_USE_TENSORRT_RTX` read when `polygraphy.config` is imported (`polygraphy.backend.trt` then binds its
module-level `trt = lazy_import_trt()`). Setting the variable from library code would be an env write deep inside
a library, would be too late if Polygraphy was already imported, and would take full TensorRT away from the `trt`
backend in the same process. So this module builds and runs with the `tensorrt_rtx` API directly (the calls
Polygraphy's `NetworkFromOnnxPath(strongly_typed=True)` + `SetDecomposableAttentions` + `CreateConfigRTX` +
`EngineBytesFromNetwork` make) and provides its own `BaseRunner`, so plans still go through `Comparator.run`.
The equivalent CLI, for reproduction: `POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy convert bK.onnx --convert-to trt
--strongly-typed --decomposable-attentions -o bK.plan`.

Runtime support (TensorRT-RTX 1.7): plans run on compute capability 8.0/8.6/8.9/12.0/12.1 by default (the
runtime's own list), 7.5 only when built for it; never on 9.0 (H100/H200) or 10.0 (B200). The runner checks the
GPU first and says which capability it found and which the plan supports.
"""

from __future__ import annotations

__all__ = [
    "BACKEND",
    "DEFAULT_TARGETS",
    "TrtRtxBackend",
    "TrtRtxRunner",
    "check_can_run",
    "import_tensorrt_rtx",
    "plan_targets",
]

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from shiva_export.engines.backends.base import (
    Backend,
    BuildOptions,
    CheckedInputsMixin,
    DeviceInfo,
    current_device,
    sidecar_path,
)
from shiva_export.errors import ArtifactError, BackendUnavailableError, ConfigError, StaticGraphError
from shiva_export.io import atomic_output, write_bytes

logger = logging.getLogger(__name__)

# What a plan built without explicit targets runs on. TensorRT-RTX 1.7's runtime refuses 9.0 with
# "Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1"; Turing (7.5) needs a plan built for SM75.
DEFAULT_TARGETS: tuple[str, ...] = ("8.0", "8.6", "8.9", "12.0", "12.1")


def import_tensorrt_rtx():
    """Import `tensorrt_rtx` or raise `BackendUnavailableError` saying how to get it."""
    try:
        import tensorrt_rtx
    except ImportError as err:
        raise BackendUnavailableError(
            f"tensorrt_rtx is not importable ({err}); install tensorrt-rtx-cu13 (pip) or use --backend ort|trt"
        ) from err
    return tensorrt_rtx


def _make_logger(trt):
    class _Logger(trt.ILogger):
        """Keeps warnings and errors, so a failed build can say why; forwards them to our logger."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity, msg):  # called by TensorRT-RTX
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append((severity, msg))
                level = logging.WARNING if severity == trt.ILogger.Severity.WARNING else logging.ERROR
                logger.log(level, "TensorRT-RTX: %s", msg)
            else:
                logger.debug("TensorRT-RTX: %s", msg)

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s <= trt.ILogger.Severity.ERROR]

    return _Logger()


def _mark_attention_decomposable(trt, network) -> int:
    """`IAttention::setDecomposable(true)` on every attention; returns how many were marked."""
    marked = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionInputLayer  # Polygraphy's SetDecomposableAttentions does the same
            layer.attention.decomposable = True
            marked += 1
    return marked


def plan_targets(plan_path: str | Path) -> tuple[str, ...]:
    """Compute capabilities a plan was built for, from its metadata sidecar; `DEFAULT_TARGETS` if unrecorded."""
    meta = sidecar_path(plan_path)
    if meta.is_file():
        try:
            recorded = json.loads(meta.read_text()).get("build_options", {}).get("compute_capabilities")
        except ValueError:
            recorded = None
        if recorded:
            return tuple(recorded)
    return DEFAULT_TARGETS


def check_can_run(targets: Sequence[str] = DEFAULT_TARGETS, device: DeviceInfo | None = None) -> DeviceInfo:
    """Raise `BackendUnavailableError` unless `device` (default: the current GPU) can run a plan for `targets`."""
    device = current_device() if device is None else device
    supported = "/".join(targets)
    if device.compute_capability is None:
        raise BackendUnavailableError(
            f"no CUDA GPU: TensorRT-RTX plans build here but run only on GPUs with compute capability {supported}. "
            "Run on such a GPU, or use --backend ort here."
        )
    if device.capability_str not in targets:
        raise BackendUnavailableError(
            f"{device.name} has compute capability {device.capability_str}; this TensorRT-RTX plan runs only on "
            f"compute capability {supported} (TensorRT-RTX supports no 9.0/10.0 GPUs such as H100, H200, B200). "
            "Use --backend trt or ort on this GPU, or rebuild for its capability if TensorRT-RTX supports it."
        )
    return device


class TrtRtxBackend(Backend):
    """TensorRT-RTX: strongly typed AOT build on any machine; JIT specialisation when the runner activates."""

    name = "trt-rtx"
    engine_suffix = ".plan"

    def is_available(self) -> tuple[bool, str]:
        try:
            trt = import_tensorrt_rtx()
        except BackendUnavailableError as err:
            return False, str(err)
        return True, f"tensorrt_rtx {trt.__version__} (builds without a GPU; runs need compute capability 7.5-12.x)"

    def version(self) -> str:
        return import_tensorrt_rtx().__version__

    def build(self, onnx_path: str | Path, out_path: str | Path, options: BuildOptions) -> Path:
        """Parse `onnx_path` (external weights beside it), build a strongly typed plan, write it atomically.

        Precision comes from the ONNX dtypes: TensorRT-RTX has no fp16/bf16 builder flags.
        """
        if options.timing_cache:
            raise ConfigError(
                "TensorRT-RTX has no timing cache (it does not autotune at build time); drop --timing-cache."
            )
        trt = import_tensorrt_rtx()
        onnx_path, out_path = Path(onnx_path), Path(out_path)
        if not onnx_path.is_file():
            raise ArtifactError(f"{onnx_path}: ONNX graph not found; run `python -m shiva_export export` first.")
        trt_logger = _make_logger(trt)
        builder = trt.Builder(trt_logger)
        # TensorRT-RTX supports strongly typed networks only; the flag says so explicitly.
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, trt_logger)
        # parse_from_file (not parse) so the parser resolves external weights relative to the ONNX file.
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or trt_logger.errors()
            raise StaticGraphError(
                f"{onnx_path}: the TensorRT-RTX ONNX parser rejected the graph: {'; '.join(errors)}. "
                "Run `polygraphy inspect capability` on it to see the unsupported nodes."
            )
        if options.decomposable_attention:
            marked = _mark_attention_decomposable(trt, network)
            logger.debug("%s: marked %d attention layers decomposable", onnx_path, marked)

        config = builder.create_builder_config()
        if options.builder_optimization_level is not None:
            config.builder_optimization_level = options.builder_optimization_level
        if options.compute_capabilities:
            config.num_compute_capabilities = len(options.compute_capabilities)
            for index, capability in enumerate(options.compute_capabilities):
                enum_name = "SM" + capability.replace(".", "")
                if not hasattr(trt.ComputeCapability, enum_name):
                    known = [n[2:-1] + "." + n[-1] for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
                    raise BackendUnavailableError(
                        f"TensorRT-RTX {trt.__version__} cannot target compute capability {capability}; "
                        f"it supports {'/'.join(known)}."
                    )
                config.set_compute_capability(getattr(trt.ComputeCapability, enum_name), index)

        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            errors = trt_logger.errors()
            hint = "See the TensorRT-RTX errors above."
            if any("decomposable" in e.lower() for e in errors) and not options.decomposable_attention:
                hint = "Build with decomposable_attention=True (--decomposable-attention) to allow unfused attention."
            raise StaticGraphError(
                f"{onnx_path}: TensorRT-RTX could not build a plan: {'; '.join(errors) or 'no error reported'}. {hint}"
            )
        logger.info("%s: TensorRT-RTX plan built in %.1f s", onnx_path.name, time.perf_counter() - start)
        return write_bytes(out_path, bytes(memoryview(serialized)))

    def make_runner(
        self,
        engine_path: str | Path,
        *,
        name: str | None = None,
        targets: Sequence[str] | None = None,
        runtime_cache: str | Path | None = None,
        device_index: int = 0,
    ) -> "TrtRtxRunner":
        """Runner for one plan.

        Args:
            targets: compute capabilities the plan was built for; default: read from its sidecar.
            runtime_cache: file persisting JIT-compiled kernels across runs (loaded on activate, saved on
                deactivate, atomically).
        """
        engine_path = Path(engine_path)
        return TrtRtxRunner(
            engine_path,
            name=name or f"trt-rtx:{engine_path.stem}",
            targets=tuple(targets) if targets else plan_targets(engine_path),
            runtime_cache=runtime_cache,
            device_index=device_index,
        )


class TrtRtxRunner(CheckedInputsMixin, BaseRunner):
    """Runs a TensorRT-RTX plan on the current GPU with torch-allocated I/O (Polygraphy `BaseRunner` contract)."""

    def __init__(
        self,
        plan_path: str | Path,
        name: str | None = None,
        targets: Sequence[str] = DEFAULT_TARGETS,
        runtime_cache: str | Path | None = None,
        device_index: int = 0,
    ):
        super().__init__(name=name, prefix="trt-rtx-runner")
        self.plan_path = Path(plan_path)
        self.targets = tuple(targets)
        self.runtime_cache = Path(runtime_cache) if runtime_cache is not None else None
        self.device_index = device_index

    def activate_impl(self) -> None:
        if not self.plan_path.is_file():
            raise ArtifactError(
                f"{self.plan_path}: TensorRT-RTX plan not found; build it with "
                "`python -m shiva_export engine --backend trt-rtx`."
            )
        check_can_run(self.targets, current_device(self.device_index))
        trt = import_tensorrt_rtx()
        import torch

        self._trt, self._torch = trt, torch
        self._device = torch.device("cuda", self.device_index)
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self._device):
            self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise ArtifactError(
                    f"{self.plan_path}: TensorRT-RTX {trt.__version__} could not deserialize the plan "
                    f"({'; '.join(self._logger.errors())}); rebuild it with this version."
                )
            runtime_config = self.engine.create_runtime_config()
            self._cache = None
            if self.runtime_cache is not None:
                self._cache = runtime_config.create_runtime_cache()
                if self.runtime_cache.is_file():
                    self._cache.deserialize(self.runtime_cache.read_bytes())
                runtime_config.set_runtime_cache(self._cache)
            self.context = self.engine.create_execution_context(runtime_config)  # JIT happens here
            self._stream = torch.cuda.Stream(self._device)
        self._io = OrderedDict()
        for index in range(self.engine.num_io_tensors):
            tensor = self.engine.get_tensor_name(index)
            self._io[tensor] = (
                self.engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT,
                tuple(self.engine.get_tensor_shape(tensor)),
                self._torch_dtype(self.engine.get_tensor_dtype(tensor)),
            )

    def _torch_dtype(self, trt_dtype):
        trt, torch = self._trt, self._torch
        table = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT8: torch.int8,
            trt.DataType.UINT8: torch.uint8,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
            trt.DataType.BOOL: torch.bool,
        }
        if trt_dtype not in table:
            raise ArtifactError(f"{self.plan_path}: I/O dtype {trt_dtype} has no torch equivalent for this runner.")
        return table[trt_dtype]

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for tensor, (is_input, shape, dtype) in self._io.items():
            if is_input:
                meta.add(tensor, dtype=dtype, shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        torch = self._torch
        use_torch = any(isinstance(v, torch.Tensor) for v in feed_dict.values())
        keep_alive, outputs = [], OrderedDict()
        with torch.cuda.device(self._device):
            for tensor, (is_input, shape, dtype) in self._io.items():
                if is_input:
                    value = feed_dict[tensor]
                    value = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
                    value = value.to(self._device, non_blocking=True).contiguous()
                    keep_alive.append(value)
                else:
                    value = torch.empty(shape, dtype=dtype, device=self._device)
                    outputs[tensor] = value
                self.context.set_tensor_address(tensor, value.data_ptr())
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
            start = time.perf_counter()
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise ArtifactError(f"{self.plan_path}: TensorRT-RTX execution failed: {self._logger.errors()}")
            self._stream.synchronize()
            self.inference_time = time.perf_counter() - start
        if use_torch:
            return outputs
        # numpy has no bfloat16: such outputs come back as float32.
        return OrderedDict(
            (k, (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy()) for k, v in outputs.items()
        )

    def deactivate_impl(self) -> None:
        if self._cache is not None and self.runtime_cache is not None:
            with atomic_output(self.runtime_cache) as tmp:
                tmp.write_bytes(bytes(memoryview(self._cache.serialize())))
        del self.context, self.engine, self._runtime, self._stream, self._cache


BACKEND = TrtRtxBackend()

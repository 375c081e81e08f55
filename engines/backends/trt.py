"""TensorRT backend: strongly typed `.plan` per bucket through Polygraphy's loaders, run with Polygraphy's TrtRunner.

The only module allowed to import `tensorrt`. TensorRT 11 networks are strongly typed and have no fp16/bf16
builder flags: precision comes from the ONNX dtypes, so none is passed. Plans are valid only for the GPU model
and TensorRT version that built them (`device_specific`), so their metadata records both.

Polygraphy drives `tensorrt` unless `POLYGRAPHY_USE_TENSORRT_RTX` was set when it was imported; then its TensorRT
backend is bound to `tensorrt_rtx` for the whole process and this backend refuses to run (the `trt-rtx` backend
does not go through Polygraphy's TensorRT loaders, see `trt_rtx.py`).

Equivalent CLI (what `--gen-script`/repro lines should print):
`polygraphy convert bK.onnx --convert-to trt --strongly-typed --decomposable-attentions
--builder-optimization-level N --load-timing-cache C --save-timing-cache C -o bK.plan`.
"""

from __future__ import annotations

__all__ = ["BACKEND", "TrtBackend", "TrtPlanRunner", "import_tensorrt"]

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from polygraphy import config as polygraphy_config
from polygraphy.backend.trt import TrtRunner
from polygraphy.exception import PolygraphyException

from shiva_export.engines.backends.base import Backend, BuildOptions, CheckedInputsMixin, current_device
from shiva_export.errors import ArtifactError, BackendUnavailableError, StaticGraphError
from shiva_export.io import atomic_output, write_bytes

logger = logging.getLogger(__name__)


def import_tensorrt():
    """Import `tensorrt` or raise `BackendUnavailableError` saying why and what to do instead."""
    if polygraphy_config.USE_TENSORRT_RTX:
        raise BackendUnavailableError(
            "POLYGRAPHY_USE_TENSORRT_RTX is set, so Polygraphy drives tensorrt_rtx in this process; "
            "unset it to use --backend trt (--backend trt-rtx works without it)"
        )
    try:
        import tensorrt
    except ImportError as err:
        raise BackendUnavailableError(
            f"tensorrt is not importable ({err}); install tensorrt-cu12/cu13 from NVIDIA's index, "
            "or use --backend ort|trt-rtx"
        ) from err
    return tensorrt


class TrtPlanRunner(CheckedInputsMixin, TrtRunner):
    """Polygraphy's `TrtRunner` for a plan file: refuses a machine without a GPU, checks inputs (`InputError`)."""

    def __init__(self, plan_path: str | Path, name: str | None = None, **kwargs: Any):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes

        self.plan_path = Path(plan_path)
        super().__init__(EngineFromBytes(BytesFromPath(str(self.plan_path))), name=name, **kwargs)

    def activate_impl(self) -> None:
        if not self.plan_path.is_file():
            raise ArtifactError(
                f"{self.plan_path}: TensorRT plan not found; "
                "build it with `python -m shiva_export engine --backend trt`."
            )
        import_tensorrt()
        device = current_device()
        if device.compute_capability is None:
            raise BackendUnavailableError("no CUDA GPU: TensorRT plans run only on an NVIDIA GPU; use --backend ort.")
        try:
            super().activate_impl()
        except PolygraphyException as err:
            raise ArtifactError(
                f"{self.plan_path}: TensorRT could not load the plan on {device.name} ({err}); plans are tied to the "
                "GPU model and TensorRT version that built them: rebuild it here."
            ) from err


class TrtBackend(Backend):
    """Full TensorRT (10.x/11.x) through Polygraphy: strongly typed, optional timing cache."""

    name = "trt"
    engine_suffix = ".plan"
    device_specific = True

    def is_available(self) -> tuple[bool, str]:
        try:
            trt = import_tensorrt()
        except BackendUnavailableError as err:
            return False, str(err)
        return True, f"tensorrt {trt.__version__}"

    def version(self) -> str:
        return import_tensorrt().__version__

    def build(self, onnx_path: str | Path, out_path: str | Path, options: BuildOptions) -> Path:
        """Parse (external weights beside the ONNX), build strongly typed, write the plan atomically.

        The timing cache, if given, is loaded before the build; the merged cache is written to a temp file and
        moved into place only after a successful build (Polygraphy's own save writes in place).
        """
        import_tensorrt()
        from polygraphy.backend.trt import (
            CreateConfig,
            EngineBytesFromNetwork,
            NetworkFromOnnxPath,
            SetDecomposableAttentions,
        )

        onnx_path, out_path = Path(onnx_path), Path(out_path)
        if not onnx_path.is_file():
            raise ArtifactError(f"{onnx_path}: ONNX graph not found; run `python -m shiva_export export` first.")
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
        if options.decomposable_attention:
            network = SetDecomposableAttentions(network)
        cache = Path(options.timing_cache) if options.timing_cache else None
        start = time.perf_counter()
        try:
            if cache is None:
                config = CreateConfig(builder_optimization_level=options.builder_optimization_level)
                engine_bytes = EngineBytesFromNetwork(network, config)()
            else:
                with atomic_output(cache) as cache_tmp:
                    if cache.is_file():
                        shutil.copyfile(cache, cache_tmp)  # EngineBytesFromNetwork merges into what it finds
                    config = CreateConfig(
                        builder_optimization_level=options.builder_optimization_level,
                        load_timing_cache=str(cache) if cache.is_file() else None,
                    )
                    engine_bytes = EngineBytesFromNetwork(network, config, save_timing_cache=str(cache_tmp))()
        except PolygraphyException as err:
            hint = ""
            if "decomposable" in str(err).lower() and not options.decomposable_attention:
                hint = " Build with decomposable_attention=True (--decomposable-attention) to allow unfused attention."
            raise StaticGraphError(f"{onnx_path}: TensorRT could not build an engine: {err}.{hint}") from err
        logger.info("%s: TensorRT plan built in %.1f s", onnx_path.name, time.perf_counter() - start)
        return write_bytes(out_path, bytes(memoryview(engine_bytes)))

    def make_runner(self, engine_path: str | Path, *, name: str | None = None, **kwargs: Any) -> TrtPlanRunner:
        """Polygraphy `TrtRunner` over the plan; `kwargs` go to `TrtRunner` (e.g. `allocation_strategy`)."""
        self.require_available()
        engine_path = Path(engine_path)
        return TrtPlanRunner(engine_path, name=name or f"trt:{engine_path.stem}", **kwargs)


BACKEND = TrtBackend()

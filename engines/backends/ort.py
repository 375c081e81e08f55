"""ONNX Runtime backend: runs the exported graphs as they are (CPU or CUDA EP), sharing one copy of the weights.

The "engine" is the exported ONNX itself: `build` writes a small link file (`engines/ort/bK.onnxref`, JSON
`{"schema": 1, "onnx": "../../bK.onnx"}`) beside which the metadata sidecar lives; no optimised model is saved,
because ORT's optimised-model output would copy the shared weights file once per bucket.

Weight sharing: every bucket graph of one export references the same external weights file. A
`SharedWeights` store loads each weight tensor once and wraps it in one `OrtValue`; every session of the set
receives them through `SessionOptions.add_initializer`, so ORT uses that buffer instead of reading the file.
ORT accepts only buffers it does not own ("Buffer containing the initializer must be owned by the user").

* CPU EP: the store memory-maps the weights file (copy-on-write) and wraps the mapped bytes, no copy. Measured
  (onnxruntime 1.32, 12.7 MB of weights, 4 sessions): +12.7 MB RSS per session without sharing; +0.6 MB with
  sharing and prepacking disabled; +12.7 MB with sharing but prepacking on (each session prepacks its own MatMul
  weights). So sharing sets `session.disable_prepacking=1`: the Python API has no `PrepackedWeightsContainer`.
* CUDA EP: CPU initializers are copied to the device by every session (no device saving), so the store copies
  each tensor to the GPU once and hands sessions a DLPack view of it (user-owned). Measured (H200,
  onnxruntime-gpu 1.31.1, 256 MiB of fp32 weights, 4 sessions, arena kSameAsRequested): device memory
  402/742/1146/1484 MiB without sharing or with host sharing, 402/550/698/844 MiB with device sharing
  (+148 MiB per extra session: workspace only).
"""

from __future__ import annotations

__all__ = ["BACKEND", "OrtBackend", "OrtRunner", "SessionFromOnnxPath", "SharedWeights", "make_runners", "resolve_onnx"]

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from polygraphy.backend.base import BaseLoader
from polygraphy.backend.onnxrt import OnnxrtRunner

from shiva_export.engines.backends.base import Backend, BuildOptions, CheckedInputsMixin
from shiva_export.errors import ArtifactError, BackendUnavailableError, ConfigError
from shiva_export.io import write_json

logger = logging.getLogger(__name__)

Provider = Literal["cpu", "cuda"]
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_LINK_SCHEMA = 1


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendUnavailableError(
            "onnxruntime is not importable; install onnxruntime (CPU) or onnxruntime-gpu (CUDA EP)"
        ) from err
    return onnxruntime


def cuda_unavailable_reason() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or None when its CUDA execution provider is available."""
    try:
        available = _onnxruntime().get_available_providers()
    except BackendUnavailableError as err:
        return str(err)
    if _PROVIDERS["cuda"] not in available:
        return f"ONNX Runtime has no {_PROVIDERS['cuda']} (available: {available})"
    return None


def _require_provider(provider: str) -> str:
    if provider not in _PROVIDERS:
        raise ConfigError(f"ORT provider '{provider}' is unknown; expected one of {sorted(_PROVIDERS)}.")
    available = _onnxruntime().get_available_providers()
    ep = _PROVIDERS[provider]
    if ep not in available:
        raise BackendUnavailableError(
            f"ONNX Runtime {ep} is not available here (available: {available}); "
            "install onnxruntime-gpu built for this CUDA, or run on the CPU (--device cpu)."
        )
    return ep


def resolve_onnx(engine_path: str | Path) -> Path:
    """The ONNX graph an ORT link file (`bK.onnxref`) points to."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise ArtifactError(
            f"{engine_path}: ORT engine link not found; build it with `python -m shiva_export engine --backend ort`."
        )
    try:
        link = json.loads(engine_path.read_text())
        onnx_path = (engine_path.parent / link["onnx"]).resolve()
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{engine_path}: not an ORT engine link ({err}); rebuild it.") from err
    if not onnx_path.is_file():
        raise ArtifactError(f"{engine_path}: points to {onnx_path}, which does not exist; re-export or rebuild.")
    return onnx_path


class SharedWeights:
    """External initializers of one engine set, loaded once and handed to every ORT session of the set.

    `device="cpu"`: the weights files are memory-mapped copy-on-write (never modified; unmodified pages shared
    with the page cache) and every `OrtValue` wraps the mapped bytes without a copy. `device="cuda"`: each tensor
    is copied to the GPU once and every session gets that device `OrtValue`.
    Keep the store alive as long as any session built from it (runners hold it through their loader).
    """

    def __init__(self, device: Literal["cpu", "cuda"] = "cpu", device_id: int = 0) -> None:
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"SharedWeights: device must be 'cpu' or 'cuda', got {device!r}.")
        self.device, self.device_id = device, device_id
        self._files: dict[Path, np.memmap] = {}
        self._values: dict[tuple, Any] = {}
        self._arrays: dict[tuple, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of weights held once for all sessions."""
        return sum(array.nbytes for array in self._arrays.values())

    def arrays(self) -> dict[tuple, np.ndarray]:
        """(file, offset, length, dtype, dims) -> the host array behind each shared tensor."""
        return dict(self._arrays)

    def values(self) -> dict[tuple, Any]:
        """(file, offset, length, dtype, dims) -> the `OrtValue` every session uses (on `device`)."""
        return dict(self._values)

    def initializers_for(self, onnx_path: str | Path) -> dict[str, Any]:
        """Initializer name -> `OrtValue` for every external initializer of `onnx_path`."""
        import onnx

        onnx_path = Path(onnx_path)
        model = onnx.load(str(onnx_path), load_external_data=False)
        values = {}
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            file = (onnx_path.parent / info["location"]).resolve()
            offset = int(info.get("offset", 0))
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
            dims = tuple(int(d) for d in tensor.dims)
            length = int(info["length"]) if "length" in info else int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            key = (file, offset, length, dtype.str, dims)
            if key not in self._values:
                array = self._map(file)[offset : offset + length].view(dtype).reshape(dims)
                if not array.flags.aligned:  # small tensors written without alignment: ORT wants aligned data
                    array = np.ascontiguousarray(array).copy()
                self._arrays[key] = array
                self._values[key] = self._ort_value(array, tensor.data_type)
            values[tensor.name] = self._values[key]
        return values

    def _ort_value(self, array: np.ndarray, onnx_type: int):
        ort = _onnxruntime()
        if array.dtype.kind in "fiub" and array.dtype.name != "bfloat16":
            host = ort.OrtValue.ortvalue_from_numpy(array)
        else:  # bfloat16 / float8: numpy has no native type, reinterpret the bytes
            host = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                array.view(np.dtype(f"u{array.dtype.itemsize}")), onnx_type
            )
        if self.device == "cpu":
            return host
        owner = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, onnx_type, "cuda", self.device_id)
        owner.update_inplace(host)
        # add_initializer refuses a buffer ORT allocated ("must be owned by the user"); a DLPack view of the same
        # device memory is user-owned and keeps `owner` alive through its deleter.
        capsule = owner._ortvalue.to_dlpack()
        try:
            return ort.OrtValue.from_dlpack(capsule)  # onnxruntime >= 1.32
        except TypeError:
            return ort.OrtValue.from_dlpack(capsule, False)  # onnxruntime <= 1.31: (data, is_bool_tensor)

    def _map(self, file: Path) -> np.memmap:
        if file not in self._files:
            if not file.is_file():
                raise ArtifactError(f"{file}: external weights file not found; re-export the graphs.")
            self._files[file] = np.memmap(file, dtype=np.uint8, mode="c")
        return self._files[file]


class SessionFromOnnxPath(BaseLoader):
    """Polygraphy loader: an ORT `InferenceSession` for an ONNX path, optionally fed from `SharedWeights`.

    Polygraphy's `SessionFromOnnx` takes no `SessionOptions`, which sharing needs.
    """

    def __init__(
        self,
        path: str | Path,
        provider: Provider = "cpu",
        weights: SharedWeights | None = None,
        provider_options: dict | None = None,
        intra_op_num_threads: int | None = None,
    ):
        self.path = Path(path)
        self.provider = provider
        self.weights = weights
        self.provider_options = provider_options or {}
        self.intra_op_num_threads = intra_op_num_threads

    def call_impl(self):
        ort = _onnxruntime()
        ep = _require_provider(self.provider)
        options = ort.SessionOptions()
        # errors only: the CUDA EP warns once per unused initializer it drops (thousands of lines on a 2.5B model)
        options.log_severity_level = 3
        if self.intra_op_num_threads is not None:
            options.intra_op_num_threads = self.intra_op_num_threads
        if self.weights is not None:
            if self.weights.device == "cuda" and self.provider != "cuda":
                raise ConfigError(
                    f"{self.path}: weights shared on the GPU need provider 'cuda', got '{self.provider}'."
                )
            for name, value in self.weights.initializers_for(self.path).items():
                options.add_initializer(name, value)
            # Prepacking would give every session a private packed copy of each MatMul weight (measured above).
            options.add_session_config_entry("session.disable_prepacking", "1")
        providers = [(ep, self.provider_options)] if ep != "CPUExecutionProvider" else [ep]
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own pybind exception types
            raise ArtifactError(f"{self.path}: ONNX Runtime could not load the graph: {err}") from err
        if session.get_providers()[0] != ep:  # ORT falls back to CPU silently when the CUDA EP fails to load
            raise BackendUnavailableError(
                f"{self.path}: ONNX Runtime did not use {ep} (session providers: {session.get_providers()}); "
                "check the CUDA/cuDNN libraries onnxruntime-gpu needs."
            )
        return session


class OrtRunner(CheckedInputsMixin, OnnxrtRunner):
    """Polygraphy's `OnnxrtRunner` whose `infer()` raises `InputError` on a bad feed."""


class OrtBackend(Backend):
    """ONNX Runtime: the engine is a link to the exported ONNX; runs on the CPU or CUDA execution provider."""

    name = "ort"
    engine_suffix = ".onnxref"

    def is_available(self) -> tuple[bool, str]:
        try:
            ort = _onnxruntime()
        except BackendUnavailableError as err:
            return False, str(err)
        return True, f"onnxruntime {ort.__version__} (providers: {', '.join(ort.get_available_providers())})"

    def version(self) -> str:
        return _onnxruntime().__version__

    def build(self, onnx_path: str | Path, out_path: str | Path, options: BuildOptions) -> Path:
        onnx_path, out_path = Path(onnx_path).resolve(), Path(out_path)
        if not onnx_path.is_file():
            raise ArtifactError(f"{onnx_path}: ONNX graph not found; run `python -m shiva_export export` first.")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        relative = os.path.relpath(onnx_path, out_path.parent.resolve())
        return write_json(out_path, {"schema": _LINK_SCHEMA, "onnx": relative})

    def stale_reason(self, engine_path: Path, onnx_path: Path) -> str | None:
        """An ORT engine is a link: it is stale when it points anywhere but `onnx_path`."""
        try:
            target = resolve_onnx(engine_path)
        except ArtifactError as err:
            return str(err)
        return None if target == Path(onnx_path).resolve() else f"the link points to {target}, not to {onnx_path}"

    def make_runner(
        self,
        engine_path: str | Path,
        *,
        name: str | None = None,
        provider: Provider = "cpu",
        weights: SharedWeights | None = None,
        provider_options: dict | None = None,
        intra_op_num_threads: int | None = None,
    ) -> OrtRunner:
        """Runner for one ORT engine link.

        Args:
            provider: `"cpu"` or `"cuda"`; `"cuda"` raises `BackendUnavailableError` where the CUDA EP is missing.
            weights: a `SharedWeights` store shared by all runners of one engine set (see `make_runners`);
                `None` lets ORT read the weights file itself.
        """
        _require_provider(provider)
        onnx_path = resolve_onnx(engine_path)
        loader = SessionFromOnnxPath(onnx_path, provider, weights, provider_options, intra_op_num_threads)
        return OrtRunner(loader, name=name or f"ort-{provider}:{Path(engine_path).stem}")


def make_runners(
    engine_paths: Sequence[str | Path], provider: Provider = "cpu", share_weights: bool = True, **kwargs: Any
) -> list[OrtRunner]:
    """Runners for a set of engines (one per bucket) that share one copy of the weights.

    With `provider="cuda"` the shared copy lives on the GPU (`provider_options["device_id"]`, default 0).
    """
    device_id = int((kwargs.get("provider_options") or {}).get("device_id", 0))
    weights = SharedWeights(device=provider, device_id=device_id) if share_weights else None
    return [BACKEND.make_runner(path, provider=provider, weights=weights, **kwargs) for path in engine_paths]


BACKEND = OrtBackend()

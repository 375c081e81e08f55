"""Backend names, in one place. Users say onnxruntime / tensorrt / tensorrt-rtx; the short ort / trt / trt-rtx work
everywhere too.

Two kinds of names exist because two things are named:
* an engine *backend* builds engines in the engine stage (`engine --backend`, `build --backend`): ort (references to
  the exported ONNX graphs, ONNX Runtime), trt (TensorRT plans), trt-rtx (TensorRT-RTX plans);
* an engine *set* is what check, bench and the runtime run: the exported graphs directly on ONNX Runtime
  (onnxruntime, onnxruntime-cuda) or the built engines of a backend (ort, trt, trt-rtx).
"""

from __future__ import annotations

from shiva_export.errors import ConfigError

BACKEND_NAMES = ("ort", "trt", "trt-rtx")   # the engine stage's backends; also their folders under onnx/engines/
BACKEND_LABELS = {"ort": "ONNX Runtime", "trt": "TensorRT", "trt-rtx": "TensorRT-RTX"}
TENSORRT_BACKENDS = ("trt", "trt-rtx")      # engines that run only on a CUDA GPU
BACKENDS = {"onnxruntime": "ort", "ort": "ort", "tensorrt": "trt", "trt": "trt",
            "tensorrt-rtx": "trt-rtx", "trt-rtx": "trt-rtx"}
ENGINE_SET_NAMES = ("onnxruntime", "onnxruntime-cuda", "ort", "trt", "trt-rtx")
ENGINE_SET_ALIASES = {"ort-cpu": "onnxruntime", "tensorrt": "trt", "tensorrt-rtx": "trt-rtx"}
ENGINE_SET_CHOICES = (*ENGINE_SET_NAMES, *ENGINE_SET_ALIASES)   # what --backend of check and bench accepts


def backend_name(name: str) -> str:
    """The engine stage's backend for a user's name; one line for an unknown one."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; expected one of onnxruntime, tensorrt, tensorrt-rtx")
    return BACKENDS[name]


def engine_set_name(name: str) -> str:
    """The engine set for a user's name (aliases resolved; unknown names are left for the caller to refuse)."""
    return ENGINE_SET_ALIASES.get(name, name)

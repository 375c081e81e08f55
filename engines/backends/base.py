"""One interface for every engine backend, so build, check and bench code never branches on the runtime.

A backend turns one static ONNX graph into an engine artifact (`build`) and hands out a Polygraphy runner for it
(`make_runner`). Runners check every feed against the engine's inputs first and raise `InputError` naming the
input, what was expected and what was given (Polygraphy's own check raises a bare `PolygraphyException`).

Backends are looked up by name (`get_backend("trt-rtx")`); their modules import their runtime lazily, so
importing any of them never fails on a machine without that runtime.
"""

from __future__ import annotations

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BuildOptions",
    "CheckedInputsMixin",
    "DeviceInfo",
    "check_feed",
    "current_device",
    "get_backend",
    "sidecar_path",
]

import abc
import dataclasses
import difflib
import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from shiva_export.engines.backends.names import BACKEND_NAMES
from shiva_export.errors import BackendUnavailableError, ConfigError, InputError
from shiva_export.records import SIDECAR_SUFFIX

logger = logging.getLogger(__name__)

# Name -> module holding that backend's `BACKEND` instance. Imported on first use only.
_BACKEND_MODULES = {name: f"shiva_export.engines.backends.{name.replace('-', '_')}" for name in BACKEND_NAMES}

_CAPABILITY = re.compile(r"^\d+\.\d+$")


@dataclass(frozen=True)
class BuildOptions:
    """How one engine is built; recorded in its metadata sidecar so that a change forces a rebuild.

    Attributes:
        builder_optimization_level (`int | None`, defaults to `None`): TensorRT / TensorRT-RTX builder
            optimisation level 0..5; `None` keeps the builder's default (3).
        decomposable_attention (`bool`, defaults to `True`): mark every `IAttention` layer decomposable, so
            TensorRT may fall back to MatMul+Softmax+MatMul where no fused kernel exists (fp32 attention after
            RMSNorm in TensorRT-RTX 1.7, small head dims). Fused kernels are still used where they exist.
        compute_capabilities (`tuple[str, ...] | None`, defaults to `None`): TensorRT-RTX target GPUs such as
            `("8.6", "8.9", "12.0")`; `None` keeps TensorRT-RTX's default targets. Ignored by other backends.
        timing_cache (`str | None`, defaults to `None`): TensorRT only: a tactic timing cache loaded before and
            merged + saved (atomically) after each build. Speeds up rebuilds; not part of the engine's identity,
            so it is left out of `to_json()`. TensorRT-RTX has no timing cache.
    """

    builder_optimization_level: int | None = None
    decomposable_attention: bool = True
    compute_capabilities: tuple[str, ...] | None = None
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        level = self.builder_optimization_level
        if level is not None and not (isinstance(level, int) and 0 <= level <= 5):
            raise ConfigError(f"BuildOptions: builder_optimization_level must be 0..5 or None, got {level!r}")
        if self.compute_capabilities is not None:
            capabilities = tuple(str(c) for c in self.compute_capabilities)
            bad = [c for c in capabilities if not _CAPABILITY.match(c)]
            if bad or not capabilities:
                raise ConfigError(
                    f"BuildOptions: compute_capabilities must be non-empty 'major.minor' strings such as '8.9', "
                    f"got {self.compute_capabilities!r}"
                )
            object.__setattr__(self, "compute_capabilities", capabilities)
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", str(self.timing_cache))

    def to_json(self) -> dict:
        """What makes two builds of one ONNX the same engine (the timing cache only changes build time)."""
        data = dataclasses.asdict(self)
        del data["timing_cache"]
        if data["compute_capabilities"] is not None:
            data["compute_capabilities"] = list(data["compute_capabilities"])
        return data


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU a build or run happens on, or `name="cpu"`, `compute_capability=None` without one."""

    name: str
    compute_capability: tuple[int, int] | None

    @property
    def capability_str(self) -> str:
        """`"8.9"` for a GPU, `"cpu"` without one (the form stored in engine metadata)."""
        if self.compute_capability is None:
            return "cpu"
        return "{}.{}".format(*self.compute_capability)


def current_device(index: int = 0) -> DeviceInfo:
    """Describe CUDA device `index` through torch, or the CPU when torch sees no CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return DeviceInfo(name="cpu", compute_capability=None)
    return DeviceInfo(
        name=torch.cuda.get_device_name(index),
        compute_capability=tuple(torch.cuda.get_device_capability(index)),
    )


DEVICES = ("cpu", "cuda")


def compute_device(requested: str | None = None, onnxruntime: bool = False) -> str:
    """Where a stage runs its PyTorch model (and, with `onnxruntime`, its ONNX Runtime engine sets): "cuda" when
    torch sees a CUDA GPU, else "cpu". With `onnxruntime` (check, bench, build, generate) the GPU is the default
    only where ONNX Runtime has its CUDA execution provider too; without it (the CPU `onnxruntime` package on a GPU
    machine) the default is the CPU, with a logged note. `requested` overrides, and "cuda" on a machine without a
    CUDA GPU is refused in one line."""
    import torch

    if requested is None:
        if not torch.cuda.is_available():
            return "cpu"
        if onnxruntime:
            from shiva_export.engines.backends.ort import cuda_unavailable_reason

            reason = cuda_unavailable_reason()
            if reason is not None:
                logger.warning("torch sees a CUDA GPU, but %s: running on the CPU (install onnxruntime-gpu to run "
                               "on the GPU)", reason)
                return "cpu"
        return "cuda"
    if requested not in DEVICES:
        raise ConfigError(f"--device {requested!r} is unknown; expected one of {list(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu")
    return requested


def sidecar_path(engine_path: str | Path) -> Path:
    """`<engine>.meta.json`: the metadata file that must sit beside every engine."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


class Backend(abc.ABC):
    """What every engine backend provides; see `ort.py`, `trt.py`, `trt_rtx.py`."""

    name: ClassVar[str]
    """Registry name, also the folder under `engines/` (`"ort"`, `"trt"`, `"trt-rtx"`)."""
    engine_suffix: ClassVar[str]
    """File suffix of the engine artifact, e.g. `".plan"`."""
    device_specific: ClassVar[bool] = False
    """True when an engine is valid only on the GPU model it was built on (full TensorRT)."""

    @abc.abstractmethod
    def is_available(self) -> tuple[bool, str]:
        """Whether this backend can build engines here, and why (not); never raises."""

    @abc.abstractmethod
    def version(self) -> str:
        """Version of the runtime that builds the engines; raises `BackendUnavailableError` if absent."""

    @abc.abstractmethod
    def build(self, onnx_path: str | Path, out_path: str | Path, options: BuildOptions) -> Path:
        """Build the engine for `onnx_path` and write it atomically to `out_path`; return `out_path`.

        Writes the engine only: `shiva_export.engines.build` adds the metadata sidecar.
        """

    @abc.abstractmethod
    def make_runner(self, engine_path: str | Path, *, name: str | None = None, **kwargs: Any):
        """Return a Polygraphy `BaseRunner` for the engine. Nothing is loaded before `activate()`."""

    def stale_reason(self, engine_path: Path, onnx_path: Path) -> str | None:
        """Why an engine whose sidecar matches is still not the engine of `onnx_path`, or None (the default: the
        sidecar's hashes say it all)."""
        return None

    def require_available(self) -> None:
        """Raise `BackendUnavailableError` with the reason when `is_available()` is false."""
        ok, reason = self.is_available()
        if not ok:
            raise BackendUnavailableError(reason)


def get_backend(name: str) -> Backend:
    """The backend registered as `name` (`"ort"`, `"trt"` or `"trt-rtx"`)."""
    if name not in _BACKEND_MODULES:
        raise ConfigError(f"unknown backend '{name}'; expected one of {', '.join(BACKEND_NAMES)}.")
    return importlib.import_module(_BACKEND_MODULES[name]).BACKEND


def _dims_match(got: tuple[int, ...], expected: tuple[Any, ...]) -> bool:
    if len(got) != len(expected):
        return False
    # A dim that is None, a string or negative is symbolic: any size fits.
    return all(not isinstance(e, int) or e < 0 or g == e for g, e in zip(got, expected))


def _fmt_shape(shape: Any) -> str:
    return "(" + ", ".join("?" if not isinstance(d, int) or d < 0 else str(d) for d in shape) + ")"


def check_feed(feed_dict: Mapping[str, Any], input_metadata: Mapping[str, Any], subject: str) -> None:
    """Check a feed against a runner's `TensorMetadata`; raise one `InputError` listing every problem.

    Args:
        feed_dict: input name -> numpy array or torch tensor.
        input_metadata: Polygraphy `TensorMetadata` (name -> (dtype, shape)), as `get_input_metadata()` returns.
        subject: what the message is about, e.g. the runner name or the engine path.
    """
    from polygraphy import util
    from polygraphy.datatype import DataType

    expected_names = list(input_metadata)
    problems = []
    for name in feed_dict:
        if name not in input_metadata:
            close = difflib.get_close_matches(name, expected_names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"unknown input '{name}'{hint}; expected inputs {expected_names}")
    for name in expected_names:
        if name not in feed_dict:
            problems.append(f"missing input '{name}'; expected inputs {expected_names}, got {list(feed_dict)}")
    for name, value in feed_dict.items():
        if name not in input_metadata or isinstance(value, int):  # an int is a device pointer: nothing to check
            continue
        meta = input_metadata[name]
        expected_dtype = DataType.from_dtype(meta.dtype) if meta.dtype is not None else None
        got_dtype = util.array.dtype(value)
        if expected_dtype is not None and got_dtype != expected_dtype:
            problems.append(
                f"input '{name}' has dtype {got_dtype.name}; expected {expected_dtype.name}. "
                f"Cast it before feeding (precision is fixed at export)"
            )
        got_shape = tuple(int(d) for d in util.array.shape(value))
        if meta.shape is not None and not _dims_match(got_shape, tuple(meta.shape)):
            problems.append(
                f"input '{name}' has shape {_fmt_shape(got_shape)}; expected {_fmt_shape(meta.shape)}. "
                f"Engines are static: feed the shape the bucket was exported with"
            )
    if problems:
        raise InputError(f"{subject}: " + "; ".join(problems) + ".")


class CheckedInputsMixin:
    """Put before a Polygraphy runner class: `infer()` raises `InputError` on a bad feed instead of running it.

    `class OrtRunner(CheckedInputsMixin, OnnxrtRunner)`. The check runs only on an active runner; an inactive
    one keeps Polygraphy's own "Must be activated prior to calling infer()" error.
    """

    def infer(self, feed_dict, check_inputs=True, *args, **kwargs):
        if check_inputs and self.is_active:
            check_feed(feed_dict, self.get_input_metadata(use_numpy_dtypes=False), subject=f"runner '{self.name}'")
        return super().infer(feed_dict, False, *args, **kwargs)

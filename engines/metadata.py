"""Engine metadata sidecars: what an engine was built from, so a stale or foreign engine is refused, never run.

Every engine `X` has `X.meta.json` beside it (written after the engine, both atomically). It records the hashes
of the ONNX graph and its external weights, the k-schedule and router-checkpoint hashes handed in by the caller,
the precision read from the graph, the backend and its version, the build device and the build options.
`verify_metadata` compares a sidecar against what the caller expects now and raises `StaleArtifactError`
naming every field that differs, so an engine built from another export folder or an older ONNX is refused.
"""

from __future__ import annotations

__all__ = [
    "SCHEMA",
    "EngineMetadata",
    "OnnxFacts",
    "metadata_path",
    "onnx_facts",
    "read_metadata",
    "verify_metadata",
    "write_metadata",
]

import dataclasses
import datetime
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, MutableMapping

from shiva_export.engines.backends.base import BuildOptions, DeviceInfo, current_device, sidecar_path
from shiva_export.errors import ArtifactError, StaleArtifactError
from shiva_export.io import sha256_file, write_json

SCHEMA = 1

_PRECISION_NAMES = {"FLOAT": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16", "DOUBLE": "fp64"}


def metadata_path(engine_path: str | Path) -> Path:
    """`<engine>.meta.json`."""
    return sidecar_path(engine_path)


@dataclass(frozen=True)
class OnnxFacts:
    """What an engine inherits from its ONNX graph; computed by `onnx_facts`."""

    onnx_sha256: str
    weights_sha256: dict[str, str]  # external data file (relative to the ONNX) -> sha256
    precision: str  # dtype holding most weight bytes: "fp32" | "fp16" | "bf16" | "fp8..." ...
    inputs: dict[str, dict]  # name -> {"dtype": "float32", "shape": [2, 16, 64, 64]}
    outputs: dict[str, dict]


def _value_info(value_info, onnx) -> dict:
    tensor_type = value_info.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else None
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
    name = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower() if dtype is None else str(dtype)
    return {"dtype": "bfloat16" if tensor_type.elem_type == onnx.TensorProto.BFLOAT16 else name, "shape": shape}


def onnx_facts(onnx_path: str | Path, hash_cache: MutableMapping[Path, str] | None = None) -> OnnxFacts:
    """Hash an ONNX graph and its external weight files; read precision and I/O from the graph.

    Args:
        hash_cache: resolved path -> sha256, shared across buckets so a weights file shared by every bucket is
            hashed once per build.
    """
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ArtifactError(f"{onnx_path}: ONNX graph not found; run `python -m shiva_export export` first.")
    cache = hash_cache if hash_cache is not None else {}

    def digest(path: Path) -> str:
        key = path.resolve()
        if key not in cache:
            cache[key] = sha256_file(key)
        return cache[key]

    model = onnx.load(str(onnx_path), load_external_data=False)
    weights: dict[str, str] = {}
    bytes_by_dtype: Counter[str] = Counter()
    for tensor in model.graph.initializer:
        dtype_name = onnx.TensorProto.DataType.Name(tensor.data_type)
        if dtype_name in _PRECISION_NAMES or dtype_name.startswith("FLOAT8"):
            count = 1
            for d in tensor.dims:
                count *= int(d)
            itemsize = 1 if dtype_name.startswith("FLOAT8") else onnx.helper.tensor_dtype_to_np_dtype(
                tensor.data_type
            ).itemsize
            bytes_by_dtype[_PRECISION_NAMES.get(dtype_name, dtype_name.lower())] += count * itemsize
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            if location not in weights:
                file = onnx_path.parent / location
                if not file.is_file():
                    raise ArtifactError(
                        f"{onnx_path}: external weights '{location}' not found beside the graph; re-export."
                    )
                weights[location] = digest(file)
    initializers = {t.name for t in model.graph.initializer}
    inputs = {v.name: _value_info(v, onnx) for v in model.graph.input if v.name not in initializers}
    outputs = {v.name: _value_info(v, onnx) for v in model.graph.output}
    if bytes_by_dtype:
        precision = bytes_by_dtype.most_common(1)[0][0]
    else:  # no float weights: fall back to the first float input's dtype
        float_inputs = [v["dtype"] for v in inputs.values() if "float" in v["dtype"]]
        first = next(iter(float_inputs), "")
        precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(first, "unknown")
    return OnnxFacts(
        onnx_sha256=digest(onnx_path), weights_sha256=weights, precision=precision, inputs=inputs, outputs=outputs
    )


@dataclass(frozen=True)
class EngineMetadata:
    """The sidecar's content. Field names are the names `verify_metadata` reports."""

    engine: str  # file name of the engine
    engine_sha256: str
    onnx: str  # path of the ONNX graph relative to the engine's folder
    onnx_sha256: str
    weights_sha256: dict[str, str]
    schedule_hash: str | None
    checkpoint_hash: str | None
    precision: str
    backend: str
    backend_version: str
    gpu_name: str  # "cpu" when built without a GPU
    compute_capability: str  # "8.9", or "cpu"
    build_options: dict
    inputs: dict[str, dict]
    outputs: dict[str, dict]
    created: str  # ISO 8601, UTC
    versions: dict[str, str] = field(default_factory=dict)  # other tools involved (onnx, polygraphy, ...)
    schema: int = SCHEMA

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "EngineMetadata":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _tool_versions() -> dict[str, str]:
    import onnx
    import polygraphy

    import shiva_export

    return {"onnx": onnx.__version__, "polygraphy": polygraphy.__version__, "shiva_export": shiva_export.__version__}


def write_metadata(
    engine_path: str | Path,
    *,
    onnx_path: str | Path,
    backend: str,
    backend_version: str,
    options: BuildOptions,
    schedule_hash: str | None = None,
    checkpoint_hash: str | None = None,
    facts: OnnxFacts | None = None,
    device: DeviceInfo | None = None,
) -> EngineMetadata:
    """Write `<engine>.meta.json` for an engine that already exists; returns what was written."""
    engine_path, onnx_path = Path(engine_path), Path(onnx_path)
    if not engine_path.is_file():
        raise ArtifactError(f"{engine_path}: engine not found; metadata is written only after the engine.")
    facts = onnx_facts(onnx_path) if facts is None else facts
    device = current_device() if device is None else device
    metadata = EngineMetadata(
        engine=engine_path.name,
        engine_sha256=sha256_file(engine_path),
        onnx=os.path.relpath(onnx_path.resolve(), engine_path.parent.resolve()),
        onnx_sha256=facts.onnx_sha256,
        weights_sha256=dict(facts.weights_sha256),
        schedule_hash=schedule_hash,
        checkpoint_hash=checkpoint_hash,
        precision=facts.precision,
        backend=backend,
        backend_version=backend_version,
        gpu_name=device.name,
        compute_capability=device.capability_str,
        build_options=options.to_json(),
        inputs=facts.inputs,
        outputs=facts.outputs,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=_tool_versions() | ({"timing_cache": options.timing_cache} if options.timing_cache else {}),
    )
    write_json(metadata_path(engine_path), metadata.to_json())
    return metadata


def _rebuild_hint(engine_path: Path, backend: str | None) -> str:
    # engines/<backend>/bK.ext -> the export folder is two levels up
    export_dir = engine_path.parent.parent.parent if engine_path.parent.parent.name == "engines" else None
    command = f"python -m shiva_export engine --backend {backend or '<backend>'}"
    if export_dir is not None:
        command += f" {export_dir}"
    return f"Rebuild with `{command}`"


def read_metadata(engine_path: str | Path) -> EngineMetadata:
    """Read an engine's sidecar; `ArtifactError` if the engine or its sidecar is missing or unreadable."""
    engine_path = Path(engine_path)
    backend = engine_path.parent.name if engine_path.parent.parent.name == "engines" else None
    if not engine_path.is_file():
        raise ArtifactError(f"{engine_path}: engine not found. {_rebuild_hint(engine_path, backend)}.")
    path = metadata_path(engine_path)
    if not path.is_file():
        raise ArtifactError(
            f"{engine_path}: metadata sidecar {path.name} not found, so nothing says what this engine was built "
            f"from. {_rebuild_hint(engine_path, backend)}."
        )
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return EngineMetadata.from_json(data)
    except (ValueError, TypeError) as err:
        raise ArtifactError(f"{path}: unreadable metadata ({err}). {_rebuild_hint(engine_path, backend)}.") from err


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:16] + "…"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return repr(value)


def verify_metadata(
    engine_path: str | Path, expected: Mapping[str, Any], *, check_engine_hash: bool = True
) -> EngineMetadata:
    """Refuse an engine whose sidecar disagrees with `expected`; return the metadata when it matches.

    Args:
        engine_path: the engine; its `<engine>.meta.json` must exist.
        expected: field name (an `EngineMetadata` field, e.g. `onnx_sha256`, `schedule_hash`, `backend_version`,
            `build_options`) -> the value it must have now. Fields left out are not compared.
        check_engine_hash: also re-hash the engine and compare with `engine_sha256` (catches a swapped engine).

    Raises:
        ArtifactError: the engine or the sidecar is missing or unreadable.
        StaleArtifactError: one or more fields differ; the message names each with expected and found values.
    """
    engine_path = Path(engine_path)
    metadata = read_metadata(engine_path)
    found = metadata.to_json()
    unknown = sorted(set(expected) - set(found))
    if unknown:
        raise KeyError(f"verify_metadata: unknown metadata fields {unknown}; known: {sorted(found)}")
    wanted = {"schema": SCHEMA, **expected}
    if check_engine_hash:
        wanted["engine_sha256"] = sha256_file(engine_path)
    differences = [
        f"{name} expected {_short(value)} found {_short(found[name])}"
        for name, value in wanted.items()
        if _normalise(found[name]) != _normalise(value)
    ]
    if differences:
        raise StaleArtifactError(
            f"{engine_path}: engine is stale or from another export: {'; '.join(differences)}. "
            f"{_rebuild_hint(engine_path, metadata.backend)} (or point to the export it was built from)."
        )
    return metadata


def _normalise(value: Any) -> Any:
    """JSON round trip, so tuples and lists (and int/float keys) compare as stored."""
    return json.loads(json.dumps(value, sort_keys=True))

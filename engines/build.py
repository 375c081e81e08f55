"""Build one engine per bucket graph of an export folder, skipping engines whose metadata still matches.

`export_dir/bK.onnx` (sharing one external weights file) -> `export_dir/engines/<backend>/bK<suffix>` plus
`bK<suffix>.meta.json`. An engine is rebuilt when anything it was built from moved: the ONNX or weights hashes,
the schedule or checkpoint hash, the backend version, the build options, or (full TensorRT only) the GPU.
Until the manifest exists, callers pass the graphs and their expected hashes as `OnnxSource`s.
"""

from __future__ import annotations

__all__ = ["EngineBuild", "OnnxSource", "build_engine", "build_engines", "engine_path_for", "find_bucket_graphs"]

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, MutableMapping, Sequence

from shiva_export.engines.backends.base import Backend, BuildOptions, current_device, get_backend
from shiva_export.engines.metadata import metadata_path, onnx_facts, verify_metadata, write_metadata
from shiva_export.errors import ArtifactError, StaleArtifactError
from shiva_export.records import ENGINES_DIR

logger = logging.getLogger(__name__)

_BUCKET = re.compile(r"^b(\d+)\.onnx$")   # the names `records.graph_file` gives bucket graphs


@dataclass(frozen=True)
class OnnxSource:
    """One bucket graph and, if the caller knows them (manifest), the hashes it must still have."""

    path: Path
    onnx_sha256: str | None = None
    weights_sha256: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True)
class EngineBuild:
    """What `build_engines` did for one bucket (the engine stage records it as a `records.EngineEntry`)."""

    bucket: str  # "b0"
    backend: str
    onnx_path: Path
    engine_path: Path
    metadata_path: Path
    status: Literal["built", "fresh"]  # "fresh": metadata matched, nothing was built
    reason: str  # why it was built, or "metadata matches"
    seconds: float  # build time (0 when fresh)
    metadata: dict = field(repr=False)

    def to_json(self) -> dict:
        return {
            "bucket": self.bucket,
            "backend": self.backend,
            "onnx": str(self.onnx_path),
            "engine": str(self.engine_path),
            "metadata": str(self.metadata_path),
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
        }


def find_bucket_graphs(export_dir: str | Path) -> list[Path]:
    """`b0.onnx, b1.onnx, ...` in `export_dir`, in bucket order."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ArtifactError(f"{export_dir}: export folder not found; run `python -m shiva_export export` first.")
    graphs = sorted(
        (p for p in export_dir.iterdir() if _BUCKET.match(p.name)), key=lambda p: int(_BUCKET.match(p.name)[1])
    )
    if not graphs:
        raise ArtifactError(
            f"{export_dir}: no bucket graphs (b0.onnx, b1.onnx, ...); run `python -m shiva_export export`."
        )
    return graphs


def engine_path_for(export_dir: str | Path, backend: Backend, onnx_path: str | Path) -> Path:
    """`export_dir/engines/<backend>/bK<suffix>`."""
    return Path(export_dir) / ENGINES_DIR / backend.name / (Path(onnx_path).stem + backend.engine_suffix)


def _expected(backend: Backend, facts, options: BuildOptions, schedule_hash, checkpoint_hash, version) -> dict:
    expected = {
        "onnx_sha256": facts.onnx_sha256,
        "weights_sha256": facts.weights_sha256,
        "schedule_hash": schedule_hash,
        "checkpoint_hash": checkpoint_hash,
        "backend": backend.name,
        "backend_version": version,
        "build_options": options.to_json(),
    }
    if backend.device_specific:
        device = current_device()
        expected |= {"gpu_name": device.name, "compute_capability": device.capability_str}
    return expected


def build_engine(
    backend: Backend,
    source: OnnxSource,
    engine_path: str | Path,
    options: BuildOptions,
    *,
    schedule_hash: str | None = None,
    checkpoint_hash: str | None = None,
    force: bool = False,
    hash_cache: MutableMapping[Path, str] | None = None,
) -> EngineBuild:
    """Build (or keep, if fresh) the engine for one graph and write its metadata sidecar."""
    engine_path = Path(engine_path)
    bucket = source.path.stem
    facts = onnx_facts(source.path, hash_cache)
    if source.onnx_sha256 is not None and source.onnx_sha256 != facts.onnx_sha256:
        raise StaleArtifactError(
            f"{source.path}: graph changed since it was recorded; onnx_sha256 expected {source.onnx_sha256[:16]}… "
            f"found {facts.onnx_sha256[:16]}…. Re-run `python -m shiva_export export`."
        )
    if source.weights_sha256 is not None and dict(source.weights_sha256) != facts.weights_sha256:
        raise StaleArtifactError(
            f"{source.path}: external weights changed since they were recorded; weights_sha256 expected "
            f"{dict(source.weights_sha256)} found {facts.weights_sha256}. Re-run `python -m shiva_export export`."
        )
    version = backend.version()
    expected = _expected(backend, facts, options, schedule_hash, checkpoint_hash, version)

    reason = "forced rebuild"
    if not force:
        if not engine_path.is_file():
            reason = "no engine yet"
        elif not metadata_path(engine_path).is_file():
            reason = "engine has no metadata sidecar"
        else:
            try:
                metadata = verify_metadata(engine_path, expected)
                stale = backend.stale_reason(engine_path, source.path)
                if stale:
                    raise StaleArtifactError(f"{engine_path}: {stale}")
            except (StaleArtifactError, ArtifactError) as err:
                reason = f"stale: {err}"
            else:
                logger.info("%s: %s engine %s is fresh (metadata matches), skipped", bucket, backend.name, engine_path)
                return EngineBuild(
                    bucket, backend.name, source.path, engine_path, metadata_path(engine_path),
                    "fresh", "metadata matches", 0.0, metadata.to_json(),
                )  # fmt: skip

    logger.info("%s: building %s engine %s (%s)", bucket, backend.name, engine_path, reason)
    start = time.perf_counter()
    backend.build(source.path, engine_path, options)
    seconds = time.perf_counter() - start
    metadata = write_metadata(
        engine_path,
        onnx_path=source.path,
        backend=backend.name,
        backend_version=version,
        options=options,
        schedule_hash=schedule_hash,
        checkpoint_hash=checkpoint_hash,
        facts=facts,
    )
    return EngineBuild(
        bucket, backend.name, source.path, engine_path, metadata_path(engine_path),
        "built", reason, seconds, metadata.to_json(),
    )  # fmt: skip


def build_engines(
    export_dir: str | Path,
    backend_name: str,
    options: BuildOptions | None = None,
    *,
    sources: Sequence[OnnxSource | str | Path] | None = None,
    schedule_hash: str | None = None,
    checkpoint_hash: str | None = None,
    force: bool = False,
) -> list[EngineBuild]:
    """Build `engines/<backend>/bK.*` for every bucket graph; engines whose metadata matches are kept.

    Args:
        export_dir: the export folder holding `b*.onnx` and their shared weights file.
        backend_name: `"ort"`, `"trt"` or `"trt-rtx"`.
        options: build options (recorded; a change forces a rebuild). Default `BuildOptions()`.
        sources: the graphs to build, with their expected hashes; default: every `b*.onnx` in `export_dir`.
        schedule_hash, checkpoint_hash: recorded in each sidecar and compared on the next build.
        force: rebuild even fresh engines.

    Raises:
        BackendUnavailableError: the backend cannot build here.
        StaleArtifactError: a graph's hashes differ from the expected ones in `sources`.
        StaticGraphError: the backend rejected a graph (engines built before it are kept).
    """
    export_dir = Path(export_dir)
    options = BuildOptions() if options is None else options
    backend = get_backend(backend_name)
    backend.require_available()
    if sources is None:
        sources = find_bucket_graphs(export_dir)
    sources = [s if isinstance(s, OnnxSource) else OnnxSource(Path(s)) for s in sources]
    hash_cache: dict[Path, str] = {}
    records = [
        build_engine(
            backend,
            source,
            engine_path_for(export_dir, backend, source.path),
            options,
            schedule_hash=schedule_hash,
            checkpoint_hash=checkpoint_hash,
            force=force,
            hash_cache=hash_cache,
        )
        for source in sources
    ]
    built = sum(r.status == "built" for r in records)
    logger.info("%s engines in %s: %d built, %d fresh", backend.name, export_dir, built, len(records) - built)
    return records

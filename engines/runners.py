"""Engine sets: one Polygraphy runner per bucket of an artifact folder, for one backend, looked up by name.

Check and bench never branch on the runtime: they ask an `EngineSet` for the runner of bucket i (the production
graph's engine), for a runner that also returns the kept token indices (`indices_layer{l}`, from the debug graph)
when the backend has one, and for the dense baseline's runner. Every runner is a Polygraphy `BaseRunner`
(`activate` / `infer` / `deactivate`); nothing loads before `activate()`.

Names:
    * ``onnxruntime`` (alias ``ort-cpu``): the exported ONNX graphs themselves in ONNX Runtime sessions on the CPU
      (`engines.backends.ort.SessionFromOnnxPath` + `OrtRunner`, all sessions sharing one copy of weights.bin).
      Needs no engine build; the debug graphs give the indices.
    * ``onnxruntime-cuda``: the same on ONNX Runtime's CUDA execution provider.
    * ``ort``, ``trt``, ``trt-rtx``: engines built by `engines.build` into ``onnx/engines/<backend>/bK<suffix>``,
      refused unless their metadata sidecar says they were built from the graph the manifest lists. Built from
      ``bK.onnx`` (no index outputs), so their agreement is reported as None with the reason, unless a debug engine
      ``bK.debug<suffix>`` exists beside them.
"""

from __future__ import annotations

__all__ = ["ENGINE_SET_NAMES", "BuiltEngines", "EngineSet", "OnnxGraphs", "get_engine_set", "library_versions"]

import abc
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from shiva_export.engines.backends.names import (BACKEND_NAMES, ENGINE_SET_CHOICES, ENGINE_SET_NAMES,  # noqa: F401
                                                 engine_set_name)
from shiva_export.errors import ArtifactError, ConfigError, StaleArtifactError
from shiva_export.records import ONNX_DIR, EngineRecord, ExportRecord, GraphRecord, graph_file

logger = logging.getLogger(__name__)


class EngineSet(abc.ABC):
    """The engines of one artifact folder on one backend."""

    name: str
    device: str = "cpu"   # "cpu" or "cuda": where the runners compute (bench picks its clock from it)

    def __init__(self, ws):
        self.ws = ws
        self.graphs: dict[int, GraphRecord] = {g.bucket: g for g in ws.bucket_graphs()}   # verified: manifest
        self._checked_graphs: dict[Path, dict[str, str]] = {}

    @abc.abstractmethod
    def runner(self, bucket: int):
        """Runner of bucket `bucket`'s production engine (outputs: ``sample``)."""

    def index_runner(self, bucket: int):
        """Runner whose outputs include ``indices_layer{l}``, or None (see `index_note`)."""
        return None

    def index_note(self, bucket: int) -> str | None:
        """Why `index_runner(bucket)` is None."""
        return None

    def dense_runner(self):
        """Runner of the unpruned baseline (dense.onnx), or None (see `dense_note`)."""
        return None

    def dense_note(self) -> str | None:
        return None

    @abc.abstractmethod
    def identity(self) -> dict[str, str]:
        """Path (relative to the artifact folder) -> sha256 of every file the runners execute."""

    def graph_path(self, bucket: int, debug: bool = False) -> Path:
        """The verified graph of a bucket (see `verified_graph`)."""
        if bucket not in self.graphs:
            raise ConfigError(f"bucket {bucket} is not exported; buckets: {sorted(self.graphs)}")
        graph = self.graphs[bucket]
        name = graph.debug_file if debug else graph.file
        if not name:
            raise ArtifactError(f"{self.ws.root}: bucket {bucket} has no {'debug ' if debug else ''}graph in the "
                                "manifest; re-export")
        return self.verified_graph(name, str(bucket), list(graph.k))

    def dense_graph_path(self) -> Path | None:
        dense = self.ws.manifest.require(ExportRecord).dense
        return None if dense is None else self.verified_graph(dense.file, "dense", None)

    def has_debug_graph(self, bucket: int) -> bool:
        return bucket in self.graphs and self.graphs[bucket].debug_file is not None

    def verified_graph(self, name: str, bucket: str, k: list[int] | None) -> Path:
        """`onnx/<name>`, verified by `Workspace.verified_graph` (identity and weights)."""
        path, weights = self.ws.verified_graph(name, bucket, k)
        self._checked_graphs[path] = weights
        return path

    def graph_weights(self, path: Path) -> dict[str, str]:
        """External weights file (relative to the graph) -> the sha256 the manifest recorded, of a verified graph."""
        return self._checked_graphs[path]


class OnnxGraphs(EngineSet):
    """The exported ONNX graphs run by ONNX Runtime directly (no engine build), sharing one weights copy."""

    def __init__(self, ws, provider: str = "cpu", provider_options: dict | None = None,
                 intra_op_num_threads: int | None = None, share_weights: bool = True):
        """share_weights: one in-memory copy of weights.bin for every session (ORT then skips prepacking its
        MatMul weights, see engines.backends.ort); False lets each session load and prepack its own, for speed."""
        super().__init__(ws)
        from shiva_export.engines.backends.ort import SharedWeights, _require_provider

        _require_provider(provider)   # BackendUnavailableError now, not at activate()
        self.provider, self.device = provider, provider
        self.name = "onnxruntime" if provider == "cpu" else f"onnxruntime-{provider}"
        self.provider_options = provider_options
        self.threads = intra_op_num_threads
        self.weights = SharedWeights(device=provider) if share_weights else None

    def _runner(self, path: Path, name: str):
        from shiva_export.engines.backends.ort import OrtRunner, SessionFromOnnxPath

        loader = SessionFromOnnxPath(path, self.provider, self.weights, self.provider_options, self.threads)
        return OrtRunner(loader, name=name)

    def runner(self, bucket: int):
        return self._runner(self.graph_path(bucket), f"{self.name}:b{bucket}")

    def index_runner(self, bucket: int):
        if not self.has_debug_graph(bucket):
            return None
        return self._runner(self.graph_path(bucket, debug=True), f"{self.name}:b{bucket}.debug")

    def index_note(self, bucket: int) -> str | None:
        if self.has_debug_graph(bucket):
            return None
        return "the export has no debug graph with index outputs (exported without debug_indices)"

    def dense_runner(self):
        path = self.dense_graph_path()
        return self._runner(path, f"{self.name}:dense") if path else None

    def dense_note(self) -> str | None:
        return None if self.ws.manifest.require(ExportRecord).dense else "the export has no dense.onnx"

    def identity(self) -> dict[str, str]:
        for bucket in self.graphs:
            self.graph_path(bucket)
            if self.has_debug_graph(bucket):
                self.graph_path(bucket, debug=True)
        self.dense_graph_path()
        return {entry.path: entry.sha256 for entry in self.ws.manifest.require(ExportRecord).files}


class BuiltEngines(EngineSet):
    """Engines built for a registered backend (`ort`, `trt`, `trt-rtx`), found through the manifest.

    Where: the manifest's ``engine`` stage (``engines[<backend>]``: records with ``bucket`` and ``engine``, the path
    relative to the folder, as `pipeline.run_engines` writes them); without that record, where `engines.build` puts
    them (``onnx/engines/<backend>/bK<suffix>``). Debug and dense engines, if someone built them, sit beside the
    bucket engines as ``bK.debug<suffix>`` and ``dense<suffix>``. Every engine is refused unless its metadata
    sidecar says it was built by this backend from the graph the manifest lists (`metadata.verify_metadata`).
    """

    def __init__(self, ws, backend_name: str, **runner_kwargs: Any):
        super().__init__(ws)
        from shiva_export.engines.backends.base import get_backend

        self.backend = get_backend(backend_name)
        self.backend.require_available()
        self.name = self.backend.name
        self.device = "cpu" if backend_name == "ort" and runner_kwargs.get("provider", "cpu") == "cpu" else "cuda"
        self.runner_kwargs = dict(runner_kwargs)
        if backend_name == "ort" and "weights" not in self.runner_kwargs:
            from shiva_export.engines.backends.ort import SharedWeights

            self.runner_kwargs["weights"] = SharedWeights(device=self.runner_kwargs.get("provider", "cpu"))
        stage = ws.manifest.record(EngineRecord)
        recorded = stage.engines.get(self.name, ()) if stage else ()
        self._recorded = {entry.bucket: ws.path(entry.engine) for entry in recorded}
        self._verified: dict[Path, str] = {}

    def _default_path(self, onnx_path: Path) -> Path:
        from shiva_export.engines.build import engine_path_for

        return engine_path_for(self.ws.path(ONNX_DIR), self.backend, onnx_path)

    def _bucket_engine_path(self, bucket: int) -> Path:
        return self._recorded.get(bucket) or self._default_path(self.graph_path(bucket))

    def _beside(self, stem: str) -> Path:
        """`<folder of the bucket engines>/<stem><suffix>`."""
        first = self._bucket_engine_path(min(self.graphs))
        return first.with_name(stem + self.backend.engine_suffix)

    def _verify(self, engine: Path, graph: Path, expected_sha: str | None) -> Path:
        """Refuse an engine unless the chain holds: manifest -> engine file and sidecar (sha256) -> the graph the
        manifest lists and its weights (the sidecar's onnx/weights sha256) -> for an ORT link, that very file."""
        from shiva_export.engines.metadata import metadata_path, verify_metadata

        if engine in self._verified:
            return engine
        relative = engine.relative_to(self.ws.root).as_posix()
        sidecar = metadata_path(engine).relative_to(self.ws.root).as_posix()
        self.ws.path(relative), self.ws.path(sidecar)  # a symlinked engine or sidecar may not leave the folder
        for name in (relative, sidecar):
            recorded = self.ws.manifest.recorded_sha256(name)
            if recorded is not None:
                self.ws.manifest.verify_file(name, recorded, "engine")
        expected = {"backend": self.backend.name, "weights_sha256": self.graph_weights(graph)}
        if expected_sha:
            expected["onnx_sha256"] = expected_sha
        metadata = verify_metadata(engine, expected)   # StaleArtifactError: built from another graph
        stale = self.backend.stale_reason(engine, graph)
        if stale:
            raise StaleArtifactError(f"{engine}: {stale}, the graph its sidecar and the manifest name; rebuild it "
                                     f"with `python -m shiva_export engine --backend {self.name} --out "
                                     f"{self.ws.root}`")
        self._verified[engine] = metadata.engine_sha256
        return engine

    def _bucket_engine(self, bucket: int) -> Path:
        graph = self.graphs[bucket] if bucket in self.graphs else self.graph_path(bucket)
        engine = self._bucket_engine_path(bucket)
        if not engine.is_file():
            raise ArtifactError(f"{engine}: no {self.name} engine for {graph.file}; build it with "
                                f"`python -m shiva_export build --backend {self.name} --out {self.ws.root}`")
        return self._verify(engine, self.graph_path(bucket), graph.sha256)

    def _optional_engine(self, stem: str, graph: Path, expected_sha: str | None) -> Path | None:
        engine = self._beside(stem)
        return self._verify(engine, graph, expected_sha) if engine.is_file() else None

    def runner(self, bucket: int):
        return self.backend.make_runner(self._bucket_engine(bucket), name=f"{self.name}:b{bucket}",
                                        **self.runner_kwargs)

    def _debug_engine(self, bucket: int) -> Path | None:
        if not self.has_debug_graph(bucket):
            return None
        return self._optional_engine(Path(graph_file(bucket, debug=True)).stem, self.graph_path(bucket, debug=True),
                                     self.graphs[bucket].debug_sha256)

    def index_runner(self, bucket: int):
        engine = self._debug_engine(bucket)
        if engine is not None:
            return self.backend.make_runner(engine, name=f"{self.name}:b{bucket}.debug", **self.runner_kwargs)
        if self.name == "ort" and self.has_debug_graph(bucket):
            # An ORT "engine" is the ONNX graph itself: its debug twin in the same provider is the same engine
            # with the index outputs kept.
            from shiva_export.engines.backends.ort import OrtRunner, SessionFromOnnxPath

            kwargs = {k: v for k, v in self.runner_kwargs.items()
                      if k in ("provider", "weights", "provider_options", "intra_op_num_threads")}
            loader = SessionFromOnnxPath(self.graph_path(bucket, debug=True), **kwargs)
            return OrtRunner(loader, name=f"{self.name}:b{bucket}.debug")
        return None

    def index_note(self, bucket: int) -> str | None:
        if self.index_runner(bucket) is not None:
            return None
        return (f"the {self.name} engine is built from b{bucket}.onnx, which has no index outputs; build one from "
                f"b{bucket}.debug.onnx (as b{bucket}.debug{self.backend.engine_suffix} beside it) to measure token "
                f"agreement on {self.name}")

    def _dense_engine(self) -> Path | None:
        dense = self.ws.manifest.require(ExportRecord).dense
        if dense is None:
            return None
        return self._optional_engine(Path(dense.file).stem, self.dense_graph_path(), dense.sha256)

    def dense_runner(self):
        engine = self._dense_engine()
        return None if engine is None else self.backend.make_runner(engine, name=f"{self.name}:dense",
                                                                    **self.runner_kwargs)

    def dense_note(self) -> str | None:
        if self._dense_engine() is not None:
            return None
        return (f"no {self.name} engine for dense.onnx beside the bucket engines "
                f"({self._beside('dense').relative_to(self.ws.root)}); build one to bench {self.name}")

    def identity(self) -> dict[str, str]:
        for bucket in self.graphs:
            self._bucket_engine(bucket)
            self._debug_engine(bucket)
        self._dense_engine()
        files = {entry.path: entry.sha256 for entry in self.ws.manifest.require(ExportRecord).files}
        for engine, sha in self._verified.items():
            files[engine.relative_to(self.ws.root).as_posix()] = sha
        return files


def get_engine_set(name: str, ws, device: str = "cpu", **kwargs: Any) -> EngineSet:
    """The engine set `name` (see the module docstring) of artifact folder `ws`; device "cuda" runs the ONNX Runtime
    sets (`onnxruntime`, `ort`) on its CUDA execution provider."""
    name = engine_set_name(name)
    if name == "onnxruntime" and device == "cuda":
        name = "onnxruntime-cuda"
    if name == "ort" and device == "cuda":
        kwargs.setdefault("provider", "cuda")
    if name == "onnxruntime":
        return OnnxGraphs(ws, "cpu", **kwargs)
    if name == "onnxruntime-cuda":
        return OnnxGraphs(ws, "cuda", **kwargs)
    if name in BACKEND_NAMES:
        return BuiltEngines(ws, name, **kwargs)
    raise ConfigError(f"unknown backend {name!r}; expected one of {', '.join(ENGINE_SET_NAMES)} (or ort-cpu)")


_DISTRIBUTIONS = ("shiva_export", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "polygraphy",
                  "diffusers", "numpy", "tensorrt", "tensorrt-rtx", "tensorrt-rtx-cu13")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose numbers check and bench report (read from package metadata, so
    no optional runtime is imported here)."""
    versions = {}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions

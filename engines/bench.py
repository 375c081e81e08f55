"""Bench: dense vs pruned on the same backend, side by side in one run, beside the FLOP-bound speedup.

For every backend (a "target": ONNX Runtime on the exported graphs; on a GPU also PyTorch eager, a CUDA-graph
capture of the static-mode model, and ONNX Runtime CUDA) the dense graph and every bucket graph get the same
seeded inputs and are timed **interleaved** (dense, b0, b1, dense, b0, b1, ...) after a warm-up, so load drift on a
shared machine hits both alike. Then the whole loop: the schedule's steps, each on its bucket's engine, against
the dense graph for all steps. Statistics per row: mean / P50 / P95 / P99 in ms. The measured speedup is the ratio
of P50s (robust to stragglers); the FLOP-bound speedup is dense FLOPs / pruned FLOPs from the schedule
(`shiva_export.flops`: routers included, element-wise work excluded), i.e. what perfect scaling would give.
The PyTorch targets are made by the caller's `torch_target` (`shiva_export.torch_bench`): this module runs no
PyTorch model.

Clocks: `time.perf_counter` around synchronous calls on the CPU; on the GPU the same wall clock between device
synchronizations, so work on any stream counts (ORT CUDA runs with IO binding on preallocated device buffers, as
one CUDA graph per session where the graph allows). Per-step rows go on past `runs` until `min_seconds` of samples
are taken, and the loop's P50 is compared with the sum of its steps' P50s (a warning beyond 15%).
"""

from __future__ import annotations

__all__ = ["BENCH_JSON", "BENCH_MD", "BenchConfig", "BenchReport", "BenchRow", "Speedup", "Timing", "render_markdown",
           "run_bench"]

import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from shiva_export.engines.backends.names import TENSORRT_BACKENDS
from shiva_export.errors import ArtifactError, BackendUnavailableError, ConfigError
from shiva_export.records import BENCH_JSON, BENCH_MD, BENCH_SCHEMA, BenchRecord, ExportRecord

logger = logging.getLogger(__name__)

LOOP_AGREEMENT = 0.15   # a loop P50 further than this from the sum of its steps' P50s is reported


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How the bench runs (P2). Per-step rows take `runs` timed calls, loop rows `loop_runs` whole loops."""

    warmup: int = 3
    runs: int = 20
    loop_runs: int = 3
    seed: int = 0
    # per-step rows: warm-up and timed rounds go on past `warmup` / `runs` until each phase has lasted this long, so
    # a fast graph gets enough samples for a stable P50 and a GPU has left its first-call and clock-ramp behaviour
    min_seconds: float = 1.0

    def __post_init__(self) -> None:
        for name in ("warmup", "runs", "loop_runs", "seed"):
            value = getattr(self, name)
            minimum = 1 if name in ("runs", "loop_runs") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be an integer >= {minimum}")
        value = self.min_seconds
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 600:
            raise ConfigError(f"--min-seconds {value!r} must be a number in [0, 600]")

    def to_json(self) -> dict:
        return {"schema": 1, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Timing:
    runs: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> "Timing":
        ordered = sorted(samples_ms)

        def pct(p: float) -> float:   # nearest rank
            return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

        return cls(runs=len(ordered), mean_ms=statistics.fmean(ordered), p50_ms=pct(50), p95_ms=pct(95),
                   p99_ms=pct(99), min_ms=ordered[0], max_ms=ordered[-1])


@dataclasses.dataclass(frozen=True)
class BenchRow:
    backend: str
    variant: str        # "dense" | "pruned"
    scope: str          # "bucket 0", ..., "loop"
    steps: int          # transformer calls per timed run
    flops: int          # per timed run
    clock: str          # "perf_counter" | "cuda_sync" (wall clock between device synchronizations)
    timing: Timing
    device: str = "cpu"  # where the backend computes: "cpu" | "cuda"

    def to_json(self) -> dict:
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "timing"},
                **dataclasses.asdict(self.timing)}


@dataclasses.dataclass(frozen=True)
class Speedup:
    backend: str
    scope: str
    dense_p50_ms: float
    pruned_p50_ms: float
    measured: float       # dense P50 / pruned P50
    flop_bound: float     # dense FLOPs / pruned FLOPs

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "efficiency": self.measured / self.flop_bound}


@dataclasses.dataclass(frozen=True)
class BenchReport:
    device: dict[str, Any]
    versions: dict[str, str]
    config: BenchConfig
    artifact: dict[str, Any]        # model, dtype, shapes, steps, buckets
    rows: tuple[BenchRow, ...]
    speedups: tuple[Speedup, ...]
    skipped: tuple[dict, ...]       # {"backend": ..., "reason": ...}

    reused: bool = False            # loaded from a fresh bench.json instead of measured

    def to_json(self) -> dict:
        return {"schema": BENCH_SCHEMA, "device": self.device, "versions": self.versions,
                "config": self.config.to_json(), "artifact": self.artifact, "rows": [r.to_json() for r in self.rows],
                "speedups": [s.to_json() for s in self.speedups], "skipped": list(self.skipped)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "BenchReport":
        if data.get("schema") != BENCH_SCHEMA:
            raise ArtifactError(f"bench report schema {data.get('schema')!r} is not {BENCH_SCHEMA!r}; re-run bench")
        timing_fields = [f.name for f in dataclasses.fields(Timing)]
        rows = tuple(BenchRow(r["backend"], r["variant"], r["scope"], r["steps"], r["flops"], r["clock"],
                              Timing(**{k: r[k] for k in timing_fields}), r.get("device", "cpu"))
                     for r in data["rows"])
        speedups = tuple(Speedup(**{k: v for k, v in s.items() if k != "efficiency"}) for s in data["speedups"])
        config = BenchConfig(**{k: v for k, v in data["config"].items() if k != "schema"})
        return cls(device=dict(data["device"]), versions=dict(data["versions"]), config=config,
                   artifact=dict(data["artifact"]), rows=rows, speedups=speedups,
                   skipped=tuple(data["skipped"]), reused=True)


# --------------------------------------------------------------------------------------------------- device
def device_facts() -> dict[str, Any]:
    """The machine the numbers belong to: GPU name (torch) or CPU model (/proc/cpuinfo)."""
    import torch

    facts: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                             "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(kind="cuda", name=props.name, compute_capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        facts.update(kind="cpu", name=facts["cpu"])
    return facts


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------------- targets
class _Target:
    """One backend's callables: step(key) for key in ("dense", 0, 1, ...), each on pre-bound inputs."""

    name: str
    clock: str = "perf_counter"
    device: str = "cpu"

    def prepare(self, key, feed: Mapping[str, np.ndarray]) -> Callable[[], None]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def timer(self) -> Callable[[Callable[[], None]], float]:
        def measure(fn: Callable[[], None]) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return measure


class _CudaEvents:
    """GPU timing: the device is synchronized before and after the call and the wall clock read between, so work on
    any stream counts (ONNX Runtime may not run on torch's current stream; events on that stream would then time
    only the launches). Costs tens of microseconds against steps of milliseconds."""

    def timer(self):
        import torch

        def measure(fn: Callable[[], None]) -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - start) * 1e3

        return measure


class _RunnerTarget(_Target):
    """Polygraphy runners of an engine set (ORT CPU sessions, built engines): infer() on numpy feeds."""

    def __init__(self, engines, keys: Sequence):
        self.name, self.engines, self.device = engines.name, engines, engines.device
        self.runners: dict = {}
        for key in keys:
            runner = engines.dense_runner() if key == "dense" else engines.runner(key)
            if runner is None:
                raise BackendUnavailableError(engines.dense_note() or f"{engines.name}: no runner for {key}")
            self.runners[key] = runner
        self.active = []
        for runner in self.runners.values():
            runner.activate()
            self.active.append(runner)

    def prepare(self, key, feed):
        runner = self.runners[key]
        runner.infer(dict(feed))   # checked once; timed calls skip the checks
        return lambda: runner.infer(feed, check_inputs=False)

    def close(self):
        for runner in self.active:
            runner.deactivate()


class _OrtCudaTarget(_CudaEvents, _Target):
    """ORT CUDA EP with IO binding on torch-allocated device buffers: each bucket session captured as one ORT CUDA
    graph (`enable_cuda_graph`) where the graph allows, else run on torch's current stream."""

    clock = "cuda_sync"
    device = "cuda"

    def __init__(self, ws, keys: Sequence, cuda_graph: bool = True):
        import torch

        from shiva_export.engines.runners import OnnxGraphs

        self.name = "onnxruntime-cuda-graph" if cuda_graph else "onnxruntime-cuda"
        stream = torch.cuda.current_stream().cuda_stream
        options = ({"enable_cuda_graph": "1"} if cuda_graph else
                   {"user_compute_stream": str(stream), "has_user_compute_stream": "1"})
        engines = OnnxGraphs(ws, "cuda", provider_options=options, share_weights=False)
        self.inner = _RunnerTarget(engines, keys)
        self.keep: list = []

    def prepare(self, key, feed):
        import torch

        runner = self.inner.runners[key]
        session = runner.sess
        binding = session.io_binding()
        for name, array in feed.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            self.keep.append(tensor)
            binding.bind_input(name, "cuda", 0, array.dtype, list(array.shape), tensor.data_ptr())
        for output in session.get_outputs():
            dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                     "tensor(int64)": np.int64}.get(output.type)
            if dtype is None:
                binding.bind_output(output.name, "cuda")
                continue
            tensor = torch.empty(output.shape, dtype=getattr(torch, np.dtype(dtype).name), device="cuda")
            self.keep.append(tensor)
            binding.bind_output(output.name, "cuda", 0, dtype, list(output.shape), tensor.data_ptr())
        session.run_with_iobinding(binding)   # with enable_cuda_graph: the capture (a first run precedes it)
        session.run_with_iobinding(binding)
        return lambda: session.run_with_iobinding(binding)

    def close(self):
        self.inner.close()


# --------------------------------------------------------------------------------------------------- timing
def _feeds(ws, schedule, cfg, seed: int) -> list[dict[str, np.ndarray]]:
    """One seeded feed per step (graph dtypes) with the step's timestep."""
    from shiva_export.engines.trajectory import _numpy_dtype

    rng = np.random.default_rng(seed)
    dtype = _numpy_dtype(cfg.dtype)
    shapes = cfg.input_shapes(ws.manifest.require(ExportRecord).transformer_config)   # the recorded config: no model
    base = {name: rng.standard_normal(shape).astype(np.float32).astype(dtype)
            for name, shape in shapes.items() if name != "timestep"}
    return [{**base, "timestep": np.full((cfg.batch,), t, dtype=np.float32)} for t in schedule.timesteps]


def _time_target(target: _Target, schedule, feeds, config: BenchConfig, dense_flops: int, loop_dense_flops: int
                 ) -> list[BenchRow]:
    measure = target.timer()
    buckets = [b.index for b in schedule.buckets]
    keys = ["dense", *buckets]
    first = {b.index: b.steps[0] for b in schedule.buckets}
    calls = {key: target.prepare(key, feeds[first.get(key, 0)]) for key in keys}
    samples: dict = {key: [] for key in keys}
    for phase, rounds in (("warmup", config.warmup), ("timed", config.runs)):
        spent, done = 0.0, 0
        while done < rounds or spent < config.min_seconds * 1e3:
            for key in keys:                           # interleaved: drift hits dense and pruned alike
                elapsed = measure(calls[key])
                spent += elapsed
                if phase == "timed":
                    samples[key].append(elapsed)
            done += 1
            if done >= 100 * max(rounds, 1):           # a phase of very fast graphs still ends
                break

    # The loop: each step on its bucket's engine (dense: the dense graph every step). The inputs stay those of the
    # bucket's first step: values do not change the work of a static graph.
    loop_fns = {"dense": [calls["dense"]] * schedule.num_steps,
                "pruned": [calls[schedule.step_to_bucket[s]] for s in range(schedule.num_steps)]}
    loops: dict = {"dense": [], "pruned": []}
    for run in range(1 + config.loop_runs):            # one warm-up loop
        for variant, fns in loop_fns.items():
            elapsed = measure(lambda fns=fns: [fn() for fn in fns])
            if run >= 1:
                loops[variant].append(elapsed)

    name, clock, device = target.name, target.clock, target.device
    for variant, fns in loop_fns.items():              # the loop and the per-step rows must tell one story
        steps = [("dense" if variant == "dense" else schedule.step_to_bucket[i]) for i in range(schedule.num_steps)]
        expected = sum(statistics.median(samples[key]) for key in steps)
        got = statistics.median(loops[variant])
        if abs(got / expected - 1) > LOOP_AGREEMENT:
            logger.warning("bench: %s %s loop P50 %.1f ms differs by %+.0f%% from the sum of its steps' P50s "
                           "(%.1f ms); the per-step rows may not be representative", name, variant, got,
                           100 * (got / expected - 1), expected)
    rows = [BenchRow(name, "dense", "step", 1, dense_flops, clock, Timing.of(samples["dense"]), device)]
    for bucket in schedule.buckets:
        rows.append(BenchRow(name, "pruned", f"bucket {bucket.index}", 1, bucket.flops_per_step, clock,
                             Timing.of(samples[bucket.index]), device))
    rows.append(BenchRow(name, "dense", "loop", schedule.num_steps, loop_dense_flops, clock,
                         Timing.of(loops["dense"]), device))
    rows.append(BenchRow(name, "pruned", "loop", schedule.num_steps, schedule.summary.realised_flops_total, clock,
                         Timing.of(loops["pruned"]), device))
    return rows


def _speedups(rows: Sequence[BenchRow]) -> list[Speedup]:
    out = []
    by = {(r.backend, r.variant, r.scope): r for r in rows}
    for row in rows:
        if row.variant != "pruned":
            continue
        dense = by[(row.backend, "dense", "loop" if row.scope == "loop" else "step")]
        out.append(Speedup(row.backend, row.scope, dense.timing.p50_ms, row.timing.p50_ms,
                           dense.timing.p50_ms / row.timing.p50_ms, dense.flops / row.flops))
    return out


def _speed_options(name: str) -> dict:
    """ORT sessions time faster with their own prepacked weights than with one shared copy (prepacking off):
    measured on tiny-sd35, ORT 1.32 CPU: dense -6%, pruned -15%. Memory is not what the bench measures."""
    if name in ("onnxruntime", "ort-cpu", "onnxruntime-cuda"):
        return {"share_weights": False}
    if name == "ort":
        return {"weights": None}
    return {}


TORCH_TARGETS = ("torch-cudagraph", "torch-eager")
ORT_CUDA_TARGETS = ("onnxruntime-cuda-graph", "onnxruntime-cuda")


def default_targets(device: str) -> list[str]:
    """What bench times by default: on a GPU, the PyTorch static model as a CUDA graph and eager, and the ONNX
    graphs on ORT's CUDA EP as a CUDA graph (falling back to plain CUDA EP runs where a graph cannot be captured);
    on the CPU, the ONNX graphs on ORT's CPU provider."""
    return [*TORCH_TARGETS, ORT_CUDA_TARGETS[0]] if device == "cuda" else ["onnxruntime"]


# The PyTorch targets' maker: (ws, schedule, ExportConfig, name in TORCH_TARGETS) -> a _Target on the GPU.
TorchTargetFn = Callable[[Any, Any, Any, str], _Target]


def _targets(ws, schedule, cfg, backends: Sequence[str] | None, device: str,
             torch_target: TorchTargetFn | None = None) -> list[tuple[str, Callable[[], _Target]]]:
    """(name, lazy maker) per target: the named ones, or the default set for the device."""
    from shiva_export.engines.runners import get_engine_set

    keys = ["dense", *[b.index for b in schedule.buckets]]
    makers = []
    for name in (backends or default_targets(device)):
        if name in TORCH_TARGETS:
            if device != "cuda":
                raise BackendUnavailableError(f"bench target {name} runs on a CUDA GPU; this run's device is {device}")
            makers.append((name, lambda name=name: _torch_target(torch_target, ws, schedule, cfg, name)))
        elif name in ORT_CUDA_TARGETS or (name == "onnxruntime" and device == "cuda"):
            graph = name != ORT_CUDA_TARGETS[1]
            makers.append((name, lambda graph=graph: _OrtCudaTarget(ws, keys, graph)))
        else:
            makers.append((name, lambda name=name: _RunnerTarget(
                get_engine_set(name, ws, device=device, **_speed_options(name)), keys)))
    return makers


def _torch_target(torch_target: TorchTargetFn | None, ws, schedule, cfg, name: str) -> _Target:
    if torch_target is None:
        raise BackendUnavailableError(f"bench target {name} times the PyTorch model, and this run was given no "
                                      "maker for it (run_bench's torch_target)")
    return torch_target(ws, schedule, cfg, name)


def run_bench(ws, config: BenchConfig | None = None, backends: Sequence[str] | None = None, *,
              runs: int | None = None, force: bool = False, device: str | None = None,
              torch_target: TorchTargetFn | None = None) -> BenchReport:
    """Time dense vs pruned per bucket and for the whole loop on every available backend; write bench.json/.md.

    Args:
        config: warm-up, runs, loop runs, seed (default `BenchConfig()`); `runs` overrides config.runs.
        backends: engine set names (`engines.runners`) or torch-cudagraph / torch-eager / onnxruntime-cuda-graph /
            onnxruntime-cuda; default: `default_targets(device)`.
        force: measure again even if bench.json is fresh (same graphs, device, config and backends).
        device: "cpu" | "cuda" (default: the CUDA GPU if torch sees one and ONNX Runtime has its CUDA provider).
        torch_target: (ws, schedule, export config, name) -> target, the maker of the PyTorch targets
            (`shiva_export.torch_bench.torch_target`); called only for torch-cudagraph / torch-eager. Without it
            those targets are unavailable (skipped from the defaults, refused when named).

    A backend that cannot run here (no CUDA EP) is recorded in `skipped` with its reason; a named one raises.
    """
    from shiva_export.engines.backends.base import compute_device
    from shiva_export.engines.runners import library_versions
    from shiva_export.engines.trajectory import export_config
    from shiva_export.io import sha256_json, write_bytes, write_json

    device = compute_device(device, onnxruntime=True)
    from shiva_export.engines.backends.names import engine_set_name
    from shiva_export.pipeline import runnable_reason

    for name in backends or ():  # refused before any session is built
        short = engine_set_name(name)
        if short in TENSORRT_BACKENDS and runnable_reason(short) is not None:
            raise BackendUnavailableError(f"bench --backend {name}: its engines cannot run here "
                                          f"({runnable_reason(short)})")
    config = config or BenchConfig()
    if runs is not None:
        config = dataclasses.replace(config, runs=runs)
    schedule = ws.schedule()
    cfg = export_config(ws)
    graphs = ws.bucket_graphs()
    dense = ws.manifest.require(ExportRecord).dense
    if dense is None:
        raise ConfigError(f"{ws.root}: the export has no dense.onnx baseline; re-export with this version")
    inputs = sha256_json({"graphs": [g.sha256 for g in graphs], "dense": dense.sha256,
                          "config": config.to_json(), "device": device_facts(), "run_on": device,
                          "backends": list(backends or []),
                          "versions": library_versions()})
    if not force and ws.manifest.is_fresh(BenchRecord, inputs):
        logger.info("bench: bench.json is up to date for these graphs, device and settings, reused (--force re-runs)")
        return BenchReport.from_json(json.loads(ws.path(BENCH_JSON).read_text()))
    feeds = _feeds(ws, schedule, cfg, config.seed)
    dense_flops = schedule.summary.dense_flops_per_step
    rows: list[BenchRow] = []
    skipped: list[dict] = []
    for name, make in _targets(ws, schedule, cfg, backends, device, torch_target):
        try:
            target = make()
        except BackendUnavailableError as err:
            if backends:
                raise
            skipped.append({"backend": name, "reason": str(err)})
            logger.info("bench: %s skipped: %s", name, err)
            continue
        try:
            logger.info("bench: %s (>= %d warm-up + >= %d runs per step and >= %g s each, %d loops)", target.name,
                        config.warmup, config.runs, config.min_seconds, config.loop_runs)
            rows += _time_target(target, schedule, feeds, config, dense_flops, schedule.summary.dense_flops_total)
        except Exception as err:  # noqa: BLE001 - ORT refuses a CUDA graph with nodes off the CUDA EP at capture
            if target.name != ORT_CUDA_TARGETS[0]:
                raise
            reason = " ".join(str(err).split())[:300]
            logger.warning("bench: ORT could not capture the graphs as CUDA graphs (%s); timing CUDA EP runs", reason)
            skipped.append({"backend": target.name, "reason": reason})
            target.close()
            target = _OrtCudaTarget(ws, ["dense", *[b.index for b in schedule.buckets]], cuda_graph=False)
            rows += _time_target(target, schedule, feeds, config, dense_flops, schedule.summary.dense_flops_total)
        finally:
            target.close()
    report = BenchReport(
        device=device_facts(), versions=library_versions(), config=config,
        artifact={"model": ws.config.model, "dtype": cfg.dtype, "height": cfg.height, "width": cfg.width,
                  "batch": cfg.batch, "context_tokens": cfg.context_tokens, "num_tokens": schedule.num_tokens,
                  "steps": schedule.num_steps, "step_to_bucket": list(schedule.step_to_bucket),
                  "buckets": [{"bucket": b.index, "k": list(b.k), "steps": list(b.steps),
                               "flops_per_step": b.flops_per_step} for b in schedule.buckets],
                  "dense_flops_per_step": dense_flops,
                  "realised_flop_ratio": schedule.summary.realised_flop_ratio},
        rows=tuple(rows), speedups=tuple(_speedups(rows)), skipped=tuple(skipped))
    data = report.to_json()
    with ws.manifest.writing():
        write_json(ws.path(BENCH_JSON), data)
        with_md = write_bytes(ws.path(BENCH_MD), render_markdown(data).encode())
        ws.manifest.set_stage(BenchRecord(files=(ws.manifest.file_record(ws.path(BENCH_JSON)),
                                                 ws.manifest.file_record(with_md)),
                                          config=config.to_json(), device=report.device.get("name"),
                                          backends=tuple(sorted({r.backend for r in rows})),
                                          speedups={f"{s.backend}/{s.scope}": round(s.measured, 4)
                                                    for s in report.speedups}), inputs)
        ws.manifest.save()
    return report


# --------------------------------------------------------------------------------------------------- report
def _gflops(flops: int) -> str:
    return f"{flops / 1e9:.2f}"


def render_markdown(data: Mapping[str, Any]) -> str:
    """bench.md, rendered from bench.json's content."""
    device, art, cfg = data["device"], data["artifact"], data["config"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(data["versions"].items()))
    lines = [
        f"# Bench: {art['model']} {art['dtype']}, {art['height']}x{art['width']} px, batch {art['batch']}, "
        f"{art['context_tokens']} context tokens, N={art['num_tokens']}",
        "",
        (f"Device: **{device['name']}** (compute capability {device['compute_capability']}, CUDA {device['cuda']}); "
         f"CPU: {device['cpu']} ({device['cpu_count']} CPUs)" if device.get("kind") == "cuda"
         else f"Device: **{device['name']}** ({device['cpu_count']} CPUs)"),
        f"Versions: {versions}",
        f"Runs: at least {cfg['warmup']} warm-up + {cfg['runs']} timed calls per step row (dense and buckets "
        f"interleaved; each phase goes on until it has lasted {cfg.get('min_seconds', 0):g} s), "
        f"1 warm-up + {cfg['loop_runs']} timed loops of {art['steps']} steps. Times in ms. ONNX Runtime sessions "
        "load their own (prepacked) weights.",
        "",
        "| backend | on | variant | scope | steps | GFLOPs | mean | P50 | P95 | P99 | runs | clock |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['backend']} | {r.get('device', 'cpu')} | {r['variant']} | {r['scope']} | {r['steps']} | "
                     f"{_gflops(r['flops'])} | {r['mean_ms']:.2f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['runs']} | {r['clock']} |")
    lines += ["", "Speedup of pruned over dense (P50 / P50) beside the FLOP bound (dense FLOPs / pruned FLOPs):", "",
              "| backend | scope | dense P50 | pruned P50 | measured | FLOP-bound | measured / bound |",
              "|---|---|---|---|---|---|---|"]
    for s in data["speedups"]:
        lines.append(f"| {s['backend']} | {s['scope']} | {s['dense_p50_ms']:.2f} | {s['pruned_p50_ms']:.2f} | "
                     f"{s['measured']:.3f}x | {s['flop_bound']:.3f}x | {s['efficiency']:.2f} |")
    buckets = "; ".join(f"bucket {b['bucket']}: steps {b['steps'][0]}-{b['steps'][-1]}, k={b['k']}"
                        for b in art["buckets"])
    lines += ["", f"Schedule: {art['steps']} steps; {buckets}; realised FLOPs {art['realised_flop_ratio']:.3f} of dense."]
    for s in data["skipped"]:
        lines.append(f"Skipped {s['backend']}: {s['reason']}")
    return "\n".join(lines) + "\n"

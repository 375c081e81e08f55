"""`bench`: dense vs pruned side by side on one backend, with the FLOP-bound speedup beside the measured one."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from shiva_export.cli import EXIT_BAD_INPUT, EXIT_OK, main
from shiva_export.engines.bench import Timing, device_facts


@pytest.fixture(scope="module")
def benched(tiny_artifact, tmp_path_factory):
    """One short bench on a copy of the tiny artifact -> (folder, exit code, stdout)."""
    root = Path(shutil.copytree(tiny_artifact, tmp_path_factory.mktemp("benched") / "artifact"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", "--out", str(root), "--warmup", "1", "--runs", "3", "--loop-runs", "1",
                     "--min-seconds", "0"])
    return root, code, out.getvalue()


def test_bench_writes_dense_and_pruned_rows_and_a_flop_bound_speedup(benched):
    root, code, out = benched
    assert code == EXIT_OK
    data = json.loads((root / "bench.json").read_text())
    schedule = json.loads((root / "schedule.json").read_text())
    rows = {(r["backend"], r["variant"], r["scope"]): r for r in data["rows"]}
    assert set(rows) == {("onnxruntime", "dense", "step"), ("onnxruntime", "pruned", "bucket 0"),
                         ("onnxruntime", "pruned", "bucket 1"), ("onnxruntime", "dense", "loop"),
                         ("onnxruntime", "pruned", "loop")}
    for row in rows.values():
        assert row["runs"] == (1 if row["scope"] == "loop" else 3) and row["clock"] == "perf_counter"
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
    dense_flops = schedule["summary"]["dense_flops_per_step"]
    assert rows["onnxruntime", "dense", "loop"]["flops"] == dense_flops * 6
    speedups = {s["scope"]: s for s in data["speedups"]}
    assert set(speedups) == {"bucket 0", "bucket 1", "loop"}
    for bucket in schedule["buckets"]:
        assert speedups[f"bucket {bucket['index']}"]["flop_bound"] == pytest.approx(dense_flops / bucket["flops_per_step"])
    assert speedups["loop"]["flop_bound"] == pytest.approx(1 / schedule["summary"]["realised_flop_ratio"])
    assert speedups["loop"]["flop_bound"] > 1 and speedups["loop"]["measured"] > 0


def test_bench_names_the_device_and_library_versions_and_renders_markdown(benched):
    root, _, out = benched
    data = json.loads((root / "bench.json").read_text())
    assert data["device"]["name"] == device_facts()["name"] and data["device"]["kind"] in ("cpu", "cuda")
    assert {"onnxruntime", "torch", "numpy"} <= set(data["versions"])
    markdown = (root / "bench.md").read_text()
    assert f"Device: **{data['device']['name']}**" in markdown
    assert "| onnxruntime | loop |" in markdown and "| onnxruntime | cpu | pruned | bucket 1 |" in markdown
    assert "FLOP-bound" in markdown and markdown in out


def test_bench_stage_is_recorded_in_the_manifest(benched):
    root, _, _ = benched
    record = json.loads((root / "manifest.json").read_text())["stages"]["bench"]
    assert {entry["path"] for entry in record["files"]} == {"bench.json", "bench.md"}
    assert record["backends"] == ["onnxruntime"] and set(record["speedups"]) == {
        "onnxruntime/bucket 0", "onnxruntime/bucket 1", "onnxruntime/loop"}


def test_bench_rejects_zero_runs_with_exit_2(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--runs", "0"]) == EXIT_BAD_INPUT
    assert "--runs 0 must be an integer >= 1" in capsys.readouterr().err


def test_timing_percentiles_use_nearest_rank():
    timing = Timing.of([float(v) for v in range(1, 101)])
    assert (timing.mean_ms, timing.p50_ms, timing.p95_ms, timing.p99_ms) == (50.5, 50.0, 95.0, 99.0)
    assert (timing.min_ms, timing.max_ms, timing.runs) == (1.0, 100.0, 100)


def test_bench_is_reused_when_graphs_device_and_settings_are_unchanged(benched, capsys):
    root, _, _ = benched
    before = json.loads((root / "manifest.json").read_text())["stages"]["bench"]["finished"]
    assert main(["bench", "--out", str(root), "--warmup", "1", "--runs", "3", "--loop-runs", "1",
                 "--min-seconds", "0"]) == EXIT_OK
    assert "reused: same graphs, device and settings" in capsys.readouterr().out
    assert json.loads((root / "manifest.json").read_text())["stages"]["bench"]["finished"] == before


def test_per_step_rows_run_until_min_seconds_have_passed(artifact_copy):
    from shiva_export.engines.bench import BenchConfig, run_bench
    from shiva_export.pipeline import Workspace

    report = run_bench(Workspace(artifact_copy), BenchConfig(warmup=0, runs=1, loop_runs=1, min_seconds=0.5),
                       device="cpu")
    steps = [row for row in report.rows if row.scope != "loop"]
    for row in steps:   # interleaved rounds: every step row has the same count, and together they took >= 0.5 s
        assert row.timing.runs == steps[0].timing.runs > 1
    assert sum(row.timing.mean_ms * row.timing.runs for row in steps) >= 500


def test_default_targets_follow_the_device():
    from shiva_export.engines.bench import default_targets

    assert default_targets("cpu") == ["onnxruntime"]
    assert default_targets("cuda") == ["torch-cudagraph", "torch-eager", "onnxruntime-cuda-graph"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("verb", ["bench", "check"])
def test_device_cuda_without_a_gpu_is_refused_in_one_line_before_any_work(verb, artifact_copy, capsys):
    before = (artifact_copy / "manifest.json").read_bytes()
    assert main([verb, "--out", str(artifact_copy), "--device", "cuda"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device cuda: torch sees no CUDA GPU on this machine; use --device cpu"]
    assert (artifact_copy / "manifest.json").read_bytes() == before


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_default_device_is_the_gpu_only_where_onnx_runtime_can_use_it_too(caplog):
    """The CPU onnxruntime package on a GPU machine: check, bench, build and generate default to the CPU (with a
    note) instead of failing at their first ORT session; a stage without ONNX Runtime still takes the GPU."""
    import onnxruntime

    from shiva_export.engines.backends.base import compute_device

    assert compute_device(None) == "cuda"
    with caplog.at_level("WARNING"):
        device = compute_device(None, onnxruntime=True)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert device == "cuda" and not caplog.records
    else:
        assert device == "cpu"
        assert "install onnxruntime-gpu" in caplog.text and "CUDAExecutionProvider" in caplog.text
    assert compute_device("cuda", onnxruntime=True) == "cuda"   # asked for: honoured (the ORT session refuses)


def test_the_pytorch_targets_are_the_callers_and_engines_runs_no_pytorch_model(artifact_copy):
    """torch-cudagraph / torch-eager time the PyTorch model: run_bench gets their maker from its caller (the bench
    verb and the pipeline pass `shiva_export.torch_bench.torch_target`); without one they are unavailable."""
    from shiva_export.engines.bench import TORCH_TARGETS, _targets
    from shiva_export.engines.trajectory import export_config
    from shiva_export.errors import BackendUnavailableError, ConfigError
    from shiva_export.pipeline import Workspace
    from shiva_export.torch_bench import TorchTarget, torch_target

    ws = Workspace(artifact_copy, write=False)
    schedule, cfg = ws.schedule(), export_config(ws)
    for name, make in _targets(ws, schedule, cfg, list(TORCH_TARGETS), "cuda"):   # makers are lazy: no GPU used
        with pytest.raises(BackendUnavailableError, match=f"{name} times the PyTorch model.*torch_target"):
            make()
    with pytest.raises(ConfigError, match="not a PyTorch target"):
        torch_target(ws, schedule, cfg, "onnxruntime")
    assert TorchTarget.device == "cuda" and TorchTarget.clock == "cuda_sync"
    engines = Path(__file__).resolve().parents[2] / "engines"
    for path in engines.rglob("*.py"):   # the modules the graphs were traced from, and graph capture of them
        text = path.read_text()
        assert not any(name in text for name in ("StaticBucket(", "DenseModel(", "torch.cuda.graph(")), path

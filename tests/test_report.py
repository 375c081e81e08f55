"""report.py: report.md / report.json / PNGs rendered from the JSON the stages wrote; missing stages are 'not run'.

The artifact folder is built by hand from the stages' own result types (a real frozen schedule, `CheckReport`,
`BenchReport`, Polygraphy RunResults), so nothing is exported or timed and the numbers are known exactly.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from shiva_export.cli import EXIT_BAD_INPUT, EXIT_OK, main
from shiva_export.errors import ArtifactError, StaleArtifactError
from shiva_export.io import write_json
from shiva_export.manifest import Manifest
from shiva_export.records import (BenchRecord, CheckRecord, EngineEntry, EngineRecord, ExportRecord, FreezeRecord,
                                  GraphConfig, GraphRecord, LintRecord, ReportRecord)
from shiva_export.report import (ERRORS_PNG, KEEP_RATIO_PNG, LATENCY_PNG, REPORT_DIR, REPORT_JSON, REPORT_MD,
                                 REPORT_SCHEMA, format_k, render_summary, write_report)

STEPS, BUCKETS, HEIGHT, WIDTH, BATCH, CONTEXT = 8, 2, 256, 256, 2, 24
BUCKET1_MAX_ABS = 3.25e-06          # distinctive numbers the report must carry over
DENSE_P50, LOOP_SPEEDUP = 12.34, 1.234
ERROR_STEP = 2.5e-05                # |engine - reference| injected into one element of bucket 0's saved outputs


def _ratios(timesteps):
    """Fig. 4b-like policy: ~0.4 kept at the noisy start rising to ~0.8 at the end; shallow layers keep more."""
    import torch

    late = 1.0 - timesteps.float()[:, None] / 1000.0
    depth = torch.arange(6, dtype=torch.float32)[None]
    ratios = (0.4 + 0.4 * late + 0.04 * (5 - depth)).clamp(0.2, 1.0)
    ratios[:, 0] = 1.0
    return ratios


def _record(manifest: Manifest, paths) -> tuple:
    return tuple(manifest.file_record(p) for p in paths)


def _write_check(root: Path, manifest: Manifest, schedule) -> None:
    from shiva_export.engines.compare import GATES, BucketResult, CheckConfig, CheckReport, Metrics
    from shiva_export.engines.trajectory import save_run_results

    results = []
    rng = np.random.default_rng(0)
    files = [root / "check.json", root / "check/repro.sh"]
    for bucket in schedule.buckets:
        folder = root / f"check/bucket{bucket.index}"
        folder.mkdir(parents=True)
        reference = [{"sample": rng.standard_normal((BATCH, 16, 4, 4)).astype(np.float32)} for _ in bucket.steps]
        outputs = [{"sample": r["sample"].copy()} for r in reference]
        if bucket.index == 0:
            outputs[0]["sample"][0, 0, 0, 0] += np.float32(ERROR_STEP)
        save_run_results(reference, "torch-static", folder / "reference.json")
        save_run_results(outputs, "onnxruntime", folder / "outputs-onnxruntime.json")
        (folder / "inputs.json").write_text("[]")
        files += [folder / "inputs.json", folder / "reference.json"]
        max_abs = BUCKET1_MAX_ABS if bucket.index == 1 else 1.5e-06
        step = Metrics(max_abs=max_abs, mean_abs=2e-07, rel_err=8e-07, cosine=0.9999999999, psnr=134.3)
        results.append(BucketResult(backend="onnxruntime", bucket=bucket.index, steps=bucket.steps, k=bucket.k,
                                    metrics=step, per_step=tuple(step for _ in bucket.steps),
                                    agreement={1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}, agreement_note=None,
                                    gate=GATES["fp32"], failures=()))
    config = CheckConfig(guidance_scale=7.0, full_trajectory=False)   # as given: the repro repeats it
    report = CheckReport(model="tiny-sd35", dtype="fp32", config=config, num_steps=STEPS,
                         buckets=tuple(results), trajectories=(), versions={"onnxruntime": "1.0"},
                         guidance={"kind": "cfg", "scale": 7.0})
    write_json(root / "check.json", report.to_json())
    (root / "check/repro.sh").write_text("#!/usr/bin/env bash\nset -euo pipefail\ncd \"$(dirname \"$0\")/..\"\n"
                                         "# bucket 0\npolygraphy run onnx/b0.debug.onnx --onnxrt --load-inputs "
                                         "check/bucket0/inputs.json --load-outputs check/bucket0/reference.json\n")
    manifest.set_stage(CheckRecord(files=_record(manifest, files), backends=("onnxruntime",), config=config.to_json(),
                                   passed=True, failures=()), "3" * 64)


def _write_bench(root: Path, manifest: Manifest, schedule) -> None:
    from shiva_export.engines.bench import BenchConfig, BenchReport, BenchRow, Speedup, Timing

    def timing(p50: float) -> Timing:
        return Timing(runs=5, mean_ms=p50, p50_ms=p50, p95_ms=p50 * 1.1, p99_ms=p50 * 1.2, min_ms=p50, max_ms=p50)

    summary = schedule.summary
    rows = [BenchRow("onnxruntime", "dense", "step", 1, summary.dense_flops_per_step, "perf_counter",
                     timing(DENSE_P50))]
    speedups = []
    for bucket in schedule.buckets:
        p50 = DENSE_P50 * bucket.flops_per_step / summary.dense_flops_per_step * 1.1
        rows.append(BenchRow("onnxruntime", "pruned", f"bucket {bucket.index}", 1, bucket.flops_per_step,
                             "perf_counter", timing(p50)))
        speedups.append(Speedup("onnxruntime", f"bucket {bucket.index}", DENSE_P50, p50, DENSE_P50 / p50,
                                summary.dense_flops_per_step / bucket.flops_per_step))
    dense_loop = DENSE_P50 * STEPS
    rows += [BenchRow("onnxruntime", "dense", "loop", STEPS, summary.dense_flops_total, "perf_counter",
                      timing(dense_loop)),
             BenchRow("onnxruntime", "pruned", "loop", STEPS, summary.realised_flops_total, "perf_counter",
                      timing(dense_loop / LOOP_SPEEDUP))]
    speedups.append(Speedup("onnxruntime", "loop", dense_loop, dense_loop / LOOP_SPEEDUP, LOOP_SPEEDUP,
                            1 / summary.realised_flop_ratio))
    report = BenchReport(device={"kind": "cpu", "name": "Test CPU", "cpu": "Test CPU", "cpu_count": 2},
                         versions={"onnxruntime": "1.0"}, config=BenchConfig(runs=5), artifact={"steps": STEPS},
                         rows=tuple(rows), speedups=tuple(speedups),
                         skipped=({"backend": "onnxruntime-cuda", "reason": "no CUDA GPU here"},))
    write_json(root / "bench.json", report.to_json())
    (root / "bench.md").write_text("bench\n")
    manifest.set_stage(BenchRecord(files=_record(manifest, [root / "bench.json", root / "bench.md"]),
                                   config=BenchConfig(runs=5).to_json(), device="Test CPU"), "4" * 64)


@pytest.fixture(scope="module")
def artifact_master(tmp_path_factory) -> Path:
    from shiva_export.models import read_preset
    from shiva_export.passes.freeze import FreezeConfig, freeze
    from shiva_export.passes.lint import Finding, LintReport, Rule, Severity

    root = tmp_path_factory.mktemp("artifact")
    schedule = freeze(_ratios, read_preset("tiny-sd35")["config"], HEIGHT, WIDTH, BATCH, CONTEXT,
                      FreezeConfig(num_steps=STEPS, align=16, max_buckets=BUCKETS))
    assert len(schedule.buckets) == BUCKETS
    manifest = Manifest(root)
    manifest.data["config"] = {"model": "tiny-sd35", "router": None, "steps": STEPS, "shift": 3.0, "buckets": BUCKETS,
                               "align": 16, "k_min": None, "height": HEIGHT, "width": WIDTH, "batch": BATCH,
                               "context_tokens": CONTEXT, "dtype": "fp32", "opset": 23, "target_keep": 0.6,
                               "align_to": "k", "row_scatter": "where"}
    schedule.save(root / "schedule.json")
    manifest.set_stage(FreezeRecord(files=_record(manifest, [root / "schedule.json"]),
                                    schedule_hash=schedule.schedule_hash,
                                    buckets=tuple(tuple(b.k) for b in schedule.buckets),
                                    summary=schedule.summary.to_json()), "0" * 64)
    graphs = tuple(GraphRecord(bucket=b.index, k=tuple(b.k), file=f"b{b.index}.onnx",
                               debug_file=f"b{b.index}.debug.onnx", sha256="0" * 64) for b in schedule.buckets)
    manifest.set_stage(ExportRecord(graphs=graphs, schedule_hash=schedule.schedule_hash,
                                    config=GraphConfig(dtype="fp32", height=HEIGHT, width=WIDTH, batch=BATCH,
                                                       context_tokens=CONTEXT)), "1" * 64)

    warning = Finding(Rule.SCATTER_DUPLICATE_INDICES, Severity.WARNING, "node_scatter_1", "indices not provably unique")
    lint = {f"b{b.index}.onnx": LintReport(f"b{b.index}.onnx", (warning,)).to_json() for b in schedule.buckets}
    write_json(root / "lint.json", lint)
    manifest.set_stage(LintRecord(files=_record(manifest, [root / "lint.json"]), errors=0, warnings=2, passed=True),
                       "2" * 64)

    engine_files, records = [], []
    for bucket in schedule.buckets:
        plan = root / f"engines/trt-rtx/b{bucket.index}.plan"
        plan.parent.mkdir(parents=True, exist_ok=True)
        plan.write_bytes(b"plan" * 100)
        meta = plan.with_name(plan.name + ".meta.json")
        write_json(meta, {"engine": plan.name, "engine_sha256": "ab" * 32, "backend": "trt-rtx",
                          "backend_version": "1.7.1.116", "precision": "fp32", "gpu_name": "cpu",
                          "compute_capability": "cpu", "build_options": {"decomposable_attention": True},
                          "created": "2026-01-01T00:00:00+00:00", "onnx_sha256": "0" * 64})
        engine_files += [plan, meta]
        records.append(EngineEntry(backend="trt-rtx", bucket=bucket.index, engine=f"engines/trt-rtx/b{bucket.index}.plan",
                                   metadata=f"engines/trt-rtx/b{bucket.index}.plan.meta.json",
                                   onnx=f"b{bucket.index}.onnx", status="built", reason="no engine yet", seconds=9.0))
    manifest.set_stage(EngineRecord(engines={"trt-rtx": tuple(records)}, files=_record(manifest, engine_files)), None)

    _write_check(root, manifest, schedule)
    _write_bench(root, manifest, schedule)
    manifest.save()
    return root


@pytest.fixture
def artifact(artifact_master, tmp_path) -> Path:
    """A private copy that a test may change (manifest paths are relative, so the copy is self-contained)."""
    return Path(shutil.copytree(artifact_master, tmp_path / "artifact"))


@pytest.fixture(scope="module")
def written(artifact_master, tmp_path_factory):
    """A copy of the artifact folder with its report written once, for the tests that only read it."""
    root = Path(shutil.copytree(artifact_master, tmp_path_factory.mktemp("written") / "artifact"))
    return root, write_report(Manifest.load(root), probe=False)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_report_md_has_every_section_and_the_numbers_of_its_json_inputs(written):
    artifact, report = written
    text = (artifact / REPORT_DIR / REPORT_MD).read_text()
    schedule = json.loads((artifact / "schedule.json").read_text())
    for heading in ("## Summary", "## Schedule", "## Lint", "## Engines", "## Check (parity with PyTorch)",
                    "## Bench (dense vs pruned)", "## Reproduction", "## Not run"):
        assert heading in text
    for bucket in schedule["buckets"]:
        assert f"k={format_k(bucket['k'])}" in text
    summary = schedule["summary"]
    keep = (f"learned {summary['learned_keep_ratio']:.3f} → aligned {summary['aligned_keep_ratio']:.3f} → "
            f"realised {summary['realised_keep_ratio']:.3f}")
    assert keep in text
    assert f"realised {summary['realised_flop_ratio']:.3f}" in text
    assert f"{BUCKET1_MAX_ABS:.2e}" in text                       # check.json metrics
    assert "| onnxruntime | b1 | 100.00% | 100.00% | 100.00% | 100.00% | 100.00% |" in text   # per-layer agreement
    assert f"{DENSE_P50:.2f}" in text and f"{LOOP_SPEEDUP:.3f}x" in text   # bench.json
    assert "onnxruntime: **pass** (2/2 buckets)" in text
    assert "polygraphy run onnx/b0.debug.onnx --onnxrt" in text  # check/repro.sh
    assert "--backend onnxruntime --seed 0 --guidance-scale 7 --no-trajectory" in text
    assert "**full-trajectory check**: check ran with --no-trajectory" in text
    assert "**bench on onnxruntime-cuda**: no CUDA GPU here" in text
    assert "`engines/trt-rtx/b1.plan`" in text and "1.7.1.116" in text
    assert "scatter-duplicate-indices x1" in text

    data = json.loads((artifact / REPORT_DIR / REPORT_JSON).read_text())
    assert data == json.loads(json.dumps(report.data)) and data["schema"] == REPORT_SCHEMA
    assert data["summary"]["keep"]["realised"] == summary["realised_keep_ratio"]
    assert [b["k"] for b in data["summary"]["buckets"]] == [b["k"] for b in schedule["buckets"]]
    assert data["summary"]["parity"]["trt-rtx"]["verdict"] == "not checked"


def test_error_distribution_is_recomputed_from_the_saved_engine_outputs(written):
    data = written[1].data
    by_bucket = {d["bucket"]: d for d in data["check"]["error_distributions"]}
    assert by_bucket[0]["quantiles"]["max"] == pytest.approx(ERROR_STEP, rel=1e-2)
    assert by_bucket[0]["zeros"] == by_bucket[0]["count"] - 1
    assert by_bucket[1]["quantiles"]["max"] == 0 and by_bucket[1]["counts"] == []
    assert "check/bucket0/outputs-onnxruntime.json" in data["inputs"]["files"]


def test_plots_are_png_images_of_nonzero_size(written):
    report = written[1]
    for name in (KEEP_RATIO_PNG, LATENCY_PNG, ERRORS_PNG):
        width, height = _png_size(report.folder / name)
        assert width > 100 and height > 100
        assert f"]({name})" in report.markdown.read_text()


def test_report_stage_is_recorded_with_its_files_and_inputs(written):
    manifest = Manifest.load(written[0])
    record = manifest.require(ReportRecord)
    assert {f.path for f in record.files} == {f"{REPORT_DIR}/{n}" for n in
                                              (REPORT_JSON, REPORT_MD, KEEP_RATIO_PNG, LATENCY_PNG, ERRORS_PNG)}
    assert record.inputs["stages"]["check"] == "3" * 64 and record.inputs_hash
    manifest.verify_files("report")


def test_missing_check_and_bench_give_not_run_lines_not_a_crash(artifact):
    manifest = Manifest.load(artifact)
    manifest.drop_stages("check", "bench")
    manifest.save()
    report = write_report(Manifest.load(artifact), probe=False)
    text = report.markdown.read_text()
    assert "_Not run: the check stage has not run on this folder._" in text
    assert "_Not run: the bench stage has not run on this folder._" in text
    assert "not run (check)" in text and "not run (bench)" in text
    assert not (report.folder / LATENCY_PNG).exists() and not (report.folder / ERRORS_PNG).exists()
    assert _png_size(report.folder / KEEP_RATIO_PNG) > (0, 0)
    summary = render_summary(Manifest.load(artifact))
    assert "parity      not run" in summary and "speedup     not run" in summary


def test_render_summary_lists_buckets_parity_speedup_and_files(written):
    artifact = written[0]
    summary = render_summary(Manifest.load(artifact))
    schedule = json.loads((artifact / "schedule.json").read_text())
    for bucket in schedule["buckets"]:
        assert f"b{bucket['index']}" in summary and format_k(bucket["k"]) in summary
    assert "onnxruntime pass (2/2 buckets)" in summary and "trt-rtx built, not checked" in summary
    assert f"onnxruntime {LOOP_SPEEDUP:.2f}x measured" in summary
    assert str(artifact.resolve()) in summary and "report/report.md" in summary


def test_missing_manifest_is_an_artifact_error_and_the_cli_exits_2(tmp_path, capsys):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        write_report(Manifest.load(tmp_path))
    assert main(["report", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "no manifest.json" in capsys.readouterr().err


def test_cli_writes_the_report_and_prints_the_summary(artifact, capsys):
    assert main(["report", "--out", str(artifact), "--no-probe"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "parity      onnxruntime pass" in out and str(artifact / REPORT_DIR / REPORT_MD) in out


def test_check_json_changed_after_check_is_refused_as_stale(artifact):
    data = json.loads((artifact / "check.json").read_text())
    data["passed"] = False
    (artifact / "check.json").write_text(json.dumps(data))
    with pytest.raises(StaleArtifactError, match="check.json: sha256 differs from the manifest"):
        write_report(Manifest.load(artifact), probe=False)


def test_failed_report_leaves_the_previous_report_folder_whole(written, tmp_path, monkeypatch):
    import shiva_export.report as report_module

    artifact = Path(shutil.copytree(written[0], tmp_path / "artifact"))
    folder = artifact / REPORT_DIR
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(data, path):
        path.write_bytes(b"half a png")
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report_module, "plot_errors", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(Manifest.load(artifact), probe=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in artifact.iterdir() if ".partial-" in p.name]


def test_probe_explains_every_backend_that_was_not_built_or_run(written):
    from shiva_export.report import ENGINE_BACKENDS, collect_report

    items = {item["what"]: item for item in collect_report(Manifest.load(written[0]), probe=True)["not_run"]}
    for backend in ("ort", "trt"):                                # built: trt-rtx only
        item = items[f"{ENGINE_BACKENDS[backend]} engines"]
        assert item["probed"] and "importable here" in item["reason"]
    assert "TensorRT-RTX engines (check)" in items and "TensorRT-RTX engines (bench)" in items


def test_a_skip_recorded_by_the_engine_stage_is_reported_without_probing(artifact):
    manifest = Manifest.load(artifact)
    manifest.data["stages"]["engine"]["skipped"] = {"trt": "tensorrt is not importable (No module named 'tensorrt')"}
    manifest.save()
    text = write_report(Manifest.load(artifact), probe=False).markdown.read_text()
    assert "- **TensorRT engines**: tensorrt is not importable (No module named 'tensorrt') — " in text

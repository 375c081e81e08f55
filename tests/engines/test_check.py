"""`check`: bucket engines vs the PyTorch static-mode model on a real trajectory; gates, files, exit codes."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shiva_export.cli import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, main
from shiva_export.engines.compare import GATES, Gate, Metrics, index_agreement
from shiva_export.export import input_names
from shiva_export.reference import capture_trajectory
from shiva_export.io import sha256_file, write_json


@pytest.fixture(scope="session")
def checked(tiny_artifact, tmp_path_factory):
    """A copy of the tiny artifact with ORT engines built by the engine stage, checked once on two engine sets:
    the exported graphs on ORT CPU (`onnxruntime`) and the built `ort` engines. -> (folder, exit code, stdout)."""
    from shiva_export import pipeline

    root = Path(shutil.copytree(tiny_artifact, tmp_path_factory.mktemp("checked") / "artifact"))
    pipeline.run_engines(pipeline.Workspace(root), "ort")
    out = io.StringIO()   # capsys is function-scoped
    with contextlib.redirect_stdout(out):
        code = main(["check", "--out", str(root), "--backend", "onnxruntime", "--backend", "ort"])
    return root, code, out.getvalue()


def _report(root: Path) -> dict:
    return json.loads((root / "check.json").read_text())


@pytest.mark.parametrize("preset, batch, scale, want", [
    ("tiny-sd35", 2, None, ("cfg", 7.0)), ("tiny-sd35", 2, 3.0, ("cfg", 3.0)), ("tiny-sd35", 1, None, ("none", 1.0)),
    ("tiny-flux", 1, None, ("embedded", 3.5)), ("tiny-flux", 1, 2.0, ("embedded", 2.0)),
    ("tiny-pixart", 2, None, ("cfg", 4.5)), ("tiny-pixart", 1, None, ("none", 1.0))])
def test_the_trajectory_guidance_is_the_familys_default_for_the_batch_unless_given(preset, batch, scale, want):
    from shiva_export.engines.trajectory import resolve_guidance
    from shiva_export.models import read_preset

    config = {"_class_name": read_preset(preset)["class_name"], **read_preset(preset)["config"]}
    guidance = resolve_guidance(config, batch, scale)
    assert (guidance.kind, guidance.scale) == want


def test_a_guidance_scale_for_a_batch_without_guidance_is_refused():
    from shiva_export.engines.trajectory import resolve_guidance
    from shiva_export.errors import ConfigError
    from shiva_export.models import read_preset

    config = {"_class_name": read_preset("tiny-sd35")["class_name"], **read_preset("tiny-sd35")["config"]}
    with pytest.raises(ConfigError, match="batch 1 without guidance"):
        resolve_guidance(config, 1, 7.0)


def rerecord_export(root: Path) -> None:
    """Record the export folder's current files in the manifest, as a buggy export that wrote wrong graphs would:
    the bookkeeping is consistent, so only the numerical check can catch the fault."""
    manifest = json.loads((root / "manifest.json").read_text())
    export = manifest["stages"]["export"]
    for entry in export["files"]:
        entry["sha256"] = sha256_file(root / entry["path"])
    for graph in export["graphs"]:
        graph["sha256"] = sha256_file(root / "onnx" / graph["file"])
        graph["debug_sha256"] = sha256_file(root / "onnx" / graph["debug_file"])
    export["dense"]["sha256"] = sha256_file(root / "onnx" / export["dense"]["file"])
    write_json(root / "manifest.json", manifest)


def perturb_float_weights(onnx_dir: Path, scale: float) -> None:
    """Multiply every fp32 weight in weights.bin by (1 + scale * n), n ~ N(0, 1) seeded; int64 tensors untouched."""
    import onnx

    model = onnx.load(str(onnx_dir / "dense.onnx"), load_external_data=False)
    data = np.fromfile(onnx_dir / "weights.bin", dtype=np.uint8)
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        info = {e.key: int(e.value) for e in tensor.external_data if e.key in ("offset", "length")}
        chunk = data[info["offset"]:info["offset"] + info["length"]].view(np.float32)
        chunk *= (1 + scale * rng.standard_normal(chunk.shape)).astype(np.float32)
    data.tofile(onnx_dir / "weights.bin")


# ------------------------------------------------------------------------------------------------ passing engines
def test_ort_cpu_passes_every_gate_on_tiny_sd35_fp32_with_full_agreement(checked):
    root, code, out = checked
    assert code == EXIT_OK, out
    report = _report(root)
    assert report["passed"] and report["failures"] == []
    ort_cpu = [b for b in report["buckets"] if b["backend"] == "onnxruntime"]
    assert [b["bucket"] for b in ort_cpu] == [0, 1]
    assert sorted(s for b in ort_cpu for s in b["steps"]) == list(range(6))
    for bucket in ort_cpu:
        assert bucket["metrics"]["max_abs"] <= 1e-4 and bucket["metrics"]["cosine"] > 0.999999
        assert set(bucket["agreement"]) == {"1", "2", "3", "4", "5"}      # every pruned layer (block 0 is dense)
        assert all(share == 1.0 for share in bucket["agreement"].values())
    assert {t["backend"]: t["passed"] for t in report["trajectories"]} == {"onnxruntime": True, "ort": True}
    assert "PASSED: every gate" in out and "| onnxruntime | full loop | 6 |" in out


def test_built_ort_engines_plug_in_by_name_and_measure_agreement_on_their_debug_twins(checked):
    root, code, _ = checked
    built = [b for b in _report(root)["buckets"] if b["backend"] == "ort"]
    assert len(built) == 2 and all(b["passed"] for b in built)
    assert all(share == 1.0 for b in built for share in b["agreement"].values())


def test_engine_set_without_index_outputs_reports_agreement_none_with_the_reason(artifact_copy):
    from shiva_export.engines.compare import CheckConfig, run_check
    from shiva_export.engines.runners import OnnxGraphs
    from shiva_export.pipeline import Workspace

    class ProductionGraphsOnly(OnnxGraphs):      # like a TensorRT engine built from bK.onnx
        def index_runner(self, bucket):
            return None

        def index_note(self, bucket):
            return f"b{bucket}.onnx has no index outputs"

    ws = Workspace(artifact_copy)
    engines = ProductionGraphsOnly(ws)
    engines.name = "no-indices"
    report = run_check(ws, backends=[engines], config=CheckConfig(full_trajectory=False), reference=capture_trajectory)
    assert report and [b.agreement for b in report.buckets] == [None, None]
    assert [b.agreement_note for b in report.buckets] == ["b0.onnx has no index outputs", "b1.onnx has no index outputs"]


def test_check_stage_is_recorded_with_graph_and_engine_hashes_and_reused_when_unchanged(checked, capsys):
    root, _, _ = checked
    record = json.loads((root / "manifest.json").read_text())["stages"]["check"]
    assert record["passed"] and record["backends"] == ["onnxruntime", "ort"] and record["inputs_hash"]
    assert {"check.json", "check/repro.sh", "check/bucket0/inputs.json", "check/bucket1/reference.json"} <= \
        {entry["path"] for entry in record["files"]}
    assert main(["check", "--out", str(root), "--backend", "onnxruntime", "--backend", "ort"]) == EXIT_OK
    assert "reused: inputs unchanged" in capsys.readouterr().out


def test_ort_cpu_passes_every_gate_on_tiny_sd3(tiny_sd3_artifact, tmp_path, capsys):
    root = Path(shutil.copytree(tiny_sd3_artifact, tmp_path / "sd3"))
    assert main(["check", "--out", str(root)]) == EXIT_OK
    out = capsys.readouterr().out
    report = _report(root)
    assert report["model"] == "tiny-sd3" and len(report["buckets"]) == 2
    # a CFG family at batch 2: the adapter's default scale, and the header says so
    assert report["guidance"] == {"kind": "cfg", "scale": 7.0} and report["config"]["guidance_scale"] is None
    assert out.splitlines()[0].endswith("seed 0, CFG scale 7")
    assert all(share == 1.0 for b in report["buckets"] for share in b["agreement"].values())


# ------------------------------------------------------------------------------------------------ Polygraphy / trtexec data
def test_inputs_json_loads_with_polygraphys_loader_as_one_feed_per_step(checked):
    from polygraphy.comparator import StreamingDataLoader
    from polygraphy.json import load_json

    root, _, _ = checked
    names = input_names(json.loads((root / "manifest.json").read_text())["stages"]["export"]["transformer_config"])
    assert names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    for bucket in _report(root)["buckets"][:2]:
        path = root / "check" / f"bucket{bucket['bucket']}" / "inputs.json"
        feeds = load_json(str(path))
        assert isinstance(feeds, list) and len(feeds) == len(bucket["steps"])
        for feed in feeds:
            assert list(feed) == names
            assert {name: a.dtype for name, a in feed.items()} == {name: np.dtype(np.float32) for name in names}
            assert feed["hidden_states"].shape == (2, 16, 32, 32) and feed["encoder_hidden_states"].shape == (2, 24, 64)
        assert len(list(StreamingDataLoader(str(path)))) == len(bucket["steps"])


def test_reference_json_loads_as_runresults_of_the_torch_static_runner(checked):
    from polygraphy.comparator import RunResults

    root, _, _ = checked
    for bucket in _report(root)["buckets"][:2]:
        results = RunResults.load(str(root / "check" / f"bucket{bucket['bucket']}" / "reference.json"))
        assert list(results.keys()) == ["torch-static"]
        iterations = results["torch-static"]
        assert len(iterations) == len(bucket["steps"])
        first = iterations[0]
        assert first["sample"].shape == (2, 16, 32, 32)
        k = bucket["k"][1]
        assert first["indices_layer1"].shape == (2, k) and first["indices_layer1"].dtype == np.int64


def test_raw_input_blobs_for_trtexec_hold_the_same_feeds(checked):
    from polygraphy.json import load_json

    root, _, _ = checked
    feeds = load_json(str(root / "check" / "bucket1" / "inputs.json"))
    for index, feed in enumerate(feeds):
        folder = root / "check" / "bucket1" / "inputs" / f"{index:010d}"
        for name, array in feed.items():
            blob = np.fromfile(folder / f"{name}.bin", dtype=array.dtype).reshape(array.shape)
            np.testing.assert_array_equal(blob, array)


def test_repro_script_has_polygraphy_and_trtexec_commands_and_its_polygraphy_line_passes(checked):
    root, _, _ = checked
    script = (root / "check" / "repro.sh").read_text()
    line = ('"$POLYGRAPHY" run onnx/b1.debug.onnx --onnxrt --load-inputs check/bucket1/inputs.json '
            "--load-outputs check/bucket1/reference.json --atol 0.0001 --rtol 0 --check-error-stat max")
    assert line in script and f"PY={sys.executable}" in script   # the polygraphy beside the Python that wrote it
    assert "trtexec --onnx=onnx/b0.onnx --stronglyTyped" in script and "--loadInputs='hidden_states':" in script
    polygraphy = Path(sys.executable).with_name("polygraphy")
    done = subprocess.run([str(polygraphy), *line.split()[1:]], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout


def swap_bucket_graphs(onnx: Path, relabel: bool) -> None:
    """Swap b0 and b1 (production and debug graphs); `relabel` also rewrites the identity each graph carries in
    its metadata_props, as an exporter that mixed up its buckets would write it."""
    import onnx as onnx_lib

    for suffix in (".onnx", ".debug.onnx"):
        paths = [onnx / f"b{bucket}{suffix}" for bucket in (0, 1)]
        identities = [list(onnx_lib.load(str(path), load_external_data=False).metadata_props) for path in paths]
        paths[0].rename(onnx / "swap")
        paths[1].rename(paths[0])
        (onnx / "swap").rename(paths[1])
        if relabel:
            for path, identity in zip(paths, identities):
                model = onnx_lib.load(str(path), load_external_data=False)
                del model.metadata_props[:]
                model.metadata_props.extend(identity)
                onnx_lib.save(model, str(path))


# ------------------------------------------------------------------------------------------------ broken engine sets
def test_swapped_bucket_graphs_fail_with_exit_1_naming_the_bucket_and_metric(artifact_copy, capsys):
    """The graphs claim the right buckets and the manifest agrees: only the numerical check can catch it."""
    swap_bucket_graphs(artifact_copy / "onnx", relabel=True)
    rerecord_export(artifact_copy)
    assert main(["check", "--out", str(artifact_copy)]) == EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert "FAILED:" in out
    for bucket in (0, 1):
        assert f"bucket {bucket}: max_abs " in out and "> 1.0e-04 (fp32 gate, onnxruntime)" in out
        assert f"bucket {bucket}: agreement layer 1 " in out
    assert "full trajectory (6 steps): max_abs" in out
    assert json.loads((artifact_copy / "manifest.json").read_text())["stages"]["check"]["passed"] is False


def test_swapped_bucket_graphs_with_their_own_identity_are_refused_with_exit_2(artifact_copy, capsys):
    """Hashes re-recorded, but each graph still says which bucket it is: refused before anything runs."""
    swap_bucket_graphs(artifact_copy / "onnx", relabel=False)
    rerecord_export(artifact_copy)
    assert main(["check", "--out", str(artifact_copy)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "names this graph for bucket 0" in err and "but the graph is bucket 1" in err
    assert len(err.strip().splitlines()) == 1


def test_perturbed_weights_fail_with_exit_1_naming_the_bucket_and_metric(artifact_copy, capsys):
    perturb_float_weights(artifact_copy / "onnx", scale=1e-3)
    rerecord_export(artifact_copy)
    assert main(["check", "--out", str(artifact_copy), "--no-trajectory"]) == EXIT_CHECK_FAILED
    failures = _report(artifact_copy)["failures"]
    assert any(f.startswith("bucket 0: max_abs ") and f.endswith("(fp32 gate, onnxruntime)") for f in failures)
    assert any(f.startswith("bucket 1: max_abs ") for f in failures)


# ------------------------------------------------------------------------------------------------ unusable input: exit 2
def test_missing_folder_exits_2(tmp_path, capsys):
    assert main(["check", "--out", str(tmp_path / "nowhere")]) == EXIT_BAD_INPUT
    assert "no manifest.json" in capsys.readouterr().err


def test_graph_changed_after_export_exits_2_as_stale(artifact_copy, capsys):
    with open(artifact_copy / "onnx" / "b1.onnx", "ab") as handle:
        handle.write(b"\0")
    assert main(["check", "--out", str(artifact_copy)]) == EXIT_BAD_INPUT
    assert "b1.onnx: sha256 differs from the manifest" in capsys.readouterr().err


def test_missing_engine_exits_2_and_says_how_to_build_it(artifact_copy, capsys):
    assert main(["check", "--out", str(artifact_copy), "--backend", "ort"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "no ort engine for b0.onnx" in err and "build --backend ort" in err


def test_engine_built_from_another_graph_exits_2_as_stale(checked, tmp_path, capsys):
    root = Path(shutil.copytree(checked[0], tmp_path / "artifact"))
    engines = root / "onnx" / "engines" / "ort"
    for name in ("b0.onnxref", "b0.onnxref.meta.json"):        # bucket 0's engine now is bucket 1's
        shutil.copy(engines / name.replace("b0", "b1"), engines / name)
    assert main(["check", "--out", str(root), "--backend", "ort", "--force"]) == EXIT_BAD_INPUT
    # refused at the first link of the chain: the engine file no longer has the sha256 the manifest recorded
    assert "b0.onnxref: sha256 differs from the manifest (stage 'engine')" in capsys.readouterr().err


def test_engine_and_sidecar_of_another_bucket_rerecorded_in_the_manifest_exit_2_as_stale(checked, tmp_path, capsys):
    root = Path(shutil.copytree(checked[0], tmp_path / "artifact"))
    engines = root / "onnx" / "engines" / "ort"
    for name in ("b0.onnxref", "b0.onnxref.meta.json"):
        shutil.copy(engines / name.replace("b0", "b1"), engines / name)
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["stages"]["engine"]["files"]:
        entry["sha256"] = sha256_file(root / entry["path"])
    write_json(root / "manifest.json", manifest)
    assert main(["check", "--out", str(root), "--backend", "ort", "--force"]) == EXIT_BAD_INPUT
    assert "engine is stale or from another export: onnx_sha256 expected" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ metrics and gates
def test_identical_outputs_have_zero_error_unit_cosine_and_infinite_psnr():
    ref = np.linspace(-2, 2, 64, dtype=np.float32).reshape(4, 16)
    metrics = Metrics.of(ref, ref.copy())
    assert (metrics.max_abs, metrics.mean_abs, metrics.rel_err, metrics.psnr) == (0, 0, 0, None)
    assert metrics.cosine == pytest.approx(1.0, abs=1e-12)


def test_metrics_follow_polygraphys_psnr_and_relative_error_definitions():
    ref = np.array([1.0, -2.0, 0.5, 2.0], dtype=np.float32)
    got = ref + np.array([0.0, 0.1, 0.0, -0.1], dtype=np.float32)
    metrics = Metrics.of(ref, got)
    assert metrics.max_abs == pytest.approx(0.1) and metrics.rel_err == pytest.approx(0.05)
    assert metrics.psnr == pytest.approx(20 * np.log10(2.0) - 10 * np.log10(0.005), abs=1e-4)


def test_agreement_compares_kept_indices_as_sets_per_row():
    ref = [np.array([[0, 1, 2, 3], [4, 5, 6, 7]])]
    assert index_agreement(ref, [np.array([[3, 2, 1, 0], [4, 5, 6, 9]])]) == pytest.approx(7 / 8)


def test_agreement_counts_tokens_kept_by_either_side():
    ref = [np.array([[0, 1, 2, 3]])]
    assert index_agreement(ref, [np.array([[0, 1, 2, 3, 4, 5, 6, 7]])]) == pytest.approx(0.5)


def test_gate_failure_names_bucket_metric_value_bound_and_backend():
    failures = GATES["fp32"].failures("bucket 1", Metrics(3.2e-2, 1e-3, 1e-2, 0.99, 40.0), {1: 1.0, 2: 0.5},
                                      backend="onnxruntime")
    assert failures == ("bucket 1: max_abs 3.2e-02 > 1.0e-04 (fp32 gate, onnxruntime)",
                        "bucket 1: agreement layer 2 50.00% < 100% (fp32 gate, onnxruntime)")
    fp16 = GATES["fp16"].failures("bucket 0", Metrics(1.0, 0.1, 0.5, 0.99, 25.0), {1: 1.0})
    assert fp16 == ("bucket 0: cosine 0.990000 < 0.9999 (fp16 gate)", "bucket 0: psnr 25.0 dB < 45 dB (fp16 gate)")


def test_fp16_agreement_floor_tolerates_one_flipped_token_per_step_only_where_k_is_small():
    gate = GATES["fp16"]
    assert gate.agreement_floor(160) == pytest.approx(1 - 1 / 160) and gate.agreement_floor(4000) == 0.999
    ok = Metrics(0.0, 0.0, 0.0, 1.0, None)
    assert gate.failures("bucket 1", ok, {4: 0.9984}, k=[256, 160, 160, 160, 160, 160]) == ()
    assert gate.failures("bucket 1", ok, {4: 0.9984}, k=[4096] + [4000] * 5) == (
        "bucket 1: agreement layer 4 99.84% < 99.9% (fp16 gate)",)
    assert GATES["fp32"].agreement_floor(160) == 1.0 and isinstance(GATES["bf16"], Gate)


def _reference_with_a_changed_selection(step: int, margin: float, tokens: int = 1, sample_offset: float = 0.0):
    """The real PyTorch reference, with `step` as a different selection would leave it: in the first pruned layer
    every row kept `tokens` other tokens than the engine will, and the reference's boundary margin there is `margin`
    (a near tie when it is tiny); `sample_offset` moves one element of that step's output, as the other token does."""
    import dataclasses

    def reference(ws, seed, guidance_scale, device):
        trajectory = capture_trajectory(ws, seed, guidance_scale, device)
        steps = list(trajectory.steps)
        record = steps[step]
        layer = min(record.margins)
        name = f"indices_layer{layer}"
        changed = record.outputs[name].copy()
        num_tokens = ws.schedule().num_tokens
        for row in changed:
            row[-tokens:] = np.setdiff1d(np.arange(num_tokens), row)[:tokens]
            row.sort()
        margins = {**record.margins, layer: np.full_like(record.margins[layer], margin)}
        sample = record.outputs["sample"].copy()
        sample.flat[0] += sample_offset
        steps[step] = dataclasses.replace(record, outputs={**record.outputs, name: changed, "sample": sample},
                                          margins=margins)
        return dataclasses.replace(trajectory, steps=tuple(steps))

    return reference


def test_the_reference_records_each_pruned_layers_boundary_margin(artifact_copy):
    from shiva_export.pipeline import Workspace

    trajectory = capture_trajectory(Workspace(artifact_copy), seed=0)
    for record in trajectory.steps:
        assert sorted(record.margins) == [1, 2, 3, 4, 5]
        for margins in record.margins.values():
            assert margins.shape == (2,) and margins[0] == margins[1]   # one CFG pair selects once for both halves
            assert np.all(np.isfinite(margins) & (margins >= 0) & (margins <= 2))


def test_boundary_margin_is_the_gap_at_k_relative_to_the_largest_score():
    import torch

    from shiva_export.patching import boundary_margin

    scores = torch.tensor([[0.5, -2.0, 0.25, 1.0], [3.0, 3.0, 1.0, 0.0]])
    assert boundary_margin(scores, 2).tolist() == pytest.approx([0.25 / 2.0, 2.0 / 3.0])
    assert boundary_margin(scores, 1).tolist() == pytest.approx([0.5 / 2.0, 0.0])
    assert boundary_margin(scores, 4).tolist() == [float("inf")] * 2


def test_a_one_token_difference_at_a_reference_tie_is_gated_by_the_near_tie_floors(artifact_copy):
    from shiva_export.engines.compare import CheckConfig, NearTie, render_report, run_check
    from shiva_export.pipeline import Workspace

    ws = Workspace(artifact_copy)
    report = run_check(ws, backends=["onnxruntime"], config=CheckConfig(full_trajectory=False),
                       reference=_reference_with_a_changed_selection(step=1, margin=1e-6))
    assert report, report.failures
    bucket = next(b for b in report.buckets if 1 in b.steps)
    assert bucket.near_ties == (NearTie(step=1, layer=1, margin=pytest.approx(1e-6)),)
    assert bucket.agreement[1] < 1.0 and all(share == 1.0 for layer, share in bucket.agreement.items() if layer != 1)
    assert all(not b.near_ties for b in report.buckets if b is not bucket)
    data = json.loads((artifact_copy / "check.json").read_text())
    assert "1 near-tie step (1)" in render_report(data)
    ties = [t for b in data["buckets"] for t in b["near_ties"]]
    assert ties == [{"step": 1, "layer": 1, "margin": pytest.approx(1e-6)}]
    from shiva_export.report import write_report

    write_report(ws.manifest, probe=False)
    assert "| onnxruntime | b0 | 1 | 1 | 1.0e-06 | cosine >= 0.9999, PSNR >= 45 dB |" in (
        artifact_copy / "report" / "report.md").read_text()


@pytest.mark.parametrize("margin, tokens", [(1e-2, 1), (1e-6, 2)])
def test_a_difference_that_is_no_near_tie_still_fails_the_fp32_gate(artifact_copy, margin, tokens):
    from shiva_export.engines.compare import CheckConfig, run_check
    from shiva_export.pipeline import Workspace

    report = run_check(Workspace(artifact_copy), backends=["onnxruntime"], config=CheckConfig(full_trajectory=False),
                       reference=_reference_with_a_changed_selection(step=1, margin=margin, tokens=tokens))
    assert not report and all(not b.near_ties for b in report.buckets)
    assert any("agreement layer 1 " in f and "< 100% (fp32 gate, onnxruntime)" in f for f in report.failures)


def offset_debug_sample(root: Path, offset: float) -> None:
    """Add `offset` to the `sample` output of every debug twin (b*.debug.onnx), and re-record the export: twins that
    no longer compute what their production graphs do, as two builds that chose differently would."""
    import onnx as onnx_lib
    from onnx import helper

    for path in sorted((root / "onnx").glob("b*.debug.onnx")):
        model = onnx_lib.load(str(path), load_external_data=False)
        graph = model.graph
        for node in graph.node:
            node.output[:] = ["sample_raw" if name == "sample" else name for name in node.output]
        dtype = next(o for o in graph.output if o.name == "sample").type.tensor_type.elem_type
        graph.initializer.append(helper.make_tensor("sample_offset", dtype, [], [offset]))
        graph.node.append(helper.make_node("Add", ["sample_raw", "sample_offset"], ["sample"], name="offset_sample"))
        onnx_lib.save(model, str(path))
    rerecord_export(root)


@pytest.mark.parametrize("twin_offset", [0.0, 1e-2])
def test_a_near_tie_waives_an_engine_only_when_it_equals_the_debug_twin_that_showed_the_tie(artifact_copy,
                                                                                            twin_offset):
    """The reference's step 1 kept another token at a tie, which moved its output by 0.05: the engine's output
    differs from it. The waiver holds while the engine equals its debug twin (whose indices showed the tie), and
    fails once the twin computes something else (a separate build of the same graph that chose differently)."""
    from shiva_export.engines.compare import CheckConfig, run_check
    from shiva_export.pipeline import Workspace

    if twin_offset:
        offset_debug_sample(artifact_copy, twin_offset)
    report = run_check(Workspace(artifact_copy), backends=["onnxruntime"], config=CheckConfig(full_trajectory=False),
                       reference=_reference_with_a_changed_selection(step=1, margin=1e-6, sample_offset=0.05))
    bucket = next(b for b in report.buckets if 1 in b.steps)
    assert [t.step for t in bucket.near_ties] == [1]
    if not twin_offset:
        assert report, report.failures
    else:
        assert not report and len(report.failures) == 1
        assert report.failures[0].startswith(f"bucket {bucket.bucket} step 1 (near tie in layer 1, margin 1.0e-06): "
                                             "output is 1.0e-02 (max abs) from its debug twin's")
        assert "and 5.0e-02 from the reference's; either must be <= 1.0e-04 (fp32 gate" in report.failures[0]


def _reference_whose_loop_ends_elsewhere(step: int, margin: float):
    """`_reference_with_a_changed_selection`, and final latents 2e-3 away in one element: a loop that fails the fp32
    trajectory gate's max abs (1e-3) but not the near-tie floors, as a near tie early in a loop leaves it."""
    import dataclasses

    changed = _reference_with_a_changed_selection(step, margin)

    def reference(ws, seed, guidance_scale, device):
        trajectory = changed(ws, seed, guidance_scale, device)
        final = trajectory.final_latents.copy()
        final.flat[0] += 2e-3
        return dataclasses.replace(trajectory, final_latents=final)

    return reference


@pytest.mark.parametrize("margin", [1e-6, 1e-2])
def test_a_loop_is_gated_by_the_near_tie_floors_only_when_its_first_different_selection_is_a_near_tie(
        artifact_copy, margin):
    from shiva_export.engines.compare import CheckConfig, NearTie, run_check
    from shiva_export.pipeline import Workspace

    report = run_check(Workspace(artifact_copy), backends=["onnxruntime"], config=CheckConfig(),
                       reference=_reference_whose_loop_ends_elsewhere(step=2, margin=margin))
    (loop,) = report.trajectories
    assert loop.metrics.max_abs == pytest.approx(2e-3, rel=0.05)
    if margin < 1e-4:
        assert report and loop.near_tie == NearTie(step=2, layer=1, margin=pytest.approx(margin))
        assert _report(artifact_copy)["trajectories"][0]["near_tie"] == {"step": 2, "layer": 1,
                                                                         "margin": pytest.approx(margin)}
    else:
        assert not report and loop.near_tie is None
        assert any(f.startswith("full trajectory (6 steps): max_abs 2.0e-03 > 1.0e-03") for f in loop.failures)


def test_a_loop_near_tie_seen_on_twins_that_compute_otherwise_does_not_waive_the_loop(artifact_copy):
    from shiva_export.engines.compare import CheckConfig, run_check
    from shiva_export.pipeline import Workspace

    offset_debug_sample(artifact_copy, 1e-2)
    report = run_check(Workspace(artifact_copy), backends=["onnxruntime"], config=CheckConfig(),
                       reference=_reference_whose_loop_ends_elsewhere(step=2, margin=1e-6))
    (loop,) = report.trajectories
    assert not loop and loop.near_tie is not None and loop.near_tie.step == 2
    assert len(loop.failures) == 1 and "(max abs) from its debug twin's" in loop.failures[0]
    assert "and 2.0e-03 from the reference's; either must be <= 1.0e-03" in loop.failures[0]


def test_a_near_tie_is_judged_per_row_at_that_rows_first_different_layer():
    from shiva_export.engines.compare import NearTie, near_tie_of
    from shiva_export.engines.trajectory import StepRecord

    ref = {"indices_layer1": np.array([[0, 1, 2], [0, 1, 2]]), "indices_layer2": np.array([[0, 1, 2], [0, 1, 2]])}

    def record(margins):
        return StepRecord(step=4, bucket=0, timestep=0.5, feed={}, outputs=ref,
                          margins={layer: np.array(m, dtype=np.float32) for layer, m in margins.items()})

    # row 0 differs first in layer 1 (later layers see other inputs), row 1 first in layer 2
    got = {"indices_layer1": np.array([[0, 1, 3], [0, 1, 2]]), "indices_layer2": np.array([[5, 6, 7], [0, 1, 4]])}
    layers = [1, 2]
    tie = near_tie_of(record({1: [1e-6, 0.3], 2: [0.3, 2e-6]}), got, layers, 1e-4)
    assert tie == NearTie(4, 1, pytest.approx(2e-6))
    assert near_tie_of(record({1: [1e-6, 0.3], 2: [0.3, 0.3]}), got, layers, 1e-4) is None   # row 1: no tie
    assert near_tie_of(record({1: [0.3, 0.3], 2: [1e-6, 1e-6]}), got, layers, 1e-4) is None   # row 0: no tie
    two = {**got, "indices_layer1": np.array([[0, 3, 4], [0, 1, 2]])}                          # two tokens at once
    assert near_tie_of(record({1: [1e-6, 1e-6], 2: [1e-6, 1e-6]}), two, layers, 1e-4) is None
    assert near_tie_of(record({1: [1e-6, 1e-6], 2: [1e-6, 1e-6]}), ref, layers, 1e-4) is None  # the same selection
    assert near_tie_of(record({}), got, layers, 1e-4) is None                                    # no margins recorded

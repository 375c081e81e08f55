"""Static-graph lint: each purpose-made bad graph fails with its rule; legal graphs pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shiva_export.errors import ArtifactError
from shiva_export.passes.lint import Rule, Severity, format_report, lint_model
from shiva_export.passes.topk import split_large_topk
from tests.passes.graphs import (
    attention_model,
    const,
    model,
    row_prune_model,
    tensor,
    topk_model,
)

REPO = Path(__file__).resolve().parents[2]


def error_rules(report) -> set[Rule]:
    return {f.rule for f in report.errors}


def symbolic_batch_model() -> onnx.ModelProto:
    return model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                 [tensor("x", TensorProto.FLOAT, ["batch", 16])],
                 [tensor("y", TensorProto.FLOAT, ["batch", 16])])


def nonzero_model() -> onnx.ModelProto:
    return model([helper.make_node("NonZero", ["x"], ["where"], name="mask_to_index")],
                 [tensor("x", TensorProto.FLOAT, [2, 3])],
                 [tensor("where", TensorProto.INT64, None)])


def expanded_gather_model(batch=2, n=16, dim=4, k=6) -> onnx.ModelProto:
    """torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, D)): the index D15 forbids."""
    nodes = [
        helper.make_node("TopK", ["scores", "k"], ["v", "top"], name="select", axis=-1),
        helper.make_node("Unsqueeze", ["top", "last"], ["top3"], name="top3"),
        helper.make_node("Expand", ["top3", "index_shape"], ["index"], name="expand_index"),
        helper.make_node("GatherElements", ["x", "index"], ["kept"], name="gather_kept", axis=1),
    ]
    return model(nodes, [tensor("x", TensorProto.FLOAT, [batch, n, dim]),
                         tensor("scores", TensorProto.FLOAT, [batch, n])],
                 [tensor("kept", TensorProto.FLOAT, [batch, k, dim])],
                 [const("k", np.array([k], np.int64)), const("last", np.array([-1], np.int64)),
                  const("index_shape", np.array([batch, k, dim], np.int64))])


def scatter_of(index_source: str, extra_nodes=(), extra_inputs=()) -> onnx.ModelProto:
    """scores [1,64] with the positions in `index_source` overwritten by zeros."""
    nodes = list(extra_nodes) + [
        helper.make_node("Shape", [index_source], ["index_shape"], name="index_shape"),
        helper.make_node("ConstantOfShape", ["index_shape"], ["zeros"], name="zeros",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("ScatterElements", ["scores", index_source, "zeros"], ["out"],
                         name="drop_tokens", axis=1),
    ]
    return model(nodes, [tensor("scores", TensorProto.FLOAT, [1, 64]), *extra_inputs],
                 [tensor("out", TensorProto.FLOAT, [1, 64])],
                 [const("k", np.array([40], np.int64)), const("k2", np.array([8], np.int64))])


def test_clean_static_row_prune_graph_passes_with_no_findings():
    report = lint_model(row_prune_model())
    assert report, format_report(report)
    assert report.findings == ()


def test_symbolic_dim_fails_with_dynamic_dim_naming_the_input():
    report = lint_model(symbolic_batch_model())
    assert not report
    assert error_rules(report) == {Rule.DYNAMIC_DIM}
    assert any("graph input 'x'" in f.message and "'batch'" in f.message for f in report.errors)


def test_nonzero_fails_with_data_dependent_shape_naming_the_node():
    report = lint_model(nonzero_model())
    assert Rule.DATA_DEPENDENT_SHAPE in error_rules(report)
    assert any(f.node == "mask_to_index" and "NonZero" in f.message for f in report.errors)


def test_op_whose_shape_inference_cannot_determine_output_is_data_dependent():
    custom = model([helper.make_node("Mystery", ["x"], ["y"], name="custom", domain="com.acme")],
                   [tensor("x", TensorProto.FLOAT, [2, 3])], [tensor("y", TensorProto.FLOAT, None)])
    custom.opset_import.append(helper.make_opsetid("com.acme", 1))
    report = lint_model(custom)
    assert any(f.rule is Rule.DATA_DEPENDENT_SHAPE and f.node == "custom" for f in report.errors)


def test_topk_k_4000_fails_with_topk_k_and_passes_after_split():
    report = lint_model(topk_model(1, 4096, 4000))
    assert error_rules(report) == {Rule.TOPK_K}
    assert report.errors[0].node == "select_tokens" and "4000" in report.errors[0].message
    assert lint_model(split_large_topk(topk_model(1, 4096, 4000))).findings == ()


def test_topk_with_runtime_k_fails_with_topk_k():
    graph = model([helper.make_node("TopK", ["scores", "k"], ["v", "i"], name="dyn_topk")],
                  [tensor("scores", TensorProto.FLOAT, [1, 64]), tensor("k", TensorProto.INT64, [1])],
                  [tensor("v", TensorProto.FLOAT, None), tensor("i", TensorProto.INT64, None)])
    report = lint_model(graph)
    assert any(f.rule is Rule.TOPK_K and "run time" in f.message for f in report.errors)


def test_expanded_gather_elements_fails_with_expanded_index():
    report = lint_model(expanded_gather_model())
    assert error_rules(report) == {Rule.EXPANDED_INDEX}
    assert report.errors[0].node == "gather_kept" and "rank 3" in report.errors[0].message


def test_scatter_nd_with_reduction_add_fails_with_scatter_reduction():
    report = lint_model(row_prune_model(reduction="add"))
    assert error_rules(report) == {Rule.SCATTER_REDUCTION}
    assert report.errors[0].node == "scatter_rows"


def test_scatter_with_indices_from_an_input_is_a_duplicate_warning_not_an_error():
    report = lint_model(scatter_of("idx", extra_inputs=[tensor("idx", TensorProto.INT64, [1, 8])]))
    assert report  # warnings keep the graph usable
    assert [(f.rule, f.severity) for f in report.findings] == [
        (Rule.SCATTER_DUPLICATE_INDICES, Severity.WARNING)]


def test_scatter_with_peeled_topk_indices_is_unique_but_two_unrelated_topk_are_not():
    peeled = split_large_topk(scatter_of("idx", extra_nodes=[
        helper.make_node("TopK", ["scores", "k"], ["v", "idx"], name="select", axis=1)]), max_k=16)
    assert lint_model(peeled, max_topk=16).findings == ()

    unrelated = scatter_of("idx", extra_nodes=[
        helper.make_node("TopK", ["scores", "k2"], ["v1", "i1"], name="a", axis=1),
        helper.make_node("TopK", ["scores", "k2"], ["v2", "i2"], name="b", axis=1),
        helper.make_node("Concat", ["i1", "i2"], ["idx"], name="cat", axis=1),
    ])
    assert {f.rule for f in lint_model(unrelated).findings} == {Rule.SCATTER_DUPLICATE_INDICES}


def compaction_model(*, dropped_term="complement", dropped_offset=None, updates="range",
                     mask_indices="top", batch=2, n=16, k=6) -> onnx.ModelProto:
    """ascending_compaction as torch.onnx emits it: mask = ScatterElements(zeros, TopK, ones);
    destination = Where(mask, CumSum(mask) - 1, k + CumSum(1 - mask) - 1) (scatter 'place');
    order = ScatterElements(zeros, destination, updates)[:, :k], then used as scatter indices
    ('drop_tokens'). The keywords build near-misses of that construction."""
    def c(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.asarray(value), name))

    term = {"complement": "not_mask", "mask": "mask"}[dropped_term]
    update_nodes = {
        # arange(N).expand(B, N), unfolded (Range -> Expand) and folded (a constant)
        "range": [helper.make_node("Range", ["zero", "n", "one"], ["arange"]),
                  helper.make_node("Expand", ["arange", "full_shape"], ["updates"])],
        "const": [c("updates", np.broadcast_to(np.arange(n), (batch, n)).copy())],
        # distinct along the batch axis only: rows of equal values
        "batch_range": [helper.make_node("Range", ["zero", "b", "one"], ["arange"]),
                        helper.make_node("Unsqueeze", ["arange", "one_axis"], ["arange_col"]),
                        helper.make_node("Expand", ["arange_col", "full_shape"], ["updates"])],
    }[updates]
    nodes = [
        c("zero", np.array(0, np.int64)), c("one", np.array(1, np.int64)),
        c("n", np.array(n, np.int64)), c("b", np.array(batch, np.int64)),
        c("kk", np.array(k if dropped_offset is None else dropped_offset, np.int64)),
        c("k1", np.array([k], np.int64)), c("zero1", np.array([0], np.int64)),
        c("one_axis", np.array([1], np.int64)), c("full_shape", np.array([batch, n], np.int64)),
        c("zeros", np.zeros((batch, n), np.int64)), c("ones", np.ones((batch, k), np.int64)),
        c("zero_rows", np.zeros((batch, k), np.float32)),
        helper.make_node("TopK", ["scores", "k1"], ["v", "top"], name="select", axis=-1),
        helper.make_node("ScatterElements", ["zeros", mask_indices, "ones"], ["mask"],
                         name="keep_mask", axis=1),
        helper.make_node("CumSum", ["mask", "one"], ["kept_cum"]),
        helper.make_node("Sub", ["kept_cum", "one"], ["kept_slot"]),
        helper.make_node("Sub", ["one", "mask"], ["not_mask"]),
        helper.make_node("CumSum", [term, "one"], ["dropped_cum"]),
        helper.make_node("Add", ["dropped_cum", "kk"], ["dropped_k"]),
        helper.make_node("Sub", ["dropped_k", "one"], ["dropped_slot"]),
        helper.make_node("Cast", ["mask"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("Where", ["keep", "kept_slot", "dropped_slot"], ["destination"]),
        *update_nodes,
        helper.make_node("ScatterElements", ["zeros", "destination", "updates"], ["order_all"],
                         name="place", axis=1),
        helper.make_node("Slice", ["order_all", "zero1", "k1", "one_axis"], ["order"]),
        helper.make_node("ScatterElements", ["scores", "order", "zero_rows"], ["out"],
                         name="drop_tokens", axis=1),
    ]
    return model(nodes, [tensor("scores", TensorProto.FLOAT, [batch, n]),
                         tensor("free_idx", TensorProto.INT64, [batch, k])],
                 [tensor("out", TensorProto.FLOAT, [batch, n])])


def duplicate_warnings(graph: onnx.ModelProto) -> set[str]:
    report = lint_model(graph)
    assert report.rules() <= {Rule.SCATTER_DUPLICATE_INDICES}, format_report(report)
    return {f.node for f in report.findings}


@pytest.mark.parametrize("updates", ["range", "const"])
def test_ascending_compaction_permutation_scatter_is_unique(updates):
    assert duplicate_warnings(compaction_model(updates=updates)) == set()


def test_ascending_compaction_matches_the_torch_export_semantics():
    """The hand-built graph is the construction: its order is TopK's picks, ascending."""
    ort = pytest.importorskip("onnxruntime")
    graph = compaction_model()
    graph.graph.output.append(tensor("order", TensorProto.INT64, [2, 6]))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    scores = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    order = session.run(["order"], {"scores": scores, "free_idx": np.zeros((2, 6), np.int64)})[0]
    np.testing.assert_array_equal(order, np.sort(np.argsort(-scores, axis=1)[:, :6], axis=1))


@pytest.mark.parametrize("near_miss, flagged", [
    # both branches count the kept tokens: not complementary, slots collide
    (dict(dropped_term="mask"), {"place", "drop_tokens"}),
    # dropped tokens start at k + 1: slot k is never written, N is out of range
    (dict(dropped_offset=7), {"place", "drop_tokens"}),
    # the mask's ones come from arbitrary (possibly repeated) indices: k per row is unproven
    (dict(mask_indices="free_idx"), {"keep_mask", "place", "drop_tokens"}),
    # updates unique along the batch axis only: the permuted rows repeat one value
    (dict(updates="batch_range"), {"drop_tokens"}),
])
def test_near_misses_of_the_compaction_still_warn(near_miss, flagged):
    assert duplicate_warnings(compaction_model(**near_miss)) == flagged


@pytest.mark.parametrize("second, warns", [("top", False), ("free_idx", True)])
def test_rows_stacked_along_the_batch_axis_keep_their_uniqueness(second, warns):
    """One selection shared by both CFG halves: torch.cat([half, half], dim=0)."""
    graph = model([
        helper.make_node("TopK", ["half_scores", "k"], ["v", "top"], name="select", axis=-1),
        helper.make_node("Concat", ["top", second], ["idx"], name="halves", axis=0),
        helper.make_node("ScatterElements", ["scores", "idx", "zero_rows"], ["out"],
                         name="drop_tokens", axis=1),
    ], [tensor("half_scores", TensorProto.FLOAT, [1, 16]),
        tensor("scores", TensorProto.FLOAT, [2, 16]),
        tensor("free_idx", TensorProto.INT64, [1, 6])],
       [tensor("out", TensorProto.FLOAT, [2, 16])],
       [const("k", np.array([6], np.int64)), const("zero_rows", np.zeros((2, 6), np.float32))])
    assert duplicate_warnings(graph) == ({"drop_tokens"} if warns else set())


def test_softmax_outside_attention_pattern_warns_and_fusible_attention_does_not():
    assert lint_model(attention_model(fusible=True)).findings == ()
    report = lint_model(attention_model(fusible=False))
    assert report and [f.rule for f in report.warnings] == [Rule.UNFUSED_ATTENTION]


def test_inconsistent_shapes_fail_with_shape_inference():
    bad = model([helper.make_node("Add", ["x", "w"], ["y"], name="add")],
                [tensor("x", TensorProto.FLOAT, [2, 3]), tensor("w", TensorProto.FLOAT, [4])],
                [tensor("y", TensorProto.FLOAT, None)])
    assert Rule.SHAPE_INFERENCE in error_rules(lint_model(bad))


def test_path_with_external_data_is_linted_from_the_file(tmp_path):
    path = tmp_path / "big.onnx"
    onnx.save(topk_model(1, 4096, 4000), path, save_as_external_data=True,
              all_tensors_to_one_file=True, location="big.onnx.data", size_threshold=0)
    report = lint_model(path)  # K itself lives in the external data file
    assert error_rules(report) == {Rule.TOPK_K} and report.model == str(path)


def test_missing_or_non_onnx_path_raises_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        lint_model(tmp_path / "absent.onnx")
    (tmp_path / "notes.onnx").write_text("not a model\n")
    with pytest.raises(ArtifactError, match="not .*ONNX model"):
        lint_model(tmp_path / "notes.onnx")


# --- CLI: python -m shiva_export lint ------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shiva_export", "lint", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_exit_codes_are_0_clean_1_errors_2_unusable(tmp_path):
    clean, bad, text = tmp_path / "clean.onnx", tmp_path / "bad.onnx", tmp_path / "text.onnx"
    onnx.save(row_prune_model(), clean)
    onnx.save(topk_model(1, 4096, 4000), bad)
    text.write_text("hello")

    result = run_cli(str(clean))
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout

    result = run_cli(str(bad), "--json")
    assert result.returncode == 1, result.stderr
    payload = json.loads(result.stdout)
    assert payload["clean"] is False and payload["findings"][0]["rule"] == "topk-k"

    # Missing files take the same ArtifactError path (tested above without a subprocess).
    result = run_cli(str(text))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(text) in result.stderr

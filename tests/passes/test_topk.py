"""SplitLargeTopKPass: exact against the original TopK and numpy's stable order, and legal for TensorRT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto

from shiva_export.errors import StaticGraphError
from shiva_export.passes.topk import SplitLargeTopKPass, require_max_topk, split_large_topk
from tests.passes.graphs import stable_topk_reference, topk_model


def run(model: onnx.ModelProto, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    values, indices = session.run(["values", "indices"], {"scores": scores})
    return values, indices


def tied_scores(shape, dtype, seed=0, levels=300) -> np.ndarray:
    """Few distinct levels, so most scores are tied and the tie rule decides the order."""
    return np.random.default_rng(seed).integers(0, levels, size=shape).astype(dtype)


def topk_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "TopK"]


def k_of(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    return int(onnx.numpy_helper.to_array(inits[node.input[1]])[0])


@pytest.mark.parametrize(
    "batch, n, k, dtype",
    [(2, 16384, 8192, np.float32), (2, 4096, 3891, np.float32), (2, 4096, 3891, np.float16)],
)
def test_split_topk_matches_original_and_stable_sort_with_ties(batch, n, k, dtype):
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    original = topk_model(batch, n, k, elem_type=elem)
    split = split_large_topk(original)
    onnx.checker.check_model(split, full_check=True)
    scores = tied_scores((batch, n), dtype)
    scores[:, ::7] = scores[:, :1]  # a long run of ties with the first score of each row

    want_values, want_indices = stable_topk_reference(scores, k)
    got_values, got_indices = run(split, scores)
    ort_values, ort_indices = run(original, scores)

    np.testing.assert_array_equal(got_indices, want_indices)
    np.testing.assert_array_equal(got_values, want_values)
    np.testing.assert_array_equal(got_indices, ort_indices)
    np.testing.assert_array_equal(got_values, ort_values)


def test_every_remaining_topk_has_k_at_most_max_k_and_is_sorted():
    split = split_large_topk(topk_model(2, 16384, 8192))
    nodes = topk_nodes(split)
    assert [k_of(split, n) for n in nodes] == [2731, 2731, 2730]
    assert all(onnx.helper.get_node_attr_value(n, "sorted") == 1 for n in nodes)
    assert "k" not in {t.name for t in split.graph.initializer}  # the old K=8192 is gone


def test_full_sort_k_equals_n_is_exact():
    split = split_large_topk(topk_model(1, 5000, 5000))
    scores = tied_scores((1, 5000), np.float32, seed=1, levels=50)
    np.testing.assert_array_equal(run(split, scores)[1], stable_topk_reference(scores, 5000)[1])


@pytest.mark.parametrize("largest", [1, 0])
@pytest.mark.parametrize("axis, rank3", [(-1, False), (0, False), (1, True), (-1, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_peeling_is_exact_for_any_axis_direction_and_dtype(axis, rank3, largest, dtype):
    # max_k=5 forces many rounds on a small graph, so every axis/direction stays cheap.
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    original = topk_model(3, 23, 17, axis=axis, largest=largest, elem_type=elem, rank3=rank3)
    split = split_large_topk(original, max_k=5)
    assert max(k_of(split, n) for n in topk_nodes(split)) <= 5
    shape = [d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim]
    for seed in range(3):
        scores = tied_scores(shape, dtype, seed=seed, levels=6)
        want_values, want_indices = stable_topk_reference(scores, 17, axis, bool(largest))
        got_values, got_indices = run(split, scores)
        np.testing.assert_array_equal(got_indices, want_indices)
        np.testing.assert_array_equal(got_values, want_values)


def test_graph_output_names_are_kept():
    split = split_large_topk(topk_model(1, 64, 40), max_k=16)
    assert [o.name for o in split.graph.output] == ["values", "indices"]


def test_small_k_is_left_untouched_and_reported_unmodified():
    ir_model = ir.serde.deserialize_model(topk_model(2, 4096, 3840))
    result = SplitLargeTopKPass()(ir_model)
    assert not result.modified
    assert [n.op_type for n in ir_model.graph] == ["TopK"]


def test_ensures_names_the_topk_it_cannot_split():
    # Integer scores cannot be masked with -inf, so the pass must refuse, naming the node.
    ir_model = ir.serde.deserialize_model(topk_model(1, 64, 40, elem_type=TensorProto.INT32))
    with pytest.raises(ir.passes.PostconditionError) as info:
        SplitLargeTopKPass(max_k=16)(ir_model)
    assert isinstance(info.value.__cause__, StaticGraphError)
    assert "'select_tokens' (K=40" in str(info.value.__cause__)
    with pytest.raises(StaticGraphError, match="select_tokens"):
        split_large_topk(topk_model(1, 64, 40, elem_type=TensorProto.INT32), max_k=16)


def test_require_max_topk_accepts_k_at_the_limit():
    require_max_topk(ir.serde.deserialize_model(topk_model(1, 4096, 3840)))


# --- TensorRT-RTX: its builder is the judge of "TensorRT accepts it" -----------------------


def build_with_tensorrt_rtx(model: onnx.ModelProto) -> tuple[bytes | None, list[str]]:
    """Parse and build `model` with TensorRT-RTX on CPU (AOT build, strongly typed).

    The only place in the tests that imports tensorrt_rtx (P8). Returns the serialized engine
    (None when parsing or building failed) and every message TensorRT logged.
    """
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")

    class Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(msg)

    logger = Capture()
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        return None, logger.messages + [str(parser.get_error(i)) for i in range(parser.num_errors)]
    engine = builder.build_serialized_network(network, builder.create_builder_config())
    return (None if engine is None else bytes(engine)), logger.messages


def test_tensorrt_rtx_rejects_k_above_3840_and_builds_the_split_graph():
    original = topk_model(1, 4096, 3891)
    engine, messages = build_with_tensorrt_rtx(original)
    assert engine is None
    assert any("3840" in m for m in messages), messages

    engine, messages = build_with_tensorrt_rtx(split_large_topk(original))
    assert engine, messages


def test_tensorrt_rtx_builds_the_split_fp16_graph_at_16384_tokens():
    engine, messages = build_with_tensorrt_rtx(
        split_large_topk(topk_model(2, 16384, 8192, elem_type=TensorProto.FLOAT16)))
    assert engine, messages

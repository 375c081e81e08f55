"""optimize_model / optimize_path: onnxscript's optimizer + strict shapes; files appear whole."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from shiva_export.errors import ArtifactError, StaticGraphError
from shiva_export.passes.cleanup import optimize_model, optimize_path
from tests.passes.graphs import const, model, tensor


def foldable_model() -> onnx.ModelProto:
    """y = (x + w1) * (a * b) + w2 with w1 == w2 (dedupe), a * b constant (fold), a dead Relu."""
    weights = np.arange(256, dtype=np.float32).reshape(4, 64) / 7  # 1 KiB: external if asked
    nodes = [
        helper.make_node("Mul", ["a", "b"], ["ab"], name="fold_me"),
        helper.make_node("Add", ["x", "w1"], ["h"], name="add1"),
        helper.make_node("Mul", ["h", "ab"], ["h2"], name="scale"),
        helper.make_node("Add", ["h2", "w2"], ["y"], name="add2"),
        helper.make_node("Relu", ["x"], ["unused"], name="dead"),
    ]
    return model(nodes, [tensor("x", TensorProto.FLOAT, [4, 64])],
                 [tensor("y", TensorProto.FLOAT, [4, 64])],
                 [const("a", np.array(2.0, np.float32)), const("b", np.array(3.0, np.float32)),
                  const("w1", weights), const("w2", weights.copy())])


def run(proto_or_path, x: np.ndarray) -> np.ndarray:
    source = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) \
        else str(proto_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


X = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)


def assert_fully_static(proto: onnx.ModelProto) -> None:
    for value in [*proto.graph.value_info, *proto.graph.output]:
        tensor_type = value.type.tensor_type
        assert tensor_type.HasField("shape"), value
        assert all(d.HasField("dim_value") for d in tensor_type.shape.dim), value


def test_optimize_model_folds_dedupes_prunes_and_annotates_static_shapes():
    original = foldable_model()
    optimized = optimize_model(original)
    ops = [n.op_type for n in optimized.graph.node]
    assert "Relu" not in ops and ops.count("Mul") == 1  # dead node gone, a*b folded
    weights = [t for t in optimized.graph.initializer if list(t.dims) == [4, 64]]
    assert len(weights) == 1  # w1 == w2 deduplicated
    assert {v.name for v in optimized.graph.value_info} >= {"h", "h2"}
    assert_fully_static(optimized)
    np.testing.assert_allclose(run(optimized, X), run(original, X), rtol=1e-6)


def test_optimize_path_writes_one_file_and_leaves_no_partials(tmp_path):
    src, dst = tmp_path / "src.onnx", tmp_path / "out" / "model.onnx"
    onnx.save(foldable_model(), src)
    optimize_path(src, dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx"]
    assert_fully_static(onnx.load(dst))
    np.testing.assert_allclose(run(dst, X), run(foldable_model(), X), rtol=1e-6)


def test_optimize_path_keeps_external_data_and_drops_the_previous_data_file(tmp_path):
    src, dst = tmp_path / "src.onnx", tmp_path / "model.onnx"
    onnx.save(foldable_model(), src, save_as_external_data=True, location="src.onnx.data",
              size_threshold=128)
    optimize_path(src, dst)
    first = sorted(p.name for p in tmp_path.glob("model.onnx.*.data"))
    optimize_path(src, dst)  # overwrite: new data file lands, old one is removed
    second = sorted(p.name for p in tmp_path.glob("model.onnx.*.data"))
    assert len(first) == len(second) == 1 and first != second
    assert not list(tmp_path.glob(".*partial*"))
    loaded = onnx.load(dst, load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in loaded.graph.initializer)
    assert_fully_static(loaded)
    np.testing.assert_allclose(run(dst, X), run(foldable_model(), X), rtol=1e-6)


def test_failed_optimize_path_leaves_no_destination(tmp_path):
    src, dst = tmp_path / "bad.onnx", tmp_path / "model.onnx"
    onnx.save(model([helper.make_node("Add", ["x", "w"], ["y"], name="add")],
                    [tensor("x", TensorProto.FLOAT, [2, 3]), tensor("w", TensorProto.FLOAT, [4])],
                    [tensor("y", TensorProto.FLOAT, None)]), src)
    with pytest.raises(StaticGraphError, match="strict ONNX shape inference failed"):
        optimize_path(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_missing_source_is_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        optimize_path(tmp_path / "absent.onnx", tmp_path / "model.onnx")

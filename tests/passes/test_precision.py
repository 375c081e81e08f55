"""Fp32IslandsPass: listed ops run on fp32 inputs via explicit Casts; fp32 graphs are untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from shiva_export.errors import StaticGraphError
from shiva_export.passes.lint import Rule, lint_model
from shiva_export.passes.precision import Fp32IslandsPass, require_fp32_islands
from tests.passes.graphs import attention_model, const, model, tensor

NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def norm_softmax_model(elem_type: int, *, share_scale: bool = False) -> onnx.ModelProto:
    """x [2,8,32] -> LayerNormalization(scale, bias) -> Softmax -> y; optionally the LN scale
    also feeds a Mul outside the island."""
    dtype = NUMPY.get(elem_type, np.float32)
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["normed"], name="norm",
                         axis=-1),
        helper.make_node("Softmax", ["normed"], ["y"], name="softmax", axis=-1),
    ]
    outputs = [tensor("y", elem_type, [2, 8, 32])]
    if share_scale:
        nodes.append(helper.make_node("Mul", ["x", "scale"], ["scaled"], name="other_use"))
        outputs.append(tensor("scaled", elem_type, [2, 8, 32]))
    scale = (1 + 0.5 * rng.standard_normal(32)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(32)).astype(np.float32)
    inits = [const("scale", scale), const("bias", bias)]
    if elem_type == TensorProto.BFLOAT16:
        inits = [helper.make_tensor(t.name, TensorProto.BFLOAT16, t.dims,
                                    onnx.numpy_helper.to_array(t).tolist()) for t in inits]
    else:
        inits = [const(t.name, onnx.numpy_helper.to_array(t).astype(dtype)) for t in inits]
    return model(nodes, [tensor("x", elem_type, [2, 8, 32])], outputs, inits)


def apply(proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, bool]:
    ir_model = ir.serde.deserialize_model(proto)
    result = Fp32IslandsPass(**options)(ir_model)
    return ir.serde.serialize_model(ir_model), result.modified


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def input_types(proto: onnx.ModelProto, node_name: str) -> list[int]:
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    node = next(n for n in inferred.graph.node if n.name == node_name)
    return [types[name] for name in node.input if name]


def test_fp16_islands_stay_within_fp16_tolerance_of_the_fp32_graph():
    islands, modified = apply(norm_softmax_model(TensorProto.FLOAT16))
    assert modified
    onnx.checker.check_model(islands, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 8, 32)).astype(np.float32) * 4
    want = run(norm_softmax_model(TensorProto.FLOAT), x)
    got = run(islands, x.astype(np.float16))
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_listed_ops_take_fp32_inputs_and_neighbours_share_one_island(elem_type):
    islands, _ = apply(norm_softmax_model(elem_type))
    assert set(input_types(islands, "norm")) == {TensorProto.FLOAT}
    assert input_types(islands, "softmax") == [TensorProto.FLOAT]
    casts = [n for n in islands.graph.node if n.op_type == "Cast"]
    # One Cast in (x) and one out (y): scale/bias became fp32 initializers, and the
    # LayerNorm -> Softmax edge stays fp32 instead of round-tripping through fp16.
    assert [(c.input[0], helper.get_node_attr_value(c, "to")) for c in casts] == [
        ("x", TensorProto.FLOAT), ("y_fp32", elem_type)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in islands.graph.output] == [
        ("y", elem_type)]
    require_fp32_islands(ir.serde.deserialize_model(islands))


def test_fp32_graph_is_left_unchanged():
    original = norm_softmax_model(TensorProto.FLOAT)
    result, modified = apply(original)
    assert not modified
    assert [n.op_type for n in result.graph.node] == ["LayerNormalization", "Softmax"]


def test_shared_fp16_initializer_keeps_its_dtype_for_other_consumers():
    islands, _ = apply(norm_softmax_model(TensorProto.FLOAT16, share_scale=True))
    assert input_types(islands, "other_use") == [TensorProto.FLOAT16, TensorProto.FLOAT16]
    assert {t.name: t.data_type for t in islands.graph.initializer}["scale"] == TensorProto.FLOAT16


def test_softmax_inside_fusible_attention_is_left_in_fp16_unless_asked():
    attention = attention_model(fusible=True)
    for value in [*attention.graph.input, *attention.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    attention.graph.initializer[0].CopyFrom(const("scale", np.array(0.5, np.float16)))

    kept, modified = apply(attention)
    assert not modified
    assert Rule.UNFUSED_ATTENTION not in lint_model(kept).rules()

    forced, modified = apply(attention, keep_fused_attention=False)
    assert modified and input_types(forced, "softmax") == [TensorProto.FLOAT]


def test_require_fp32_islands_names_ops_still_on_fp16():
    with pytest.raises(StaticGraphError, match=r"'norm' \(LayerNormalization\).*'softmax'"):
        require_fp32_islands(ir.serde.deserialize_model(norm_softmax_model(TensorProto.FLOAT16)))

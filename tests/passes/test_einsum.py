"""RewritePermutationEinsumPass: a permutation Einsum becomes an exact Transpose, anything else stays."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from shiva_export.errors import StaticGraphError
from shiva_export.passes._shapes import infer_shapes_model
from shiva_export.passes.einsum import (NotAPermutation, RewritePermutationEinsumPass, einsum_permutation,
                                        require_no_permutation_einsum)
from tests.passes.graphs import model, tensor

UNPATCHIFY = "nhwpqc->nchpwq"   # SD3/SD3.5 unpatchify, as torch.onnx exports it


def einsum_model(equation: str, shape, elem_type=TensorProto.FLOAT, num_inputs: int = 1,
                 out_shape=None) -> onnx.ModelProto:
    names = ["x", "w"][:num_inputs]
    node = helper.make_node("Einsum", names, ["y"], name="einsum", equation=equation)
    inputs = [tensor(name, elem_type, shape) for name in names]
    return model([node], inputs, [tensor("y", elem_type, out_shape)])


def rewrite(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    ir_model = ir.serde.deserialize_model(proto)
    result = RewritePermutationEinsumPass()(ir_model)
    return ir.serde.serialize_model(result.model), result.modified


def run(proto: onnx.ModelProto, **feed: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], feed)[0]


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("equation, rank, perm", [
    (UNPATCHIFY, 6, (0, 5, 1, 3, 2, 4)),
    (UNPATCHIFY, None, (0, 5, 1, 3, 2, 4)),    # no ellipsis: the rank is not needed
    ("ij->ji", 2, (1, 0)),
    ("ij->ij", 2, (0, 1)),                     # identity is a permutation too
    (" i j -> j i ", 2, (1, 0)),               # spaces are ignored
    ("aA->Aa", 2, (1, 0)),                     # labels are case-sensitive
    ("ba", 2, (1, 0)),                         # implicit output: the labels sorted, "ab"
    ("...ij->...ji", 4, (0, 1, 3, 2)),
    ("i...j->j...i", 3, (2, 1, 0)),
    ("...ij->ji...", 2, (1, 0)),               # the ellipsis may cover no axis
    ("b...->...b", 4, (1, 2, 3, 0)),
    ("b...a", 4, (1, 2, 3, 0)),                # implicit with ellipsis: "...ab"
])
def test_permutation_equations_parse_to_the_transpose_perm(equation, rank, perm):
    assert einsum_permutation(equation, rank) == perm


@pytest.mark.parametrize("equation, rank, reason", [
    ("ij,jk->ik", 2, "more than one input"),
    ("ii->i", 2, "repeats 'i' (a diagonal)"),
    ("ij->i", 2, "sums over 'j'"),
    ("ij", 2, None),                           # implicit "ij" is the identity, not refused
    ("ij->ijk", 2, "output 'k' is not in the input"),
    ("ij->jj", 2, "repeats an output label"),
    ("...ij->ij", 3, "sums over '...'"),       # dropping the ellipsis sums its axes
    ("ij->...ij", 2, "output '...' is not in the input"),
    ("...ij->...ji", None, "input rank is unknown"),
    ("ij->ji", 3, "names 2 axes; the input has rank 3"),
    ("...ijk->...kji", 2, "names 3 axes; the input has rank 2"),
    ("i..j->ji", 2, "not a label"),
    ("i...j...->ij", 4, "more than one ellipsis"),
    ("ij->ji->ij", 2, "more than one '->'"),
    ("i1->1i", 2, "not a label"),
])
def test_non_permutation_and_malformed_equations_are_refused_with_a_reason(equation, rank, reason):
    if reason is None:
        assert einsum_permutation(equation, rank) == (0, 1)
        return
    with pytest.raises(NotAPermutation, match=reason.replace("(", r"\(").replace(")", r"\)")):
        einsum_permutation(equation, rank)


@pytest.mark.parametrize("equation, shape, dtype", [
    (UNPATCHIFY, [2, 4, 4, 2, 2, 3], np.float32),
    (UNPATCHIFY, [2, 4, 4, 2, 2, 3], np.int64),
    ("ij->ji", [5, 3], np.float32),
    ("ba", [5, 3], np.float32),
    ("...ij->...ji", [2, 3, 4, 5], np.float32),
    ("b...->...b", [2, 3, 4, 5], np.float32),
    ("...ij->ji...", [4, 5], np.float32),
])
def test_rewritten_graph_equals_the_einsum_on_random_input(equation, shape, dtype):
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.INT64
    original = einsum_model(equation, shape, elem)
    rewritten, modified = rewrite(original)
    assert modified and op_types(rewritten) == ["Transpose"]
    onnx.checker.check_model(rewritten, full_check=True)
    x = np.random.default_rng(0).standard_normal(shape) * 100
    x = x.astype(dtype)
    got, want = run(rewritten, x=x), run(original, x=x)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.einsum(equation, x))
    assert [o.name for o in rewritten.graph.output] == ["y"]   # callers bind the graph output by name


@pytest.mark.parametrize("equation, shape, num_inputs", [
    ("ij->i", [3, 4], 1),              # a sum
    ("ii->i", [3, 3], 1),              # a diagonal
    ("ij,ij->ij", [3, 4], 2),          # two inputs
    ("...ij->...ji", None, 1),         # ellipsis of unknown extent
])
def test_non_permutation_einsums_are_left_alone(equation, shape, num_inputs):
    original = einsum_model(equation, shape, num_inputs=num_inputs)
    rewritten, modified = rewrite(original)
    assert not modified and op_types(rewritten) == ["Einsum"]
    if shape is not None:
        feed = {name: np.random.default_rng(i).standard_normal(shape).astype(np.float32)
                for i, name in enumerate(["x", "w"][:num_inputs])}
        np.testing.assert_array_equal(run(rewritten, **feed), run(original, **feed))


def test_bf16_permutation_einsum_fails_shape_inference_and_its_transpose_passes():
    """ONNX's Einsum has no bfloat16, so a bf16 unpatchify cannot be typed; the Transpose can, and runs on ORT CPU.

    fp32 in and out (ORT's Python API has no bf16 arrays): Cast -> bf16 Einsum -> Cast, both Casts exact but the first.
    """
    shape = [2, 4, 4, 2, 2, 3]
    nodes = [helper.make_node("Cast", ["x"], ["x16"], name="to_bf16", to=TensorProto.BFLOAT16),
             helper.make_node("Einsum", ["x16"], ["t"], name="unpatchify", equation=UNPATCHIFY),
             helper.make_node("Cast", ["t"], ["y"], name="to_fp32", to=TensorProto.FLOAT)]
    original = model(nodes, [tensor("x", TensorProto.FLOAT, shape)], [tensor("y", TensorProto.FLOAT, None)])
    with pytest.raises(StaticGraphError, match="bfloat16"):
        infer_shapes_model(original, strict=True)
    rewritten, modified = rewrite(original)
    assert modified and op_types(rewritten) == ["Cast", "Transpose", "Cast"]
    inferred = infer_shapes_model(rewritten, strict=True)
    onnx.checker.check_model(inferred, full_check=True)
    dims = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 4, 2, 4, 2]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    want = np.einsum(UNPATCHIFY, x.astype(ml_dtypes.bfloat16)).astype(np.float32)
    np.testing.assert_array_equal(run(rewritten, x=x), want)


def test_einsum_inside_a_graph_keeps_its_consumers_and_shapes():
    """Einsum -> Relu: the consumer reads the Transpose, which carries the permuted static shape."""
    nodes = [helper.make_node("Einsum", ["x"], ["t"], name="unpatchify", equation=UNPATCHIFY),
             helper.make_node("Relu", ["t"], ["y"], name="relu")]
    original = model(nodes, [tensor("x", TensorProto.FLOAT, [1, 2, 2, 2, 2, 3])],
                     [tensor("y", TensorProto.FLOAT, [1, 3, 2, 2, 2, 2])])
    ir_model = ir.serde.deserialize_model(original)
    RewritePermutationEinsumPass()(ir_model)
    transpose, relu = list(ir_model.graph)
    assert transpose.op_type == "Transpose" and relu.inputs[0] is transpose.outputs[0]
    assert transpose.outputs[0].name == "t" and list(transpose.outputs[0].shape) == [1, 3, 2, 2, 2, 2]
    x = np.random.default_rng(2).standard_normal([1, 2, 2, 2, 2, 3]).astype(np.float32)
    np.testing.assert_array_equal(run(ir.serde.serialize_model(ir_model), x=x), run(original, x=x))


def test_remaining_permutation_einsum_is_named_by_the_postcondition():
    ir_model = ir.serde.deserialize_model(einsum_model(UNPATCHIFY, [1, 2, 2, 2, 2, 3]))
    with pytest.raises(StaticGraphError, match=r"'einsum' \('nhwpqc->nchpwq'\)"):
        require_no_permutation_einsum(ir_model)
    RewritePermutationEinsumPass()(ir_model)
    require_no_permutation_einsum(ir_model)

"""Tiny purpose-made ONNX graphs for the pass tests (cf. Polygraphy's tests/models/make_models.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 23


def model(nodes, inputs, outputs, initializers=(), name="g") -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 10
    return proto


def tensor(name: str, elem_type: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def topk_model(batch: int, n: int, k: int, *, axis: int = -1, largest: int = 1,
               elem_type: int = TensorProto.FLOAT, rank3: bool = False) -> onnx.ModelProto:
    """scores -> TopK(K=k) -> (values, indices); N sits on `axis` ([N, batch] for axis 0;
    rank3 gives [batch, n, 3] for axis 1 and [batch, 3, n] for axis -1)."""
    shape = [n, batch] if axis == 0 else [batch, n]
    if rank3:
        shape = [batch, n, 3] if axis == 1 else [batch, 3, n]
    out_shape = list(shape)
    out_shape[axis] = k
    node = helper.make_node("TopK", ["scores", "k"], ["values", "indices"], name="select_tokens",
                            axis=axis, largest=largest, sorted=1)
    return model([node], [tensor("scores", elem_type, shape)],
                 [tensor("values", elem_type, out_shape),
                  tensor("indices", TensorProto.INT64, out_shape)],
                 [const("k", np.array([k], np.int64))])


def row_prune_model(batch=2, n=16, dim=4, k=6, reduction: str | None = None) -> onnx.ModelProto:
    """The D15 block shape: TopK -> flat row index (per-batch offset) -> Gather rows of
    [B*N, D] -> work on k rows -> ScatterND them back. Fully static and TensorRT-legal."""
    nodes = [
        helper.make_node("TopK", ["scores", "k"], ["top_values", "top"], name="select", axis=-1),
        helper.make_node("Range", ["zero", "batch", "one"], ["batch_ids"], name="batch_ids"),
        helper.make_node("Mul", ["batch_ids", "n"], ["batch_base"], name="batch_base"),
        helper.make_node("Unsqueeze", ["batch_base", "axis1"], ["offset"], name="offset"),
        helper.make_node("Add", ["top", "offset"], ["rows2d"], name="rows2d"),
        helper.make_node("Reshape", ["rows2d", "flat_shape"], ["rows"], name="rows"),
        helper.make_node("Reshape", ["x", "table_shape"], ["table"], name="table"),
        helper.make_node("Gather", ["table", "rows"], ["kept"], name="gather_rows", axis=0),
        helper.make_node("Mul", ["kept", "two"], ["worked"], name="block"),
        helper.make_node("Unsqueeze", ["rows", "axis1"], ["row_index"], name="row_index"),
        helper.make_node("ScatterND", ["table", "row_index", "worked"], ["merged"],
                         name="scatter_rows", **({"reduction": reduction} if reduction else {})),
        helper.make_node("Reshape", ["merged", "x_shape"], ["y"], name="y"),
    ]
    inits = [
        const("k", np.array([k], np.int64)), const("zero", np.array(0, np.int64)),
        const("batch", np.array(batch, np.int64)), const("one", np.array(1, np.int64)),
        const("n", np.array(n, np.int64)), const("axis1", np.array([1], np.int64)),
        const("flat_shape", np.array([-1], np.int64)),
        const("table_shape", np.array([batch * n, dim], np.int64)),
        const("x_shape", np.array([batch, n, dim], np.int64)),
        const("two", np.array(2.0, np.float32)),
    ]
    return model(nodes, [tensor("x", TensorProto.FLOAT, [batch, n, dim]),
                         tensor("scores", TensorProto.FLOAT, [batch, n])],
                 [tensor("y", TensorProto.FLOAT, [batch, n, dim])], inits)


def attention_model(*, fusible: bool) -> onnx.ModelProto:
    """q,k,v [1,2,8,4]: MatMul -> Mul(scale) -> Softmax -> MatMul; `fusible=False` puts a
    Transpose between the Softmax and the second MatMul, which breaks the pattern."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale"),
        helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
    ]
    if fusible:
        nodes.append(helper.make_node("MatMul", ["probs", "v"], ["out"], name="pv"))
    else:
        nodes += [
            helper.make_node("Transpose", ["probs"], ["probs_t"], name="probs_t", perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["probs_t", "v"], ["out"], name="pv"),
        ]
    qkv = [tensor(name, TensorProto.FLOAT, [1, 2, 8, 4]) for name in ("q", "k", "v")]
    return model(nodes, qkv, [tensor("out", TensorProto.FLOAT, [1, 2, 8, 4])],
                 [const("scale", np.array(0.5, np.float32))])


def stable_topk_reference(x: np.ndarray, k: int, axis: int = -1, largest: bool = True):
    """numpy reference with our tie rule (D7): order by value, ties to the lower index."""
    order = np.argsort(-x if largest else x, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(x, indices, axis=axis), indices

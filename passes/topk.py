"""Rewrite TopK with a large constant K into rounds of TopK that TensorRT accepts.

TensorRT's `ITopKLayer` takes K <= 3840 only, yet a DiT at 1024 px has N = 4096 image tokens (patch 2, VAE /8)
and a token-pruned block may keep more than 3840 of them (D16). `SplitLargeTopKPass` "peels"
the selection: round r runs TopK(K_r <= max_k) over the elements that the earlier rounds have
not taken, and the rounds' values and indices are concatenated along the axis.

The elements still available after round r-1 are exactly those that come *after* its last
pick in TopK's total order (value descending for largest=1, ascending for largest=0, ties to
the lower index, which is our selection tie rule D7). So round r masks the original input with
one elementwise `Where` instead of a scatter:

    keep = (x < v_last) | ((x == v_last) & (position > i_last))      # largest=1; `>` for largest=0
    x_r  = Where(keep, x, -inf)                                      # +inf for largest=0

and the concatenated output is bit-identical to the single TopK: same values, same indices,
same order, for any finite input (an input holding the fill value itself, +-inf, or NaN is
outside the guarantee). Every round uses sorted=1, which TensorRT also requires.
"""

from __future__ import annotations

__all__ = [
    "TENSORRT_MAX_TOPK",
    "SplitLargeTopKPass",
    "require_max_topk",
    "split_large_topk",
    "topk_k",
]

import logging

import numpy as np
import onnx
import onnx_ir as ir

from shiva_export.errors import StaticGraphError
from shiva_export.passes._shapes import fill_missing_types

logger = logging.getLogger(__name__)

# TensorRT 11.1 NvInfer.h, ITopKLayer::setK: "Currently only values up to 3840 are supported".
TENSORRT_MAX_TOPK = 3840

_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


def topk_k(node: ir.Node) -> int | None:
    """The constant K of a TopK node, or None when K is computed at run time."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    tensor = ir.convenience.get_const_tensor(node.inputs[1])
    if tensor is None:
        return None
    values = tensor.numpy().reshape(-1)
    return int(values[0]) if values.size == 1 else None


def _is_topk(node: ir.Node) -> bool:
    return node.op_type == "TopK" and node.domain in ("", "ai.onnx")


def _node_label(node: ir.Node) -> str:
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs else None
    return f"{node.op_type} -> {output}" if output else node.op_type


def _split_blockers(node: ir.Node, max_k: int) -> str | None:
    """Why `node` cannot be peeled, or None when it can."""
    data = node.inputs[0]
    if data is None or data.dtype not in _FLOAT_TYPES:
        dtype = None if data is None else data.dtype
        return f"input dtype {dtype} is not a float type (peeling masks with +-inf)"
    if data.shape is None:
        return "input rank is unknown; run shape inference first"
    rank = len(data.shape)
    axis = node.attributes.get_int("axis", -1)
    if not -rank <= axis < rank:
        return f"axis {axis} is out of range for rank {rank}"
    if not isinstance(data.shape[axis], int):
        return f"input dim {data.shape[axis]} along axis {axis} is not static"
    if topk_k(node) is not None and topk_k(node) > data.shape[axis]:
        return f"K={topk_k(node)} exceeds the axis length {data.shape[axis]}"
    return None


def _balanced_rounds(k: int, max_k: int) -> list[int]:
    """Split k into the fewest rounds of at most max_k, sizes differing by at most one."""
    rounds = -(-k // max_k)
    base, extra = divmod(k, rounds)
    return [base + 1 if i < extra else base for i in range(rounds)]


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.val(name, const_value=ir.tensor(array, name=name))
    value.dtype = ir.DataType.from_numpy(array.dtype)
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _fill_value(dtype: ir.DataType, largest: bool) -> np.ndarray:
    fill = -np.inf if largest else np.inf
    return np.array(fill, dtype=dtype.numpy())


def _split_topk(node: ir.Node, max_k: int, shared: dict) -> None:
    """Replace one TopK node in its graph by the peeled rounds described in the module doc."""
    graph = node.graph
    assert graph is not None, "SplitLargeTopKPass: TopK node is not attached to a graph"
    data, k_input = node.inputs
    values_out, indices_out = node.outputs
    k = topk_k(node)
    assert k is not None
    rank = len(data.shape)
    axis = node.attributes.get_int("axis", -1) % rank
    largest = node.attributes.get_int("largest", 1) != 0
    length = data.shape[axis]
    prefix = (node.name or values_out.name or "TopK").replace("/", "_")

    new_nodes: list[ir.Node] = []

    def op(op_type: str, inputs, name: str, dtype, shape, attributes=None, num_outputs=1):
        created = ir.node(
            op_type, inputs, attributes, num_outputs=num_outputs, name=f"{prefix}/{name}"
        )
        for i, output in enumerate(created.outputs):
            output.name = f"{prefix}/{name}_out{i}" if num_outputs > 1 else f"{prefix}/{name}"
            output.dtype = dtype[i] if isinstance(dtype, tuple) else dtype
            output.shape = ir.Shape(shape)
        new_nodes.append(created)
        return created.outputs if num_outputs > 1 else created.outputs[0]

    # Positions along the axis, shaped to broadcast against the input: [length, 1, ..., 1].
    # Shared by every split TopK of the same graph and layout (one per pruned block otherwise).
    trailing = rank - 1 - axis
    position_key = (graph, "position", length, trailing)
    if position_key not in shared:
        shared[position_key] = _const(
            graph, f"{prefix}/position",
            np.arange(length, dtype=np.int64).reshape([length] + [1] * trailing))
    position = shared[position_key]
    fill_key = (graph, "fill", data.dtype, largest)
    if fill_key not in shared:
        shared[fill_key] = _const(graph, f"{prefix}/fill", _fill_value(data.dtype, largest))
    fill_value = shared[fill_key]
    full_shape = list(data.shape)  # masks broadcast data with [.., 1 at axis, ..]: data's shape

    round_values: list[ir.Value] = []
    round_indices: list[ir.Value] = []
    sizes = _balanced_rounds(k, max_k)
    for r, size in enumerate(sizes):
        if r == 0:
            source = data
        else:
            last = sizes[r - 1]
            starts = _const(graph, f"{prefix}/peel{r}/starts", np.array([last - 1], np.int64))
            ends = _const(graph, f"{prefix}/peel{r}/ends", np.array([last], np.int64))
            axes = _const(graph, f"{prefix}/peel{r}/axes", np.array([axis], np.int64))
            edge_shape = list(data.shape)
            edge_shape[axis] = 1
            last_value = op("Slice", [round_values[-1], starts, ends, axes],
                            f"peel{r}/last_value", data.dtype, edge_shape)
            last_index = op("Slice", [round_indices[-1], starts, ends, axes],
                            f"peel{r}/last_index", ir.DataType.INT64, edge_shape)
            beyond = op("Less" if largest else "Greater", [data, last_value],
                        f"peel{r}/beyond", ir.DataType.BOOL, full_shape)
            same = op("Equal", [data, last_value], f"peel{r}/same", ir.DataType.BOOL, full_shape)
            # Broadcast [length,1..] against the [.., 1 at axis, ..] edge: the full shape.
            later = op("Greater", [position, last_index], f"peel{r}/later",
                       ir.DataType.BOOL, full_shape)
            tie_after = op("And", [same, later], f"peel{r}/tie_after", ir.DataType.BOOL, full_shape)
            keep = op("Or", [beyond, tie_after], f"peel{r}/keep", ir.DataType.BOOL, full_shape)
            source = op("Where", [keep, data, fill_value], f"peel{r}/masked", data.dtype, full_shape)
        k_value = _const(graph, f"{prefix}/peel{r}/k", np.array([size], np.int64))
        out_shape = list(data.shape)
        out_shape[axis] = size
        round_value, round_index = op(
            "TopK", [source, k_value], f"peel{r}/TopK",
            (data.dtype, ir.DataType.INT64), out_shape,
            attributes={"axis": axis, "largest": int(largest), "sorted": 1}, num_outputs=2,
        )
        round_values.append(round_value)
        round_indices.append(round_index)

    out_shape = list(data.shape)
    out_shape[axis] = k
    concat_values = op("Concat", round_values, "values", data.dtype, out_shape, {"axis": axis})
    concat_indices = op("Concat", round_indices, "indices", ir.DataType.INT64, out_shape,
                        {"axis": axis})

    graph.insert_before(node, new_nodes)
    old_names = (values_out.name, indices_out.name)
    ir.convenience.replace_all_uses_with(
        [values_out, indices_out], [concat_values, concat_indices], replace_graph_outputs=True
    )
    graph.remove(node, safe=True)
    if (k_input.is_initializer() and not k_input.uses() and not k_input.is_graph_output()
            and not k_input.is_graph_input()):
        k_input.graph.initializers.pop(k_input.name)
    # Keep the original tensor names: they may be graph outputs that callers bind by name.
    for new_value, name in zip((concat_values, concat_indices), old_names):
        if name:
            new_value.name = name
    logger.debug("%s: split TopK K=%d into %d rounds %s", prefix, k, len(sizes), sizes)


def _iter_topk(model: ir.Model):
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if _is_topk(n)]


def require_max_topk(model: ir.Model, max_k: int = TENSORRT_MAX_TOPK) -> None:
    """Raise StaticGraphError naming every TopK whose constant K exceeds max_k."""
    offenders = []
    for node in _iter_topk(model):
        k = topk_k(node)
        if k is not None and k > max_k:
            reason = _split_blockers(node, max_k)
            offenders.append(f"'{_node_label(node)}' (K={k}{'; ' + reason if reason else ''})")
    if offenders:
        raise StaticGraphError(
            f"TopK with K > {max_k} remains: {', '.join(offenders)}; TensorRT accepts K <= "
            f"{TENSORRT_MAX_TOPK}. Give the TopK a float input of static shape so "
            "SplitLargeTopKPass can peel it, or select fewer tokens."
        )


class SplitLargeTopKPass(ir.passes.InPlacePass):
    """Rewrite TopK with constant K > max_k as peeled rounds of TopK: TensorRT accepts K <= 3840.

    The rewrite is exact (values, indices and order) for finite float inputs of static shape,
    for any axis and for largest=1 and largest=0. TopK whose K is not a constant is left alone
    (the lint reports it); one that cannot be peeled makes `ensures` raise.
    """

    def __init__(self, max_k: int = TENSORRT_MAX_TOPK):
        super().__init__()
        if max_k < 1:
            raise ValueError(f"SplitLargeTopKPass: max_k must be >= 1, got {max_k}")
        self.max_k = max_k

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        big = [n for n in _iter_topk(model) if (topk_k(n) or 0) > self.max_k]
        fill_missing_types(model, (n.inputs[0] for n in big))  # peeling needs dtype and shape
        split, shared = 0, {}
        for node in _iter_topk(model):
            k = topk_k(node)
            if k is None:
                logger.debug("%s: K is not a constant; left for the lint", _node_label(node))
                continue
            if k <= self.max_k:
                continue
            reason = _split_blockers(node, self.max_k)
            if reason is not None:
                logger.debug("%s: not split: %s", _node_label(node), reason)
                continue
            _split_topk(node, self.max_k, shared)
            split += 1
        return ir.passes.PassResult(model, modified=bool(split))

    def ensures(self, model: ir.Model) -> None:
        require_max_topk(model, self.max_k)


def split_large_topk(model: onnx.ModelProto, max_k: int = TENSORRT_MAX_TOPK) -> onnx.ModelProto:
    """Proto-in, proto-out form of SplitLargeTopKPass for callers that don't use onnx_ir.

    Raises:
        StaticGraphError: a TopK with constant K > max_k could not be rewritten.
    """
    ir_model = ir.serde.deserialize_model(model)
    try:
        SplitLargeTopKPass(max_k)(ir_model)
    except ir.passes.PostconditionError as err:
        if isinstance(err.__cause__, StaticGraphError):
            raise err.__cause__ from None
        raise
    return ir.serde.serialize_model(ir_model)

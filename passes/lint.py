"""Static-graph lint: say, before a 30-minute TensorRT build, why a graph will fail or be slow.

TensorRT builds one engine per static shape; anything that leaves a dimension to run time
(symbolic dims, NonZero/Loop/If, TopK with a computed K) fails the build or forces profiles we
do not want. TopK K > 3840 is refused outright. Per-feature GatherElements indices move B*k*D
int64s per layer (D15), scatter reductions need a plugin and duplicate scatter indices are
undefined behaviour in `IScatterLayer`. Attention outside the fusible pattern runs as separate
kernels. Each rule reports the node and what to change; `lint_model` never modifies the model.
"""

from __future__ import annotations

__all__ = [
    "Finding",
    "LintReport",
    "Rule",
    "Severity",
    "format_report",
    "lint_model",
]

import dataclasses
import enum
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from shiva_export.errors import StaticGraphError
from shiva_export.passes._files import inline_small_external_tensors, read_model_proto
from shiva_export.passes._patterns import is_fusible_softmax
from shiva_export.passes._shapes import infer_shapes_model
from shiva_export.passes.topk import TENSORRT_MAX_TOPK, topk_k

logger = logging.getLogger(__name__)


class Severity(str, enum.Enum):
    """An error makes the graph unusable for a static TensorRT engine; a warning costs speed."""

    ERROR = "error"
    WARNING = "warning"


class Rule(str, enum.Enum):
    """Rule ids, stable for scripts that filter `--json` output."""

    SHAPE_INFERENCE = "shape-inference"
    DYNAMIC_DIM = "dynamic-dim"
    DATA_DEPENDENT_SHAPE = "data-dependent-shape"
    TOPK_K = "topk-k"
    EXPANDED_INDEX = "expanded-index"
    SCATTER_REDUCTION = "scatter-reduction"
    SCATTER_DUPLICATE_INDICES = "scatter-duplicate-indices"
    UNFUSED_ATTENTION = "unfused-attention"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: which rule, how bad, where (node name; "" for graph inputs/outputs), what to do."""

    rule: Rule
    severity: Severity
    node: str
    message: str

    def to_json(self) -> dict:
        return {"rule": self.rule.value, "severity": self.severity.value, "node": self.node,
                "message": self.message}


@dataclasses.dataclass(frozen=True)
class LintReport:
    """All findings for one model; truthy when the graph has no errors (warnings allowed)."""

    model: str
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.WARNING)

    def __bool__(self) -> bool:
        return not self.errors

    def rules(self) -> set[Rule]:
        return {f.rule for f in self.findings}

    def to_json(self) -> dict:
        return {"schema": 1, "model": self.model, "clean": bool(self),
                "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [f.to_json() for f in self.findings]}


# Ops whose output shape depends on tensor values, or that TensorRT can only run with
# data-dependent shapes / control flow.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "Loop", "If", "Scan", "Unique", "Compress"})
_SCATTER_OPS = frozenset({"ScatterND", "ScatterElements"})
_ELEMENT_INDEX_OPS = frozenset({"GatherElements", "ScatterElements"})
# Ops that keep every index value distinct (per row) when their input's values are distinct.
_INDEX_PRESERVING = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Slice"})
_INTEGER_TYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32, ir.DataType.UINT32,
                            ir.DataType.UINT64})
_ANCESTOR_SEARCH_LIMIT = 32


def _is_onnx(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


def _label(node: ir.Node) -> str:
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs else None
    return f"{node.op_type} -> {output}" if output else node.op_type


def _is_static(value: ir.Value | None) -> bool:
    if value is None or value.const_value is not None:
        return True
    return value.shape is not None and all(isinstance(d, int) for d in value.shape)


def _describe_dims(value: ir.Value) -> str:
    if value.shape is None:
        return "has no known shape"
    bad = [f"dim {i} is {'unknown' if d.value is None else repr(d.value)}"
           for i, d in enumerate(value.shape) if not isinstance(d, int)]
    return f"shape {value.shape}: " + ", ".join(bad)


# --- provenance of scatter indices --------------------------------------------------------


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _has_ancestor(value: ir.Value | None, target: ir.Node) -> bool:
    """Bounded search: does `target` feed `value` (within a few dozen nodes)?"""
    stack, seen = [value], 0
    while stack and seen < _ANCESTOR_SEARCH_LIMIT:
        current = stack.pop()
        producer = None if current is None else current.producer()
        if producer is None:
            continue
        if producer is target:
            return True
        seen += 1
        stack.extend(producer.inputs)
    return False


def _topk_axis(node: ir.Node) -> int | None:
    data = node.inputs[0]
    if data is None or data.shape is None:
        return None
    return node.attributes.get_int("axis", -1) % len(data.shape)


def _masks_previous_round(current: ir.Node, previous: ir.Node, root: ir.Value) -> bool:
    """`current` TopK runs on `root` with `previous`'s picks masked out (Where or scatter)."""
    masker = current.inputs[0].producer() if current.inputs[0] is not None else None
    if _is_onnx(masker, "Where"):
        return masker.inputs[1] is root and _has_ancestor(masker.inputs[0], previous)
    if _is_onnx(masker, "ScatterElements"):
        return (masker.inputs[0] is previous.inputs[0]
                and _has_ancestor(masker.inputs[1], previous))
    return False


def _is_peeled_topk_concat(node: ir.Node) -> bool:
    """Concat of the indices of one peeled TopK chain (SplitLargeTopKPass): all distinct."""
    rounds = []
    for value in node.inputs:
        producer = None if value is None else value.producer()
        if not _is_onnx(producer, "TopK") or value is not producer.outputs[1]:
            return False
        rounds.append(producer)
    first = rounds[0]
    axis, largest = _topk_axis(first), first.attributes.get_int("largest", 1)
    if axis is None or node.attributes.get_int("axis", 0) % len(first.inputs[0].shape) != axis:
        return False
    if any(_topk_axis(r) != axis or r.attributes.get_int("largest", 1) != largest
           for r in rounds):
        return False
    root = first.inputs[0]
    return all(_masks_previous_round(rounds[i], rounds[i - 1], root)
               for i in range(1, len(rounds)))


def _is_row_offset(value: ir.Value | None, depth: int = 0) -> bool:
    """A per-row (per-batch) offset: constant along the last axis, built from Range/constants."""
    if value is None or depth > 8:
        return False
    if value.shape is not None and len(value.shape) > 0 and value.shape[-1] != 1:
        return False
    if _const_array(value) is not None:
        return True
    producer = value.producer()
    if _is_onnx(producer, "Range"):
        return True
    if _is_onnx(producer, "Mul"):
        return all(_const_array(v) is not None or _is_range_like(v) for v in producer.inputs)
    if _is_onnx(producer, "Reshape", "Unsqueeze", "Cast", "Identity"):
        return _is_range_like(producer.inputs[0]) or _is_row_offset(producer.inputs[0], depth + 1)
    return False


def _is_range_like(value: ir.Value | None, depth: int = 0) -> bool:
    if value is None or depth > 8:
        return False
    if _const_array(value) is not None:
        return True
    producer = value.producer()
    if _is_onnx(producer, "Range"):
        return True
    if _is_onnx(producer, "Mul"):
        return all(_is_range_like(v, depth + 1) for v in producer.inputs)
    if _is_onnx(producer, "Reshape", "Unsqueeze", "Cast", "Identity"):
        return _is_range_like(producer.inputs[0], depth + 1)
    return False


# Ascending compaction (shiva_export.topk.ascending_compaction) reorders TopK's picks without a
# sort: mask = ScatterElements(zeros, topk, ones) has exactly k ones per row; destination =
# Where(mask, CumSum(mask) - 1, k + CumSum(1 - mask) - 1) sends the kept tokens to slots 0..k-1
# and the dropped ones to k..N-1, so it is a permutation of 0..N-1 along the row; and
# ScatterElements(any, destination, arange) writes every slot once with distinct values, so its
# output is again unique per row. The helpers below prove exactly that construction (constants,
# axes, shapes and the k of the mask), not merely the op types.


def _static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)


def _uniform_const(value: ir.Value | None, depth: int = 0) -> int | float | None:
    """The single value of a tensor whose elements are all equal and known at build time: a
    constant, or Expand/ConstantOfShape/Cast/CastLike/reshapes of one (torch's zeros, ones_like)."""
    if value is None or depth > 8:
        return None
    array = _const_array(value)
    if array is not None:
        return _uniform_array_value(array)
    producer = value.producer()
    if _is_onnx(producer, "ConstantOfShape"):
        fill = producer.attributes.get_tensor("value")
        return 0 if fill is None else _uniform_array_value(fill.numpy())
    if _is_onnx(producer, "Expand", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"):
        return _uniform_const(producer.inputs[0], depth + 1)
    if _is_onnx(producer, "Cast", "CastLike"):
        inner = _uniform_const(producer.inputs[0], depth + 1)
        if inner is None or value.dtype is None:
            return None
        try:
            cast = np.asarray(inner).astype(value.dtype.numpy())
        except (TypeError, ValueError, OverflowError):
            return None
        return cast.item() if cast == inner else None  # only casts that keep the value
    return None


def _uniform_array_value(array: np.ndarray) -> int | float | None:
    if array.size == 0 or not np.all(array == array.flat[0]):
        return None
    return array.flat[0].item()


def _uniform_int(value: ir.Value | None) -> int | None:
    constant = _uniform_const(value)
    if constant is None or not float(constant).is_integer():
        return None
    return int(constant)


def _strip_casts(value: ir.Value | None) -> ir.Value | None:
    """The value under Cast/CastLike; only used on 0/1 masks, which every cast preserves."""
    for _ in range(8):
        producer = None if value is None else value.producer()
        if not _is_onnx(producer, "Cast", "CastLike"):
            break
        value = producer.inputs[0]
    return value


def _row_axis(node: ir.Node, rank: int) -> int | None:
    """The node's `axis` attribute, normalised; None unless it is the last (row) axis."""
    axis = node.attributes.get_int("axis", 0) % rank
    return axis if axis == rank - 1 else None


def _mask_row_count(mask: ir.Value, axis: int, depth: int) -> int | None:
    """k, when `mask` is ScatterElements(zeros, unique [.., k] indices, ones) along `axis`:
    a 0/1 mask with exactly k ones in every row."""
    producer = mask.producer()
    if not _is_onnx(producer, "ScatterElements") or len(producer.inputs) < 3:
        return None
    if producer.attributes.get_string("reduction", "none") != "none":
        return None
    data, indices, updates = producer.inputs[:3]
    data_shape, index_shape = _static_shape(data), _static_shape(indices)
    if data_shape is None or index_shape is None or len(data_shape) != len(index_shape):
        return None
    if _row_axis(producer, len(data_shape)) != axis:
        return None
    # Every row gets k writes (no row is left out by a smaller index shape).
    if any(i != d for j, (i, d) in enumerate(zip(index_shape, data_shape)) if j != axis):
        return None
    if index_shape[axis] > data_shape[axis]:
        return None
    if _uniform_const(data) != 0 or _uniform_const(updates) != 1:
        return None
    if not _has_unique_values(indices, depth + 1):
        return None
    return index_shape[axis]


def _cumsum_slots(value: ir.Value, axis: int) -> tuple[ir.Value, bool, int] | None:
    """(mask, complemented, first) for `value` = CumSum(mask or 1 - mask, axis) + constants:
    over the positions where the summed 0/1 term is 1, the values run first, first+1, ..."""
    offset = 0
    for _ in range(16):
        producer = value.producer()
        if _is_onnx(producer, "CumSum"):
            break
        if _is_onnx(producer, "Add"):
            a, b = producer.inputs[:2]
            ca, cb = _uniform_int(a), _uniform_int(b)
            if (ca is None) == (cb is None):
                return None
            offset, value = (offset + cb, a) if cb is not None else (offset + ca, b)
        elif _is_onnx(producer, "Sub"):
            a, b = producer.inputs[:2]
            cb = _uniform_int(b)
            if cb is None or _uniform_int(a) is not None:
                return None
            offset, value = offset - cb, a
        elif _is_onnx(producer, "Cast"):
            # integer -> integer casts commute with the additions (modular arithmetic)
            source = producer.inputs[0]
            if source is None or source.dtype not in _INTEGER_TYPES:
                return None
            if value.dtype not in _INTEGER_TYPES:
                return None
            value = source
        else:
            return None
    else:
        return None
    summed, cum_axis = producer.inputs[:2]
    rank = len(value.shape) if value.shape is not None else 0
    cum_axis_value = _uniform_int(cum_axis)
    if rank == 0 or cum_axis_value is None or cum_axis_value % rank != axis:
        return None
    first = offset + (0 if producer.attributes.get_int("exclusive", 0) else 1)
    term = _strip_casts(summed)
    complement = None if term is None else term.producer()
    if (_is_onnx(complement, "Sub") and _uniform_int(complement.inputs[0]) == 1
            and _uniform_int(complement.inputs[1]) is None):
        return _strip_casts(complement.inputs[1]), True, first
    return term, False, first


def _is_row_permutation(value: ir.Value | None, axis: int, depth: int) -> bool:
    """`value` = Where(mask, CumSum(mask) - 1, k + CumSum(1 - mask) - 1) for a mask with k ones
    per row (or the dropped-first mirror): each row is a permutation of 0..N-1."""
    producer = None if value is None else value.producer()
    if not _is_onnx(producer, "Where") or len(producer.inputs) < 3:
        return False
    condition, kept, dropped = producer.inputs[:3]
    if condition is None or kept is None or dropped is None:
        return False
    mask = _strip_casts(condition)
    shape = _static_shape(mask)
    if shape is None or any(_static_shape(v) != shape for v in (condition, kept, dropped, value)):
        return False  # no broadcasting anywhere: one slot per position
    k = _mask_row_count(mask, axis, depth)
    kept_slots, dropped_slots = _cumsum_slots(kept, axis), _cumsum_slots(dropped, axis)
    if k is None or kept_slots is None or dropped_slots is None:
        return False
    (kept_mask, kept_negated, kept_first), (drop_mask, drop_negated, drop_first) = (
        kept_slots, dropped_slots)
    if kept_mask is not mask or drop_mask is not mask or kept_negated or not drop_negated:
        return False
    return (kept_first, drop_first) in ((0, k), (shape[axis] - k, 0))


def _is_unique_along(value: ir.Value | None, axis: int, depth: int = 0) -> bool:
    """Every 1-D slice along `axis` has distinct values (e.g. arange(N).expand(B, N))."""
    shape = _static_shape(value)
    if shape is None or not 0 <= axis < len(shape) or depth > 8:
        return False
    if shape[axis] == 1:
        return True
    constant = _const_array(value)
    if constant is not None:
        rows = np.sort(np.moveaxis(constant, axis, -1), axis=-1)
        return bool(np.all(rows[..., 1:] != rows[..., :-1]))
    producer = value.producer()
    if _is_onnx(producer, "Range"):
        return axis == 0 and _uniform_const(producer.inputs[2]) not in (None, 0)
    if _is_onnx(producer, "Expand"):
        source_shape = _static_shape(producer.inputs[0])
        if source_shape is None:
            return False
        source_axis = axis - (len(shape) - len(source_shape))
        return (source_axis >= 0 and source_shape[source_axis] == shape[axis]
                and _is_unique_along(producer.inputs[0], source_axis, depth + 1))
    if _is_onnx(producer, "Identity") or (
            _is_onnx(producer, "Cast") and value.dtype in _INTEGER_TYPES
            and producer.inputs[0].dtype in _INTEGER_TYPES):
        return _is_unique_along(producer.inputs[0], axis, depth + 1)
    if _is_onnx(producer, "Reshape", "Unsqueeze", "Squeeze", "Flatten"):
        # Only moves a single non-1 dim (e.g. arange [N] -> [1, N]).
        source_shape = _static_shape(producer.inputs[0])
        if source_shape is None:
            return False
        source_dims = [i for i, d in enumerate(source_shape) if d != 1]
        dims = [i for i, d in enumerate(shape) if d != 1]
        if dims != [axis] or len(source_dims) != 1:
            return False
        return _is_unique_along(producer.inputs[0], source_dims[0], depth + 1)
    return False


def _is_permutation_scatter(node: ir.Node, depth: int) -> bool:
    """ScatterElements(any, permutation along the row, values unique along the row): every
    position is written once, with distinct values, so the output rows are unique."""
    if node.attributes.get_string("reduction", "none") != "none" or len(node.inputs) < 3:
        return False
    data, indices, updates = node.inputs[:3]
    shape = _static_shape(indices)
    if shape is None or _static_shape(data) != shape or _static_shape(updates) != shape:
        return False
    axis = _row_axis(node, len(shape))
    return (axis is not None and _is_row_permutation(indices, axis, depth)
            and _is_unique_along(updates, axis))


def _has_unique_values(value: ir.Value | None, depth: int = 0) -> bool:
    """True when the index values provably never repeat (within a row): TopK indices, peeled
    TopK concats, the ascending-compaction permutation (see above), through index-preserving
    ops and per-row offsets."""
    if value is None or depth > 64:
        return False
    constant = _const_array(value)
    if constant is not None:
        return np.unique(constant).size == constant.size
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return False
    op = producer.op_type
    if op == "TopK":
        return value is producer.outputs[1]
    if op in _INDEX_PRESERVING:
        return _has_unique_values(producer.inputs[0], depth + 1)
    if op == "Cast":
        return value.dtype in _INTEGER_TYPES and _has_unique_values(producer.inputs[0], depth + 1)
    if op in ("Add", "Sub"):
        a, b = producer.inputs[:2]
        return ((_has_unique_values(a, depth + 1) and _is_row_offset(b))
                or (_has_unique_values(b, depth + 1) and _is_row_offset(a)))
    if op == "Gather":
        data, indices = producer.inputs[:2]
        picks = _const_array(indices)
        picks_distinct = (picks is not None and np.unique(picks).size == picks.size) or (
            _has_unique_values(indices, depth + 1))
        return picks_distinct and _has_unique_values(data, depth + 1)
    if op == "Concat":
        # Stacking rows (any axis but the row axis) keeps each row as it was, e.g. the CFG
        # halves sharing one selection: torch.cat([half, half], dim=0).
        rank = len(value.shape) if value.shape is not None else 0
        if rank > 1 and producer.attributes.get_int("axis", 0) % rank != rank - 1:
            return all(_has_unique_values(v, depth + 1) for v in producer.inputs)
        return _is_peeled_topk_concat(producer)
    if op == "ScatterElements":
        return _is_permutation_scatter(producer, depth + 1)
    if op == "Where":
        rank = len(value.shape) if value.shape is not None else 0
        return rank > 0 and _is_row_permutation(value, rank - 1, depth + 1)
    return False


# --- rules -------------------------------------------------------------------------------


def _check_graph_io(graph: ir.Graph) -> Iterable[Finding]:
    initializers = set(graph.initializers.values())
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for value in values:
            if value in initializers or _is_static(value):
                continue
            yield Finding(
                Rule.DYNAMIC_DIM, Severity.ERROR, "",
                f"graph {kind} '{value.name}': {_describe_dims(value)}; expected a fully static "
                "shape (one engine per shape). Re-export with concrete sizes (batch, height, "
                "width) and no dynamic_shapes/dynamic_axes.",
            )


def _check_data_dependent(node: ir.Node) -> Iterable[Finding]:
    if node.domain in ("", "ai.onnx") and node.op_type in DATA_DEPENDENT_OPS:
        yield Finding(
            Rule.DATA_DEPENDENT_SHAPE, Severity.ERROR, _label(node),
            f"{node.op_type} makes shapes or control flow depend on tensor values; expected a "
            "graph whose shapes are fixed at export. Replace it with fixed-size ops (e.g. "
            "TopK with a constant K instead of a boolean mask, no Python control flow on "
            "tensors) and re-export.",
        )
        return
    if not all(_is_static(v) for v in node.inputs):
        return  # dynamism comes from upstream; reported where it starts
    for output in node.outputs:
        if output.name and not _is_static(output):
            yield Finding(
                Rule.DATA_DEPENDENT_SHAPE, Severity.ERROR, _label(node),
                f"output '{output.name}' of {node.domain + '::' if node.domain else ''}"
                f"{node.op_type} {_describe_dims(output)} although all inputs are static; "
                "shape inference cannot determine it, so it may depend on data. Replace the "
                "op, or fold constants (shiva_export.passes.cleanup) and lint again.",
            )
            return


def _check_topk(node: ir.Node, max_k: int) -> Iterable[Finding]:
    k = topk_k(node)
    if k is None:
        yield Finding(
            Rule.TOPK_K, Severity.ERROR, _label(node),
            "TopK K is computed at run time; expected a constant K (TensorRT needs K <= "
            f"{max_k} known at build time). Pass k as a Python int when exporting.",
        )
    elif k > max_k:
        yield Finding(
            Rule.TOPK_K, Severity.ERROR, _label(node),
            f"TopK K={k} exceeds TensorRT's limit; expected K <= {max_k}. Run "
            "shiva_export.passes.topk.SplitLargeTopKPass (split_large_topk) to peel it into "
            "exact rounds of K <= 3840.",
        )


def _check_index_rank(node: ir.Node) -> Iterable[Finding]:
    index = node.inputs[1] if len(node.inputs) > 1 else None
    if index is None or index.shape is None or len(index.shape) < 3:
        return
    yield Finding(
        Rule.EXPANDED_INDEX, Severity.ERROR, _label(node),
        f"{node.op_type} index '{index.name}' has rank {len(index.shape)} (shape {index.shape}); "
        "an index expanded per feature moves B*k*D int64s per layer. Expected a rank-2 [B, k] "
        "index: gather rows of a [B*N, D] view with Gather/GatherND and scatter them back with "
        "ScatterND (D15).",
    )


def _check_scatter(node: ir.Node) -> Iterable[Finding]:
    reduction = node.attributes.get_string("reduction", "none")
    if reduction != "none":
        yield Finding(
            Rule.SCATTER_REDUCTION, Severity.ERROR, _label(node),
            f"{node.op_type} reduction='{reduction}'; expected 'none' (TensorRT: ScatterND "
            "has no reductions, ScatterElements only via a plugin). Write each output row "
            "once: scatter unique indices, or merge tokens before the scatter.",
        )
    index = node.inputs[1] if len(node.inputs) > 1 else None
    if not _has_unique_values(index):
        yield Finding(
            Rule.SCATTER_DUPLICATE_INDICES, Severity.WARNING, _label(node),
            f"{node.op_type} indices '{index.name if index is not None else ''}' are not "
            "provably unique (they come neither from TopK nor from the TopK-mask permutation "
            "scatter of ascending_compaction through index-preserving ops); "
            "duplicate indices are undefined behaviour in TensorRT's IScatterLayer. Derive "
            "them from TopK indices (plus per-batch offsets) so each row is written once.",
        )


def _check_softmax(node: ir.Node) -> Iterable[Finding]:
    data = node.inputs[0]
    if data is None or data.shape is None or len(data.shape) != 4 or is_fusible_softmax(node):
        return
    yield Finding(
        Rule.UNFUSED_ATTENTION, Severity.WARNING, _label(node),
        "Softmax on a rank-4 tensor outside MatMul -> [Mul/Div/Add]* -> Softmax -> MatMul; "
        "TensorRT will not fuse this attention into one kernel. Export at opset 23 so "
        "scaled_dot_product_attention becomes the ONNX Attention op, or keep the "
        "decomposition free of other ops between the two MatMuls.",
    )


def _lint_ir(model: ir.Model, name: str, max_k: int, pre: list[Finding]) -> LintReport:
    findings = list(pre)
    graph = model.graph
    findings.extend(_check_graph_io(graph))
    for node in graph:  # shapes only for the main graph; subgraphs belong to If/Loop/Scan
        findings.extend(_check_data_dependent(node))
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "TopK":
            findings.extend(_check_topk(node, max_k))
        if node.op_type in _ELEMENT_INDEX_OPS:
            findings.extend(_check_index_rank(node))
        if node.op_type in _SCATTER_OPS:
            findings.extend(_check_scatter(node))
        if node.op_type == "Softmax":
            findings.extend(_check_softmax(node))
    findings.sort(key=lambda f: f.severity is not Severity.ERROR)  # stable: errors first
    return LintReport(model=name, findings=tuple(findings))


def _inference_finding(err: StaticGraphError) -> Finding:
    return Finding(Rule.SHAPE_INFERENCE, Severity.ERROR, "", str(err))


def _lint_path(path: Path, max_k: int) -> LintReport:
    # The graph without its weights is small whatever the model's size, so inference runs in
    # memory; only small external constants (K, shapes) are read from disk.
    proto = read_model_proto(path)
    inline_small_external_tensors(proto, path.parent)
    pre: list[Finding] = []
    try:
        inferred = infer_shapes_model(proto, strict=True)
    except StaticGraphError as err:
        pre.append(_inference_finding(err))
        inferred = infer_shapes_model(proto, strict=False)
    model = ir.serde.deserialize_model(inferred)
    ir.external_data.set_base_dir(model.graph, path.parent)
    return _lint_ir(model, str(path), max_k, pre)


def lint_model(
    model_or_path: onnx.ModelProto | str | os.PathLike, *, max_topk: int = TENSORRT_MAX_TOPK
) -> LintReport:
    """Check that a graph is fully static and legal, and fast, for a TensorRT engine.

    Runs strict ONNX shape inference, then every rule; the model is not modified. For a path
    the weights stay on disk (only small external constants such as K are read), so models
    with > 2 GB of external data lint in seconds; a ModelProto over 2 GB is inferred through
    a file (`infer_shapes_path`).

    Raises:
        ArtifactError: the path is missing or is not an ONNX model.
    """
    if isinstance(model_or_path, onnx.ModelProto):
        pre: list[Finding] = []
        try:
            proto = infer_shapes_model(model_or_path, strict=True)
        except StaticGraphError as err:
            pre.append(_inference_finding(err))
            proto = infer_shapes_model(model_or_path, strict=False)
        name = model_or_path.graph.name or "<model>"
        return _lint_ir(ir.serde.deserialize_model(proto), name, max_topk, pre)
    return _lint_path(Path(model_or_path), max_topk)


def format_report(report: LintReport) -> str:
    """Human-readable report: one line per finding, errors first, then a summary line."""
    lines = []
    for finding in report.findings:
        where = f" [{finding.node}]" if finding.node else ""
        lines.append(f"{finding.severity.value}: {finding.rule.value}{where}: {finding.message}")
    verdict = "clean" if report else "NOT static-graph clean"
    lines.append(f"{report.model}: {len(report.errors)} error(s), {len(report.warnings)} "
                 f"warning(s): {verdict}")
    return "\n".join(lines)

"""Drop the axes of a Squeeze that are not of size 1 (torch's `squeeze(dim)` leaves such a dim alone).

`x.squeeze(1)` on a [B, N, C] tensor with N != 1 is a no-op in PyTorch, but the exporter can still emit an ONNX
`Squeeze(axes=[1])`, which ONNX defines only for size-1 axes: strict shape inference (and TensorRT) reject it.
With static shapes the pass decides each axis: a Squeeze none of whose axes is of size 1 is removed (its users read
its input), one with some size-1 axes keeps only those. Exact: no data changes.
"""

from __future__ import annotations

__all__ = ["DropNoOpSqueezePass"]

import logging

import numpy as np
import onnx_ir as ir

from shiva_export.errors import StaticGraphError

logger = logging.getLogger(__name__)


def _static_dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in value.shape]
    return None if None in dims else dims


def _axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    const = node.inputs[1].const_value
    if const is None:
        return None
    return [int(a) for a in np.asarray(const.numpy()).reshape(-1)]


def _no_op_axes(node: ir.Node) -> tuple[list[int], list[int]] | None:
    """(kept size-1 axes, dropped non-1 axes) of a Squeeze with static input and constant axes; None otherwise."""
    dims, axes = _static_dims(node.inputs[0]), _axes(node)
    if dims is None or axes is None:
        return None
    axes = [a + len(dims) if a < 0 else a for a in axes]
    ones = [a for a in axes if dims[a] == 1]
    others = [a for a in axes if dims[a] != 1]
    return ones, others


class DropNoOpSqueezePass(ir.passes.InPlacePass):
    """Remove (or narrow) every Squeeze whose axes include dims that are not 1 (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed = 0
        graph = model.graph
        for node in list(graph):
            if node.op_type != "Squeeze" or node.domain not in ("", "ai.onnx"):
                continue
            decided = _no_op_axes(node)
            if decided is None or not decided[1]:
                continue
            ones, _ = decided
            if ones:
                axes = ir.Value(name=f"{node.name or 'squeeze'}_axes")
                axes.const_value = ir.tensor(np.asarray(ones, dtype=np.int64), name=axes.name)
                graph.register_initializer(axes)
                node.replace_input_with(1, axes)
            else:
                source, output = node.inputs[0], node.outputs[0]
                if output.is_graph_output():
                    continue   # a graph output keeps its producer (never the case in a DiT graph)
                output.replace_all_uses_with(source)
                graph.remove(node, safe=True)
            changed += 1
        logger.debug("DropNoOpSqueezePass: %d Squeeze node(s) fixed", changed)
        return ir.passes.PassResult(model, modified=bool(changed))

    def ensures(self, model: ir.Model) -> None:
        bad = [node.name for node in model.graph if node.op_type == "Squeeze" and node.domain in ("", "ai.onnx")
               and (decided := _no_op_axes(node)) is not None and decided[1]]
        if bad:
            raise StaticGraphError(f"Squeeze of axes that are not of size 1 remains: {bad}; expected "
                                   "DropNoOpSqueezePass to remove them")

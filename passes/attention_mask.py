"""Give an ONNX Attention's mask its query dimension: [..., 1, S] -> [..., q, S] (an Expand, exact).

ONNX's Attention (opset 23) lets attn_mask broadcast to [B, H, q, kv], but ONNX Runtime's CPU kernel requires the
mask's second-to-last dim to equal the query length. A cross-attention whose mask is one row per sample (a caption
padding mask, [B, H, 1, S]) therefore runs only after the row is expanded to the q query tokens. With static shapes
the pass inserts one Expand per (mask, query length), shared by the Attention nodes that need it.
"""

from __future__ import annotations

__all__ = ["BroadcastAttentionMaskPass"]

import logging

import numpy as np
import onnx_ir as ir

from shiva_export.errors import StaticGraphError

logger = logging.getLogger(__name__)

MASK_INPUT = 3   # Attention(Q, K, V, attn_mask, past_key, past_value)


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in value.shape]
    return None if None in dims else dims


def _needs_rows(node: ir.Node) -> tuple[list[int], int] | None:
    """(mask dims, query length) of an Attention whose static mask has a single query row for q > 1 queries."""
    if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.inputs) <= MASK_INPUT:
        return None
    mask, query = _dims(node.inputs[MASK_INPUT]), _dims(node.inputs[0])
    if mask is None or query is None or len(mask) < 2 or len(query) != 4:
        return None   # a 3D Q ([B, q, hidden]) keeps q at dim 1; the exporter emits 4D
    rows = query[2]
    return (mask, rows) if mask[-2] == 1 and rows != 1 else None


class BroadcastAttentionMaskPass(ir.passes.InPlacePass):
    """Expand every single-row Attention mask to the query length (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        made: dict[tuple[int, int], ir.Value] = {}
        changed = 0
        for node in list(graph):
            decided = _needs_rows(node)
            if decided is None:
                continue
            mask_dims, rows = decided
            mask = node.inputs[MASK_INPUT]
            key = (id(mask), rows)
            if key not in made:
                target = [*mask_dims[:-2], rows, mask_dims[-1]]
                shape = ir.Value(name=f"{mask.name}_rows{rows}_shape")
                shape.const_value = ir.tensor(np.asarray(target, dtype=np.int64), name=shape.name)
                graph.register_initializer(shape)
                expand = ir.node("Expand", inputs=[mask, shape], name=f"{mask.name}_rows{rows}")
                expand.outputs[0].name = f"{mask.name}_rows{rows}"
                expand.outputs[0].shape = ir.Shape(target)
                expand.outputs[0].type = mask.type
                graph.insert_before(node, expand)
                made[key] = expand.outputs[0]
            node.replace_input_with(MASK_INPUT, made[key])
            changed += 1
        logger.debug("BroadcastAttentionMaskPass: %d Attention mask(s) expanded", changed)
        return ir.passes.PassResult(model, modified=bool(changed))

    def ensures(self, model: ir.Model) -> None:
        bad = [node.name for node in model.graph if _needs_rows(node) is not None]
        if bad:
            raise StaticGraphError(f"Attention masks with one query row remain: {bad}; expected "
                                   "BroadcastAttentionMaskPass to expand them to the query length")

"""Graph patterns that more than one pass must recognise the same way.

The lint warns about a Softmax outside fused attention, and Fp32IslandsPass leaves a Softmax
inside fused attention alone (a Cast there would break TensorRT's MHA fusion, whose kernels
already keep softmax in fp32). Both must agree on what "fusible" means, so it lives here.
"""

from __future__ import annotations

__all__ = ["ATTENTION_SCALE_OPS", "is_fusible_softmax"]

import onnx_ir as ir

# Ops allowed between the scores MatMul and the Softmax: scale (Mul/Div) and mask (Add).
ATTENTION_SCALE_OPS = frozenset({"Mul", "Div", "Add"})
_MAX_SCALE_CHAIN = 8


def _onnx_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


def _comes_from_matmul(value: ir.Value | None, depth: int = 0) -> bool:
    """True if `value` is MatMul -> [Mul/Div/Add]* (the scores of decomposed attention)."""
    if value is None or depth > _MAX_SCALE_CHAIN:
        return False
    producer = value.producer()
    if _onnx_op(producer, "MatMul"):
        return True
    if not _onnx_op(producer, *ATTENTION_SCALE_OPS):
        return False
    # Div only scales its numerator; Mul and Add may carry the scores on either side.
    candidates = producer.inputs[:1] if producer.op_type == "Div" else producer.inputs
    return any(_comes_from_matmul(v, depth + 1) for v in candidates)


def is_fusible_softmax(node: ir.Node) -> bool:
    """Softmax in MatMul -> [Mul/Div/Add]* -> Softmax -> MatMul, the decomposed attention
    that TensorRT fuses into one MHA kernel (its only consumers are the probs x V MatMuls)."""
    if not _onnx_op(node, "Softmax") or not _comes_from_matmul(node.inputs[0]):
        return False
    probs = node.outputs[0]
    uses = list(probs.uses())
    return (
        bool(uses)
        and not probs.is_graph_output()
        and all(_onnx_op(use.node, "MatMul") and use.idx == 0 for use in uses)
    )

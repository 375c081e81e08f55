"""Run a bf16 ONNX graph on ONNX Runtime CPU, which has no bf16 kernels for most of its ops.

ONNX Runtime 1.32's CPU provider registers bf16 only for data-movement ops (Cast, Reshape,
Transpose, Gather, Scatter*, Concat, ...) and LayerNormalization; Conv, MatMul, Gemm, Add, Mul,
Attention, RMSNormalization, TopK ... have none, so an exported bf16 graph cannot open there.
`emulate_bf16` returns the same graph with every bf16 tensor held in fp32 and rounded to bf16
(a Cast pair) right where it is produced: each op computes in fp32 on bf16-representable values
and stores a bf16-rounded result, which is what bf16 GPU kernels with fp32 accumulation do.
The graph's own Casts, fp32 islands and selection ops are all kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

BF16, FP32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT
_ROUNDING = "shiva.test.bf16_rounding"


def _round_to_bf16(graph: ir.Graph, value: ir.Value, after: ir.Node | None) -> None:
    """Insert Cast(bf16) -> Cast(fp32) after `value` (fp32 now) and move its consumers to the result."""
    uses = list(value.uses())
    output_slots = [i for i, v in enumerate(graph.outputs) if v is value]
    name = value.name
    if value.is_graph_input():       # feeds bind by name: the input keeps it
        name = f"{name}/bf16_rounded"
    else:
        value.name = f"{name}/fp32"
    down = ir.node("Cast", [value], {"to": int(BF16)}, name=f"{name}/to_bf16")
    up = ir.node("Cast", [down.outputs[0]], {"to": int(FP32)}, name=f"{name}/to_fp32")
    for cast in (down, up):
        cast.meta[_ROUNDING] = True
    down.outputs[0].name, down.outputs[0].dtype = f"{name}/bf16", BF16
    rounded = up.outputs[0]
    rounded.dtype, rounded.shape = FP32, value.shape
    if after is None:
        graph.insert_before(next(iter(graph)), [down, up])
    else:
        graph.insert_after(after, [down, up])
    for use in uses:
        use.node.replace_input_with(use.idx, rounded)
    for slot in output_slots:
        graph.outputs[slot] = rounded
    rounded.name = name


def emulate_bf16(path: str | Path) -> onnx.ModelProto:
    """The bf16 graph at `path` with bf16 storage emulated in fp32 (see the module doc); weights in memory."""
    typed = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    model = ir.serde.deserialize_model(typed)   # every intermediate typed: rounding is decided by dtype
    graph = model.graph
    for value in graph.initializers.values():
        array = value.const_value.numpy()
        if value.dtype == BF16:
            array = array.astype(np.float32)   # exact: every bf16 is an fp32
            value.dtype = FP32
        value.const_value = ir.tensor(array, name=value.name)
    for value in list(graph.inputs):
        if value.dtype == BF16:
            value.dtype = FP32
            _round_to_bf16(graph, value, after=None)
    for node in list(graph):
        assert all(v.dtype is not None for v in node.outputs), f"emulate_bf16: {node.name} has an untyped output"
        assert node.op_type not in ("Constant", "ConstantOfShape", "CastLike"), \
            f"emulate_bf16: {node.op_type} may carry a bf16 attribute; teach the emulation about it"
        if node.op_type == "Cast" and node.attributes.get_int("to") == int(BF16):
            node.attributes["to"] = ir.AttrInt64("to", int(FP32))   # rounded below, like any bf16 result
        for output in node.outputs:
            if output.dtype == BF16:
                output.dtype = FP32
                _round_to_bf16(graph, output, after=node)
    assert not any(getattr(v, "dtype", None) == BF16 for n in graph for v in n.outputs
                   if not n.meta.get(_ROUNDING)), "emulate_bf16: a bf16 value is left"
    return ir.serde.serialize_model(model)

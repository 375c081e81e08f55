"""Keep overflow-prone ops of an fp16/bf16 graph in fp32 with explicit Cast nodes.

TensorRT 11 is strongly typed: a layer computes in the dtype of its inputs, the fp16/bf16
builder flags are gone and `setComputePrecision` is rejected, so precision has to be spelled
out in the ONNX as Cast nodes. Normalizations and reductions over thousands of fp16 values
overflow (TensorRT warns "layernorm after self-attention with FP16 Reduce or Pow may cause
overflow"; NVIDIA's demoDiffusion runs a large DiT block in fp32 for the same reason).

`Fp32IslandsPass` casts the listed ops' low-precision inputs up to fp32 (constant inputs such as
LayerNorm scale/bias become fp32 initializers, no runtime Cast) and casts their outputs back.
Listed ops that feed each other share the fp32 tensor, so a LayerNorm -> Softmax chain is one
fp32 island instead of round-tripping through fp16 in between. A Softmax inside fusible
attention (MatMul -> [Mul/Div/Add]* -> Softmax -> MatMul) is left alone by default: TensorRT's
fused MHA kernels already keep softmax in fp32, and a Cast there would break the fusion.
"""

from __future__ import annotations

__all__ = ["DEFAULT_FP32_OPS", "Fp32IslandsPass", "require_fp32_islands"]

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from shiva_export.errors import StaticGraphError
from shiva_export.passes._patterns import is_fusible_softmax
from shiva_export.passes._shapes import fill_missing_types

logger = logging.getLogger(__name__)

DEFAULT_FP32_OPS = (
    "LayerNormalization",
    "RMSNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL2",
)
_LOW_PRECISION = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _is_low(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in _LOW_PRECISION


def _label(node: ir.Node) -> str:
    return node.name or f"{node.op_type} -> {node.outputs[0].name}"


class _Island:
    """fp32 twins of low-precision values, per graph (a subgraph may not define main-graph values)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.fp32_of: dict[ir.Value, ir.Value] = {}
        self.cast_back: list[ir.Node] = []

    def fp32_input(self, value: ir.Value, before: ir.Node) -> ir.Value:
        twin = self.fp32_of.get(value)
        if twin is not None:
            return twin
        constant = ir.convenience.get_const_tensor(value)
        if constant is not None and value.name:
            # Scale/bias and other constants: convert once, at export time, not per run.
            array = constant.numpy().astype(np.float32)
            name = f"{value.name}_fp32"
            while name in self.graph.initializers:
                name += "_"
            twin = ir.val(name, ir.DataType.FLOAT, array.shape,
                          const_value=ir.tensor(array, name=name))
            self.graph.register_initializer(twin)
        else:
            cast = ir.node("Cast", [value], {"to": int(ir.DataType.FLOAT)},
                           name=f"{value.name}/cast_fp32")
            twin = cast.outputs[0]
            twin.name, twin.dtype, twin.shape = f"{value.name}_fp32", ir.DataType.FLOAT, value.shape
            self.graph.insert_before(before, cast)
        self.fp32_of[value] = twin
        return twin

    def cast_output_back(self, node: ir.Node, output: ir.Value) -> None:
        original_name, original_dtype = output.name, output.dtype
        uses = list(output.uses())
        output_slots = [i for i, v in enumerate(self.graph.outputs) if v is output]
        output.name, output.dtype = f"{original_name}_fp32", ir.DataType.FLOAT
        cast = ir.node("Cast", [output], {"to": int(original_dtype)}, name=f"{original_name}/cast_back")
        low = cast.outputs[0]
        low.dtype, low.shape = original_dtype, output.shape
        self.graph.insert_after(node, cast)
        for use in uses:
            use.node.replace_input_with(use.idx, low)
        for slot in output_slots:
            self.graph.outputs[slot] = low
        low.name = original_name  # consumers and graph outputs keep binding by name
        self.fp32_of[low] = output
        self.cast_back.append(cast)

    def drop_dead_casts(self) -> None:
        """Cast-back nodes whose every consumer joined the island are no longer needed."""
        for cast in self.cast_back:
            out = cast.outputs[0]
            if not out.uses() and not out.is_graph_output():
                self.graph.remove(cast, safe=True)


class Fp32IslandsPass(ir.passes.InPlacePass):
    """Run the listed ops on fp32 inputs in an fp16/bf16 graph, with explicit Casts (TensorRT 11
    is strongly typed). A no-op on fp32 graphs.

    Args:
        op_types (`Iterable[str]`, defaults to `DEFAULT_FP32_OPS`): ONNX op types to run in fp32.
        keep_fused_attention (`bool`, defaults to `True`): leave a Softmax inside fusible
            attention in its dtype (TensorRT's fused MHA computes softmax in fp32 already).
    """

    def __init__(self, op_types: Iterable[str] = DEFAULT_FP32_OPS, *, keep_fused_attention: bool = True):
        super().__init__()
        self.op_types = frozenset(op_types)
        self.keep_fused_attention = keep_fused_attention

    def _applies_to(self, node: ir.Node) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type not in self.op_types:
            return False
        if self.keep_fused_attention and is_fusible_softmax(node):
            logger.debug("%s: inside fusible attention; left in its dtype", _label(node))
            return False
        return True

    def _candidates(self, model: ir.Model) -> list[ir.Node]:
        nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if self._applies_to(n)]
        if fill_missing_types(model, (v for n in nodes for v in (*n.inputs, *n.outputs))):
            nodes = [n for n in nodes if self._applies_to(n)]  # attention shapes may be known now
        return nodes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        islands: dict[ir.Graph, _Island] = {}
        wrapped = 0
        for node in self._candidates(model):
            if not any(_is_low(v) for v in node.inputs):
                continue
            island = islands.setdefault(node.graph, _Island(node.graph))
            for i, value in enumerate(node.inputs):
                if _is_low(value):
                    node.replace_input_with(i, island.fp32_input(value, before=node))
            for output in node.outputs:
                if output.name and _is_low(output):
                    island.cast_output_back(node, output)
            wrapped += 1
        for island in islands.values():
            island.drop_dead_casts()
        logger.debug("Fp32IslandsPass: %d node(s) moved to fp32", wrapped)
        return ir.passes.PassResult(model, modified=bool(wrapped))

    def ensures(self, model: ir.Model) -> None:
        require_fp32_islands(model, self.op_types, self.keep_fused_attention)


def require_fp32_islands(
    model: ir.Model, op_types: Iterable[str] = DEFAULT_FP32_OPS, keep_fused_attention: bool = True
) -> None:
    """Raise StaticGraphError naming every listed op that still takes fp16/bf16 inputs.

    Values without a dtype are typed by ONNX inference first (annotations only).
    """
    checker = Fp32IslandsPass(op_types, keep_fused_attention=keep_fused_attention)
    offenders = [
        f"'{_label(node)}' ({node.op_type})"
        for node in checker._candidates(model)
        if any(_is_low(v) for v in node.inputs)
    ]
    if offenders:
        raise StaticGraphError(
            f"ops that must run in fp32 still take fp16/bf16 inputs: {', '.join(offenders)}; "
            "expected explicit Cast-to-fp32 inputs (TensorRT 11 is strongly typed). Run "
            "Fp32IslandsPass after every pass that adds such ops."
        )

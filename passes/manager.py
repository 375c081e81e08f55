"""The pass manager for exported graphs: what the pipeline runs on every traced bucket graph before it is saved.

The exporter only traces; which rewrites make a graph TensorRT-safe is decided here, once, and handed to the
export by the pipeline (`pipeline.run_export`). Every pass checks its own postcondition; a violated one surfaces as
the pass's own `StaticGraphError` (one line naming the node), not as onnx_ir's wrapper.
"""

from __future__ import annotations

import onnx_ir as ir

from shiva_export.errors import StaticGraphError


class GraphPasses:
    """An `ir.passes.PassManager` of our passes, callable on an `ir.Model` in place."""

    def __init__(self, passes: list[ir.passes.PassBase]):
        self.passes = list(passes)
        self.manager = ir.passes.PassManager(self.passes)

    @property
    def names(self) -> list[str]:
        return [type(graph_pass).__name__ for graph_pass in self.passes]

    def __call__(self, model: ir.Model) -> ir.Model:
        try:
            return self.manager(model).model
        except (ir.passes.PassError, ir.passes.InvariantError) as err:
            cause = err.__cause__
            while cause is not None and not isinstance(cause, StaticGraphError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise


def tensorrt_safety(dtype: str) -> GraphPasses:
    """Rewrite what TensorRT rejects or computes badly. The Einsum rewrite runs first and for every dtype: the
    unpatchify permutation has no bf16 Einsum in ONNX, and the later passes' shape inference must see every dim;
    a Squeeze of axes that are not of size 1 (torch's no-op squeeze) is dropped; a one-row Attention mask gets its
    query rows (ONNX Runtime's CPU kernel does not broadcast it); TopK above TensorRT's K limit is split;
    reduced-precision graphs keep fp32 islands where fp16 overflows."""
    from shiva_export.passes.attention_mask import BroadcastAttentionMaskPass
    from shiva_export.passes.einsum import RewritePermutationEinsumPass
    from shiva_export.passes.precision import Fp32IslandsPass
    from shiva_export.passes.squeeze import DropNoOpSqueezePass
    from shiva_export.passes.topk import SplitLargeTopKPass

    return GraphPasses([RewritePermutationEinsumPass(), DropNoOpSqueezePass(), BroadcastAttentionMaskPass(),
                        SplitLargeTopKPass()]
                       + ([Fp32IslandsPass()] if dtype != "fp32" else []))

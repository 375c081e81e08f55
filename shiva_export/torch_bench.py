"""The PyTorch bench targets: the stage beside the engine bench that runs the pruned model itself.

`torch_target` makes the `torch-cudagraph` / `torch-eager` rows of `bench`: the PyTorch static-mode model (the
modules the graphs were traced from, with the family's shape-fixed inputs) timed on the GPU as one CUDA graph per
bucket, or eagerly. `engines.bench.run_bench(..., torch_target=torch_target)` takes it, as `engines.compare.run_check`
takes `reference.capture_trajectory`; the engines package runs no PyTorch model.
"""

from __future__ import annotations

__all__ = ["TorchTarget", "torch_target"]

import numpy as np

from shiva_export.engines.bench import TORCH_TARGETS, _CudaEvents, _Target
from shiva_export.errors import ConfigError


class TorchTarget(_CudaEvents, _Target):
    """The PyTorch static-mode model on the GPU: eager, or one CUDA graph per bucket (and the dense model)."""

    clock = "cuda_sync"
    device = "cuda"

    def __init__(self, ws, schedule, cfg, cuda_graph: bool):
        import torch

        from shiva_export.export import DenseModel, StaticBucket, torch_dtype

        self.name = "torch-cudagraph" if cuda_graph else "torch-eager"
        self.cuda_graph = cuda_graph
        self.pruned = ws.pruned
        self.pruned.to_dtype(torch_dtype(cfg.dtype))
        self.pruned.transformer.to("cuda")
        # the family's shape-fixed inputs (the adapter's `constants`), folded into the graphs, passed here
        constants = {name: value.to("cuda") for name, value in cfg.constants(self.pruned.config).items()}
        self.modules = {"dense": DenseModel(self.pruned.transformer, constants).eval()}
        # kept rows are written back into each block's own input (no copy of the sequence): what a PyTorch
        # deployment of the static model runs under inference mode
        self.modules.update({b.index: StaticBucket(self.pruned.transformer, b.k, inplace_scatter=True,
                                                   constants=constants).eval()
                             for b in schedule.buckets})
        self.pool = torch.cuda.graph_pool_handle() if cuda_graph else None
        self.graphs: list = []

    def prepare(self, key, feed):
        import torch

        module = self.modules[key]
        inputs = {n: torch.from_numpy(np.ascontiguousarray(a)).cuda() for n, a in feed.items()}
        if not self.cuda_graph:
            def call():
                with torch.inference_mode():
                    module(**inputs)
            call()
            return call
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):
                module(**inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            module(**inputs)
        self.graphs.append((graph, inputs))
        return graph.replay

    def close(self):
        import torch

        self.graphs.clear()
        self.pruned.transformer.to("cpu")
        self.pruned.to_dtype(torch.float32)
        torch.cuda.empty_cache()


def torch_target(ws, schedule, cfg, name: str) -> TorchTarget:
    """The bench target `name` (one of `engines.bench.TORCH_TARGETS`: "torch-cudagraph", "torch-eager") on the
    CUDA GPU for the artifact `ws`, its schedule and its ExportConfig `cfg`."""
    if name not in TORCH_TARGETS:
        raise ConfigError(f"bench target {name!r} is not a PyTorch target; expected one of {list(TORCH_TARGETS)}")
    return TorchTarget(ws, schedule, cfg, name == TORCH_TARGETS[0])

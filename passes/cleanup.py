"""Fold, prune and shape-annotate an exported graph with onnxscript's optimizer, then strict
shape inference, so the lint and TensorRT's parser see constants as constants and every
tensor with a static shape. Nothing here re-implements a pass that onnxscript/onnx_ir ship.
"""

from __future__ import annotations

__all__ = ["PROTOBUF_LIMIT", "optimize_model", "optimize_path"]

import logging
import os
import re
import secrets
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript.optimizer

from shiva_export.passes._files import read_model_proto
from shiva_export.passes._shapes import infer_shapes_file, infer_shapes_model

logger = logging.getLogger(__name__)

# Protobuf cannot serialize 2 GiB; bigger models must keep weights in external data.
PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF


def optimize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, dead-node removal, initializer/subexpression dedupe (onnxscript's
    `optimize`), then strict shape inference with data propagation.

    Raises:
        StaticGraphError: strict shape inference found inconsistent shapes.
    """
    optimized = onnxscript.optimizer.optimize(model)
    return infer_shapes_model(optimized, strict=True)


def _external_locations(model: ir.Model) -> set[str]:
    locations = set()
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            locations.add(value.const_value.location)
    return locations


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


def _own_data_files(dst: Path) -> list[Path]:
    """External-data files that optimize_path wrote for `dst` earlier (named `<dst>.<hex>.data`)."""
    pattern = re.compile(rf"^{re.escape(dst.name)}\.[0-9a-f]{{8}}\.data$")
    return [p for p in dst.parent.iterdir() if pattern.match(p.name)] if dst.parent.is_dir() else []


def optimize_path(
    src: str | os.PathLike, dst: str | os.PathLike, *, external_data: bool | None = None
) -> Path:
    """File-level `optimize_model` for models of any size; `dst` appears whole or not at all.

    Weights are read lazily (onnx_ir memory-maps external data) and shape inference runs on the
    file (`infer_shapes_path`), so models over 2 GB work. Weights go to external data when
    `external_data` is True, or, by default, when `src` used external data or they exceed
    2 GB; the data file is `<dst name>.<8 hex>.data` beside `dst`. A fresh name per write means
    the old `dst` never points at a half-written data file: the data lands first, then `dst` is
    replaced atomically, then data files of earlier writes to `dst` are removed.

    Raises:
        ArtifactError: `src` is missing or not an ONNX model.
        StaticGraphError: strict shape inference found inconsistent shapes.
    """
    src, dst = Path(src), Path(dst)
    read_model_proto(src)  # ArtifactError for a missing or non-ONNX file
    model = ir.load(src)
    if external_data is None:
        external_data = bool(_external_locations(model))
    onnxscript.optimizer.optimize(model)
    if not external_data and _initializer_bytes(model) >= PROTOBUF_LIMIT:
        external_data = True

    stale = _own_data_files(dst)
    data_name = f"{dst.name}.{secrets.token_hex(4)}.data" if external_data else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Stage beside dst (same filesystem, so the final os.replace is atomic).
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.partial-") as tmp:
        staged = Path(tmp) / dst.name
        ir.save(model, staged, external_data=data_name)
        infer_shapes_file(staged, staged, strict=True)
        if data_name is not None:
            os.replace(Path(tmp) / data_name, dst.parent / data_name)
        os.replace(staged, dst)
    for old in stale:
        if old.name != data_name:
            old.unlink(missing_ok=True)
    logger.info("optimized %s -> %s%s", src, dst, f" (+ {data_name})" if data_name else "")
    return dst

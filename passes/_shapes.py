"""Strict ONNX shape inference for models of any size.

`onnx.shape_inference.infer_shapes` serializes the model, which protobuf caps at 2 GB; above
that, inference must run on a file whose weights live in external data (`infer_shapes_path`,
as demoDiffusion's optimizer does). Both entry points here raise StaticGraphError when strict
inference finds the graph inconsistent, so callers get one error type.
"""

from __future__ import annotations

__all__ = ["fill_missing_types", "infer_shapes_file", "infer_shapes_model"]

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from shiva_export.errors import StaticGraphError

logger = logging.getLogger(__name__)

# Protobuf refuses to serialize a message of 2 GiB or more.
_PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF


def _inference_failed(subject: str, err: Exception) -> StaticGraphError:
    detail = " ".join(str(err).split())
    return StaticGraphError(
        f"{subject}: strict ONNX shape inference failed: {detail}; expected every node's "
        "input shapes to agree. Fix the exporter or the pass that produced this node."
    )


def infer_shapes_file(
    src: str | os.PathLike, dst: str | os.PathLike, *, strict: bool = True
) -> None:
    """Run shape inference from file to file; external data stays where it is and is not read."""
    try:
        onnx.shape_inference.infer_shapes_path(
            os.fspath(src), os.fspath(dst), check_type=strict, strict_mode=strict, data_prop=True
        )
    except onnx.shape_inference.InferenceError as err:
        raise _inference_failed(os.fspath(src), err) from err


def infer_shapes_model(model: onnx.ModelProto, *, strict: bool = True) -> onnx.ModelProto:
    """Return a copy of `model` with inferred value_info; models over 2 GB go through a file."""
    if model.ByteSize() < _PROTOBUF_LIMIT:
        try:
            return onnx.shape_inference.infer_shapes(
                model, check_type=strict, strict_mode=strict, data_prop=True
            )
        except onnx.shape_inference.InferenceError as err:
            raise _inference_failed(model.graph.name or "model", err) from err
    with tempfile.TemporaryDirectory(prefix="shiva-shapes-") as tmp:
        path = Path(tmp) / "model.onnx"
        # onnx_ir writes external data without mutating the caller's proto (onnx.save would).
        ir.save(ir.serde.deserialize_model(model), path, external_data="model.onnx.data")
        infer_shapes_file(path, path, strict=strict)
        return onnx.load(path, load_external_data=True)


def fill_missing_types(model: ir.Model, values: Iterable[ir.Value | None]) -> bool:
    """Annotate dtypes/shapes with ONNX inference when any of `values` lacks them.

    Graphs built by hand (or by passes that don't annotate) leave intermediate values untyped;
    a pass that decides by dtype or rank must not guess. Only type annotations change; onnx_ir
    leaves the weights out of the inference call, so this is cheap for big models. Returns
    whether inference ran.
    """
    if all(v is None or (v.dtype is not None and v.shape is not None) for v in values):
        return False
    logger.debug("filling missing value types with ONNX shape inference")
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return True

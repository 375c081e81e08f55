"""Strict ONNX shape inference for models of any size.

`onnx.shape_inference.infer_shapes` serializes the model, which protobuf caps at 2 GB; above
that, inference must run on a file whose weights live in external data (`infer_shapes_path`,
as demoDiffusion's optimizer does). Both entry points here raise StaticGraphError when strict
inference finds the graph inconsistent, so callers get one error type.
"""

from __future__ import annotations

__all__ = ["infer_shapes_file", "infer_shapes_model"]

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from shiva_export.errors import StaticGraphError

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

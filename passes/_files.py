"""Open ONNX files for the passes, turning unusable input into ArtifactError (CLI exit 2)."""

from __future__ import annotations

__all__ = ["read_model_proto"]

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from shiva_export.errors import ArtifactError


def read_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph of an .onnx file without its external weights (cheap for any model size).

    Raises:
        ArtifactError: the file is missing, unreadable or not an ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file; expected an .onnx model. Check the path.")
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        raise ArtifactError(f"{path}: not a readable ONNX model ({err}); expected a file "
                            "written by torch.onnx.export or onnx.save.") from err
    # An empty or unrelated file can still decode as an empty ModelProto.
    if not proto.HasField("graph") or not proto.opset_import:
        raise ArtifactError(f"{path}: not an ONNX model (no graph or opset_import); expected "
                            "a file written by torch.onnx.export or onnx.save.")
    return proto

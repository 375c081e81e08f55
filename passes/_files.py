"""Open ONNX files for the passes, turning unusable input into ArtifactError (CLI exit 2)."""

from __future__ import annotations

__all__ = ["inline_small_external_tensors", "read_model_proto"]

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper
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


# Shape-like constants (TopK K, Reshape shapes, Slice bounds) are far below this.
SMALL_TENSOR_BYTES = 64 * 1024


def inline_small_external_tensors(
    proto: onnx.ModelProto, base_dir: str | os.PathLike, limit: int = SMALL_TENSOR_BYTES
) -> int:
    """Read external initializers of at most `limit` bytes into the proto; return how many.

    Shape inference cannot read external data ("Cannot parse data from external tensors"), so a
    K or a Reshape shape saved externally would look data-dependent; weights stay on disk.
    """
    inlined = 0
    for tensor in proto.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if int(np.prod(tensor.dims, dtype=np.int64)) * itemsize > limit:
            continue
        external_data_helper.load_external_data_for_tensor(tensor, os.fspath(base_dir))
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        inlined += 1
    return inlined

"""A tiny DiT-shaped model exported as two bucket graphs sharing one weights file, like the real export.

`TinyDiT` has the product's I/O (`hidden_states` [B,C,H,W], `encoder_hidden_states` [B,S,Dj],
`pooled_projections` [B,P], `timestep` [B] fp32 -> `sample`), q/k RMSNorm (ONNX `RMSNormalization`) and joint
attention over text + the first `keep` image tokens (ONNX `Attention` at opset 23); `keep` plays the bucket.
Head dim 64 as in SD3.5, where TensorRT-RTX has fused fp16 kernels but no fused fp32 one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import external_data_helper, numpy_helper

B, C, H, W, S, DJ, P, DIM, HEADS = 2, 4, 4, 4, 5, 8, 6, 128, 2
INPUT_NAMES = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
WEIGHTS = "weights.bin"


class TinyDiT(torch.nn.Module):
    def __init__(self, keep: int = H * W):
        super().__init__()
        self.keep = keep
        self.proj_in = torch.nn.Linear(C, DIM)
        self.context = torch.nn.Linear(DJ, DIM)
        self.pooled = torch.nn.Linear(P, DIM)
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.proj_out = torch.nn.Linear(DIM, C)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        b, c, h, w = hidden_states.shape
        x = self.proj_in(hidden_states.flatten(2).transpose(1, 2))
        x = x + self.pooled(pooled_projections)[:, None] + timestep[:, None, None].to(x.dtype)
        kept, rest = x[:, : self.keep], x[:, self.keep :]
        joint = torch.cat([self.context(encoder_hidden_states), kept], 1)
        q, k, v = self.qkv(joint).chunk(3, -1)
        heads = lambda t: t.unflatten(-1, (HEADS, -1)).transpose(1, 2)  # noqa: E731
        head_dim = DIM // HEADS
        q, k = F.rms_norm(heads(q), (head_dim,)), F.rms_norm(heads(k), (head_dim,))
        attn = F.scaled_dot_product_attention(q, k, heads(v)).transpose(1, 2).flatten(2)
        x = torch.cat([kept + attn[:, -self.keep :], rest], 1)
        return self.proj_out(x).transpose(1, 2).reshape(b, c, h, w)


def make_inputs(dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": rng.standard_normal((B, C, H, W)).astype(dtype),
        "encoder_hidden_states": rng.standard_normal((B, S, DJ)).astype(dtype),
        "pooled_projections": rng.standard_normal((B, P)).astype(dtype),
        "timestep": rng.random(B).astype(np.float32),  # always fp32
    }


def export_graph(model: TinyDiT, dtype: torch.dtype) -> onnx.ModelProto:
    feed = make_inputs(np.float16 if dtype == torch.float16 else np.float32)
    args = tuple(torch.from_numpy(feed[n]) for n in INPUT_NAMES)
    program = torch.onnx.export(
        model, args, dynamo=True, opset_version=23, input_names=INPUT_NAMES, output_names=["sample"], verbose=False
    )
    return program.model_proto


def save_sharing_weights(models: dict[str, onnx.ModelProto], folder: Path) -> dict[str, Path]:
    """Save graphs into `folder` with all float weights in one `weights.bin`, each tensor stored once."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[tuple[str, bytes], tuple[int, int]] = {}
    paths = {}
    with open(folder / WEIGHTS, "wb") as blob:
        for name, model in models.items():
            for tensor in model.graph.initializer:
                # Shape constants stay inline: ORT needs them at load time (ShapeInferenceError otherwise).
                if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or not tensor.dims:
                    continue
                raw = numpy_helper.to_array(tensor).tobytes()
                key = (tensor.name, raw)
                if key not in written:
                    blob.write(b"\0" * (-blob.tell() % 64))  # aligned, as onnx's own writer does for big tensors
                    written[key] = (blob.tell(), len(raw))
                    blob.write(raw)
                offset, length = written[key]
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))  # raw_data form
                external_data_helper.set_external_data(tensor, WEIGHTS, offset=offset, length=length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
            paths[name] = folder / f"{name}.onnx"
            onnx.save_model(model, paths[name])
    return paths


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, TinyDiT]:
    torch.manual_seed(0)
    b0 = TinyDiT(keep=H * W).eval()
    b1 = TinyDiT(keep=H * W // 2).eval()
    b1.load_state_dict(b0.state_dict())  # buckets share every weight
    return {"b0": b0, "b1": b1}


@pytest.fixture(scope="session")
def fp32_export_master(tmp_path_factory, tiny_models) -> Path:
    folder = tmp_path_factory.mktemp("export_fp32")
    graphs = {name: export_graph(model, torch.float32) for name, model in tiny_models.items()}
    save_sharing_weights(graphs, folder)
    return folder


@pytest.fixture(scope="session")
def fp16_export_master(tmp_path_factory, tiny_models) -> Path:
    folder = tmp_path_factory.mktemp("export_fp16")
    model = TinyDiT(keep=H * W).eval()
    model.load_state_dict(tiny_models["b0"].state_dict())
    graphs = {"b0": export_graph(model.half(), torch.float16)}
    save_sharing_weights(graphs, folder)
    return folder


@pytest.fixture
def fp32_export(fp32_export_master, tmp_path) -> Path:
    """A private copy of the fp32 export folder (b0.onnx, b1.onnx, weights.bin) that a test may modify."""
    return Path(shutil.copytree(fp32_export_master, tmp_path / "export"))


@pytest.fixture
def fp16_export(fp16_export_master, tmp_path) -> Path:
    return Path(shutil.copytree(fp16_export_master, tmp_path / "export16"))


def touch_graph(onnx_path: Path) -> None:
    """Change an exported graph without breaking it (new doc string), as a re-export would."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    model.doc_string = "re-exported"
    onnx.save_model(model, str(onnx_path))


@pytest.fixture
def feed() -> dict[str, np.ndarray]:
    """Seeded fp32 inputs of the tiny model."""
    return make_inputs(np.float32)


@pytest.fixture
def feed16() -> dict[str, np.ndarray]:
    return make_inputs(np.float16)


@pytest.fixture
def torch_reference(tiny_models):
    """bucket -> fp32 torch output for `feed`."""

    def run(bucket: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return tiny_models[bucket](*(torch.from_numpy(inputs[n]) for n in INPUT_NAMES)).numpy()

    return run


@pytest.fixture
def change_graph():
    """Function that changes an exported graph in place without breaking it."""
    return touch_graph

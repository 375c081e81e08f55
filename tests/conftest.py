"""Session fixtures: one tiny artifact folder (freeze + export) shared by the check and bench tests.

Tests that write into a folder (check, bench, a broken engine set) take a private copy (`artifact_copy`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this once, when triton.language is first imported (by any test: torch.compile imports it too);
    # its CPU interpreter then runs the fused-kernel checks of test_kernels.py. It changes nothing else here: the
    # product takes the fused path only for CUDA tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def time_varying_policy(policy) -> None:
    """Give an untrained ratio policy a temporal trend (keep more tokens at high noise, as trained ones do).

    An untrained policy returns the target ratio at every step, which freezes into a single bucket; the check
    needs two buckets (steps on different engines, a swappable pair). Only freeze reads the policy.
    """
    with torch.no_grad():
        policy.time_mlp[-1].weight.copy_(torch.linspace(-0.5, 0.5, policy.hidden_dim))


def make_artifact(root: Path, model: str, steps: int = 6, buckets: int = 2) -> Path:
    from shiva_export import pipeline

    ws = pipeline.start(root, pipeline.ArtifactConfig(model=model, steps=steps, buckets=buckets))
    time_varying_policy(ws.pruned.policy)
    pipeline.run_freeze(ws)
    pipeline.run_export(ws)
    return root


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """tiny-sd35, 256 px, CFG batch 2, fp32, 6 steps frozen into 2 buckets: onnx/{b0,b1}{,.debug}.onnx, dense.onnx."""
    root = make_artifact(tmp_path_factory.mktemp("artifact") / "tiny-sd35", "tiny-sd35")
    buckets = json.loads((root / "manifest.json").read_text())["stages"]["freeze"]["buckets"]
    assert len(buckets) == 2, f"the fixture needs two buckets, the freeze gave {buckets}"
    return root


@pytest.fixture(scope="session")
def tiny_sd3_artifact(tmp_path_factory) -> Path:
    """tiny-sd3 (no dual attention, no qk-norm), 6 steps, 2 buckets."""
    return make_artifact(tmp_path_factory.mktemp("artifact") / "tiny-sd3", "tiny-sd3")


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    """A private copy of the tiny artifact folder that a test may check, bench or break."""
    return Path(shutil.copytree(tiny_artifact, tmp_path / "artifact"))


@pytest.fixture(scope="session")
def trt_rtx_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """The tiny artifact with TensorRT-RTX plans for both buckets, built on this CPU (the builder needs no GPU).
    Tests that write into it take a copy."""
    pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (a test extra)")
    from shiva_export import pipeline

    root = Path(shutil.copytree(tiny_artifact, tmp_path_factory.mktemp("rtx") / "artifact"))
    ws = pipeline.Workspace(root)
    pipeline.run_engines(ws, "trt-rtx")
    del ws
    return root

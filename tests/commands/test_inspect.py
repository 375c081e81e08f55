"""`inspect`: stages in pipeline order, and every engine's path with its freshness."""

from __future__ import annotations

import shutil
from pathlib import Path

from shiva_export.cli import EXIT_BAD_INPUT, EXIT_OK, main


def test_inspect_lists_stages_in_order_and_each_engine_with_its_path_and_freshness(trt_rtx_artifact, tmp_path,
                                                                                  capsys):
    folder = Path(shutil.copytree(trt_rtx_artifact, tmp_path / "artifact"))
    assert main(["inspect", "--out", str(folder)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.index("[freeze]") < out.index("[export]") < out.index("[engine]")
    for bucket in (0, 1):
        assert f"    bucket {bucket}: onnx/engines/trt-rtx/b{bucket}.plan (fresh)" in out

    with (folder / "onnx" / "engines" / "trt-rtx" / "b1.plan").open("ab") as plan:
        plan.write(b"changed")
    assert main(["inspect", "--out", str(folder)]) == EXIT_BAD_INPUT  # the runtime would refuse it
    out = capsys.readouterr().out
    assert "    bucket 0: onnx/engines/trt-rtx/b0.plan (fresh)" in out
    assert "    bucket 1: onnx/engines/trt-rtx/b1.plan (STALE: " in out and "sha256 differs from the manifest" in out

"""scripts/gpu_bench.py on this CPU: the command a GPU session runs first must not break where nothing can check it.

On a CPU the script times the fp32 model eagerly; the figures mean nothing here, the files and their fields do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.py"
TINY = ("--height", "256", "--width", "256", "--skip-schedule", "--runs", "1", "--warmup", "1")


def gpu_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--phase", "torch", *args], capture_output=True, text=True,
                          timeout=600)


def test_both_projection_layouts_are_timed_in_one_process(tmp_path):
    proc = gpu_bench("--model", "tiny-flux", *TINY, "--projections", "fused,separate", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {name: json.loads((tmp_path / f"torch-{name}.json").read_text()) for name in ("separate", "fused")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch-fused.json", "torch-fused.md", "torch-separate.json",
                                                          "torch-separate.md"]
    assert [r["fuse_projections"] for r in results.values()] == [False, True]
    # the separate layout ran first: fusing is in place
    assert proc.stdout.index("projections: separate") < proc.stdout.index("projections: fused")
    for result in results.values():
        rows = result["per_step"]
        assert list(rows) == ["dense", "keep1", "keep0.6", "keep0.4"]
        assert all(row["eager"]["mean_ms"] > 0 for row in rows.values())
        assert set(result["numerics"]) == {"keep0.6", "keep0.4"}
    assert ([row["k"] for row in results["fused"]["per_step"].values()]
            == [row["k"] for row in results["separate"]["per_step"].values()])
    assert "input projections fused: True" in (tmp_path / "torch-fused.md").read_text()


@pytest.mark.parametrize("model, options, message", [
    ("tiny-flux", ("--projections", "fused,fused"),
     "--projections takes separate and/or fused, each once, got 'fused,fused'"),
    ("tiny-sd35", ("--projections", "separate,fused"), "--projections fused: sd3: no fused projection layout"),
    ("tiny-flux", ("--kernels", "cuda"), "--kernels takes triton and/or torch, got 'cuda'"),
    ("tiny-sd35", ("--attention-backend", "native"),
     "--attention-backend native: no attention processor of SD3Transformer2DModel takes a backend"),
])
def test_bad_options_are_refused_in_one_line_with_exit_2_before_any_timing(tmp_path, model, options, message):
    proc = gpu_bench("--model", model, *TINY, *options, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "eager" not in proc.stdout
    assert not (tmp_path / "out").exists()

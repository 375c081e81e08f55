"""scripts/fidelity/study.py (issue #18): the quality-vs-speed study at CI size, and what its results must satisfy.

The smoke run pretrains the digits model for a few steps, trains routers for a few steps with `train --data`, and
runs every method once on four prompts (about two minutes on 2 cores). What is asserted are the study's invariants,
never a speed: dense against a second dense run gives PSNR inf and Fréchet distance 0; the routers at keep 1.0
equal dense on the same weights; First-Block-Cache at threshold 0 and merging at ratio 0 equal dense; FLOPs are
counted so that dense is 1.00x and every method's row is complete.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "fidelity"
STUDY = SCRIPTS / "study.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    proc = subprocess.run([sys.executable, str(STUDY), "--work", str(root / "work"), "--out", str(root / "out"),
                           "--smoke", "--samples", "4", "--targets", "0.6"], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "result": json.loads((root / "out" / "study.json").read_text()), "stdout": proc.stdout}


def test_dense_against_a_second_dense_run_is_identical(smoke):
    rerun = smoke["result"]["invariants"]["digits"]["dense_rerun"]
    assert rerun["psnr_vs_dense"] == "inf" and rerun["ssim_vs_dense"] == 1.0
    assert rerun["max_abs_vs_dense_latents"] == 0.0
    assert abs(rerun["frechet_vs_dense"]) < 1e-6


def test_keep_one_cache_zero_and_merge_zero_equal_dense(smoke):
    inv = smoke["result"]["invariants"]["digits"]
    assert inv["keep1_equals_dense_0.6"] <= 1e-5
    assert inv["cache_threshold0_equals_dense"] == 0.0
    assert inv["merge_ratio0_equals_dense"] == 0.0


def test_every_method_has_a_complete_row(smoke):
    rows = next(iter(smoke["result"]["models"].values()))
    families = {row["family"] for row in rows}
    assert families == {"dense", "dense, adapted weights", "fewer steps", "shiva adaptive", "shiva uniform", "random selection",
                        "grid selection", "ToMe", "shiva + First-Block-Cache", "First-Block-Cache", "TaylorSeer"}
    reference = rows[0]
    assert reference["label"] == "dense 28 steps" and reference["flop_speedup"] == 1.0
    for row in rows:
        for key in ("flop_speedup", "measured_speedup", "ssim_vs_dense", "accuracy", "frechet_vs_real",
                    "frechet_vs_dense", "flops_per_image", "seconds_per_image"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["label"], key)
        assert 0 <= row["accuracy"] <= 1 and -1 <= row["ssim_vs_dense"] <= 1
        if row["family"].startswith("shiva") or row["family"].endswith("selection"):   # on the adapted weights
            value = row["psnr_vs_same_weights"]
            assert value == "inf" or math.isfinite(value), row["label"]
    by_family = {row["family"]: row for row in rows}
    assert by_family["fewer steps"]["flop_speedup"] == pytest.approx(28 / 14)
    # equal-FLOP operating points are equal in FLOPs: uniform keep and ToMe within a few %, the same k for selection
    shiva = by_family["shiva adaptive"]
    assert shiva["flop_speedup"] > 1
    assert by_family["shiva uniform"]["flops_per_image"] == pytest.approx(shiva["flops_per_image"], rel=0.03)
    assert by_family["ToMe"]["flops_per_image"] == pytest.approx(shiva["flops_per_image"], rel=0.05)


def test_outputs_and_answers_are_written(smoke):
    out = smoke["root"] / "out"
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| shiva adaptive 0.6 |" in table and "| dense 28 steps |" in table
    answers = smoke["result"]["answers"]
    assert [a["target"] for a in answers["adaptive_vs_uniform"]] == [0.6]
    assert answers["stacking"] and answers["equal_speed"]["flop_speedup"]["psnr_vs_dense"]


def test_a_bad_target_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(STUDY), "--work", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--targets", "1.5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--targets" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_pareto_front_and_equal_speed_interpolation():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import study
    finally:
        sys.path.remove(str(SCRIPTS))
    points = [(1.0, 30.0), (1.5, 25.0), (1.4, 20.0), (2.0, 10.0), (2.0, 12.0)]
    assert study.pareto(points, higher_better=True) == [(1.0, 30.0), (1.5, 25.0), (2.0, 12.0)]
    assert study.pareto([(1.0, 2.0), (2.0, 3.0), (2.0, 9.0)], higher_better=False) == [(1.0, 2.0), (2.0, 3.0)]
    assert study.pareto([(1.0, 5.0), (2.0, 3.0)], higher_better=False) == [(2.0, 3.0)]   # faster and better
    assert study.interpolate_at([(1.0, 30.0), (2.0, 10.0)], 1.5) == pytest.approx(20.0)
    assert study.interpolate_at([(1.0, 30.0), (2.0, 10.0)], 2.5) is None

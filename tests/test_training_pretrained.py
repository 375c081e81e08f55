"""The issue's training claims on a tiny model with learned weights and its own data (CPU, about 9 minutes).

tiny-sd35 has random weights: every token's block update has nearly the same size, so there is little for a router
to find and the stage-3 claim fails there (tests/test_training.py, docs/training-data.md). scripts/pretrain_toy.py
pretrains the same architecture for 300 steps on synthetic "shapes" latents; this module runs the demo protocol of
test_training.py on that model and its data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shiva_export import checkpoint as ckpt
from tests.test_training import DEMO, run_cli

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_toy.py"
PRETRAIN_STEPS = "300"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(root), "--steps", PRETRAIN_STEPS],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "ckpt"
    code = run_cli("--model", str(root / "model"), "--data", str(root / "data"), "--out", str(out),
                   *[part for item in DEMO.items() for part in item])
    assert code == 0
    return {"root": root, "summary": json.loads((out / ckpt.SUMMARY_FILE).read_text()),
            "pretrain": json.loads((root / "model" / "pretrain_log.json").read_text())}


def test_the_pretrained_fixture_learned_its_data(pretrained):
    log = pretrained["pretrain"]["log"]
    assert log[-1]["step"] == int(PRETRAIN_STEPS)
    assert log[-1]["held_out_loss"] < log[0]["held_out_loss"] / 3, log  # measured 1.78 -> 0.37


def test_with_learned_weights_and_data_every_claim_holds_including_stage3(pretrained):
    """Measured (seeds 0 / 1 / 2): stage 3 is 35-38% below the untrained router at the same per-layer k."""
    summary = pretrained["summary"]
    assert summary["checks"] and all(summary["checks"].values()), summary["checks"]
    stage3 = summary["after_stage3"]
    assert stage3["learned"] <= 0.7 * stage3["untrained_router"], stage3
    assert stage3["learned"] < stage3["learned_no_adapters"] < stage3["untrained_router"]


def test_with_learned_weights_the_schedule_is_not_bang_bang(pretrained):
    """With real structure the error grows faster than linearly as tokens go, so the optimum is interior."""
    per_step = pretrained["summary"]["schedule"]["mean_keep"]
    interior = [r for r in per_step if 0.15 < r < 0.95]
    assert len(interior) >= len(per_step) // 2, per_step

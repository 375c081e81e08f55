"""The issue's training claims on a tiny model with learned weights and its own data (CPU, about 8 minutes).

tiny-sd35 has random weights: every token's block update has nearly the same size, so there is little for a router
to find and the stage-3 claim fails there (tests/test_training.py, docs/training-data.md). scripts/pretrain_toy.py
pretrains the same architecture for 300 steps on synthetic "shapes" latents; this module checks that it learned
them and runs the demo protocol of test_training.py on that model and its data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shiva_export import checkpoint as ckpt
from shiva_export.models import load_transformer
from shiva_export.training_data import LatentDataset
from tests.test_training import DEMO, run_cli

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "pretrain_toy.py"
PRETRAIN_STEPS = 300
DATA_SAMPLES = 512   # the script's default --samples
BASE = "tiny-sd35"
SEED = 0


@pytest.fixture(scope="module")
def pretrain_toy():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import pretrain_toy
    finally:
        sys.path.remove(str(SCRIPTS))
    return pretrain_toy


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, pretrain_toy):
    root = tmp_path_factory.mktemp("toy")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(root), "--steps", str(PRETRAIN_STEPS)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "ckpt"
    code = run_cli("--model", str(root / "model"), "--data", str(root / "data"), "--out", str(out),
                   *[part for item in DEMO.items() for part in item])
    assert code == 0
    return {"root": root, "summary": json.loads((out / ckpt.SUMMARY_FILE).read_text()),
            "pretrain": json.loads((root / "model" / pretrain_toy.LOG_FILE).read_text())}


def test_the_pretrained_model_learned_its_data(pretrained, pretrain_toy):
    """The saved model's held-out loss, computed here, is the logged one and far below the initialisation's."""
    log = pretrained["pretrain"]["log"]
    assert [entry["step"] for entry in (log[0], log[-1])] == [0, PRETRAIN_STEPS]
    model, _ = load_transformer(str(pretrained["root"] / "model"))
    initial, base = load_transformer(BASE)
    world = pretrain_toy.shapes_world(model.config, base.defaults, SEED)
    learned = pretrain_toy.evaluate(model, world, SEED)
    untrained = pretrain_toy.evaluate(initial, world, SEED)
    assert learned == pytest.approx(log[-1]["held_out_loss"], rel=1e-6)
    assert untrained == pytest.approx(log[0]["held_out_loss"], rel=1e-6)
    assert learned < untrained / 3, log   # measured 1.78 -> 0.37
    # the script's streams (held-out set, samples, noise, levels, AdamW) are the documented run's: measured 0.37227
    assert learned == pytest.approx(0.37227, rel=1e-2), log
    batch = LatentDataset(pretrained["root"] / "data", model.config).read(range(8))   # the data, as drawn
    latents, context, pooled = (t[:8] for t in world.sample(DATA_SAMPLES, torch.Generator().manual_seed(SEED + 4)))
    assert torch.equal(batch.latents, latents) and torch.equal(batch.encoder_hidden_states, context)
    assert torch.equal(batch.pooled_projections, pooled)


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

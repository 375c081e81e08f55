"""scripts/toy_topk.py: the paper's synthetic check (App. A.3) of the residual-aware differentiable top-k."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "toy_topk.py"
PAPER = ("--n", "100", "--d", "16", "--signal", "20", "--k-init", "50", "--seeds", "0,1,2")
TINY = ("--steps", "10", "--warmup", "5", "--trials", "5", "--eval-batch", "16")


def run_toy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def run_json(*args: str) -> dict:
    proc = run_toy(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def paper() -> dict:
    return run_json(*PAPER)


def test_paper_setting_runs_every_seed_with_the_papers_hyperparameters(paper):
    assert [row["seed"] for row in paper["seeds"]] == [0, 1, 2]
    s = paper["settings"]
    assert (s["n"], s["d"], s["signal"], s["signal_mean"], s["k_init"]) == (100, 16, 20, 10.0, 50.0)
    assert (s["lr_router"], s["lr_k"], s["lam"], s["warmup"], s["steps"]) == (0.1, 2.0, 0.1, 100, 700)
    assert (s["tau_rank"], s["tau_sel"]) == ([0.2, 0.05], [0.1, 0.02])


def test_k_settles_between_15_and_25_for_20_signal_tokens_on_every_seed(paper):
    for row in paper["seeds"]:
        assert 15 <= row["k"] <= 25, row


def test_at_least_90_percent_of_kept_tokens_are_signal_on_every_seed(paper):
    for row in paper["seeds"]:
        assert row["precision"] >= 0.9, row


def test_at_least_90_percent_of_signal_tokens_are_kept_on_every_seed(paper):
    for row in paper["seeds"]:
        assert row["recall"] >= 0.9, row


def test_ste_gradient_has_cosine_at_least_0_7_with_the_ideal_two_path_gradient(paper):
    assert paper["cosine_wrt"] == "pi"
    assert paper["cosine_trials"] == 3 * 200
    assert paper["cosine_mean"] >= 0.7, paper


def test_k_settles_near_40_for_40_signal_tokens_among_200():
    result = run_json("--n", "200", "--signal", "40", "--k-init", "100", "--seeds", "0,1", "--trials", "10")
    for row in result["seeds"]:
        assert 35 <= row["k"] <= 45, row
        assert row["precision"] >= 0.9 and row["recall"] >= 0.9, row


def test_same_seed_gives_identical_json():
    assert run_json(*TINY, "--seeds", "3") == run_json(*TINY, "--seeds", "3")


def test_default_output_is_a_table_with_one_row_per_seed():
    proc = run_toy(*TINY, "--seeds", "4,5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "precision" in line and "recall" in line)
    assert [line.split()[0] for line in lines[header + 1:header + 3]] == ["4", "5"]
    assert any(line.startswith("cosine(STE, ideal") for line in lines)


@pytest.mark.parametrize("args, message", [
    (("--signal", "101"), "--signal must be in [1, n=100], got 101"),
    (("--n", "50", "--signal", "60", "--k-init", "10"), "--signal must be in [1, n=50], got 60"),
    (("--k-init", "0"), "--k-init must be in [1, n=100], got 0"),
    (("--k-init", "100.5"), "--k-init must be in [1, n=100], got 100.5"),
    (("--seeds", "a,b"), "--seeds must be comma-separated integers"),
])
def test_invalid_arguments_are_rejected_with_a_usage_error(args, message):
    proc = run_toy(*args)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and message in proc.stderr, proc.stderr

"""Fail fast, say it once, say it right: what a user met on a first run (issue: a real pipeline folder and a GPU
machine, as a user brings them). A backend that cannot build or run here is refused before any work, in one line;
check/repro.sh runs with no virtual environment on PATH; every option's help shows its default; one set of backend
names; a model with nothing to prune is named as such; a bucket count that throws the schedule away is warned about.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shiva_export import pipeline
from shiva_export.cli import EXIT_BAD_INPUT, build_parser, main
from shiva_export.errors import BackendUnavailableError

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_build_with_a_backend_that_is_not_installed_stops_before_any_stage(tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx")  # the other flavour must be the one missing
    if __import__("importlib").util.find_spec("tensorrt") is not None:
        pytest.skip("needs a machine where full TensorRT is not installed")
    out = tmp_path / "out"
    assert main(["build", "--backend", "tensorrt", "--out", str(out)]) == EXIT_BAD_INPUT
    assert "tensorrt is not importable" in one_error_line(capsys)
    assert not out.exists()  # no freeze, no export: nothing was written


@pytest.fixture(scope="module")
def with_trt_rtx_plans(trt_rtx_artifact, tmp_path_factory) -> Path:
    """A private copy of the artifact with TensorRT-RTX plans (built on this CPU)."""
    return Path(shutil.copytree(trt_rtx_artifact, tmp_path_factory.mktemp("rtx-copy") / "artifact"))


@NO_GPU
@pytest.mark.parametrize("spelling", ["tensorrt-rtx", "trt-rtx"])
def test_check_with_plans_that_cannot_run_here_is_refused_before_the_trajectory(spelling, with_trt_rtx_plans,
                                                                                 capsys, caplog):
    caplog.set_level(logging.INFO, logger="shiva_export")
    assert main(["check", "--out", str(with_trt_rtx_plans), "--backend", spelling]) == EXIT_BAD_INPUT
    assert "its engines cannot run here (no CUDA GPU here)" in one_error_line(capsys)
    assert "captured" not in caplog.text and not (with_trt_rtx_plans / "check.json").exists()


@NO_GPU
def test_runtime_verifies_then_refuses_plans_it_cannot_run_at_from_artifacts(with_trt_rtx_plans, capsys):
    from shiva_export.runtime import ShivaEngineTransformer

    with pytest.raises(BackendUnavailableError, match=r"the trt-rtx engines are intact but cannot run on this "
                                                      r"machine \(no CUDA GPU here\)"):
        ShivaEngineTransformer.from_artifacts(with_trt_rtx_plans, backend="tensorrt-rtx")
    assert main(["inspect", "--out", str(with_trt_rtx_plans)]) == 0
    assert "runtime: intact, cannot run here: no CUDA GPU here (trt-rtx)" in capsys.readouterr().out


def test_repro_script_runs_without_the_venv_on_path_and_carries_the_engine_flags(with_trt_rtx_plans):
    ws = pipeline.Workspace(with_trt_rtx_plans)
    from shiva_export.engines.compare import run_check
    from shiva_export.reference import capture_trajectory

    assert run_check(ws, backends=("onnxruntime",), device="cpu", reference=capture_trajectory)
    del ws
    script = with_trt_rtx_plans / "check" / "repro.sh"
    text = script.read_text()
    assert f"PY={sys.executable}" in text
    assert re.search(r"POLYGRAPHY_USE_TENSORRT_RTX=1 \"\$POLYGRAPHY\" convert onnx/b0\.onnx --convert-to trt "
                     r"--strongly-typed --decomposable-attentions", text)
    # only the ONNX Runtime comparisons: the plans' conversion is what a supported GPU machine repeats
    runnable = "\n".join(line for line in text.splitlines() if "convert" not in line)
    script.write_text(runnable + "\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert done.stdout.count("PASSED") >= 2


def test_every_option_says_its_default():
    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    missing = []
    for verb, sub in verbs.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.required or action.dest == "help":
                continue
            shown = sub._get_formatter()._get_help_string(action) or ""
            if "default" not in shown:
                missing.append(f"{verb} {action.option_strings[0]}")
        assert "%(default)" not in text
    assert missing == []


def test_backend_names_are_one_set_across_verbs():
    from shiva_export.engines.runners import ENGINE_SET_CHOICES

    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    for verb in ("check", "bench"):
        action = next(a for a in verbs[verb]._actions if a.dest == "backend")
        assert {"onnxruntime", "tensorrt", "tensorrt-rtx", "ort", "trt", "trt-rtx"} <= set(action.choices)
    engine = next(a for a in verbs["engine"]._actions if a.dest == "backend")
    assert set(engine.choices) == {"onnxruntime", "tensorrt", "tensorrt-rtx", "ort", "trt", "trt-rtx"}
    assert {"tensorrt", "tensorrt-rtx"} <= set(ENGINE_SET_CHOICES)
    assert [pipeline.backend_name(n) for n in ("onnxruntime", "tensorrt", "tensorrt-rtx")] == ["ort", "trt", "trt-rtx"]


def test_a_one_block_model_says_there_is_nothing_to_prune(tmp_path, capsys):
    from tests.pipelines import save_sd3_pipeline

    folder = save_sd3_pipeline(tmp_path / "pipe", num_layers=1)  # diffusers' own tiny SD3 test transformer
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["build", "--model", str(folder), "--out", str(out)]) == EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "the transformer has 1 block; block 0 stays dense, so there is nothing to prune" in line
    assert not out.exists()


def test_one_bucket_for_a_time_varying_schedule_warns_with_the_keep_it_gives_away(caplog):
    from shiva_export.models import read_preset
    from shiva_export.passes.freeze import FreezeConfig, freeze

    config = read_preset("tiny-sd35")["config"]
    ramp = lambda t: (0.2 + 0.8 * (1 - t / 1000)).unsqueeze(1).repeat(1, 6).clamp(0.1, 1.0)  # noqa: E731
    caplog.set_level(logging.WARNING, logger="shiva_export")
    four = freeze(ramp, config, 256, 256, 2, 24, FreezeConfig(num_steps=8, align=16, max_buckets=4))
    assert "bucketing gives away" not in caplog.text
    one = freeze(ramp, config, 256, 256, 2, 24, FreezeConfig(num_steps=8, align=16, max_buckets=1))
    assert one.summary.realised_keep_ratio > four.summary.realised_keep_ratio
    warning = re.search(r"1 bucket\(s\) run keep ([\d.]+) where the schedule asks for ([\d.]+): bucketing gives "
                        r"away ([\d.]+) of the keep ratio .* --buckets 2 or more", caplog.text)
    assert warning and float(warning[1]) == pytest.approx(one.summary.realised_keep_ratio, abs=1e-3)

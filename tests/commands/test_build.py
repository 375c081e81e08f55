"""`python -m shiva_export build`: the README's main job, end to end on a clean folder, then a fast resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shiva_export.cli import VERBS, main
from shiva_export.manifest import Manifest
from shiva_export.models import shipped_router
from shiva_export.records import CheckRecord, ExportRecord

pytestmark = pytest.mark.slow


def shiva(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shiva_export", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def digest(folder: Path) -> dict[str, str]:
    """Every file's sha256, except the folder's lock file (it holds the last writer's PID)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".shiva.lock"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One default build (tiny-sd35, shipped router) into a clean folder."""
    out = tmp_path_factory.mktemp("build") / "artifacts"
    return out, shiva("build", "--out", str(out), cwd=out.parent)


def test_default_build_on_a_clean_folder_writes_every_artifact_and_exits_0(built):
    out, result = built
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = Manifest.load(out)
    for stage in ("freeze", "export", "lint", "engine", "check", "bench", "report"):
        assert manifest.record(stage) is not None, stage
        manifest.verify_files(stage)
    graphs = manifest.require(ExportRecord).graphs
    assert graphs and all((out / "onnx" / g.file).is_file() for g in graphs)
    assert (out / "onnx" / "weights.bin").is_file()
    assert json.loads((out / "check.json").read_text())
    for name in ("report.md", "report.json", "keep_ratio.png"):
        assert (out / "report" / name).stat().st_size > 0
    assert "parity" in result.stdout and "bucket" in result.stdout
    assert manifest.require(CheckRecord).passed is True


def test_default_build_uses_the_router_trained_and_shipped_for_the_preset(built):
    """No --router: the checkpoint our own `train` verb made (scripts/ship_router.py) ships in the package."""
    out, result = built
    assert result.returncode == 0, result.stderr[-3000:]
    shipped = shipped_router("tiny-sd35")
    assert shipped is not None, "the package ships no router for the default preset"
    manifest = Manifest.load(out)
    assert manifest.data["config"]["router"] == str(Path(shipped).resolve())
    summary = json.loads((Path(shipped) / "summary.json").read_text())
    assert summary["checks"]["mean_keep_within_0.03"] and summary["checks"]["schedule_not_flat"], summary["checks"]
    assert summary["checks"]["stage2_beats_random"] and summary["checks"]["stage2_beats_grid"], summary["checks"]
    schedule = json.loads((out / "schedule.json").read_text())
    assert len(schedule["buckets"]) >= 2                              # its learned schedule is not flat


def test_second_build_with_the_same_inputs_reuses_every_stage(built):
    """Speed of the resume is the benchmarks' business; here: nothing is redone or rewritten."""
    out, _ = built
    before = {k: v for k, v in digest(out).items() if not k.startswith("report/") and k != "manifest.json"}
    second = shiva("build", "--out", str(out), cwd=out.parent)
    assert second.returncode == 0, second.stderr[-3000:]
    reused_line = next(line for line in second.stdout.splitlines() if "stages" in line)
    for stage in ("freeze", "export", "check", "bench"):
        assert stage in reused_line.split("reused:")[1], reused_line
    after = {k: v for k, v in digest(out).items() if not k.startswith("report/") and k != "manifest.json"}
    assert after == before  # nothing rebuilt


def test_every_verb_has_help(tmp_path, capsys):
    """Through a fresh interpreter once (`python -m`), then every verb in this process (the parser is the same)."""
    result = shiva(VERBS[0], "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--" in result.stdout, result.stderr
    for verb in VERBS:
        with pytest.raises(SystemExit) as exit_:
            main([verb, "--help"])
        assert exit_.value.code == 0, verb
        out = " ".join(capsys.readouterr().out.split())
        assert out.startswith(f"usage: python -m shiva_export {verb} [-h]") and " --" in out, (verb, out[:200])


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-preset"], "unknown model preset"),
    (["--buckets", "0"], "--buckets 0 must be >= 1"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--height", "250"], "not divisible"),
])
def test_bad_build_input_exits_2_with_a_clear_message(tmp_path, args, message):
    result = shiva("build", "--out", str(tmp_path / "out"), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_folder_without_a_transformer_exits_2(tmp_path):
    (tmp_path / "model").mkdir()
    result = shiva("export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no transformer found" in result.stderr


def test_unwritable_out_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = shiva("build", "--out", str(blocker / "sub"), cwd=tmp_path)
    assert result.returncode == 2
    assert "--out" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_during_export_leaves_no_partial_artifacts_and_keeps_the_old_graphs(built, tmp_path):
    out, _ = built
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    before = digest(copy / "onnx")
    proc = subprocess.Popen([sys.executable, "-m", "shiva_export", "export", "--out", str(copy), "--force"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 900     # hang guard only
    while time.time() < deadline and not any(p.name.startswith(".onnx.partial") for p in copy.iterdir()):
        time.sleep(0.2)
    assert any(p.name.startswith(".onnx.partial") for p in copy.iterdir()), "export never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)     # honoured after the graph being traced (export.interrupts_between_graphs)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert not [p for p in copy.rglob("*") if ".partial" in p.name]
    assert digest(copy / "onnx") == before

"""The stages name no backbone family: what a family is lives in its adapter (shiva_export/backbones/) and its
presets; every other module asks the adapter. A family name in a stage (code, comment, docstring or help text)
is a seam that a new family would have to find and patch."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_DIRS = ("shiva_export", "engines", "passes")
FAMILY_OWNED = ("shiva_export/backbones/", "shiva_export/presets/")
FAMILY_NAMES = re.compile(r"SD3|Joint|Flux|FLUX|PixArt|StableDiffusion3")


def stage_files() -> list[Path]:
    files = []
    for folder in STAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if path.is_symlink() or any(relative.startswith(owned) for owned in FAMILY_OWNED):
                continue
            files.append(path)
    return files


def test_the_stage_files_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in stage_files()}
    assert {"shiva_export/export.py", "engines/trajectory.py", "passes/freeze.py",
            "shiva_export/commands/_args.py"} <= names
    assert not any(name.startswith(FAMILY_OWNED) for name in names)


def test_no_stage_names_a_backbone_family():
    hits = [f"{path.relative_to(ROOT).as_posix()}:{number}: {line.strip()}"
            for path in stage_files()
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            if FAMILY_NAMES.search(line)]
    assert not hits, "family names outside shiva_export/backbones/ and presets/ (ask the adapter):\n" + "\n".join(hits)

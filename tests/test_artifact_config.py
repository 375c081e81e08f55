"""`ArtifactConfig.resolve`: an unset option takes the model's default, a given one is used or refused, never
silently replaced (`--align 0` used to become the preset's 16)."""

from __future__ import annotations

import math

import pytest

from shiva_export.cli import EXIT_BAD_INPUT, main
from shiva_export.errors import ConfigError
from shiva_export.models import read_preset
from shiva_export.pipeline import ArtifactConfig

TINY_DEFAULTS = read_preset("tiny-sd35")["defaults"]


@pytest.mark.parametrize("args, message", [
    (["--align", "0"], "--align 0 must be >= 1"),
    (["--align", "-16"], "--align -16 must be >= 1"),
    (["--k-min", "0"], "--k-min 0 must be >= 1"),
    (["--opset", "17"], "--opset 17 is not supported; expected 18..23"),
    (["--opset", "24"], "--opset 24 is not supported; expected 18..23"),
    (["--height", "0"], "--height 0 must be >= 1"),
    (["--width", "-8"], "--width -8 must be >= 1"),
    (["--batch", "0"], "--batch 0 must be >= 1"),
    (["--context-tokens", "0"], "--context-tokens 0 must be >= 1"),
    (["--shift", "0"], "--shift 0 must be a finite number > 0"),
    (["--shift", "-1.5"], "--shift -1.5 must be a finite number > 0"),
    (["--shift", "nan"], "--shift nan must be a finite number > 0"),
    (["--shift", "inf"], "--shift inf must be a finite number > 0"),
])
def test_out_of_range_option_exits_2_with_one_line_naming_it_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["freeze", "--out", str(out), *args]) == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not out.exists()


@pytest.mark.parametrize("field, value, message", [
    ("align", 0, "--align 0 must be >= 1"),
    ("k_min", 0, "--k-min 0 must be >= 1"),
    ("opset", 0, "--opset 0 is not supported"),
    ("shift", math.nan, "--shift nan must be a finite number > 0"),
])
def test_resolve_refuses_a_given_value_instead_of_replacing_it_with_the_default(field, value, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        ArtifactConfig(model="tiny-sd35", **{field: value}).resolve(TINY_DEFAULTS)


def test_unset_options_take_the_models_defaults_and_given_ones_are_kept():
    default = ArtifactConfig(model="tiny-sd35").resolve(TINY_DEFAULTS)
    assert (default.align, default.align_to, default.k_min) == (16, "k", None)   # k_min None: FreezeConfig -> align
    assert (default.height, default.width, default.batch, default.context_tokens) == (256, 256, 2, 24)
    given = ArtifactConfig(model="tiny-sd35", align=1, k_min=1, height=128, batch=1, opset=18).resolve(TINY_DEFAULTS)
    assert (given.align, given.k_min, given.height, given.width, given.batch, given.opset) == (1, 1, 128, 256, 1, 18)
    assert ArtifactConfig(model="folder").resolve({}).align == 64                # no model default: 64

"""`python -m shiva_export freeze`: a thin verb over pipeline.run_freeze that writes a loadable schedule."""

from __future__ import annotations

from shiva_export.passes.freeze import Schedule

from shiva_export.cli import EXIT_BAD_INPUT, EXIT_OK, main


def test_freeze_verb_writes_a_schedule_and_reuses_it_when_inputs_are_unchanged(tmp_path, capsys):
    argv = ["freeze", "--model", "tiny-sd35", "--out", str(tmp_path), "--target-keep", "0.5", "--steps", "8",
            "--align", "16"]
    assert main(argv) == EXIT_OK
    schedule = Schedule.load(tmp_path / "schedule.json")
    assert schedule.num_steps == 8 and schedule.freeze_config.align == 16
    assert [b.k for b in schedule.buckets] == [(256, 128, 128, 128, 128, 128)]
    first = capsys.readouterr().out
    assert "bucket 0: steps 0-7  k=256,128x5" in first and schedule.schedule_hash[:12] in first
    assert main(argv) == EXIT_OK
    assert Schedule.load(tmp_path / "schedule.json").schedule_hash == schedule.schedule_hash


def test_freeze_verb_rejects_zero_buckets_with_exit_2(tmp_path, capsys):
    assert main(["freeze", "--model", "tiny-sd35", "--out", str(tmp_path), "--buckets", "0"]) == EXIT_BAD_INPUT
    assert "--buckets 0 must be >= 1" in capsys.readouterr().err

"""Ctrl-C at any moment of `python -m shiva_export VERB`: exit 130, one line on stderr, no traceback.

The process imports torch and onnx for about two seconds before the verb starts (`cli.build_parser` imports every
verb module); a Ctrl-C there used to print a KeyboardInterrupt traceback and kill the process by SIGINT, and one
inside a class body (torch.distributed) came out as a RuntimeError traceback with exit 1.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from shiva_export.cli import EXIT_INTERRUPTED, INTERRUPTED, interrupts_deferred, is_interrupt

LOG_RECORD = re.compile(r"^(DEBUG|INFO|WARNING) shiva_export[\w.]*: ")   # cli.main's logging format


def _catching_sigint(pid: int, timeout: float = 60.0) -> None:
    """Wait until the child's Python has installed its SIGINT handler (bit 2 of SigCgt in /proc/PID/status): before
    that the default action kills it, on a loaded machine even 0.3 s after the start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            return
        caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
        if int(caught, 16) & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.01)


def _default_sigint() -> None:
    """A terminal's Ctrl-C reaches a process whose SIGINT is not ignored; a background test runner's children
    inherit SIG_IGN, which Python keeps (no KeyboardInterrupt at all)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("delay_s", [0.3, 1.0])   # importing the verbs (twice), then early in the verb
def test_ctrl_c_exits_130_with_one_line_and_no_traceback(tmp_path, delay_s):
    proc = subprocess.Popen([sys.executable, "-m", "shiva_export", "build", "--out", str(tmp_path / "out")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    _catching_sigint(proc.pid)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=900)   # hang guard only
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    # Once the verb runs, its INFO records come before the interruption; nothing else may.
    lines = [line for line in stderr.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert lines == [INTERRUPTED], stderr[-3000:]


def test_ctrl_c_while_importing_leaves_only_the_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "shiva_export", "export", "--out", str(tmp_path / "out")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    _catching_sigint(proc.pid)
    time.sleep(0.3)   # the interpreter is up and importing torch (~2 s)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.strip()] == [INTERRUPTED] and stdout == ""
    assert not (tmp_path / "out").exists()


def test_an_interrupt_wrapped_by_python_is_still_an_interrupt():
    class Field:
        def __set_name__(self, owner, name):
            raise KeyboardInterrupt

    try:
        class Holder:  # noqa: F841
            field = Field()
    except BaseException as err:  # Python 3.11 wraps it in a RuntimeError; 3.12+ re-raises it with a note
        caught = err
    assert is_interrupt(caught)
    assert not is_interrupt(RuntimeError("a bug")) and not is_interrupt(ValueError())


def test_a_ctrl_c_during_imports_waits_for_the_block_then_interrupts():
    """CI once cut numpy's import in half: what surfaced was a RecursionError (exit 1), not an interrupt."""
    finished = []
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)   # a background runner may ignore SIGINT
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                signal.raise_signal(signal.SIGINT)
                finished.append("the block ran to its end")
        assert finished == ["the block ran to its end"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with interrupts_deferred():   # nothing received: nothing raised
            pass
    finally:
        signal.signal(signal.SIGINT, inherited)

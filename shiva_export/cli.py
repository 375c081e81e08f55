"""`python -m shiva_export VERB`: thin verbs over library calls; exit 0 ok, 1 a check failed, 2 unusable input,
130 interrupted (Ctrl-C)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading

from shiva_export.errors import ShivaError

# One module per verb under shiva_export/commands; each exposes add_parser(subparsers).
VERBS = ("data", "train", "freeze", "export", "lint", "engine", "check", "bench", "report", "inspect", "build",
         "generate")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
INTERRUPTED = "interrupted: partial outputs were discarded; existing artifacts are unchanged"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it (derived defaults, e.g. "the
    model's") or there is none to show (flags, required options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shiva_export",
        description="Compile Shiva-DiT token-pruned DiTs into static ONNX graphs and engines.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        try:
            module = importlib.import_module(f"shiva_export.commands.{verb}")
        except ModuleNotFoundError as err:
            if err.name != f"shiva_export.commands.{verb}":
                raise
            continue
        module.add_parser(subparsers)
    for verb_parser in subparsers.choices.values():
        verb_parser.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        with interrupts_deferred():
            parser = build_parser()  # imports every verb module (torch, onnx): seconds in which a Ctrl-C is likely
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("shiva_export").setLevel(logging.DEBUG if args.verbose else logging.INFO)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        return int(args.func(args) or 0)
    except (KeyboardInterrupt, Exception) as err:
        if is_interrupt(err):
            print(INTERRUPTED, file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(err, ShivaError):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a Ctrl-C until the block ends, then raise it. An import cut in half leaves a module half-initialized
    (numpy's lazy `__getattr__` then recurses until RecursionError), so the failure that surfaces is not an
    interrupt at all. Only the main thread with Python's own SIGINT handler is touched (embedding code keeps its)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def is_interrupt(err: BaseException) -> bool:
    """Whether err is a Ctrl-C or was raised because of one: Python 3.11 wraps a KeyboardInterrupt raised inside a
    class body's `__set_name__` (e.g. while importing torch) in a RuntimeError, and cleanup code may raise its own."""
    seen, pending = set(), [err]
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        pending += [err.__cause__, err.__context__]
    return False

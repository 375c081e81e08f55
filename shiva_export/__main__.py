"""`python -m shiva_export VERB`; a Ctrl-C at any moment exits 130 with one line on stderr, never a traceback."""

import signal
import sys


def _run() -> int:
    try:
        from shiva_export import cli   # light: the heavy imports happen in cli.main with Ctrl-C deferred

        return cli.main()
    except KeyboardInterrupt:  # while importing the CLI, or just after main returned
        print("interrupted: partial outputs were discarded; existing artifacts are unchanged", file=sys.stderr)
        return 130
    finally:
        # The verb is done: a late Ctrl-C must not interrupt atexit handlers (tqdm's) into a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(_run())

"""Train the router shipped for a preset with our own `train` verb and copy its deployable part into the package.

`python -m shiva_export build` (and every verb without --router) uses shiva_export/presets/<preset>.router when it
exists. This script is how that folder was made; rerun it to reproduce or refresh it:

    python scripts/ship_router.py                     # tiny-sd35, the settings below
    python scripts/ship_router.py --train-dir /tmp/r  # keep the full checkpoint (optimizer state, for --resume)

Only what a pruned model needs ships (config.json, router/policy/adapter safetensors) plus the run's summary and
loss log as provenance; the optimizer state stays in the training folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from shiva_export import checkpoint as ckpt
from shiva_export import cli
from shiva_export.io import atomic_directory

PRESETS = Path(__file__).resolve().parents[1] / "shiva_export" / "presets"
SHIPPED_FILES = (ckpt.CONFIG_FILE, *ckpt.WEIGHT_FILES, ckpt.SUMMARY_FILE, ckpt.LOG_FILE)
# Data-free, CPU-sized: the demo protocol of tests/test_training.py, twice as long in every stage.
TRAIN_ARGS = ("--target-keep", "0.6", "--warmup-steps", "100", "--policy-steps", "400", "--joint-steps", "100",
              "--lr-warmup-steps", "20", "--global-batch", "4", "--micro-batch", "1", "--eval-steps", "28",
              "--lr-policy", "3e-3", "--lr-adapter", "1e-3", "--seed", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd35", help="preset to train the shipped router for")
    parser.add_argument("--train-dir", default=None, help="training checkpoint folder (default: a temporary one)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        train_dir = Path(args.train_dir or Path(scratch) / "ckpt")
        code = cli.main(["train", "--model", args.model, "--out", str(train_dir), "--device", args.device,
                         *TRAIN_ARGS])
        if code:
            return code
        with atomic_directory(PRESETS / f"{args.model}.router") as staging:
            for name in SHIPPED_FILES:
                if (train_dir / name).is_file():
                    shutil.copy2(train_dir / name, Path(staging) / name)
    print(f"shipped {PRESETS / f'{args.model}.router'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`freeze`: evaluate the ratio policy at the sampler's timesteps and write the bucketed k schedule."""

from __future__ import annotations

import argparse

from shiva_export.commands._args import add_artifact_args, artifact_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "freeze", help="freeze the learned keep ratios into at most --buckets fixed-k schedules",
        description="Evaluate the ratio policy at the real timesteps of the flow-matching scheduler (--steps, "
                    "--shift), round every k up to a multiple of --align (never pruning more than learned), group "
                    "the steps into at most --buckets contiguous buckets with the least realised FLOPs, and write "
                    "OUT/schedule.json (hashed, recorded in OUT/manifest.json). Later stages export one static "
                    "graph per bucket.")
    add_artifact_args(parser)
    parser.add_argument("--force", action="store_true", help="re-freeze even if the inputs are unchanged")
    parser.set_defaults(func=run)


def _flops(value: float) -> str:
    return f"{value / 1e12:.3f} TFLOPs" if value >= 1e11 else f"{value / 1e9:.3f} GFLOPs"


def run(args: argparse.Namespace) -> int:
    from shiva_export import pipeline
    from shiva_export.report import format_k

    ws = pipeline.start(args.out, artifact_config(args))
    pipeline.run_freeze(ws, force=args.force)
    schedule = ws.schedule()
    summary = schedule.summary
    print(f"{ws.path(pipeline.SCHEDULE_FILE)}: {schedule.num_steps} steps, {len(schedule.buckets)} bucket(s), "
          f"N={schedule.num_tokens}, schedule_hash {schedule.schedule_hash[:12]}")
    for bucket in schedule.buckets:
        print(f"  bucket {bucket.index}: steps {bucket.steps[0]}-{bucket.steps[-1]}  k={format_k(bucket.k)}  "
              f"{_flops(bucket.flops_per_step)}/step")
    print(f"  keep ratio: learned {summary.learned_keep_ratio:.3f}, aligned {summary.aligned_keep_ratio:.3f}, "
          f"realised {summary.realised_keep_ratio:.3f}")
    print(f"  FLOPs vs dense ({_flops(summary.dense_flops_per_step)}/step): learned "
          f"{summary.learned_flop_ratio:.3f}, aligned {summary.aligned_flop_ratio:.3f}, realised "
          f"{summary.realised_flop_ratio:.3f}")
    return 0

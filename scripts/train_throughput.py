"""Throughput of router training (`python -m shiva_export train`): optimizer steps per second, per stage.

Runs the real training code, `shiva_export.training.Trainer` (what `train()` and the CLI build) with a
`TrainConfig` and `RunOptions`, for a few optimizer steps of each stage, and times every `Trainer.train_step()`
between two CUDA synchronisations. The first ``--warmup`` steps of each stage are discarded: they hold the stage's
one-time work (cuBLAS heuristics, a fresh AdamW, in stage 3 the DoRA adapters being attached and the anchor
re-centred). A timed step is one whole optimizer step: the data-free inputs, the teacher forward (no grad), the
student forward with the training hooks, the backward and AdamW. Not timed: the summary's evaluations (after stages
2 and 3) and checkpoint saves, which `train()` adds at the stage ends and every ``--save-every`` steps.

    python scripts/train_throughput.py --model sd35-medium-shape --global-batch 4,16 --out docs/benchmarks/h200
    python scripts/train_throughput.py --model tiny-sd35 --device cpu --global-batch 2 --warmup 0 --measure 1

Writes ``training-throughput.json`` and ``.md`` into ``--out`` (``--append`` adds runs to an existing report of the
same device) and prints the table. ``--profile`` adds one untimed, profiled step at the end of each stage and keeps
its most expensive operators; ``--sdpa`` restricts PyTorch's attention backends (a diagnostic variant).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from shiva_export import models as shiva_models  # noqa: E402
from shiva_export.training import Trainer, init_distributed  # noqa: E402
from shiva_export.training_config import RunOptions, TrainConfig  # noqa: E402

GIB = 1024 ** 3
REPORT = "training-throughput"
# the default schedule (TrainConfig's stage lengths), for the wall-time estimate
DEFAULT_STEPS = {1: TrainConfig.warmup_steps, 2: TrainConfig.policy_steps, 3: TrainConfig.joint_steps}
STAGE_NAMES = {1: "1 router warm-up", 2: "2 policy (score term)", 3: "3 joint + DoRA"}
SDPA_NAMES = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
              "math": "MATH"}
PROFILE_ROWS = 12


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd35-medium-shape", help="preset or local diffusers folder")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--global-batch", default="4,16",
                        help="comma-separated global batches, one run each (default 4,16; 16 = the paper's)")
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per forward (default 1)")
    parser.add_argument("--stages", default="1,2,3", help="stages to time (3 needs peft; default 1,2,3)")
    parser.add_argument("--warmup", type=int, default=2, help="discarded steps at the start of each stage")
    parser.add_argument("--measure", type=int, default=3, help="timed steps per stage")
    parser.add_argument("--height", type=int, default=None, help="image height in px (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width in px (default: the model's)")
    parser.add_argument("--context-tokens", type=int, default=None, help="text tokens (default: the model's)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: bf16 autocast on GPU, fp32 on CPU (as train)")
    parser.add_argument("--target-keep", type=float, default=0.6)
    parser.add_argument("--sdpa", default=None,
                        help=f"comma-separated attention backends PyTorch may use ({', '.join(SDPA_NAMES)}); "
                             "default: PyTorch's own choice")
    parser.add_argument("--profile", action="store_true",
                        help="one extra, untimed step at the end of each stage under torch.profiler; its top "
                             "operators go into the JSON")
    parser.add_argument("--init-on-host", action="store_true",
                        help="initialise preset weights on the CPU, as `train` does (default on CUDA: on the GPU, "
                             "which takes seconds instead of minutes; random weights either way, same speed)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="skip a global batch whose run, extrapolated from the previous one, would end after "
                             "this many seconds from the start (keeps a device call inside its limit)")
    parser.add_argument("--out", default=None, help=f"folder for {REPORT}.json / .md")
    parser.add_argument("--append", action="store_true", help="add the runs to the report already in --out")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------- environment


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("diffusers", "peft", "transformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - report what is there
            out[name] = None
    return out


def gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    info = {"name": torch.cuda.get_device_name(device), "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / GIB, 1), "multiprocessors": props.multi_processor_count,
            "driver": None,
            "sdpa_enabled": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                             "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                             "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                             "math": torch.backends.cuda.math_sdp_enabled()}}
    with contextlib.suppress(Exception):
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index}"],
            capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def preset_init_on(device: torch.device):
    """Make Trainer build preset weights directly on ``device`` (load_transformer's own option)."""
    original = shiva_models.load_transformer
    shiva_models.load_transformer = functools.partial(original, device=device)
    try:
        yield
    finally:
        shiva_models.load_transformer = original


def sdpa_context(backends: str | None):
    if not backends:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [name.strip() for name in backends.split(",") if name.strip()]
    unknown = [name for name in names if name not in SDPA_NAMES]
    if unknown:
        raise SystemExit(f"--sdpa: unknown backends {unknown}; expected some of {list(SDPA_NAMES)}")
    return sdpa_kernel([getattr(SDPBackend, SDPA_NAMES[name]) for name in names])


def profile_rows(prof) -> dict:
    """Top operators of a profiled step, by self device time and by self CPU time (ms over the step)."""
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0)
        rows.append({"name": event.key[:90], "calls": event.count, "self_device_ms": round(device_us / 1000, 2),
                     "self_cpu_ms": round(event.self_cpu_time_total / 1000, 2)})
    return {"by_device": sorted(rows, key=lambda r: -r["self_device_ms"])[:PROFILE_ROWS],
            "by_cpu": sorted(rows, key=lambda r: -r["self_cpu_ms"])[:PROFILE_ROWS],
            "total_self_device_ms": round(sum(r["self_device_ms"] for r in rows), 1),
            "total_self_cpu_ms": round(sum(r["self_cpu_ms"] for r in rows), 1)}


# ----------------------------------------------------------------------------------------------- one run


def stage_config(args, global_batch: int, stages: list[int]) -> TrainConfig:
    per_stage = args.warmup + args.measure + (1 if args.profile else 0)
    lengths = {stage: (per_stage if stage in stages else 0) for stage in (1, 2, 3)}
    return TrainConfig(target_keep=args.target_keep, warmup_steps=lengths[1], policy_steps=lengths[2],
                       joint_steps=lengths[3], global_batch=global_batch, micro_batch=args.micro_batch,
                       height=args.height, width=args.width, context_tokens=args.context_tokens,
                       precision=args.precision)


def one_step(trainer: Trainer, device: torch.device, profiled: bool) -> tuple[dict, float, dict | None]:
    synchronize(device)
    if not profiled:
        begin = time.perf_counter()
        record = trainer.train_step()
        synchronize(device)
        return record, time.perf_counter() - begin, None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    begin = time.perf_counter()
    with profile(activities=activities) as prof:
        record = trainer.train_step()
        synchronize(device)
    elapsed = time.perf_counter() - begin
    return record, elapsed, profile_rows(prof)


def run_one(args, device: torch.device, global_batch: int, stages: list[int], command: str) -> dict:
    config = stage_config(args, global_batch, stages)
    timed_per_stage = args.warmup + args.measure
    result: dict = {"global_batch": global_batch, "micro_batch": args.micro_batch,
                    "accumulation": config.micro_batches, "warmup": args.warmup, "measure": args.measure,
                    "sdpa": args.sdpa or "default", "command": command, "stages": {}}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp, sdpa_context(args.sdpa):
        options = RunOptions(out=Path(tmp) / "ckpt", progress=False, device=str(device))
        start = time.perf_counter()
        init = preset_init_on(device) if device.type == "cuda" and not args.init_on_host \
            else contextlib.nullcontext()
        with init:
            trainer = Trainer(args.model, config, options, init_distributed(str(device)))
        synchronize(device)
        result["setup_s"] = round(time.perf_counter() - start, 2)
        result["num_image_tokens"] = trainer.num_tokens
        result["resolved"] = {"height": trainer.config.height, "width": trainer.config.width,
                              "context_tokens": trainer.config.context_tokens, "bf16_autocast": trainer.bf16}
        result["parameters"] = sum(p.numel() for p in trainer.transformer.parameters())
        if device.type == "cuda":
            result["model_memory_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)
        try:
            while trainer.step < config.total_steps:
                stage = config.stage(trainer.step)
                index = trainer.step - config.stage_start(stage)
                if index == 0 and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                profiled = index >= timed_per_stage  # the extra step of --profile
                record, elapsed, prof = one_step(trainer, device, profiled)
                entry = result["stages"].setdefault(stage, {"step_s": [], "loss": [], "batch_keep": []})
                if index == timed_per_stage - 1 and device.type == "cuda":  # memory of the unprofiled steps
                    entry["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
                    entry["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 2)
                if profiled:
                    entry["profile"] = {"step_s_with_profiler": round(elapsed, 3), **prof}
                else:
                    entry["step_s"].append(elapsed)
                    entry["loss"].append(record["loss"])
                    entry["batch_keep"].append(record["batch_keep"])
                print(f"  gb {global_batch} stage {stage} step {trainer.step}: {elapsed:.3f} s"
                      f"{' (profiled)' if profiled else ''} loss {record['loss']:.4f} keep {record['batch_keep']:.3f}",
                      file=sys.stderr, flush=True)
        except torch.cuda.OutOfMemoryError as err:
            result["error"] = f"out of memory at step {trainer.step + 1}: {str(err).splitlines()[0]}"
        if trainer.peft is not None:
            result["adapter_parameters"] = sum(p.numel() for p in trainer.adapter_parameters())
        del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for entry in result["stages"].values():
        timed = entry["step_s"][args.warmup:]
        entry["warmup_steps_s"] = [round(t, 4) for t in entry["step_s"][:args.warmup]]
        entry["timed_steps_s"] = [round(t, 4) for t in timed]
        entry["timed_batch_keep"] = [round(k, 4) for k in entry["batch_keep"][args.warmup:]]
        entry["finite_loss"] = all(math.isfinite(v) for v in entry["loss"])
        del entry["step_s"], entry["batch_keep"], entry["loss"]
        if timed:
            mean = statistics.fmean(timed)
            entry.update(s_per_step=round(mean, 4), it_per_s=round(1 / mean, 4),
                         samples_per_s=round(global_batch / mean, 3),
                         s_per_step_min=round(min(timed), 4), s_per_step_max=round(max(timed), 4),
                         mean_batch_keep=round(statistics.fmean(entry["timed_batch_keep"]), 4))
    measured = [s for s in (1, 2, 3) if "s_per_step" in result["stages"].get(s, {})]
    if len(measured) == 3:
        hours = sum(DEFAULT_STEPS[s] * result["stages"][s]["s_per_step"] for s in measured) / 3600
        result["default_schedule_hours"] = round(hours, 2)
    return result


# ----------------------------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    gpu, ver, setup = report["device"], report["versions"], report["setup"]
    lines = [f"# Router training throughput: `{setup['model']}` on {gpu['name']}", ""]
    where = [f"device: **{gpu['name']}**"]
    if "driver" in gpu:
        where += [f"compute capability {gpu['capability']}", f"{gpu['memory_gib']} GiB", f"driver {gpu['driver']}"]
    where += [f"PyTorch {ver['torch']}" + (f" (CUDA {ver['cuda']})" if ver["cuda"] else ""),
              f"diffusers {ver['diffusers']}", f"peft {ver['peft']}"]
    lines += ["; ".join(where) + ".", ""]
    first = next((r for r in report["runs"] if "resolved" in r), None)
    if first:
        res, count = first["resolved"], first["parameters"]
        size = f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"
        lines += [f"{size}-parameter backbone (random weights), {res['height']}x{res['width']} px "
                  f"({first['num_image_tokens']} image tokens), {res['context_tokens']} context tokens, data-free "
                  f"inputs, target keep {setup['target_keep']}, "
                  f"{'bf16 autocast' if res['bf16_autocast'] else 'fp32'} (precision {setup['precision']}), one "
                  "process. Each row: the mean over the timed optimizer steps of that stage (each step between two "
                  "CUDA synchronisations), after the discarded warm-up steps.", ""]
    lines += ["| global batch | micro-batch | stage | attention (SDPA) | warm-up + timed steps | s/step | it/s "
              "| samples/s | min-max s/step | mean keep | peak allocated | peak reserved |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for stage in sorted(run["stages"], key=int):
            e = run["stages"][stage]
            if "s_per_step" not in e:
                continue
            mem = (f"{e['peak_allocated_gib']} GiB", f"{e['peak_reserved_gib']} GiB") \
                if "peak_allocated_gib" in e else ("-", "-")
            lines.append(f"| {run['global_batch']} | {run['micro_batch']} | {STAGE_NAMES[int(stage)]} "
                         f"| {run.get('sdpa', 'default')} | {run['warmup']} + {run['measure']} "
                         f"| {e['s_per_step']:.3f} | **{e['it_per_s']:.3f}** | {e['samples_per_s']:.2f} "
                         f"| {e['s_per_step_min']:.3f}-{e['s_per_step_max']:.3f} | {e['mean_batch_keep']:.3f} "
                         f"| {mem[0]} | {mem[1]} |")
        if run.get("error"):
            lines.append(f"| {run['global_batch']} | {run['micro_batch']} | - | {run['error']} |"
                         + " |" * 8)
    lines.append("")
    for run in report["runs"]:
        if "default_schedule_hours" in run:
            lines.append(f"* Global batch {run['global_batch']} (SDPA {run.get('sdpa', 'default')}): the default "
                         f"schedule ({DEFAULT_STEPS[1]} + {DEFAULT_STEPS[2]} + {DEFAULT_STEPS[3]} steps) would take "
                         f"about {run['default_schedule_hours']} h on this device (evaluations and checkpoints not "
                         "counted).")
    for note in report["notes"]:
        lines.append(f"* {note}")
    profiled = [(run, stage, e["profile"]) for run in report["runs"] for stage, e in sorted(run["stages"].items())
                if "profile" in e]
    for run, stage, prof in profiled:
        lines += ["", f"Profile, global batch {run['global_batch']}, stage {stage}, SDPA {run.get('sdpa', 'default')} "
                  f"(one extra step under torch.profiler: {prof['step_s_with_profiler']} s; self device time "
                  f"{prof['total_self_device_ms']} ms, self CPU time {prof['total_self_cpu_ms']} ms):", "",
                  "| operator (by self CPU time) | calls | self CPU ms | self device ms |", "|---|---|---|---|"]
        lines += [f"| `{r['name']}` | {r['calls']} | {r['self_cpu_ms']} | {r['self_device_ms']} |"
                  for r in prof["by_cpu"][:8]]
        if prof["total_self_device_ms"]:
            lines += ["", "| operator (by self device time) | calls | self device ms | self CPU ms |",
                      "|---|---|---|---|"]
            lines += [f"| `{r['name']}` | {r['calls']} | {r['self_device_ms']} | {r['self_cpu_ms']} |"
                      for r in prof["by_device"][:8]]
    lines += ["", "Commands:", "", "```bash"]
    lines += list(dict.fromkeys(run.get("command", report.get("command", "")) for run in report["runs"]))
    lines += ["```", ""]
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{REPORT}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{REPORT}.md").write_text(markdown(report))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    notes = []
    if 3 in stages and importlib.util.find_spec("peft") is None:
        stages.remove(3)
        notes.append("stage 3 not measured: peft is not installed here")
    if not stages or args.measure < 1 or args.warmup < 0:
        raise SystemExit("need at least one stage, --measure >= 1 and --warmup >= 0")
    if 2 in stages:
        notes.append("stage 2 runs the antithetic score term: micro-batches in pairs share one teacher forward, "
                     "so it does global_batch / 2 teacher forwards per step instead of global_batch")
    notes.append("stages 1-2 back-propagate through the frozen backbone to the routers (and policy); stage 3 also "
                 "trains DoRA adapters on every attention/FFN linear, and the teacher runs with them disabled")
    if device.type == "cuda" and not args.init_on_host:
        notes.append("preset weights initialised on the GPU (random either way; `train` initialises on the CPU, "
                     "which only changes its start-up time)")
    command = " ".join(["python", "scripts/train_throughput.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"device": gpu_info(device), "versions": versions(),
              "setup": {"model": args.model, "precision": args.precision, "target_keep": args.target_keep,
                        "init_on_device": device.type == "cuda" and not args.init_on_host},
              "runs": [], "notes": []}
    out = Path(args.out) if args.out else None
    if args.append and out is not None and (out / f"{REPORT}.json").is_file():
        previous = json.loads((out / f"{REPORT}.json").read_text())
        if previous["device"]["name"] != report["device"]["name"] or previous["setup"]["model"] != args.model:
            raise SystemExit(f"--append: {out} holds {previous['setup']['model']} on {previous['device']['name']}")
        report["runs"], report["notes"] = previous["runs"], previous["notes"]
    report["notes"] += [note for note in notes if note not in report["notes"]]
    print(f"device {report['device']['name']}, torch {torch.__version__}", file=sys.stderr, flush=True)
    started, fresh = time.perf_counter(), []
    for global_batch in (int(b) for b in args.global_batch.split(",") if b.strip()):
        previous = fresh[-1] if fresh else None
        if args.max_seconds and previous and previous.get("stages"):
            # every step of the previous run (warm-up included), scaled by the number of micro-batches
            step_s = sum(e["s_per_step"] * (args.warmup + args.measure) for e in previous["stages"].values()
                         if "s_per_step" in e)
            estimate = previous["setup_s"] + step_s * global_batch / previous["global_batch"]
            if time.perf_counter() - started + estimate > args.max_seconds:
                report["notes"].append(f"global batch {global_batch} skipped: about {estimate:.0f} s estimated, "
                                       f"past --max-seconds {args.max_seconds:g}")
                print(report["notes"][-1], file=sys.stderr, flush=True)
                continue
        print(f"global batch {global_batch}, micro-batch {args.micro_batch}", file=sys.stderr, flush=True)
        fresh.append(run_one(args, device, global_batch, stages, command))
        report["runs"].append(fresh[-1])
        report["notes"] = [n for n in report["notes"] if not n.startswith(f"global batch {global_batch} skipped")]
        if out is not None:  # keep what is done if a later run dies
            write(report, out)
    print(markdown(report))
    if out is not None:
        write(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`train`: learn the router, the ratio policy and DoRA adapters in three stages; write a checkpoint folder."""

from __future__ import annotations

import argparse
import dataclasses
import json

# TrainConfig fields by concern (P11); every field is an option, with TrainConfig's default.
GROUPS = {
    "budget": ("target_keep", "r_min", "r_max", "dense_layers"),
    "stages": ("warmup_steps", "policy_steps", "joint_steps", "lr_warmup_steps", "lr_decay"),
    "optimisation": ("lr_router", "lr_policy", "lr_policy_layer_scale", "lr_adapter", "weight_decay", "global_batch", "micro_batch",
                     "precision", "seed"),
    "method": ("tau_rank_start", "tau_rank_end", "tau_sel_start", "tau_sel_end", "ste_gate", "score_noise",
               "logit_noise", "policy_score_weight", "joint_policy", "stage3_recenter", "budget_beta",
               "budget_gradient",
               "lambda_budget", "lambda_distill", "lambda_diffusion", "distill_every", "router_hidden_dim",
               "router_group_size", "policy_hidden_dim", "adapter_rank", "adapter_alpha"),
    "data": ("data", "height", "width", "context_tokens", "data_free_contrast", "timestep_shift", "timestep_weighting",
             "cfg_dropout"),
    "evaluation": ("eval_steps", "eval_samples"),
}
HELP = {
    "target_keep": "long-run mean keep ratio R_target in (0, 1]",
    "r_min": "smallest keep ratio (policy clamp; low end of the stage-1 range)",
    "r_max": "high end of the stage-1 ratio range",
    "dense_layers": "comma-separated blocks never pruned",
    "warmup_steps": "stage 1 (router warm-up) optimizer steps",
    "policy_steps": "stage 2 (policy learning) optimizer steps",
    "joint_steps": "stage 3 (joint tuning with DoRA adapters) optimizer steps",
    "lr_warmup_steps": "linear learning-rate warm-up at the start of each stage",
    "global_batch": "samples per optimizer step over all processes",
    "micro_batch": "samples per forward pass; accumulation = global / (micro * processes)",
    "lr_policy_layer_scale": "the policy's layer branch learns at lr-policy times this (its signal is steadier "
                             "than the time branch's, which it would otherwise outrun to the clamp)",
    "precision": "auto: bf16 autocast on GPU, fp32 on CPU",
    "data": "folder of precomputed latents + text embeddings (docs/training-data.md); default: data-free",
    "height": "data-free image height in pixels (default: the model's)",
    "width": "data-free image width in pixels (default: the model's)",
    "context_tokens": "data-free text tokens (default: the model's)",
    "data_free_contrast": "data-free latents: spread of their smooth random amplitude envelope (0: i.i.d. noise)",
    "timestep_shift": "training timesteps t = 1000 s u / (1 + (s - 1) u), u uniform: the flow-matching scheduler "
                      "shift, 1 for a scheduler without one, e.g. DPM-Solver (default: the pipeline's scheduler: its "
                      "shift, or its dynamic shift at the image's token count)",
    "budget_gradient": "budget-loss gradient through the batch's sampled ratios into the whole policy (batch, Eq. 13) "
                       "or into the anchor alone (anchor: the budget sets the level, the losses the shape)",
    "timestep_weighting": "distillation weight per timestep: euler-step = the sampler's step size d(sigma)/du there "
                          "(the error that reaches the image), none = uniform",
    "cfg_dropout": "caption dropout probability with --data (default: 0.1 where the pipeline runs classifier-free "
                   "guidance, 0 for a guidance-distilled model)",
    "eval_steps": "sampler steps at whose timesteps the summary evaluates the policy",
    "eval_samples": "samples in the summary's evaluation batch",
    "ste_gate": "STE gate on the block input (D5) or on the kept tokens' update (see training.py)",
    "policy_score_weight": "stage 2: weight of the antithetic score-function term for the policy (0: STE only)",
    "joint_policy": "stage 3: train only the policy's anchor, or the whole policy",
    "stage3_recenter": "entering stage 3, re-centre the anchor on the target keep ratio (true/false)",
    "lr_decay": "learning-rate decay after each stage's warm-up",
}


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from err


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _option_type(field: dataclasses.Field):
    annotation = str(field.type)
    if annotation == "bool":
        return _parse_bool
    if annotation.startswith("tuple"):
        return _parse_layers
    for name, kind in (("float", float), ("int", int), ("str", str)):
        if annotation.startswith(name):
            return kind
    return str


def add_parser(subparsers) -> None:
    from shiva_export.backbones import MODEL_CLASSES
    from shiva_export.models import preset_names
    from shiva_export.training_config import TrainConfig

    parser = subparsers.add_parser(
        "train", help="train the router, ratio policy and DoRA adapters (three stages)",
        description="Stage 1 warms the router up on stratified keep ratios, stage 2 learns the ratio policy under "
                    "the EMA budget loss with logit noise, stage 3 tunes router, policy and DoRA adapters together. "
                    "Losses: normalised feature distillation from the frozen teacher, the denoising loss (the "
                    "family's: flow matching, or epsilon for a DDPM-family model) with --data, and the budget loss. "
                    "Without --data it distils on random latents and context. Runs under `torchrun --nproc-per-node "
                    "N -m shiva_export train ...` too. Writes a checkpoint folder (--out) with "
                    "safetensors weights, config.json, log.jsonl and summary.json; prints the summary.")
    parser.add_argument("--model", default=argparse.SUPPRESS,
                        help=f"preset ({', '.join(preset_names())}) or a local diffusers folder (a pipeline or "
                             f"transformer folder of {' / '.join(MODEL_CLASSES)}) (required unless --resume, which "
                             "takes the checkpoint's; no default)")
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for title, names in GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            field = fields[name]
            default = field.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            choices = {"precision": ("auto", "fp32", "bf16"), "ste_gate": ("input", "output"),
                       "lr_decay": ("none", "cosine"), "joint_policy": ("anchor", "all"),
                       "timestep_weighting": ("none", "euler-step"), "budget_gradient": ("batch", "anchor")}
            kwargs = {"choices": choices[name]} if name in choices else {"type": _option_type(field)}
            text = HELP.get(name, name.replace('_', ' '))
            if "default:" not in text:   # a help that says its default itself (one decided per model) keeps it
                text = f"{text} (default: {shown})"
            group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, help=text,
                               **kwargs)
    run = parser.add_argument_group("run", "where and how this invocation runs (not hyperparameters)")
    run.add_argument("--out", required=True, help="checkpoint folder (replaced atomically at every save)")
    run.add_argument("--resume", action="store_true", help="continue the checkpoint in --out where it stopped")
    run.add_argument("--stop-after", type=int, default=None,
                     help="stop with a checkpoint after this many steps (default: run to the end)")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at stage ends)")
    run.add_argument("--device", default=None, help="cpu or cuda (default: the local GPU if any)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_train)
    missing = set(fields) - {name for names in GROUPS.values() for name in names}
    assert not missing, f"TrainConfig fields without an option: {missing}"


def cmd_train(args: argparse.Namespace) -> int:
    from shiva_export.errors import ConfigError
    from shiva_export.training import RunOptions, TrainConfig, resume_config, train

    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)
             if hasattr(args, field.name)}
    model = getattr(args, "model", None)
    if args.resume:
        stored_model, config = resume_config(args.out, given)
        if model is not None and model != stored_model:
            raise ConfigError(f"{args.out}: the checkpoint was trained on --model {stored_model!r}, not {model!r}; "
                              "drop --model to resume it")
        model = stored_model
    else:
        if model is None:
            raise ConfigError("--model is required (a preset such as tiny-sd35, or a local diffusers folder)")
        config = TrainConfig(**given)
    options = RunOptions(out=args.out, resume=args.resume, stop_after=args.stop_after, save_every=args.save_every,
                         progress=not args.no_progress, device=args.device)
    summary = train(model, config, options)
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0

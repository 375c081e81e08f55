"""Training checkpoints: safetensors tensors + JSON, written as a whole directory or not at all (P12).

Layout of a checkpoint folder (``train --out``):

    config.json                  schema, model identity (class, hash, sizes), every training hyperparameter, adapters
    router.safetensors           RouterBank state
    policy.safetensors           AdaptiveRatioPolicy state
    adapters.safetensors         DoRA adapter state (peft), once stage 3 has started
    trainer_state.safetensors    optimizer moments, budget EMA, RNG states  (resume only)
    trainer_state.json           step, stage, optimizer hyperparameters, evaluations so far  (resume only)
    log.jsonl                    one JSON record per optimizer step
    summary.json                 the final figures, when training has finished

Only safetensors and json are ever read back: no pickle, so a checkpoint cannot run code when loaded.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from shiva_export.backbones import MODEL_CLASSES, UNRECORDED_MODEL_CLASS
from shiva_export.errors import ArtifactError, ConfigError
from shiva_export.io import atomic_directory, sha256_file, sha256_json, write_json
from shiva_export.models import read_json
from shiva_export.policy import AdaptiveRatioPolicy
from shiva_export.router import RouterBank
from shiva_export.schema import Any_, Bool, Float, Hex, Int, ListOf, MapOf, Obj, Str, validate
from shiva_export.training_config import TrainConfig, train_spec

logger = logging.getLogger(__name__)

CHECKPOINT_SCHEMA = 1
CONFIG_FILE = "config.json"
ROUTER_FILE = "router.safetensors"
POLICY_FILE = "policy.safetensors"
ADAPTER_FILE = "adapters.safetensors"
STATE_FILE = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
WEIGHT_FILES = (ROUTER_FILE, POLICY_FILE, ADAPTER_FILE)

_SIZE = Int(minimum=1, maximum=65536)
# what the loaders need of `train`: the sizes the router and the policy are rebuilt from (the rest has defaults)
BUILD_KEYS = ("schema", "target_keep", "r_min", "dense_layers", "policy_hidden_dim", "router_hidden_dim",
              "router_group_size")
CONFIG_SPEC = Obj(
    required={
        "schema": Int(minimum=CHECKPOINT_SCHEMA, maximum=CHECKPOINT_SCHEMA),
        "model": Obj(required={
            "name": Str(), "kind": Str(choices=("preset", "folder")), "model_hash": Hex(),
            "num_layers": Int(minimum=1, maximum=1024), "token_dim": _SIZE, "temb_dim": _SIZE, "context_dim": _SIZE,
            "joint_attention_dim": _SIZE, "in_channels": _SIZE, "patch_size": Int(minimum=1, maximum=64)},
            optional={"model_class": Str(choices=MODEL_CLASSES), "pooled_projection_dim": _SIZE}),
        "train": train_spec(required=BUILD_KEYS),
        "adapters": Obj(required={"rank": _SIZE, "alpha": Float(minimum=0, maximum=1e6, exclusive_minimum=True),
                                  "use_dora": Bool(), "target_modules": Str()}),
    },
    optional={"num_image_tokens": Int(minimum=1, maximum=1 << 24), "versions": MapOf(Str(max_length=200))})
STATE_SPEC = Obj(required={
    "step": Int(minimum=0, maximum=10**9), "optimizer_stage": Int(minimum=0, maximum=3),
    "param_groups": ListOf(Obj(required={"params": ListOf(Int(minimum=0))}, extra=True)),
    "evals": MapOf(Any_()), "wall_time_s": Float(minimum=0), "total_steps": Int(minimum=1, maximum=10**9),
    "finished": Bool()})


def model_sizes(transformer) -> dict:
    """The backbone's class and every size that the router, the policy or the training data depend on.

    ``num_layers`` is the number of routed blocks (the backbone adapter's `blocks`, of every block kind),
    ``token_dim`` / ``temb_dim`` / ``context_dim`` the router's input widths (the adapter's router_dims); the rest
    are the transformer's widths: ``joint_attention_dim`` / ``pooled_projection_dim`` those of its text inputs
    (`encoder_hidden_states`, and `pooled_projections` for a model that takes a pooled text vector; absent
    otherwise), read from the adapter's input_specs. A checkpoint without ``model_class`` predates it (check_model
    reads backbones.UNRECORDED_MODEL_CLASS for it).
    """
    from shiva_export import backbones

    cfg = transformer.config
    adapter = backbones.for_model(transformer)
    token_dim, temb_dim, context_dim = adapter.router_dims(cfg)
    factor = 8
    size = adapter.default_size(cfg, factor)
    specs = adapter.input_specs(cfg, size, size, 1, 1, factor, "fp32")
    sizes = {
        "model_class": adapter.model_class,
        "num_layers": adapter.num_blocks(cfg), "token_dim": token_dim, "temb_dim": temb_dim,
        "context_dim": context_dim, "joint_attention_dim": int(specs["encoder_hidden_states"].shape[-1]),
        "pooled_projection_dim": int(specs["pooled_projections"].shape[-1]) if "pooled_projections" in specs else None,
        "in_channels": cfg.in_channels, "patch_size": cfg.patch_size,
    }
    return {key: value for key, value in sizes.items() if value is not None}


def model_identity(transformer, source) -> dict:
    """What a checkpoint must match: the model's hash (from its ModelSource) and its sizes."""
    return {"name": source.name, "kind": source.kind, "model_hash": source.model_hash, **model_sizes(transformer)}


def check_model(stored: Mapping[str, Any], transformer, source=None, where: str = "checkpoint") -> None:
    """Refuse a checkpoint made for another model; the message names both values.

    Sizes are always compared; the model hash is compared when the ModelSource is given (load_transformer returns
    it), since a loaded nn.Module does not carry the hash of the files it came from.
    """
    current = model_sizes(transformer)
    for key, value in current.items():
        recorded = stored.get(key, UNRECORDED_MODEL_CLASS if key == "model_class" else None)
        if key not in stored and key != "model_class" and value is not None:
            # optional in the schema (a family without that input records none), required by this model's family
            raise ConfigError(f"{where}: field model.{key}: missing; the given model's family needs it ({key}={value})")
        if recorded != value:
            raise ConfigError(
                f"{where}: was trained for model {stored.get('name')!r} with {key}={recorded}, but the given "
                f"model has {key}={value}; train a router for this model or pass the model it was trained on")
    if source is not None and stored.get("model_hash") != source.model_hash:
        raise ConfigError(
            f"{where}: was trained for model {stored.get('name')!r} (hash {str(stored.get('model_hash'))[:12]}), but "
            f"the given model {source.name!r} has hash {source.model_hash[:12]}; the weights differ, so the router's "
            "ranking would not fit. Pass the model it was trained on")


def write_checkpoint(dest: str | Path, config: Mapping[str, Any], tensors: Mapping[str, Mapping[str, torch.Tensor]],
                     json_files: Mapping[str, Any] = (), jsonl_files: Mapping[str, Iterable[Mapping]] = ()) -> Path:
    """Write a checkpoint folder atomically: the old one stays until the new one is complete, then is swapped.

    Args:
        config: the content of config.json (written last inside the temp folder).
        tensors: file name -> {tensor name -> tensor}, each saved with safetensors.
        json_files / jsonl_files: file name -> JSON value / sequence of JSON records.
    """
    from safetensors.torch import save_file

    dest = Path(dest)
    with atomic_directory(dest) as tmp:
        for name, group in tensors.items():
            save_file({key: value.detach().cpu().contiguous() for key, value in group.items()}, str(tmp / name))
        for name, data in dict(json_files).items():
            write_json(tmp / name, data)
        for name, records in dict(jsonl_files).items():
            (tmp / name).write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
        write_json(tmp / CONFIG_FILE, dict(config))
    return dest


def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint folder, checked field by field: ArtifactError if the folder is not a checkpoint,
    ConfigError (naming the file and the field) if its config.json is damaged or forged."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ArtifactError(f"{path}: not a training checkpoint (no {CONFIG_FILE}); expected a folder written by "
                            "`python -m shiva_export train --out`")
    config = validate(read_json(config_path), CONFIG_SPEC, str(config_path), error=ConfigError)
    TrainConfig.from_json(config["train"], source=f"{config_path}: field train")  # the cross-field rules
    layers = config["model"]["num_layers"]
    if any(layer >= layers for layer in config["train"]["dense_layers"]):
        raise ConfigError(f"{config_path}: field train.dense_layers: expected layer indices below model.num_layers "
                          f"{layers}, got {config['train']['dense_layers']}")
    try:
        re.compile(config["adapters"]["target_modules"])
    except re.error as err:
        raise ConfigError(f"{config_path}: field adapters.target_modules: expected a regular expression ({err})"
                          ) from None
    return config


def read_trainer_state(path: str | Path) -> dict:
    """trainer_state.json of a checkpoint folder (resume), checked field by field."""
    state_path = Path(path) / STATE_JSON
    if not state_path.is_file():
        raise ArtifactError(f"{state_path}: missing from the checkpoint; it cannot be resumed")
    state = validate(read_json(state_path), STATE_SPEC, str(state_path), error=ConfigError)
    if state["step"] > state["total_steps"]:
        raise ConfigError(f"{state_path}: field step: expected at most total_steps {state['total_steps']}, "
                          f"got {state['step']}")
    return state


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing from the checkpoint")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise ArtifactError(f"{path}: not a readable safetensors file ({err})") from err


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a .jsonl file ([] if absent); ConfigError naming the line if one is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise ConfigError(f"{path}: line {number}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def load_state(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict=True), after checking the tensors' names, shapes and values: a file that does not fit
    the module its config.json describes is one ConfigError naming the file and the first tensor that is off."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{where}: tensors do not fit the {type(module).__name__} of config.json: missing "
                          f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
                          f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    for name, reference in expected.items():
        tensor = tensors[name]
        if tensor.shape != reference.shape:
            raise ConfigError(f"{where}: tensor {name} has shape {list(tensor.shape)}; config.json gives "
                              f"{list(reference.shape)}")
        if not (tensor.is_floating_point() and bool(torch.isfinite(tensor).all())):
            raise ConfigError(f"{where}: tensor {name} ({tensor.dtype}) is not finite floating point")
    try:
        module.load_state_dict(dict(tensors), strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{where}: does not fit this model ({' '.join(str(err).split())[:200]})") from None


def build_router(config: Mapping[str, Any]) -> RouterBank:
    model, train = config["model"], config["train"]
    return RouterBank(model["num_layers"], model["token_dim"], model["temb_dim"], model["context_dim"],
                      train["router_hidden_dim"], train["router_group_size"])


def build_policy(config: Mapping[str, Any]) -> AdaptiveRatioPolicy:
    train = config["train"]
    return AdaptiveRatioPolicy(config["model"]["num_layers"], train["target_keep"], train["r_min"],
                               tuple(train["dense_layers"]), train["policy_hidden_dim"])


def checkpoint_hash(path: str | Path) -> str:
    """Hash of what a checkpoint contributes to a pruned model: its weights and its model identity."""
    path = Path(path)
    files = {name: sha256_file(path / name) for name in WEIGHT_FILES if (path / name).is_file()}
    return sha256_json({"files": files, "model": read_config(path)["model"]})


def load_router_checkpoint(path: str | Path, transformer, source=None
                           ) -> tuple[RouterBank, AdaptiveRatioPolicy, dict]:
    """RouterBank and AdaptiveRatioPolicy of a `train` checkpoint, checked against the model first.

    Args:
        path: the checkpoint folder (``train --out``).
        transformer: the backbone the router will run on; its sizes must match the checkpoint's.
        source: the ModelSource from load_transformer; when given, the model hash must match too.

    Returns:
        (routers, policy, config) with routers and policy in eval mode, fp32, on CPU. ``config`` is config.json plus
        ``checkpoint_hash`` and ``has_adapters`` (stage-3 DoRA weights: apply them with load_adapters).

    Raises:
        ArtifactError: not a checkpoint, or a file is missing or unreadable.
        ConfigError: the checkpoint was trained for another model.
    """
    path = Path(path)
    config = read_config(path)
    check_model(config["model"], transformer, source, where=str(path / CONFIG_FILE))
    routers, policy = build_router(config), build_policy(config)
    load_state(routers, read_tensors(path / ROUTER_FILE), str(path / ROUTER_FILE))
    load_state(policy, read_tensors(path / POLICY_FILE), str(path / POLICY_FILE))
    meta = dict(config, checkpoint_hash=checkpoint_hash(path), has_adapters=(path / ADAPTER_FILE).is_file())
    return routers.eval(), policy.eval(), meta


def lora_config(adapters: Mapping[str, Any]):
    """peft LoraConfig from the ``adapters`` entry of config.json (DoRA, rank, alpha, target regex)."""
    from peft import LoraConfig

    return LoraConfig(r=adapters["rank"], lora_alpha=adapters["alpha"], use_dora=adapters["use_dora"],
                      target_modules=adapters["target_modules"], lora_dropout=0.0, init_lora_weights=True)


def load_adapters(path: str | Path, transformer, source=None):
    """Merge a checkpoint's stage-3 DoRA adapters into the transformer's weights (in place) and return it.

    After merging the model has plain nn.Linear layers again (what export traces). A checkpoint without adapters
    (training stopped before stage 3) leaves the model unchanged.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    path = Path(path)
    config = read_config(path)
    check_model(config["model"], transformer, source, where=str(path / CONFIG_FILE))
    if not (path / ADAPTER_FILE).is_file():
        return transformer
    frozen = {name: p.requires_grad for name, p in transformer.named_parameters()}
    peft_model = get_peft_model(transformer, lora_config(config["adapters"]))
    try:
        result = set_peft_model_state_dict(peft_model, read_tensors(path / ADAPTER_FILE))
    except RuntimeError as err:  # a shape that does not fit adapters.rank or the model
        raise ConfigError(f"{path / ADAPTER_FILE}: does not fit this model ({' '.join(str(err).split())[:200]})"
                          ) from None
    missing = [key for key in result.missing_keys if "lora_" in key]  # missing_keys also lists every base weight
    if result.unexpected_keys or missing:
        raise ConfigError(f"{path / ADAPTER_FILE}: adapter tensors do not fit this model and config.json: "
                          f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")
    merged = peft_model.merge_and_unload()
    for name, param in merged.named_parameters():
        param.requires_grad_(frozen.get(name, False))
    return merged


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state as flat safetensors-able tensors plus JSON param groups (no pickle)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{index}.{name}"] = tensor
    groups = [{key: list(value) if isinstance(value, tuple) else value for key, value in group.items()}
              for group in state["param_groups"]]
    return tensors, groups


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                           groups: list[dict], where: str = f"{STATE_FILE} / {STATE_JSON}") -> None:
    """Inverse of optimizer_to_tensors; ConfigError naming ``where`` if the saved state does not fit the optimizer."""
    try:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        groups = [{key: tuple(value) if key == "betas" else value for key, value in group.items()}
                  for group in groups]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ConfigError(f"{where}: the optimizer state does not fit this run ({err})") from None

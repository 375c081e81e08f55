"""Hostile config.json files: a router checkpoint's and a diffusers model folder's.

Every damaged or forged field ends in one ConfigError (the CLI: one `error:` line on stderr, exit 2) that names
the file and the field, before the backbone is built. The good folders are built once per module; each case
links their weights into its own folder and writes its own config.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shiva_export import cli
from shiva_export import checkpoint as ckpt
from shiva_export.errors import ConfigError, ShivaError
from shiva_export.models import load_transformer, shipped_router
from shiva_export.pruned import load_pruned_model

MODEL = "tiny-sd35"              # the model the shipped router was trained for
ROUTER = Path(shipped_router(MODEL))
GOOD_ROUTER = json.loads((ROUTER / ckpt.CONFIG_FILE).read_text())
DELETE = object()

# -------------------------------------------------------------------------------------------- the cases


def _leaves(data: dict, prefix: str = ""):
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield path, value
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _wrong_type(value):
    """A value of another JSON type than `value`'s."""
    if isinstance(value, bool):
        return "true"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return 7
    if isinstance(value, (list, dict)):
        return "0"
    return []  # null -> a list


def _out_of_range(path: str, value) -> list:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    if path.endswith(".seed"):
        return [-1, 2**64]
    if isinstance(value, int):
        return [-1, 10**12]
    return [-1.0, 1e12, math.nan]


def _case(path: str, value, expect: str | None = None):
    shown = "deleted" if value is DELETE else repr(value)[:30]
    return pytest.param(path, value, expect or f"field {path}", id=f"{path}={shown}")


def router_cases() -> list:
    cases = []
    for path, value in _leaves(GOOD_ROUTER):
        cases.append(_case(path, _wrong_type(value)))
        cases += [_case(path, bad) for bad in _out_of_range(path, value)]
    cases += [_case("train.dense_layers[0]", bad) for bad in ("0", -1, 0.5)]
    cases += [_case(path, bad) for path, bad in [
        ("schema", 2), ("schema", 0), ("model.kind", "banana"), ("model.model_hash", "xyz"),
        ("train.router_hidden_dim", -64), ("train.router_hidden_dim", 1e12), ("train.router_group_size", 0),
        ("train.policy_hidden_dim", 1), ("train.target_keep", 0), ("train.cfg_dropout", math.inf),
        ("train.lr_decay", "banana"), ("train.precision", "fp64"), ("train.ste_gate", ""),
        ("train.timestep_weighting", None), ("train.joint_policy", "none"), ("train.budget_gradient", "both"),
        ("train.schema", 2), ("model.name", None), ("adapters.use_dora", 1)]]
    required = {"": ["schema", "model", "train", "adapters"], "model.": list(GOOD_ROUTER["model"]),
                "train.": list(ckpt.BUILD_KEYS), "adapters.": list(GOOD_ROUTER["adapters"])}
    cases += [_case(prefix + key, DELETE, f"field {prefix}{key}: missing") for prefix, keys in required.items()
              for key in keys]
    cases += [_case(f"{prefix}surprise", 1, f"field {prefix}surprise: unknown key")
              for prefix in ("", "model.", "train.", "adapters.")]
    # values each fine alone that break a rule between fields (the message names the field)
    cases += [_case(path, value, expect) for path, value, expect in [
        ("train.r_min", 0.9, "r_min 0.9 must be in (0, target_keep=0.6]"),
        ("train.r_max", 0.05, "r_max 0.05 must be in [r_min=0.1, 1]"),
        ("train.micro_batch", 3, "global_batch 4 must be a positive multiple of micro_batch 3"),
        ("train.policy_hidden_dim", 255, "policy_hidden_dim 255 must be even"),
        ("train.dense_layers", [0, 6], "field train.dense_layers: expected layer indices below model.num_layers 6"),
        ("adapters.target_modules", "(", "field adapters.target_modules: expected a regular expression")]]
    return cases


RAW_FILES = [pytest.param(text, id=name) for name, text in [
    ("list", b"[]"), ("string", b'"config"'), ("null", b"null"), ("number", b"42"), ("truncated", b'{"schema": 1,'),
    ("empty", b""), ("binary", b"\xff\xfe\x00garbage"), ("nested-too-deep", b"[" * 200_000)]]

# -------------------------------------------------------------------------------------------- helpers


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` anew: never through a hard link into the shared good folder."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def linked_copy(good: Path, dest: Path) -> Path:
    """`good` with every file hard-linked (each case replaces what it breaks with replace_file)."""
    return Path(shutil.copytree(good, dest, copy_function=os.link))


def mutate(config: dict, path: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *parents, last = path.replace("[", ".[").split(".")
    node = config
    for part in parents:
        node = node[part]
    if last.startswith("["):
        node[int(last[1:-1])] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return config


def write_config(folder: Path, config) -> Path:
    path = folder / "config.json"
    replace_file(path, json.dumps(config).encode())  # NaN and Infinity are written as JSON's parsers accept them
    return path


def refused_by_cli(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one `error:` line on stderr. Returns that line."""
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def refused_by_loader(load) -> str:
    with pytest.raises(ConfigError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def good_router(tmp_path_factory) -> Path:
    """A private copy of the shipped router checkpoint (cases link to its files, never to the package's)."""
    return Path(shutil.copytree(ROUTER, tmp_path_factory.mktemp("router") / "good"))


@pytest.fixture
def broken_router(good_router, tmp_path):
    def make(config) -> tuple[Path, Path]:
        folder = linked_copy(good_router, tmp_path / "router")
        return folder, write_config(folder, config)
    return make


def refuse_router(via: str, folder: Path, capsys, tmp_path) -> str:
    if via == "cli":
        return refused_by_cli(capsys, ["freeze", "--router", str(folder), "--out", str(tmp_path / "out")])
    return refused_by_loader(lambda: load_pruned_model(MODEL, str(folder)))


# -------------------------------------------------------------------------------------------- router checkpoints


def test_the_good_router_copy_loads_and_a_missing_optional_hyperparameter_takes_its_default(broken_router):
    folder, _ = broken_router(mutate(GOOD_ROUTER, "train.lambda_budget", DELETE))
    pruned = load_pruned_model(MODEL, str(folder))
    assert pruned.policy.num_layers == GOOD_ROUTER["model"]["num_layers"]
    assert pruned.routers.routers[0].proj_x.out_features == GOOD_ROUTER["train"]["router_hidden_dim"]


@pytest.mark.parametrize("via", ["load", "cli"])
@pytest.mark.parametrize("path, value, expect", router_cases())
def test_router_config_field_is_refused_naming_the_file_and_the_field(broken_router, capsys, tmp_path, via, path,
                                                                      value, expect):
    folder, config = broken_router(mutate(GOOD_ROUTER, path, value))
    message = refuse_router(via, folder, capsys, tmp_path)
    assert str(config) in message and expect in message, message


@pytest.mark.parametrize("via", ["load", "cli"])
@pytest.mark.parametrize("text", RAW_FILES)
def test_router_config_that_is_not_a_json_object_is_refused_naming_the_file(good_router, capsys, tmp_path, via, text):
    folder = linked_copy(good_router, tmp_path / "router")
    replace_file(folder / ckpt.CONFIG_FILE, text)
    message = refuse_router(via, folder, capsys, tmp_path)
    assert f"{folder / ckpt.CONFIG_FILE}: " in message
    assert any(what in message for what in ("not valid JSON", "content: expected an object", "nested")), message


def test_router_config_is_checked_before_the_backbone_is_built(broken_router):
    """An unknown model would be refused when the backbone is loaded: the router's config.json is refused first."""
    folder, config = broken_router(mutate(GOOD_ROUTER, "train.router_group_size", 0))
    message = refused_by_loader(lambda: load_pruned_model("no-such-model", str(folder)))
    assert message.startswith(f"{config}: field train.router_group_size: expected an integer in [1, 1024], got 0")


def _renamed(tensors: dict) -> dict:
    return {key.replace("routers.0.", "routers.9."): value for key, value in tensors.items()}


def _poisoned(tensors: dict) -> dict:
    tensors = dict(tensors)
    tensors["anchor"] = torch.tensor(float("nan"))
    return tensors


def _truncated_rank(tensors: dict) -> dict:
    key = next(key for key in tensors if key.endswith("lora_A.weight"))
    return {**tensors, key: tensors[key][:1].clone()}


def _missing_adapter(tensors: dict) -> dict:
    return dict(list(tensors.items())[1:])


# (tensor file, how its tensors are changed, config changes, what the message says); the config stays valid
TENSOR_CASES = [pytest.param(*case, id=name) for name, case in {
    "router-renamed": (ckpt.ROUTER_FILE, _renamed, {}, "unexpected ['routers.9."),
    "router-hidden-dim": (ckpt.ROUTER_FILE, None, {"train.router_hidden_dim": 32},
                          "tensor routers.0.proj_x.weight has shape [64, 128]; config.json gives [32, 128]"),
    "router-group-size": (ckpt.ROUTER_FILE, None, {"train.router_group_size": 3}, "tensors do not fit the RouterBank"),
    "policy-nan": (ckpt.POLICY_FILE, _poisoned, {}, "tensor anchor (torch.float32) is not finite"),
    "policy-hidden-dim": (ckpt.POLICY_FILE, None, {"train.policy_hidden_dim": 128}, "config.json gives [128, 128]"),
    "adapters-shape": (ckpt.ADAPTER_FILE, _truncated_rank, {}, "does not fit this model (Error(s) in loading"),
    "adapters-rank": (ckpt.ADAPTER_FILE, None, {"adapters.rank": 16}, "does not fit this model"),
    "adapters-missing": (ckpt.ADAPTER_FILE, _missing_adapter, {}, "missing ['base_model.model.transformer_blocks"),
}.items()]


@pytest.mark.parametrize("via", ["load", "cli"])
@pytest.mark.parametrize("name, change, config_changes, expect", TENSOR_CASES)
def test_router_tensors_that_do_not_fit_their_config_are_refused_naming_the_file(broken_router, capsys, tmp_path,
                                                                                  via, name, change, config_changes,
                                                                                  expect):
    config = GOOD_ROUTER
    for path, value in config_changes.items():
        config = mutate(config, path, value)
    folder, _ = broken_router(config)
    if change is not None:
        tensors = change(load_file(str(folder / name)))
        (folder / name).unlink()
        save_file(tensors, str(folder / name))
    message = refuse_router(via, folder, capsys, tmp_path)
    assert f"{folder / name}: " in message and expect in message, message


@pytest.mark.parametrize("via", ["load", "cli"])
def test_corrupt_router_safetensors_is_refused_naming_the_file(good_router, capsys, tmp_path, via):
    folder = linked_copy(good_router, tmp_path / "router")
    replace_file(folder / ckpt.ROUTER_FILE, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    if via == "cli":
        message = refused_by_cli(capsys, ["freeze", "--router", str(folder), "--out", str(tmp_path / "out")])
    else:
        with pytest.raises(ShivaError) as info:
            load_pruned_model(MODEL, str(folder))
        message = str(info.value)
    assert f"{folder / ckpt.ROUTER_FILE}: not a readable safetensors file" in message


# -------------------------------------------------------------------------------------------- trainer state, logs


GOOD_STATE = {"step": 3, "optimizer_stage": 1, "param_groups": [{"params": [0, 1], "lr": 0.001}], "evals": {},
              "wall_time_s": 1.5, "total_steps": 7, "finished": False}


@pytest.mark.parametrize("path, value, expect", [
    _case("step", -1), _case("step", "3"), _case("optimizer_stage", 4), _case("param_groups", {}),
    _case("param_groups[0]", {"lr": 0.1}, "field param_groups[0].params: missing"), _case("evals", []),
    _case("wall_time_s", math.nan), _case("total_steps", 0), _case("finished", "no"), _case("step", DELETE),
    _case("surprise", 1, "field surprise: unknown key"), _case("step", 8, "field step: expected at most total_steps 7"),
])
def test_trainer_state_field_is_refused_naming_the_file_and_the_field(tmp_path, path, value, expect):
    replace_file(tmp_path / ckpt.STATE_JSON, json.dumps(mutate(GOOD_STATE, path, value)).encode())
    message = refused_by_loader(lambda: ckpt.read_trainer_state(tmp_path))
    assert f"{tmp_path / ckpt.STATE_JSON}: " in message and expect in message, message


def test_good_trainer_state_loads(tmp_path):
    replace_file(tmp_path / ckpt.STATE_JSON, json.dumps(GOOD_STATE).encode())
    assert ckpt.read_trainer_state(tmp_path) == GOOD_STATE


def test_log_line_that_is_not_a_json_object_is_refused_naming_the_line(tmp_path):
    replace_file(tmp_path / ckpt.LOG_FILE, b'{"step": 1}\n[2]\n')
    message = refused_by_loader(lambda: ckpt.read_jsonl(tmp_path / ckpt.LOG_FILE))
    assert message == f"{tmp_path / ckpt.LOG_FILE}: line 2: expected a JSON object, got list"


# -------------------------------------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    """tiny-sd3 saved by diffusers: config.json + diffusion_pytorch_model.safetensors."""
    model, _ = load_transformer("tiny-sd3")
    folder = tmp_path_factory.mktemp("model") / "good"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def good_model_config(good_model) -> dict:
    return json.loads((good_model / "config.json").read_text())


def refuse_model(via: str, folder: Path, capsys, tmp_path) -> str:
    if via == "cli":
        return refused_by_cli(capsys, ["freeze", "--model", str(folder), "--out", str(tmp_path / "out")])
    return refused_by_loader(lambda: load_transformer(str(folder)))


def _changes(changes: dict, expect: str):
    """Several fields at once, each fine alone."""
    return pytest.param(changes, None, expect, id=",".join(f"{key}={value}" for key, value in changes.items()))


MODEL_SIZES = ["sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
               "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
               "pos_embed_max_size"]
MODEL_CASES = [
    *[_case(name, bad) for name in MODEL_SIZES for bad in (str(16), 16.5, 0, -1, 10**12)],
    _case("dual_attention_layers", "0"), _case("dual_attention_layers[0]", -1),
    _case("dual_attention_layers[0]", 0.5), _case("qk_norm", 5), _case("qk_norm", "banana"),
    _case("_use_default_values", 5), _case("_diffusers_version", 0.3),
    _case("_class_name", 5, "model class 5 is not supported"),
    _case("_class_name", "UNet2DConditionModel", "model class 'UNet2DConditionModel' is not supported"),
    _case("_class_name", DELETE, "model class None is not supported"),
    # each size fine alone, together nonsense
    _case("patch_size", 3, "field sample_size: expected a multiple of patch_size 3, got 32"),
    _case("pos_embed_max_size", 8, "field pos_embed_max_size: expected >= sample_size / patch_size = 16"),
    _case("caption_projection_dim", 64, "field caption_projection_dim: expected num_attention_heads x "
                                        "attention_head_dim = 128"),
    _changes({"num_attention_heads": 1, "attention_head_dim": 126, "caption_projection_dim": 126},
             "field num_attention_heads: expected num_attention_heads x attention_head_dim a multiple of 4"),
    _changes({"num_attention_heads": 1024, "attention_head_dim": 1024},
             "field num_attention_heads: expected num_attention_heads x attention_head_dim a multiple of 4 and <= "
             "65536 (the sin-cos position embedding's width), got 1024 x 1024"),
    _case("dual_attention_layers", [4], "field dual_attention_layers: expected layer indices below num_layers 4"),
]


def _model_config(good: dict, path: str | dict, value) -> dict:
    if isinstance(path, dict):
        return {**good, **path}
    if path.startswith("dual_attention_layers["):        # tiny-sd3 has none: give it one to break
        good = {**good, "dual_attention_layers": [0]}
    return mutate(good, path, value)


@pytest.mark.parametrize("via", ["load", "cli"])
@pytest.mark.parametrize("path, value, expect", MODEL_CASES)
def test_model_config_field_is_refused_naming_the_file_and_the_field(good_model, good_model_config, capsys, tmp_path,
                                                                     via, path, value, expect):
    folder = linked_copy(good_model, tmp_path / "model")
    config = write_config(folder, _model_config(good_model_config, path, value))
    message = refuse_model(via, folder, capsys, tmp_path)
    assert f"{config}: " in message and expect in message, message


@pytest.mark.parametrize("via", ["load", "cli"])
@pytest.mark.parametrize("text", RAW_FILES)
def test_model_config_that_is_not_a_json_object_is_refused_naming_the_file(good_model, capsys, tmp_path, via, text):
    folder = linked_copy(good_model, tmp_path / "model")
    replace_file(folder / "config.json", text)
    message = refuse_model(via, folder, capsys, tmp_path)
    assert f"{folder / 'config.json'}: " in message
    assert any(what in message for what in ("not valid JSON", "content: expected an object", "nested",
                                            "is not supported")), message


def test_model_config_with_unknown_keys_and_diffusers_defaults_loads(good_model, good_model_config, tmp_path):
    folder = linked_copy(good_model, tmp_path / "model")
    config = {key: value for key, value in good_model_config.items() if key != "out_channels"}
    write_config(folder, {**config, "some_future_key": [1, 2], "_name_or_path": "somewhere"})
    model, source = load_transformer(str(folder))
    assert source.kind == "folder" and model.out_channels == good_model_config["in_channels"]


WEIGHTS = "diffusion_pytorch_model.safetensors"


def _rewrite_tensors(change):
    def rewrite(folder: Path, config: dict) -> None:
        tensors = change(load_file(str(folder / WEIGHTS)))
        (folder / WEIGHTS).unlink()
        save_file(tensors, str(folder / WEIGHTS))
    return rewrite


def _rewrite_bytes(change):
    return lambda folder, config: replace_file(folder / WEIGHTS, change((folder / WEIGHTS).read_bytes()))


def _only_a_pickle(folder: Path, config: dict) -> None:
    (folder / WEIGHTS).unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"a pickle would be here; it is never read")


# how the folder is broken, what the message says (after "<folder>: the weights do not ...")
WEIGHT_CASES = [pytest.param(*case, id=name) for name, case in {
    "truncated": (_rewrite_bytes(lambda data: data[:len(data) // 2]), "load"),
    "garbage": (_rewrite_bytes(lambda data: b"garbage"), "load"),
    "only-a-pickle": (_only_a_pickle, f"no file named {WEIGHTS}"),
    "missing-tensor": (_rewrite_tensors(lambda t: dict(list(t.items())[1:])), "1 missing keys"),
    "extra-tensor": (_rewrite_tensors(lambda t: {**t, "surprise.weight": torch.zeros(2)}),
                     "1 unexpected keys (e.g. ['surprise.weight'])"),
    "wrong-shape": (_rewrite_tensors(lambda t: {**t, "context_embedder.bias": torch.zeros(3)}),
                    "context_embedder.bias expected shape"),
    "config-of-another-size": (lambda folder, config: write_config(folder, {**config, "num_layers": 3}),
                               "transformer_blocks.2.norm1_context.linear.bias expected shape"),
}.items()]


@pytest.mark.parametrize("via", ["load", "cli"])
@pytest.mark.parametrize("breaks, expect", WEIGHT_CASES)
def test_weights_that_do_not_load_are_refused_naming_the_folder(good_model, good_model_config, capsys, tmp_path, via,
                                                                breaks, expect):
    folder = linked_copy(good_model, tmp_path / "model")
    breaks(folder, good_model_config)
    message = refuse_model(via, folder, capsys, tmp_path).removeprefix("error: ")
    assert message.startswith(f"{folder}: the weights do not") and expect in message, message

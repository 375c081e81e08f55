"""`train` on FLUX.1 (tiny-flux, CPU): the three stages, the checkpoint, loading it back and building from it.

Flux differs from SD3 where training touches the model: latents go in packed into tokens of 2x2 latent pixels
(FluxPipeline._pack_latents), the timestep as t / 1000, img_ids / txt_ids and the distilled guidance with every call,
and its routed blocks are the double- then the single-stream blocks (2 + 4 in tiny-flux).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from shiva_export import backbones
from shiva_export import checkpoint as ckpt
from shiva_export import cli
from shiva_export.errors import ConfigError
from shiva_export.models import load_transformer
from shiva_export.router import RouterBank
from shiva_export.training import DistContext, RunOptions, TrainConfig, Trainer
from shiva_export.training_data import LatentDataset, pack_latents, write_latent_dataset

FLUX = "tiny-flux"
SIZE = 128                          # px: 16x16 latents, 8x8 = 64 packed tokens
TOKENS = 64
STAGES = [1, 1, 2, 2, 3, 3, 3]
# Small but real: every stage, an antithetic stage 2 (4 micro-batches), the summary's evaluations at 2 sampler steps.
TRAIN_ARGS = {"--target-keep": "0.6", "--warmup-steps": "2", "--policy-steps": "2", "--joint-steps": "3",
              "--lr-warmup-steps": "1", "--global-batch": "4", "--micro-batch": "1", "--eval-steps": "2",
              "--eval-samples": "1", "--height": str(SIZE), "--width": str(SIZE), "--lr-router": "3e-3",
              "--lr-adapter": "1e-3"}


def run_cli(*argv: str) -> int:
    return cli.main([*argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("flux") / "ckpt"
    code = run_cli("train", "--model", FLUX, "--out", str(out), "--no-progress",
                   *[part for item in TRAIN_ARGS.items() for part in item])
    assert code == 0
    return {"out": out, "summary": json.loads((out / ckpt.SUMMARY_FILE).read_text())}


# ------------------------------------------------------------------------------------------ what a step feeds


def test_a_flux_training_step_feeds_packed_latents_scaled_timesteps_ids_and_guidance(tmp_path):
    """The transformer sees what FluxPipeline feeds it: observed with a forward pre-hook on a real step."""
    config = TrainConfig(warmup_steps=1, policy_steps=0, joint_steps=0, lr_warmup_steps=1, global_batch=2,
                         micro_batch=1, eval_steps=1, eval_samples=1, height=SIZE, width=SIZE)
    trainer = Trainer(FLUX, config, RunOptions(out=tmp_path / "ckpt", progress=False), DistContext())
    mcfg = trainer.transformer.config
    adapter = backbones.for_model(trainer.transformer)
    assert trainer.num_layers == adapter.num_blocks(mcfg) == mcfg.num_layers + mcfg.num_single_layers == 6
    assert trainer.grid == (8, 8) and trainer.num_tokens == TOKENS
    assert trainer.routers.num_layers == 6 and trainer.routers.routers[0].proj_p.in_features == 128
    calls = []
    handle = trainer.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({k: v.detach().clone() for k, v in kwargs.items()
                                                   if torch.is_tensor(v)}), with_kwargs=True)
    try:
        trainer.train_step()
    finally:
        handle.remove()
    specs = adapter.input_specs(mcfg, SIZE, SIZE, 1, 24, 8, "fp32")
    constants = adapter.constants(mcfg, SIZE, SIZE, 24, 8)
    assert len(calls) == 4                                                  # 2 micro-batches x (teacher, student)
    for call in calls:
        for name, spec in specs.items():
            assert tuple(call[name].shape) == spec.shape, name              # [1, 64, 16] packed tokens, ...
        assert torch.equal(call["img_ids"], constants["img_ids"]) and torch.equal(call["txt_ids"], constants["txt_ids"])
        assert call["guidance"].tolist() == [3.5]
        assert 0 < float(call["timestep"]) <= 1                             # t / 1000, not t
    # each micro-batch draws its timestep from its own stratum of [0, 1000] (D11): 1000 t lands in its half
    shift = trainer.config.timestep_shift
    strata = [float(call["timestep"]) for call in calls[::2]]
    u = [t / (shift - (shift - 1) * t) for t in strata]                    # invert sigma = s u / (1 + (s - 1) u)
    assert u[0] < 0.5 <= u[1], (strata, u)
    assert shift == pytest.approx(math.exp(0.5 + (TOKENS - 256) * 0.65 / 3840))   # FluxPipeline's mu at 64 tokens


def test_data_free_latents_are_drawn_on_the_latent_image_and_packed_as_flux_packs_them():
    from diffusers import FluxPipeline

    from shiva_export.training import keyed_generator
    from shiva_export.training_data import DataFreeSource

    model, _ = load_transformer(FLUX)
    source = DataFreeSource(model.config, SIZE, SIZE, 24)
    assert source.layout.latent_channels == 4 and source.layout.pack == 2      # in_channels 16 = 4 channels x 2x2
    batch = source.batch([0, 1], keyed_generator(0, "x"))
    assert batch.latents.shape == (2, TOKENS, 16) and batch.encoder_hidden_states.shape == (2, 24, 64)
    generator = keyed_generator(0, "x")
    image = torch.randn(2, 4, 16, 16, generator=generator) * source.envelope(2, generator)
    torch.testing.assert_close(batch.latents, FluxPipeline._pack_latents(image, 2, 4, 16, 16), rtol=0, atol=0)
    assert torch.equal(pack_latents(image, 2), FluxPipeline._pack_latents(image, 2, 4, 16, 16))


def test_samples_of_a_micro_batch_keep_their_own_tokens_and_rope_rows_in_training():
    """micro_batch 2 on Flux: each sample keeps its own tokens (per-sample RoPE rows, the batched attention
    processor), so the batch's output is each sample's output alone; the STE gradient reaches the routers."""
    from shiva_export.patching import training_ratios

    config = TrainConfig(warmup_steps=1, policy_steps=0, joint_steps=0, lr_warmup_steps=1, global_batch=2,
                         micro_batch=2, eval_steps=1, eval_samples=1, height=SIZE, width=SIZE)
    trainer = Trainer(FLUX, config, RunOptions(out=Path("unused"), progress=False), DistContext())
    batch = trainer.data.batch([0, 1], torch.Generator().manual_seed(1))
    inputs = trainer._model_inputs(batch.latents, batch.text(), torch.tensor([600.0, 600.0]))
    ratios = torch.full((2, trainer.num_layers), 0.5)
    ratios[:, 0] = 1.0

    def run(rows: slice):
        part = {name: value if name in ("img_ids", "txt_ids") else value[rows] for name, value in inputs.items()}
        with training_ratios(trainer.transformer, ratios[rows], score_noise=0.0, record=True) as state:
            out = trainer.transformer(**part).sample
            return out, {layer: indices.clone() for layer, indices in state.indices.items()}

    together, indices = run(slice(0, 2))
    alone = [run(slice(i, i + 1)) for i in range(2)]
    torch.testing.assert_close(together, torch.cat([alone[0][0], alone[1][0]]), rtol=1e-4, atol=1e-5)
    assert sorted(indices) == [1, 2, 3, 4, 5] and all(indices[layer].shape == (2, TOKENS // 2) for layer in indices)
    assert any(not torch.equal(indices[layer][0], indices[layer][1]) for layer in indices)   # per-sample rows used
    for layer in indices:
        assert torch.equal(indices[layer][0], alone[0][1][layer][0]) and torch.equal(indices[layer][1],
                                                                                     alone[1][1][layer][0])
    together.float().pow(2).mean().backward()
    grads = [p.grad for p in trainer.routers.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(float(g.abs().max()) > 0 for g in grads)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd35"])
def test_each_family_names_its_dora_targets_every_block_projection_but_the_adaln(model):
    """`adapter_targets` (the family's, in its adapter) takes every Linear inside the routed blocks except the AdaLN
    modulation, and nothing outside them."""
    transformer, _ = load_transformer(model)
    adapter = backbones.for_model(transformer)
    pattern = adapter.adapter_targets()
    matched = {name for name, module in transformer.named_modules()
               if isinstance(module, torch.nn.Linear) and re.fullmatch(pattern, name)}
    names = {module: name for name, module in transformer.named_modules()}
    expected = {names[module] for block in adapter.blocks(transformer) for module in block.modules()
                if isinstance(module, torch.nn.Linear) and ".norm" not in names[module]}
    assert matched == expected and len(matched) > 4 * len(adapter.blocks(transformer))


def test_training_code_names_no_family():
    """Family knowledge lives in shiva_export/backbones; the training code and the train verb only ask the adapter."""
    root = Path(__file__).resolve().parents[1] / "shiva_export"
    files = [root / name for name in ("training.py", "training_data.py", "training_config.py", "checkpoint.py",
                                      "commands/train.py")]
    found = {path.name: re.findall(r"Flux|FLUX|SD3|SD35|Joint", path.read_text()) for path in files}
    assert not any(found.values()), found


# ------------------------------------------------------------------------------------------ the data-free run


def test_three_stages_run_on_flux_and_write_a_flux_checkpoint(trained):
    out, summary = trained["out"], trained["summary"]
    config = ckpt.read_config(out)
    assert config["model"]["model_class"] == "FluxTransformer2DModel" and config["model"]["num_layers"] == 6
    assert config["model"]["name"] == FLUX and config["num_image_tokens"] == TOKENS
    log = ckpt.read_jsonl(out / ckpt.LOG_FILE)
    assert [record["stage"] for record in log] == STAGES
    assert all(math.isfinite(record["loss"]) and record["distill"] > 0 for record in log)
    assert summary["num_image_tokens"] == TOKENS and summary["steps"]["done"] == len(STAGES)
    # the policy ends on budget: its long-run mean keep and the budget EMA within 0.03 of the target
    assert abs(summary["mean_keep"] - 0.6) <= 0.03, summary["mean_keep"]
    assert abs(summary["mean_keep_ema"] - 0.6) <= 0.03, summary["mean_keep_ema"]
    assert summary["checks"]["mean_keep_within_0.03"]
    # evaluated on FluxPipeline's own grid: sigmas linspace(1, 1/2, 2), dynamically shifted
    assert summary["schedule"]["timesteps"][0] == 1000.0 and 500 < summary["schedule"]["timesteps"][1] < 1000
    assert summary["after_stage3"]["learned"] > 0 and 0 < summary["flop_ratio_at_sampler"] < 1


def test_training_moved_the_routers_and_the_adapters_cover_both_block_kinds(trained):
    out = trained["out"]
    model, _ = load_transformer(FLUX)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)                                            # what the trainer starts from (seed 0)
        initial = RouterBank.for_transformer(model).state_dict()
    trained_routers = ckpt.read_tensors(out / ckpt.ROUTER_FILE)
    assert initial.keys() == trained_routers.keys()
    moved = [key for key in initial if not torch.equal(initial[key], trained_routers[key])]
    assert any(key.endswith("proj_x.weight") for key in moved), moved
    adapters = ckpt.read_tensors(out / ckpt.ADAPTER_FILE)
    targets = {key.split(".lora_")[0].removeprefix("base_model.model.") for key in adapters}
    for block in ("transformer_blocks.1", "single_transformer_blocks.3"):
        assert any(t.startswith(block + ".attn.to_q") for t in targets), block
    assert {f"single_transformer_blocks.{i}.{name}" for i in range(4) for name in ("proj_mlp", "proj_out")} <= targets
    assert not any("norm" in t or t in ("proj_out", "x_embedder") for t in targets)
    assert any(float(value.abs().max()) > 0 for key, value in adapters.items() if "lora_B" in key)   # B left 0


def test_load_pruned_model_takes_the_flux_checkpoint_with_merged_adapters(trained):
    from shiva_export.patching import keep_ratios_to_k, static_k
    from shiva_export.pruned import load_pruned_model

    out = trained["out"]
    pruned = load_pruned_model(FLUX, router_checkpoint=str(out))
    saved = ckpt.read_tensors(out / ckpt.ROUTER_FILE)
    assert all(torch.equal(pruned.routers.state_dict()[key], value) for key, value in saved.items())
    assert pruned.policy.num_layers == 6 and pruned.checkpoint_hash == ckpt.checkpoint_hash(out)
    timesteps = torch.tensor(trained["summary"]["schedule"]["timesteps"])
    assert pruned.policy.ratios(timesteps)[:, 1:].mean(dim=1).tolist() == pytest.approx(
        trained["summary"]["schedule"]["mean_keep"], abs=1e-3)
    base, _ = load_transformer(FLUX)
    merged = dict(pruned.transformer.named_parameters())
    changed = [name for name, param in base.named_parameters() if not torch.equal(param, merged[name])]
    assert any(name.startswith("single_transformer_blocks.") and ".proj_mlp." in name for name in changed), changed
    assert all(".attn." in name or ".ff" in name or ".proj_" in name for name in changed), changed
    # the merged, pruned model runs at the policy's k and stays close to its dense self
    adapter = backbones.for_model(pruned.transformer)
    mcfg = pruned.transformer.config
    generator = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(spec.shape, generator=generator)
              for name, spec in adapter.input_specs(mcfg, SIZE, SIZE, 1, 24, 8, "fp32").items()}
    inputs.update(timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  **adapter.constants(mcfg, SIZE, SIZE, 24, 8))
    k = keep_ratios_to_k(pruned.policy.ratios(torch.tensor([500.0]))[0].tolist(), TOKENS)
    with torch.no_grad():
        dense = pruned.transformer(**inputs).sample
        with static_k(pruned.transformer, k, record=True) as state:
            sparse = pruned.transformer(**inputs).sample
            processed = dict(state.processed_tokens)
    assert sorted(processed) == [1, 2, 3, 4, 5] and all(processed[layer] == k[layer] for layer in processed)
    assert min(k[1:]) < TOKENS                                              # something was pruned
    assert torch.isfinite(sparse).all() and 0 < float((sparse - dense).norm() / dense.norm()) < 0.5


def test_a_flux_checkpoint_is_refused_for_an_sd3_model_naming_both_classes(trained):
    other, source = load_transformer("tiny-sd35")
    with pytest.raises(ConfigError, match=r"tiny-flux.*model_class=FluxTransformer2DModel.*given model has "
                                          r"model_class=SD3Transformer2DModel"):
        ckpt.load_router_checkpoint(trained["out"], other, source)


def test_a_checkpoint_from_before_model_class_was_recorded_is_an_sd3_one_refused_for_flux():
    from shiva_export.models import shipped_router

    shipped = shipped_router("tiny-sd35")
    assert "model_class" not in ckpt.read_config(shipped)["model"]         # written before Flux came
    routers, _, _ = ckpt.load_router_checkpoint(shipped, *load_transformer("tiny-sd35"))
    assert routers.num_layers == 6
    with pytest.raises(ConfigError, match=r"model_class=SD3Transformer2DModel, but the given model has "
                                          r"model_class=FluxTransformer2DModel"):
        ckpt.load_router_checkpoint(shipped, *load_transformer(FLUX))


def test_build_from_the_flux_checkpoint_exits_0(trained, tmp_path):
    out = tmp_path / "artifacts"
    code = run_cli("build", "--model", FLUX, "--router", str(trained["out"]), "--out", str(out), "--steps", "4",
                   "--height", str(SIZE), "--width", str(SIZE), "--backend", "onnxruntime", "--runs", "1")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert Path(manifest["config"]["router"]).resolve() == trained["out"].resolve()
    schedule = json.loads((out / "schedule.json").read_text())                # frozen from the trained policy
    assert schedule["checkpoint_hash"] == ckpt.checkpoint_hash(trained["out"])


# ------------------------------------------------------------------------------------------ a data folder


def flux_dataset(root: Path, channels: int = 4, count: int = 4) -> Path:
    """The documented format with tiny-flux's sizes: image-shaped VAE latents [n, 4, 16, 16] (in_channels 16 =
    4 VAE channels packed 2x2), 24 text tokens of width 64, pooled width 64."""
    generator = torch.Generator().manual_seed(0)
    return write_latent_dataset(root, torch.randn(count, channels, 16, 16, generator=generator),
                                torch.randn(count, 24, 64, generator=generator),
                                torch.randn(count, 64, generator=generator), shard_size=3,
                                null_embeddings=(torch.zeros(24, 64), torch.zeros(64)))


def test_a_flux_data_folder_is_read_packed_and_trains_with_the_flow_matching_loss(tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    data = flux_dataset(tmp_path / "data")
    model, _ = load_transformer(FLUX)
    dataset = LatentDataset(data, model.config)
    stored = load_file(str(data / "shard-00000.safetensors"))["latents"]
    batch = dataset.read([0, 2])
    assert batch.latents.shape == (2, TOKENS, 16)
    assert torch.equal(batch.latents, FluxPipeline._pack_latents(stored[[0, 2]], 2, 4, 16, 16))

    config = TrainConfig(warmup_steps=1, policy_steps=1, joint_steps=1, lr_warmup_steps=1, global_batch=2,
                         micro_batch=1, eval_steps=2, eval_samples=1, data=str(data))
    summary = Trainer(FLUX, config, RunOptions(out=tmp_path / "ckpt", progress=False), DistContext()).run()
    log = ckpt.read_jsonl(tmp_path / "ckpt" / ckpt.LOG_FILE)
    assert [record["stage"] for record in log] == [1, 2, 3]
    assert all(record["diffusion"] > 0 and math.isfinite(record["diffusion"]) for record in log)
    assert summary["num_image_tokens"] == TOKENS
    saved = ckpt.read_config(tmp_path / "ckpt")["train"]
    assert (saved["height"], saved["width"], saved["context_tokens"]) == (SIZE, SIZE, 24)
    assert saved["cfg_dropout"] == 0.0              # guidance-distilled: FluxPipeline never runs the empty prompt


def test_flux_data_with_packed_channel_count_exits_2_naming_the_vae_channels(tmp_path, capsys):
    data = flux_dataset(tmp_path / "data", channels=16, count=1)
    assert run_cli("train", "--model", FLUX, "--out", str(tmp_path / "c"), "--data", str(data), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "latent_channels is 16" in err and "in_channels / 4" in err and "is 4" in err


@pytest.mark.parametrize("argv, message", [
    (["--height", "120"], "resolution 120x"),                                  # 16 px per packed token
    (["--dense-layers", "0,1,2,3,4,5"], "leaves no layer to prune"),           # 2 double + 4 single blocks
    (["--dense-layers", "6"], "out of range for a 6-layer model"),
    (["--cfg-dropout", "1"], "cfg_dropout"),
])
def test_bad_flux_training_input_exits_2_in_one_line(tmp_path, capsys, argv, message):
    assert run_cli("train", "--model", FLUX, "--out", str(tmp_path / "c"), "--no-progress", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "c" / ckpt.CONFIG_FILE).exists()


def test_data_made_by_the_data_verb_from_a_flux_pipeline_folder_trains_on_that_folder(tmp_path):
    """The whole chain on a FluxPipeline folder (diffusers' tiny test components, VAE factor 1): `data` writes the
    teacher's unpacked latents [n, 1, 16, 16] (in_channels 4 = 1 channel packed 2x2), `train` packs them back."""
    from tests.pipelines import save_flux_pipeline

    folder = save_flux_pipeline(tmp_path / "pipe", num_layers=1, num_single_layers=2)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    assert run_cli("data", "--model", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--out",
                   str(tmp_path / "data"), "--steps", "2", "--height", "16", "--width", "16", "--no-progress") == 0
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    assert (index["latent_channels"], index["latent_height"], index["latent_width"]) == (1, 16, 16)
    assert index["source"]["guidance_scale"] == 3.5   # the teacher at FluxPipeline's distilled guidance
    out = tmp_path / "ckpt"
    assert run_cli("train", "--model", str(folder), "--data", str(tmp_path / "data"), "--out", str(out),
                   "--no-progress", "--warmup-steps", "1", "--policy-steps", "1", "--joint-steps", "1",
                   "--lr-warmup-steps", "1", "--global-batch", "2", "--micro-batch", "1", "--eval-steps", "2",
                   "--eval-samples", "1") == 0
    config = ckpt.read_config(out)
    assert config["model"]["kind"] == "folder" and config["model"]["num_layers"] == 3
    assert config["num_image_tokens"] == TOKENS and config["train"]["context_tokens"] == index["context_tokens"]
    assert all(record["diffusion"] > 0 for record in ckpt.read_jsonl(out / ckpt.LOG_FILE))
    model, source = load_transformer(str(folder))
    routers, policy, _ = ckpt.load_router_checkpoint(out, model, source)
    assert routers.num_layers == policy.num_layers == 3

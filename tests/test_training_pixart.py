"""`train` on PixArt-Sigma (tiny-pixart, CPU): the three stages, the checkpoint, building from it, caption masks.

PixArt differs from SD3 / FLUX.1 where training touches the model: it is a DDPM-family model (the pipeline's
DPM-Solver scheduler: betas, alphas_cumprod; epsilon prediction), so latents are noised as sqrt(a_t) x0 +
sqrt(1 - a_t) noise and the denoising target is the noise; the transformer outputs 2 x 4 channels (epsilon + learned
variance) and the losses compare the 4 the sampler integrates; there is no pooled text vector but a caption mask
(encoder_attention_mask) with the T5 tokens; the timestep goes in unscaled (0..1000).
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
from shiva_export.training import DistContext, RunOptions, TrainConfig, Trainer
from shiva_export.training_data import LatentDataset, write_latent_dataset

PIXART = "tiny-pixart"
SIZE = 128                          # px: 16x16 latents, patch 2: 8x8 = 64 tokens
TOKENS = 64
CONTEXT = 16                        # tiny-pixart's caption tokens; caption_channels 32
STAGES = [1, 2, 2, 3]
TRAIN_ARGS = {"--target-keep": "0.6", "--warmup-steps": "1", "--policy-steps": "2", "--joint-steps": "1",
              "--lr-warmup-steps": "1", "--global-batch": "2", "--micro-batch": "1", "--eval-steps": "2",
              "--eval-samples": "1", "--lr-router": "3e-3", "--lr-adapter": "1e-3"}


def run_cli(*argv: str) -> int:
    return cli.main([*argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pixart") / "ckpt"
    code = run_cli("train", "--model", PIXART, "--out", str(out), "--no-progress",
                   *[part for item in TRAIN_ARGS.items() for part in item])
    assert code == 0
    return {"out": out, "summary": json.loads((out / ckpt.SUMMARY_FILE).read_text())}


# ------------------------------------------------------------------------------------------ the training process


def test_pixart_noises_as_its_ddpm_scheduler_and_predicts_epsilon_while_flow_families_are_unchanged():
    from diffusers import DDPMScheduler

    pixart = backbones.REGISTRY["PixArtTransformer2DModel"]
    _, source = load_transformer(PIXART)
    scheduler = source.facts.scheduler
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([0.0, 417.0, 999.0])
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=scheduler["beta_start"], beta_end=scheduler["beta_end"],
                         beta_schedule=scheduler["beta_schedule"])
    assert torch.allclose(pixart.noised(x0, noise, t, scheduler), ddpm.add_noise(x0, noise, t.long()), atol=1e-6)
    assert torch.equal(pixart.training_target(x0, noise, t, scheduler), noise)
    between = pixart.noised(x0, noise, torch.tensor([417.5] * 3), scheduler)   # continuous t: interpolated
    low, high = (ddpm.add_noise(x0, noise, torch.full((3,), v)) for v in (417, 418))
    assert ((between - low).norm() < (high - low).norm()) and ((between - high).norm() < (high - low).norm())
    for family in ("SD3Transformer2DModel", "FluxTransformer2DModel"):          # rectified flow, velocity target
        adapter = backbones.REGISTRY[family]
        assert torch.allclose(adapter.noised(x0, noise, t), (1 - t / 1000).reshape(-1, 1, 1, 1) * x0
                              + (t / 1000).reshape(-1, 1, 1, 1) * noise)
        assert torch.equal(adapter.training_target(x0, noise, t), noise - x0)


def test_a_pixart_training_step_feeds_the_caption_mask_unscaled_timesteps_and_compares_the_epsilon_channels(
        tmp_path):
    config = TrainConfig(warmup_steps=1, policy_steps=0, joint_steps=0, lr_warmup_steps=1, global_batch=2,
                         micro_batch=1, eval_steps=1, eval_samples=1)
    trainer = Trainer(PIXART, config, RunOptions(out=tmp_path / "ckpt", progress=False), DistContext())
    assert trainer.num_layers == 4 and trainer.grid == (8, 8) and trainer.config.context_tokens == CONTEXT
    assert trainer.config.timestep_shift == 1.0 and trainer.config.cfg_dropout == 0.1   # no shift; CFG pipeline
    calls, compared = [], []
    handle = trainer.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({k: v for k, v in kwargs.items() if torch.is_tensor(v)}),
        with_kwargs=True)
    original = trainer._output
    trainer._output = lambda sample: compared.append(tuple(sample.shape)) or original(sample)
    try:
        trainer.train_step()
    finally:
        handle.remove()
    assert len(calls) == 4                                                   # 2 micro-batches x (teacher, student)
    for call in calls:
        assert set(call) == {"hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask"}
        assert call["hidden_states"].shape == (1, 4, 16, 16) and call["encoder_hidden_states"].shape == (1, 16, 32)
        mask = call["encoder_attention_mask"]
        assert mask.shape == (1, CONTEXT) and mask.dtype == torch.float32 and 1 <= mask.sum() <= CONTEXT
        assert bool((mask[0, :-1] >= mask[0, 1:]).all())                     # real tokens first, then padding
        assert 1 < float(call["timestep"]) < 1000                             # the scheduler's t, unscaled
    assert compared == [(1, 8, 16, 16)] * 4                                  # epsilon + learned variance ...
    assert original(torch.zeros(1, 8, 16, 16)).shape == (1, 4, 16, 16)       # ... of which the sampler's 4 count


# ------------------------------------------------------------------------------------------ the data-free run


def test_three_stages_run_on_pixart_and_write_a_complete_pixart_checkpoint(trained):
    out, summary = trained["out"], trained["summary"]
    assert {path.name for path in out.iterdir()} >= {ckpt.CONFIG_FILE, ckpt.ROUTER_FILE, ckpt.POLICY_FILE,
                                                    ckpt.ADAPTER_FILE, ckpt.STATE_FILE, ckpt.STATE_JSON,
                                                    ckpt.LOG_FILE, ckpt.SUMMARY_FILE}
    config = ckpt.read_config(out)
    model = config["model"]
    assert model["model_class"] == "PixArtTransformer2DModel" and model["num_layers"] == 4 and model["name"] == PIXART
    assert model["joint_attention_dim"] == 32 and "pooled_projection_dim" not in model      # no pooled text
    assert config["num_image_tokens"] == TOKENS and config["train"]["context_tokens"] == CONTEXT
    log = ckpt.read_jsonl(out / ckpt.LOG_FILE)
    assert [record["stage"] for record in log] == STAGES
    assert all(math.isfinite(record["loss"]) and record["distill"] > 0 for record in log)
    assert json.loads((out / ckpt.STATE_JSON).read_text())["finished"]
    assert abs(summary["mean_keep"] - 0.6) <= 0.03 and summary["checks"]["mean_keep_within_0.03"]
    # evaluated at the pipeline's own DPM-Solver++ timesteps (linspace spacing, 2 steps)
    assert summary["schedule"]["timesteps"] == [999.0, 500.0]
    assert summary["after_stage2"]["learned"] > 0 and summary["after_stage3"]["learned"] > 0
    assert 0 < summary["flop_ratio_at_sampler"] < 1
    adapters = ckpt.read_tensors(out / ckpt.ADAPTER_FILE)
    targets = {key.split(".lora_")[0].removeprefix("base_model.model.") for key in adapters}
    assert {f"transformer_blocks.3.{name}" for name in ("attn1.to_q", "attn2.to_k", "ff.net.2")} <= targets
    assert not any("norm" in t or "adaln" in t or "caption" in t for t in targets)
    model_now, source = load_transformer(PIXART)
    routers, policy, _ = ckpt.load_router_checkpoint(out, model_now, source)
    assert routers.num_layers == policy.num_layers == 4


def test_build_from_the_pixart_checkpoint_exits_0_and_freezes_its_policy(trained, tmp_path):
    out = tmp_path / "artifacts"
    code = run_cli("build", "--model", PIXART, "--router", str(trained["out"]), "--out", str(out), "--steps", "4",
                   "--backend", "onnxruntime", "--runs", "1")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert Path(manifest["config"]["router"]).resolve() == trained["out"].resolve()
    schedule = json.loads((out / "schedule.json").read_text())
    assert schedule["checkpoint_hash"] == ckpt.checkpoint_hash(trained["out"])


def test_a_pixart_checkpoint_is_refused_for_an_sd3_model_in_one_line(trained):
    other, source = load_transformer("tiny-sd35")
    with pytest.raises(ConfigError, match=r"model_class=PixArtTransformer2DModel.*given model has "
                                          r"model_class=SD3Transformer2DModel") as err:
        ckpt.load_router_checkpoint(trained["out"], other, source)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ a data folder


def pixart_dataset(root: Path, lengths: list[int], tokens: int, seed: int = 0, mask: bool = True) -> Path:
    """tiny-pixart's sizes: latents [n, 4, 16, 16], `tokens` caption tokens of width 32 of which the first
    lengths[i] are real; the padding holds other embeddings (as T5 gives them), masked out."""
    generator = torch.Generator().manual_seed(seed)
    count = len(lengths)
    latents = torch.randn(count, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    real = torch.randn(count, max(lengths), 32, generator=torch.Generator().manual_seed(2))
    context = torch.randn(count, tokens, 32, generator=generator) * 3
    caption = torch.zeros(count, tokens)
    for row, length in enumerate(lengths):
        context[row, :length] = real[row, :length]
        caption[row, :length] = 1.0
    return write_latent_dataset(root, latents, context, None, shard_size=3,
                                encoder_attention_mask=caption if mask else None)


def test_a_padded_caption_trains_as_the_unpadded_one(tmp_path):
    """Same samples, captions padded to 16 tokens (mask) or cut to their real tokens: the masked cross-attention and
    the router's masked mean ignore the padding, so a micro-batch's losses and router gradients agree."""
    lengths = [5, 8]
    exact = pixart_dataset(tmp_path / "exact", lengths, tokens=8)
    padded = pixart_dataset(tmp_path / "padded", lengths, tokens=CONTEXT, seed=7)
    config = TrainConfig(warmup_steps=1, policy_steps=0, joint_steps=0, lr_warmup_steps=1, global_batch=2,
                         micro_batch=2, eval_steps=1, eval_samples=1, cfg_dropout=0.0, data=str(exact))
    trainer = Trainer(PIXART, config, RunOptions(out=tmp_path / "ckpt", progress=False), DistContext())
    results = []
    for data in (exact, padded):
        trainer.data = LatentDataset(data, trainer.transformer.config)
        batch = trainer.data.read([0, 1])
        assert batch.pooled_projections is None and batch.encoder_attention_mask.sum(1).tolist() == [5.0, 8.0]
        micro = trainer._micro_batches(0, 1)[0]
        losses = trainer._losses(0, micro, *config.temperatures(0))
        trainer.routers.zero_grad(set_to_none=True)
        (losses["distill"] + losses["diffusion"]).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in trainer.routers.parameters() if p.grad is not None])
        results.append(({key: float(value) for key, value in losses.items()}, grads))
    (exact_losses, exact_grads), (padded_losses, padded_grads) = results
    assert exact_losses["diffusion"] > 0 and exact_losses["distill"] > 0
    assert padded_losses == pytest.approx(exact_losses, rel=1e-4, abs=1e-8)
    assert float(exact_grads.norm()) > 0 and exact_grads.shape == padded_grads.shape
    assert float((padded_grads - exact_grads).norm() / exact_grads.norm()) < 1e-4


@pytest.mark.parametrize("case, message", [
    ("no-mask", "no tensor 'encoder_attention_mask'"),
    ("sd3-widths", "context_dim is 64 but the model's joint_attention_dim (text embedding width) is 32"),
])
def test_pixart_data_without_its_caption_mask_or_of_other_widths_exits_2_in_one_line(tmp_path, capsys, case,
                                                                                     message):
    if case == "no-mask":
        data = pixart_dataset(tmp_path / "data", [3], tokens=CONTEXT, mask=False)
    else:
        data = write_latent_dataset(tmp_path / "data", torch.zeros(1, 4, 16, 16), torch.zeros(1, 24, 64),
                                    torch.zeros(1, 64))
    assert run_cli("train", "--model", PIXART, "--out", str(tmp_path / "c"), "--data", str(data),
                   "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["--height", "120"], "resolution 120x"),                                  # 16 px per token (VAE 8 x patch 2)
    (["--dense-layers", "0,1,2,3"], "leaves no layer to prune"),
    (["--dense-layers", "4"], "out of range for a 4-layer model"),
])
def test_bad_pixart_training_input_exits_2_in_one_line(tmp_path, capsys, argv, message):
    assert run_cli("train", "--model", PIXART, "--out", str(tmp_path / "c"), "--no-progress", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "c" / ckpt.CONFIG_FILE).exists()


def test_a_family_the_trainer_cannot_feed_is_still_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(type(backbones.REGISTRY["PixArtTransformer2DModel"]), "trainable", False)
    with pytest.raises(ConfigError, match="training a PixArtTransformer2DModel is not supported yet") as err:
        Trainer(PIXART, TrainConfig(), RunOptions(out=tmp_path / "ckpt", progress=False), DistContext())
    assert "\n" not in str(err.value)


def test_training_and_data_code_name_no_family():
    root = Path(__file__).resolve().parents[1] / "shiva_export"
    files = [root / name for name in ("training.py", "training_data.py", "training_config.py", "checkpoint.py",
                                      "data.py", "commands/train.py", "commands/data.py")]
    found = {path.name: re.findall(r"PixArt|Pixart|pixart|PIXART|Flux|FLUX|SD3|Joint", path.read_text())
             for path in files}
    assert not any(found.values()), found


def test_the_data_verb_on_a_pixart_pipeline_folder_writes_caption_masks_that_train(tmp_path):
    """`data` on a PixArtSigmaPipeline folder (diffusers' tiny test components, VAE factor 1): the teacher's latents
    [n, 4, 16, 16], the T5 embeddings and their caption masks (no pooled text); the empty prompt's too. A training
    step reads them back."""
    from safetensors.torch import load_file

    from tests.pipelines import save_pixart_pipeline

    folder = save_pixart_pipeline(tmp_path / "pipe", num_layers=2)
    (tmp_path / "prompts.txt").write_text("a red square\n")
    assert run_cli("data", "--model", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--out",
                   str(tmp_path / "data"), "--steps", "1", "--height", "16", "--width", "16", "--no-progress") == 0
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    assert (index["latent_channels"], index["latent_height"], index["latent_width"]) == (4, 16, 16)
    assert index["caption_mask"] and "pooled_dim" not in index and index["source"]["guidance_scale"] == 4.5
    shard = load_file(str(tmp_path / "data" / index["shards"][0]["file"]))
    null = load_file(str(tmp_path / "data" / "null.safetensors"))
    assert set(shard) == {"latents", "encoder_hidden_states", "encoder_attention_mask"} and set(null) == set(shard) - {
        "latents"}
    assert 1 < float(shard["encoder_attention_mask"].sum()) < index["context_tokens"]   # a prompt, padded
    assert float(null["encoder_attention_mask"].sum()) == 1.0                            # "" keeps </s>
    config = TrainConfig(warmup_steps=1, policy_steps=1, joint_steps=0, lr_warmup_steps=1, global_batch=2,
                         micro_batch=1, eval_steps=1, eval_samples=1, data=str(tmp_path / "data"))
    trainer = Trainer(str(folder), config, RunOptions(out=tmp_path / "ckpt", progress=False), DistContext())
    record = trainer.train_step()
    assert record["diffusion"] > 0 and math.isfinite(record["loss"]) and trainer.num_tokens == TOKENS

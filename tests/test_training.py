"""Claims about `train` (shiva_export/training.py, checkpoint.py, training_data.py, commands/train.py) on CPU."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shiva_export import checkpoint as ckpt
from shiva_export import cli
from shiva_export.errors import ArtifactError, ConfigError
from shiva_export.models import load_transformer
from shiva_export.training import RunOptions, TrainConfig, train
from shiva_export.training_data import write_latent_dataset

TINY = "tiny-sd35"
# The demo run behind the quality claims: data-free, default resolution (256 image tokens), every default but the
# stage lengths, the LR warm-up (scaled down with them), the batch, and the policy and adapter learning rates (raised
# for a run this short: 1e-4 moves them too little in 50-200 steps).
DEMO = {"--target-keep": "0.6", "--warmup-steps": "50", "--policy-steps": "200", "--joint-steps": "50",
        "--lr-warmup-steps": "10", "--global-batch": "4", "--micro-batch": "1", "--eval-steps": "8",
        "--lr-policy": "3e-3", "--lr-adapter": "1e-3"}
DEMO_STAGES = [1] * 50 + [2] * 200 + [3] * 50
DEMO_STEPS = len(DEMO_STAGES)
# Tiny runs for the mechanics (resume, processes, data): a few steps over all three stages.
MECHANICS = TrainConfig(warmup_steps=2, policy_steps=2, joint_steps=3, lr_warmup_steps=2, global_batch=4,
                        micro_batch=1, eval_steps=2, eval_samples=1, height=128, width=128, lr_policy=1e-3)
PROCESS_TOLERANCE = 1e-4         # 2 gloo processes vs 1 process: same math, different float summation order


def run_cli(*argv: str) -> int:
    return cli.main(["train", *argv, "--no-progress"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "ckpt"
    code = run_cli("--model", TINY, "--out", str(out), *[part for item in DEMO.items() for part in item])
    assert code == 0
    return {"out": out, "summary": json.loads((out / ckpt.SUMMARY_FILE).read_text())}


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in (ckpt.ROUTER_FILE, ckpt.POLICY_FILE, ckpt.ADAPTER_FILE, ckpt.STATE_FILE):
        if (folder / name).is_file():
            out.update({f"{name}/{key}": value for key, value in ckpt.read_tensors(folder / name).items()})
    return out


# ------------------------------------------------------------------------------------------ the demo run


def test_three_stages_run_and_write_a_complete_checkpoint(demo):
    """How long they take is measured by benchmarks, not asserted here."""
    out, summary = demo["out"], demo["summary"]
    for name in (ckpt.CONFIG_FILE, ckpt.ROUTER_FILE, ckpt.POLICY_FILE, ckpt.ADAPTER_FILE, ckpt.STATE_FILE,
                 ckpt.STATE_JSON, ckpt.LOG_FILE, ckpt.SUMMARY_FILE):
        assert (out / name).is_file(), name
    config = ckpt.read_config(out)
    assert config["model"]["num_layers"] == 6 and config["model"]["name"] == TINY
    assert config["model"]["model_hash"] == summary["model_hash"]
    assert config["train"]["lr_router"] == 3e-4 and config["train"]["tau_rank_start"] == 0.2
    assert config["adapters"]["rank"] == 32 and config["adapters"]["use_dora"] is True
    log = ckpt.read_jsonl(out / ckpt.LOG_FILE)
    assert [record["step"] for record in log] == list(range(1, DEMO_STEPS + 1))
    assert [record["stage"] for record in log] == DEMO_STAGES
    assert log[0]["tau_rank"] == pytest.approx(0.2) and log[-1]["tau_rank"] == pytest.approx(0.05)
    assert log[0]["tau_sel"] == pytest.approx(0.1) and log[-1]["tau_sel"] == pytest.approx(0.02)
    assert all({"loss", "distill", "budget", "batch_keep", "ema_keep"} <= set(record) for record in log)
    assert summary["steps"]["done"] == DEMO_STEPS and summary["wall_time_s"] > 0


def test_long_run_mean_keep_ratio_ends_within_0_03_of_the_target(demo):
    summary = demo["summary"]
    assert abs(summary["mean_keep"] - 0.6) <= 0.03, summary["mean_keep"]
    assert abs(summary["mean_keep_ema"] - 0.6) <= 0.03, summary["mean_keep_ema"]
    assert summary["checks"]["mean_keep_within_0.03"]


def test_after_stage2_learned_router_beats_random_and_grid_selection_at_the_same_budget(demo):
    errors = demo["summary"]["after_stage2"]
    assert errors["learned"] < errors["random"], errors
    assert errors["learned"] < errors["grid"], errors


def test_after_stage3_the_untrained_system_runs_one_keep_ratio_at_the_learned_mean_and_is_reported(demo):
    """The second baseline: untrained router and no schedule (what a build without a trained router runs)."""
    summary = demo["summary"]
    stage3 = summary["after_stage3"]
    learned, system = stage3["budgets"]["learned"], stage3["budgets"]["untrained_system"]
    assert learned["mean_keep"] == pytest.approx(summary["mean_keep_at_sampler"], rel=1e-6)
    assert learned["flop_ratio"] == pytest.approx(summary["flop_ratio_at_sampler"], rel=1e-9)
    assert system["mean_keep"] == pytest.approx(learned["mean_keep"], rel=1e-6)
    assert 0 < system["flop_ratio"] < 1
    values = stage3["per_timestep"]["untrained_system"]
    assert max(values) < 3 * min(values), values  # one k at every step: no step is left near-dense
    for suffix, errors in (("", stage3), ("weighted_", stage3["weighted"])):
        assert stage3[f"{suffix}reduction_vs_untrained_system"] == pytest.approx(
            1 - errors["learned"] / errors["untrained_system"])
    # the learned schedule keeps the low-noise steps, whose error reaches the sample: measured 0.92 (seed 0)
    assert stage3["weighted_reduction_vs_untrained_system"] >= 0.30, stage3


def test_summary_records_each_sampler_timesteps_error_and_their_trajectory_weighted_mean(demo):
    from shiva_export.training import trajectory_weight

    summary = demo["summary"]
    weights = trajectory_weight(torch.tensor(summary["schedule"]["timesteps"]), 3.0).double()
    weights = weights / weights.sum()
    for key in ("after_stage2", "after_stage3"):
        errors = summary[key]
        assert set(errors["per_timestep"]) == set(errors["weighted"]) >= {"learned", "untrained_router"}
        for name, values in errors["per_timestep"].items():
            assert len(values) == 8 and all(value >= 0 for value in values)
            assert errors[name] == pytest.approx(sum(values) / 8, rel=1e-9)
            # the summary rounds the timesteps to 3 decimals
            assert errors["weighted"][name] == pytest.approx(float((weights * torch.tensor(values)).sum()), rel=1e-5)
    stage3 = summary["after_stage3"]
    assert stage3["weighted_reduction_vs_untrained"] == pytest.approx(
        1 - stage3["weighted"]["learned"] / stage3["weighted"]["untrained_router"])


def test_learned_schedule_is_not_flat_across_timesteps(demo):
    schedule = demo["summary"]["schedule"]
    per_step = schedule["mean_keep"]
    assert len(per_step) == 8
    assert max(per_step) - min(per_step) >= 0.05, per_step
    assert demo["summary"]["checks"]["schedule_not_flat"]
    # the paper's direction: prune the early, high-noise steps, keep the late ones
    assert sum(per_step[4:]) / 4 > sum(per_step[:4]) / 4 + 0.05, per_step


def test_budget_gradient_anchor_reaches_only_the_anchor(tmp_path):
    """The budget sets the policy's level; with budget_gradient="anchor" its gradient leaves the branches alone."""
    from shiva_export.training import DistContext, Trainer

    trainer = Trainer(TINY, MECHANICS, RunOptions(out=tmp_path / "ckpt", progress=False),
                      DistContext())
    with torch.no_grad():
        for head in (trainer.policy.time_mlp[-1], trainer.policy.layer_mlp[-1]):
            head.weight.normal_(0, 0.3)
    for anchor_only in (True, False):
        trainer.policy.zero_grad(set_to_none=True)
        trainer.expected_keep(grad=True, anchor_only=anchor_only).backward()
        branch_grads = [p.grad for name, p in trainer.policy.named_parameters() if name != "anchor"]
        assert trainer.policy.anchor.grad is not None and float(trainer.policy.anchor.grad) > 0
        touched = [g is not None and bool(g.abs().sum() > 0) for g in branch_grads]
        assert not any(touched) if anchor_only else any(touched)


def test_summary_is_printed_and_saved_with_every_figure(demo):
    summary = demo["summary"]
    for key in ("mean_keep", "mean_keep_ema", "flop_ratio_at_sampler", "wall_time_s", "after_stage2",
                "after_stage3", "schedule", "checks"):
        assert key in summary
    assert 0 < summary["flop_ratio_at_sampler"] < 1
    failed = {name for name, ok in summary["checks"].items() if not ok}
    # the stage-3 claim is held on learned weights and data (test_training_pretrained.py, the digits model); on this
    # random-weight model data-free it is not met, as docs/training-data.md records
    assert failed <= {"stage3_30pct_below_untrained"}, summary["checks"]


# ------------------------------------------------------------------------------------------ loading checkpoints


def test_load_router_checkpoint_restores_the_trained_router_and_policy(demo):
    model, source = load_transformer(TINY)
    routers, policy, config = ckpt.load_router_checkpoint(demo["out"], model, source)
    saved = ckpt.read_tensors(demo["out"] / ckpt.ROUTER_FILE)
    assert all(torch.equal(routers.state_dict()[key], value) for key, value in saved.items())
    timesteps = torch.tensor(demo["summary"]["schedule"]["timesteps"])
    table = policy.ratios(timesteps)
    assert table[:, 1:].mean(dim=1).tolist() == pytest.approx(demo["summary"]["schedule"]["mean_keep"], abs=1e-3)
    assert config["has_adapters"] and len(config["checkpoint_hash"]) == 64


def test_pruned_model_from_the_checkpoint_carries_the_merged_stage3_adapters(demo):
    """What export traces is the student the router was trained with: base weights + merged DoRA, no peft layers."""
    from shiva_export.pruned import load_pruned_model

    base, _ = load_transformer(TINY)
    pruned = load_pruned_model(TINY, str(demo["out"]))
    merged = {name: param for name, param in pruned.transformer.named_parameters()
              if not name.startswith("shiva_routers.")}                 # the routers ride along as a submodule
    assert set(merged) == {name for name, _ in base.named_parameters()}
    changed = [name for name, param in base.named_parameters() if not torch.equal(param, merged[name])]
    assert changed and all(".attn" in name or ".ff" in name for name in changed), changed
    assert pruned.checkpoint_hash == ckpt.checkpoint_hash(demo["out"])


def test_checkpoint_for_another_model_is_refused_naming_both(demo, tmp_path):
    other, other_source = load_transformer("tiny-sd3")
    with pytest.raises(ConfigError, match=r"tiny-sd35.*num_layers=6.*given model has num_layers=4"):
        ckpt.load_router_checkpoint(demo["out"], other, other_source)
    copy = tmp_path / "ckpt"
    shutil.copytree(demo["out"], copy)
    config = json.loads((copy / ckpt.CONFIG_FILE).read_text())
    config["model"]["model_hash"] = "f" * 64
    (copy / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    model, source = load_transformer(TINY)
    with pytest.raises(ConfigError, match=rf"hash ffffffffffff.*has hash {source.model_hash[:12]}"):
        ckpt.load_router_checkpoint(copy, model, source)


def test_resume_with_another_model_exits_2(demo, capsys):
    assert run_cli("--model", "tiny-sd3", "--out", str(demo["out"]), "--resume") == 2
    assert "tiny-sd35" in capsys.readouterr().err


def test_checkpoints_load_without_unpickling(demo, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must never be unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model, source = load_transformer(TINY)
    ckpt.load_router_checkpoint(demo["out"], model, source)
    ckpt.load_adapters(demo["out"], model, source)


def test_load_adapters_merges_dora_into_plain_linear_layers(demo):
    from peft import get_peft_model, set_peft_model_state_dict

    inputs = {"hidden_states": torch.randn(1, 16, 32, 32), "encoder_hidden_states": torch.randn(1, 24, 64),
              "pooled_projections": torch.randn(1, 64), "timestep": torch.tensor([500.0])}
    config = ckpt.read_config(demo["out"])
    wrapped, _ = load_transformer(TINY)
    peft_model = get_peft_model(wrapped, ckpt.lora_config(config["adapters"]))
    set_peft_model_state_dict(peft_model, ckpt.read_tensors(demo["out"] / ckpt.ADAPTER_FILE))
    base, source = load_transformer(TINY)
    with torch.no_grad():
        expected = peft_model(**inputs).sample
        dense = base(**inputs).sample
    merged = ckpt.load_adapters(demo["out"], base, source)
    assert not any(type(module).__module__.startswith("peft") for module in merged.modules())
    assert type(merged.transformer_blocks[1].attn.to_q) is torch.nn.Linear
    with torch.no_grad():
        actual = merged(**inputs).sample
    assert not torch.allclose(expected, dense, atol=1e-4)           # the adapters did learn something
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ resume, processes


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """MECHANICS trained in one go by one process (4 accumulation steps of one sample)."""
    out = tmp_path_factory.mktemp("mechanics") / "whole"
    train(TINY, MECHANICS, RunOptions(out=out, progress=False))
    return out


def test_resume_after_a_stop_is_bit_exact_on_cpu(uninterrupted, tmp_path):
    whole, parts = uninterrupted, tmp_path / "parts"
    stopped = train(TINY, MECHANICS, RunOptions(out=parts, progress=False, stop_after=5))   # mid stage 3
    assert stopped["stopped_at"] == 5 and (parts / ckpt.ADAPTER_FILE).is_file()
    train(TINY, MECHANICS, RunOptions(out=parts, progress=False, resume=True))
    expected, actual = tensors_of(whole), tensors_of(parts)
    assert expected.keys() == actual.keys()
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []
    assert ckpt.read_jsonl(whole / ckpt.LOG_FILE) == ckpt.read_jsonl(parts / ckpt.LOG_FILE)
    first, second = (json.loads((p / ckpt.SUMMARY_FILE).read_text()) for p in (whole, parts))
    assert first["after_stage3"] == second["after_stage3"] and first["after_stage2"] == second["after_stage2"]


def test_two_gloo_processes_match_one_process_with_twice_the_accumulation(uninterrupted, tmp_path):
    single, double = uninterrupted, tmp_path / "double"                     # 2 processes: 2 accumulation steps each
    options = ["--model", TINY, "--out", str(double), "--warmup-steps", "2", "--policy-steps", "2",
               "--joint-steps", "3", "--lr-warmup-steps", "2", "--global-batch", "4", "--micro-batch", "1",
               "--eval-steps", "2", "--eval-samples", "1", "--height", "128", "--width", "128",
               "--lr-policy", "1e-3", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "shiva_export", "train", *options], env=env, capture_output=True, text=True,
                            timeout=900)  # hang guard only
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((double / ckpt.SUMMARY_FILE).read_text())
    assert summary["world_size"] == 2
    assert ckpt.read_config(double)["train"] == ckpt.read_config(single)["train"]
    expected, actual = tensors_of(single), tensors_of(double)
    assert expected.keys() == actual.keys()
    for key in expected:
        if key.endswith("rng.cpu"):
            continue
        torch.testing.assert_close(actual[key], expected[key], atol=PROCESS_TOLERANCE, rtol=PROCESS_TOLERANCE,
                                   msg=lambda message: f"{key}: {message}")
    for one, two in zip(ckpt.read_jsonl(single / ckpt.LOG_FILE), ckpt.read_jsonl(double / ckpt.LOG_FILE)):
        assert two["batch_keep"] == pytest.approx(one["batch_keep"], abs=PROCESS_TOLERANCE)
        assert two["distill"] == pytest.approx(one["distill"], rel=1e-3)


def test_interrupted_checkpoint_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "ckpt"
    train(TINY, MECHANICS, RunOptions(out=out, progress=False, stop_after=1))
    before = tensors_of(out)
    real_save, calls = safetensors.torch.save_file, []

    def crash_midway(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill during the checkpoint write")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, MECHANICS, RunOptions(out=out, progress=False, resume=True, stop_after=2))
    monkeypatch.undo()
    assert len(calls) == 3
    assert json.loads((out / ckpt.STATE_JSON).read_text())["step"] == 1
    after = tensors_of(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]          # no partial folder left behind
    resumed = train(TINY, MECHANICS, RunOptions(out=out, progress=False, resume=True, stop_after=2))
    assert resumed["stopped_at"] == 2


# ------------------------------------------------------------------------------------------ data and bad input


def tiny_dataset(root: Path, count: int = 6, context_dim: int = 64) -> Path:
    generator = torch.Generator().manual_seed(0)
    return write_latent_dataset(root, torch.randn(count, 16, 16, 16, generator=generator),
                                torch.randn(count, 24, context_dim, generator=generator),
                                torch.randn(count, 64, generator=generator), shard_size=4,
                                null_embeddings=(torch.zeros(24, context_dim), torch.zeros(64)))


def test_training_on_the_documented_data_format_adds_the_flow_matching_loss(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    assert sorted(p.name for p in data.iterdir()) == ["index.json", "null.safetensors", "shard-00000.safetensors",
                                                      "shard-00001.safetensors"]
    config = TrainConfig(warmup_steps=1, policy_steps=1, joint_steps=1, lr_warmup_steps=1, global_batch=2,
                         micro_batch=1, eval_steps=2, eval_samples=1, data=str(data))
    summary = train(TINY, config, RunOptions(out=tmp_path / "ckpt", progress=False))
    log = ckpt.read_jsonl(tmp_path / "ckpt" / ckpt.LOG_FILE)
    assert all(record["diffusion"] > 0 for record in log)
    assert summary["num_image_tokens"] == 64                      # 16x16 latents, patch 2
    saved = ckpt.read_config(tmp_path / "ckpt")["train"]
    assert (saved["height"], saved["width"], saved["context_tokens"]) == (128, 128, 24)


@pytest.mark.parametrize("keep", ["0", "-0.2", "1.5"])
def test_target_keep_outside_0_1_exits_2(tmp_path, capsys, keep):
    assert run_cli("--model", TINY, "--out", str(tmp_path / "c"), "--target-keep", keep) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_missing_data_folder_exits_2(tmp_path, capsys):
    assert run_cli("--model", TINY, "--out", str(tmp_path / "c"), "--data", str(tmp_path / "nowhere")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_data_with_another_embedding_width_exits_2_naming_both_widths(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data", context_dim=32)
    assert run_cli("--model", TINY, "--out", str(tmp_path / "c"), "--data", str(data)) == 2
    err = capsys.readouterr().err
    assert "context_dim is 32" in err and "joint_attention_dim (text embedding width) is 64" in err


def test_resume_and_fresh_runs_refuse_the_wrong_folder(tmp_path, capsys):
    with pytest.raises(ArtifactError, match="no checkpoint to resume"):
        train(TINY, MECHANICS, RunOptions(out=tmp_path / "none", resume=True, progress=False))
    out = tmp_path / "ckpt"
    train(TINY, MECHANICS, RunOptions(out=out, progress=False, stop_after=1))
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(TINY, MECHANICS, RunOptions(out=out, progress=False))
    assert run_cli("--out", str(out), "--resume", "--lr-router", "1e-3") == 2
    assert "lr_router=0.001 (checkpoint: 0.0003)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ shared-module additions


def test_output_gate_keeps_the_block_output_and_gives_pi_the_update_as_gradient():
    from shiva_export.topk import output_gate

    generator = torch.Generator().manual_seed(0)
    kept_in, kept_out = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
    upstream = torch.randn(2, 3, 4, generator=generator)
    pi = torch.rand(2, 5, generator=generator).requires_grad_(True)
    indices = torch.tensor([[0, 2, 4], [1, 2, 3]])
    gated = output_gate(kept_in, kept_out, pi, indices)
    assert torch.equal(gated, kept_out)                                     # exact values: the hard split
    (gated * upstream).sum().backward()
    expected = torch.zeros(2, 5).scatter(1, indices, (upstream * (kept_out - kept_in)).sum(-1))
    torch.testing.assert_close(pi.grad, expected)                          # <dL/dout, out - in>; dropped: 0


def test_scored_by_replaces_the_router_for_the_block_and_restores_it():
    from shiva_export.patching import PruningConfig, apply_token_pruning, get_pruning_state, scored_by, static_k
    from shiva_export.router import RouterBank
    from shiva_export.training import GridScorer

    model, _ = load_transformer(TINY)
    apply_token_pruning(model, RouterBank.for_transformer(model), PruningConfig())
    inputs = {"hidden_states": torch.randn(1, 16, 16, 16), "encoder_hidden_states": torch.randn(1, 24, 64),
              "pooled_projections": torch.randn(1, 64), "timestep": torch.tensor([500.0])}
    k = (64, 16, 16, 16, 16, 16)
    with torch.no_grad(), static_k(model, k, record=True) as state:
        with scored_by(model, GridScorer(8, 8)):
            model(**inputs)
        grid = {layer: idx.clone() for layer, idx in state.indices.items()}
        model(**inputs)
        learned = dict(state.indices)
    assert grid[1].tolist() == [[0, 2, 4, 6, 16, 18, 20, 22, 32, 34, 36, 38, 48, 50, 52, 54]]   # every 2nd row, col
    assert not torch.equal(grid[1], learned[1])
    assert get_pruning_state(model).scorer is None

"""PixArt-Sigma through every stage, on the tiny-pixart preset and a PixArtSigmaPipeline folder built from diffusers'
own tiny test configurations (no downloads): keep 1 == unpatched, exactly k image tokens in self-attention,
cross-attention and FFN of every pruned block, a padded caption that selects and computes what the unpadded one does
(PyTorch and ONNX Runtime), the exact FLOP model, freeze's timesteps against PixArtSigmaPipeline's DPM-Solver, static
export + ORT parity with identical indices, the build stages with TensorRT-RTX plans, and the runtime as
PixArtSigmaPipeline's transformer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from shiva_export import backbones
from shiva_export.errors import ConfigError
from shiva_export.export import DenseModel, ExportConfig, StaticBucket, example_feed
from shiva_export.flops import model_flops
from shiva_export.patching import static_k
from shiva_export.pruned import load_pruned_model
from shiva_export.records import ExportRecord
from tests.conftest import make_artifact

N = 64    # tiny-pixart at its default 128 x 128 px: (128 / 8 / 2)^2 tokens
S = 16    # caption tokens
L = 4     # blocks


@pytest.fixture(scope="module")
def pixart():
    pruned = load_pruned_model("tiny-pixart")
    cfg = ExportConfig(height=128, width=128, batch=2, context_tokens=S)
    return pruned, cfg


def padded_feed(pruned, cfg, real: int, seed: int = 0):
    """A feed whose captions have `real` tokens, padded to S with junk embeddings under a 0 mask, and the same feed
    unpadded (S = real, every token real)."""
    feed = example_feed(pruned.config, cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    context = feed["encoder_hidden_states"].clone()
    context[:, real:] = 5 * torch.randn(context[:, real:].shape, generator=gen)
    mask = torch.zeros(cfg.batch, S)
    mask[:, :real] = 1
    padded = {**feed, "encoder_hidden_states": context, "encoder_attention_mask": mask}
    unpadded = {**feed, "encoder_hidden_states": context[:, :real].clone(),
                "encoder_attention_mask": torch.ones(cfg.batch, real)}
    return padded, unpadded


def test_the_adapter_names_the_blocks_and_the_graph_inputs(pixart):
    pruned, cfg = pixart
    adapter = backbones.for_model(pruned.transformer)
    assert adapter.family == "pixart" and adapter.pipeline_class == "PixArtSigmaPipeline"
    assert [type(b).__name__ for b in adapter.blocks(pruned.transformer)] == ["BasicTransformerBlock"] * L
    assert pruned.state.pruned_layers == [1, 2, 3] and len(pruned.routers.routers) == 2
    assert adapter.router_dims(pruned.config) == (32, 6 * 32, 32)   # temb: the adaLN-single embedding (6 D)
    assert cfg.input_shapes(pruned.config) == {"hidden_states": (2, 4, 16, 16), "encoder_hidden_states": (2, S, 32),
                                               "timestep": (2,), "encoder_attention_mask": (2, S)}
    assert cfg.input_specs(pruned.config)["encoder_attention_mask"].role == "mask"
    sample = torch.randn(2, 8, 16, 16)
    assert torch.equal(adapter.sampler_output(pruned.config, sample), sample[:, :4])   # learned sigma dropped


def test_keep_one_equals_the_unpatched_model(pixart):
    pruned, cfg = pixart
    feed = example_feed(pruned.config, cfg, seed=1)
    feed["encoder_attention_mask"][0, S // 2:] = 0   # a padded caption too
    with torch.no_grad():
        dense = DenseModel(pruned.transformer)(**feed)
        kept_all = StaticBucket(pruned.transformer, [N] * L)(**feed)
        routed_all = StaticBucket(pruned.transformer, [N] * L, select_full_layers=True)(**feed)
    assert dense.shape == (2, 8, 16, 16)   # the full learned-sigma output
    assert (kept_all - dense).abs().max() <= 1e-6 and (routed_all - dense).abs().max() <= 1e-6


def test_exactly_k_image_tokens_run_self_attention_cross_attention_and_ffn(pixart):
    pruned, cfg = pixart
    k = (N, 16, 24, 40)
    seen = []

    def record(part):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            seen.append((part, hidden.shape[1], None if context is None else context.shape[1]))
        return hook

    blocks = backbones.for_model(pruned.transformer).blocks(pruned.transformer)
    handles = [h for b in blocks for h in (b.attn1.register_forward_pre_hook(record("self"), with_kwargs=True),
                                           b.attn2.register_forward_pre_hook(record("cross"), with_kwargs=True),
                                           b.ff.register_forward_pre_hook(record("ffn"), with_kwargs=True))]
    try:
        with torch.no_grad(), static_k(pruned.transformer, k, record=True) as state:
            pruned.transformer(**example_feed(pruned.config, cfg), return_dict=False)
            processed = [state.processed_tokens[layer] for layer in range(1, L)]
    finally:
        for handle in handles:
            handle.remove()
    assert processed == list(k[1:])
    assert seen == [item for tokens in k for item in (("self", tokens, None), ("cross", tokens, S),
                                                       ("ffn", tokens, None))]


def test_a_padded_caption_keeps_the_tokens_and_output_of_the_unpadded_one(pixart):
    """The router pools the caption over its real tokens and cross-attention masks the padding: junk embeddings at
    padded positions change neither the kept set nor the output."""
    pruned, cfg = pixart
    k = (N, 16, 24, 40)
    for real in (1, 7):
        padded, unpadded = padded_feed(pruned, cfg, real, seed=real)
        with torch.no_grad():
            got = StaticBucket(pruned.transformer, k, debug_indices=True)(**padded)
            want = StaticBucket(pruned.transformer, k, debug_indices=True)(**unpadded)
            ignored = StaticBucket(pruned.transformer, k, debug_indices=True)(
                **{**padded, "encoder_attention_mask": torch.ones(cfg.batch, S)})
        assert all(torch.equal(a, b) for a, b in zip(got[1:], want[1:]))
        assert (got[0] - want[0]).abs().max() <= 1e-5
        # the mask matters: read as real tokens, the junk moves the selection and the output
        assert not all(torch.equal(a, b) for a, b in zip(got[1:], ignored[1:]))
        assert (got[0] - ignored[0]).abs().max() > 1e-3


def test_the_router_conditioning_is_computed_once_per_forward_and_only_for_shared_inputs(pixart, monkeypatch):
    """Every PixArt block reads the same caption and timestep embedding: the mask weights and the masked caption
    mean are computed in the first pruned block of each forward and reused by the others. An MMDiT family, whose
    blocks hand new context tokens on, computes its conditioning in every pruned block."""
    calls = []
    for model, batch in (("tiny-pixart", 2), ("tiny-sd3", 2)):
        pruned = pixart[0] if model == "tiny-pixart" else load_pruned_model(model, cfg_consistent=True)
        adapter = backbones.for_model(pruned.transformer)
        original = adapter.router_inputs
        monkeypatch.setattr(adapter, "router_inputs", lambda call, original=original: calls.append(1) or original(call))
        cfg = ExportConfig(height=128, width=128, batch=batch, context_tokens=S)
        feed = example_feed(pruned.config, cfg)
        k = [cfg.validate(pruned.config)] + [16] * (pruned.state.num_layers - 1)
        calls.clear()
        with torch.no_grad():
            for _ in range(2):   # each forward starts afresh
                StaticBucket(pruned.transformer, k)(**feed)
        expected = 1 if model == "tiny-pixart" else len(pruned.state.pruned_layers)
        assert len(calls) == 2 * expected, (model, len(calls))
        monkeypatch.undo()


def test_flop_model_matches_torch_flop_counter_exactly(pixart):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    pruned, cfg = pixart
    feed = example_feed(pruned.config, cfg)
    for k in ((N,) * L, (N, 16, 24, 40)):
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            StaticBucket(pruned.transformer, k)(**feed)
        assert counter.get_total_flops() == model_flops(pruned.config, k, S, 2, num_tokens=N)


def test_pixart_sigma_shape_flop_bounds_are_stated():
    from shiva_export.models import read_preset

    config = {"_class_name": "PixArtTransformer2DModel", **read_preset("pixart-sigma-shape")["config"]}
    dense = model_flops(config, [4096] * 28, 300, 2, num_tokens=4096)
    bound = dense / model_flops(config, [4096] + [int(4096 * 0.5)] * 27, 300, 2, num_tokens=4096)
    assert 1.7 < bound < 2.3, bound   # self-attention is quadratic in k: halving k more than halves a block


def test_freeze_steps_through_the_timesteps_pixart_sigma_pipeline_uses():
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import retrieve_timesteps

    from shiva_export.models import preset_facts, read_preset
    from shiva_export.passes.freeze import scheduler_timesteps

    facts = preset_facts("pixart-sigma-shape", read_preset("pixart-sigma-shape"))
    assert facts.scheduler["_class_name"] == "DPMSolverMultistepScheduler" and facts.shift == 1.0
    for steps in (20, 6):
        ours = scheduler_timesteps(steps, facts.shift, facts.scheduler, image_seq_len=4096)
        sampler = DPMSolverMultistepScheduler.from_config(
            {key: value for key, value in facts.scheduler.items() if key != "shift"})
        theirs, _ = retrieve_timesteps(sampler, steps, "cpu")
        assert torch.equal(ours.double(), theirs.double()), steps


def test_bad_pixart_inputs_are_one_line_config_errors(tmp_path):
    from shiva_export import pipeline
    from shiva_export.models import scheduler_config

    adapter = backbones.by_class("PixArtTransformer2DModel")
    base = {"_class_name": "PixArtTransformer2DModel", "caption_channels": 32, "num_attention_heads": 2,
            "attention_head_dim": 16, "cross_attention_dim": 32, "sample_size": 16}
    for change, field in (({"use_additional_conditions": True}, "use_additional_conditions"),
                          ({"cross_attention_dim": 24}, "cross_attention_dim"),
                          ({"caption_channels": None}, "caption_channels"),
                          ({"out_channels": 5}, "out_channels")):
        with pytest.raises(ConfigError, match=f"field {field}") as err:
            adapter.validate_config({**base, **change}, "config.json")
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="field algorithm_type"):
        scheduler_config({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "s",
                         adapter.scheduler_classes)
    with pytest.raises(ConfigError, match="scheduler class 'FlowMatchEulerDiscreteScheduler' is not supported"):
        scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "s", adapter.scheduler_classes)
    with pytest.raises(ConfigError, match="--shift 3: the DPMSolverMultistepScheduler .* has no timestep shift"):
        pipeline.start(tmp_path / "art", pipeline.ArtifactConfig(model="tiny-pixart", shift=3.0))


@pytest.fixture(scope="module")
def pixart_artifact(tmp_path_factory):
    """tiny-pixart, 128 px, CFG batch 2, fp32, 6 DPM-Solver steps in 2 buckets: exported, linted."""
    return make_artifact(tmp_path_factory.mktemp("pixart") / "tiny-pixart", "tiny-pixart")


def test_export_is_static_and_ort_matches_pytorch_with_identical_indices_under_padding(pixart_artifact):
    import onnx
    import onnxruntime as ort

    from shiva_export.pipeline import Workspace

    ws = Workspace(pixart_artifact, write=False)
    schedule = ws.schedule()
    assert len(schedule.buckets) == 2 and schedule.freeze_config.scheduler["_class_name"] == \
        "DPMSolverMultistepScheduler"
    cfg = ExportConfig(**ws.manifest.require(ExportRecord).config.to_json())
    pruned = ws.pruned
    for bucket in schedule.buckets:
        path = pixart_artifact / "onnx" / f"b{bucket.index}.debug.onnx"
        model = onnx.load(str(path), load_external_data=False)
        assert [i.name for i in model.graph.input] == list(cfg.input_shapes(pruned.config))
        dims = [d for value in [*model.graph.input, *model.graph.output] for d in value.type.tensor_type.shape.dim]
        assert all(d.HasField("dim_value") for d in dims)   # 0 unknown dims
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        padded, unpadded = padded_feed(pruned, cfg, real=5, seed=bucket.index)
        outputs = session.run(None, {name: value.numpy() for name, value in padded.items()})
        with torch.no_grad():
            reference = StaticBucket(pruned.transformer, bucket.k, debug_indices=True)(**padded)
            shorter = StaticBucket(pruned.transformer, bucket.k, debug_indices=True)(**unpadded)
        assert np.abs(outputs[0] - reference[0].numpy()).max() <= 1e-4
        assert np.abs(outputs[0] - shorter[0].numpy()).max() <= 1e-4   # the engine's padding == a shorter caption
        for got, want, short in zip(outputs[1:], reference[1:], shorter[1:]):
            assert np.array_equal(got, want.numpy()) and np.array_equal(got, short.numpy())


def test_check_defaults_to_the_pipelines_guidance_scale(pixart_artifact, tmp_path, capsys):
    from shiva_export.cli import EXIT_OK, main

    out = shutil.copytree(pixart_artifact, tmp_path / "art")
    assert main(["check", "--out", str(out), "--no-trajectory"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[0].endswith("seed 0, CFG scale 4.5")   # PixArtSigmaPipeline's default
    assert json.loads((out / "check.json").read_text())["guidance"] == {"kind": "cfg", "scale": 4.5}


def test_build_checks_benches_reports_and_builds_trt_rtx_plans(pixart_artifact, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    from shiva_export import pipeline

    out = shutil.copytree(pixart_artifact, tmp_path / "art")
    ws = pipeline.Workspace(out)
    result = pipeline.build(ws, backends=["ort", "trt-rtx"], runs=1, progress=False, device="cpu")
    assert result.passed and set(result.reused) >= {"freeze", "export"}
    check = json.loads((out / "check.json").read_text())
    assert len(check["buckets"]) == 2 and all(b["passed"] for b in check["buckets"])
    assert all(value == 1.0 for b in check["buckets"] for value in b["agreement"].values())
    assert sorted(p.name for p in (out / "onnx" / "engines" / "trt-rtx").glob("*.plan")) == ["b0.plan", "b1.plan"]
    report = (out / "report" / "report.md").read_text()
    assert "DPMSolverMultistepScheduler" in report and (out / "bench.json").is_file()


def test_pixart_sigma_pipeline_with_the_engines_gives_the_pytorch_pruned_image(tmp_path):
    from shiva_export import pipeline
    from shiva_export.errors import InputError
    from shiva_export.models import load_pipeline
    from shiva_export.runtime import ShivaEngineTransformer, load_pruned_reference
    from tests.pipelines import save_pixart_pipeline

    folder = save_pixart_pipeline(tmp_path / "pixart-pipe", num_layers=3)
    out = tmp_path / "art"
    ws = pipeline.start(out, pipeline.ArtifactConfig(model=str(folder), height=16, width=16, context_tokens=12,
                                                     steps=6, align=4))
    pipeline.run_freeze(ws)
    pipeline.run_export(ws)
    del ws
    pipe = load_pipeline(folder)
    call = dict(prompt="a red cube", height=16, width=16, num_inference_steps=6, max_sequence_length=12,
                output_type="np", use_resolution_binning=False, clean_caption=False)
    with ShivaEngineTransformer.from_artifacts(out) as engines:
        pipe.transformer = engines
        with_engines = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        with pytest.raises(InputError, match="call the pipeline with height=16, width=16"):
            pipe(**{**call, "height": 32, "width": 32})
    pipe.transformer = load_pruned_reference(out)
    with_pytorch = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert with_engines.shape == (1, 16, 16, 3) and np.abs(with_engines - with_pytorch).max() <= 1e-4

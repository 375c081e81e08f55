"""FLUX.1 through every stage, on the tiny-flux preset and a FluxPipeline folder built from diffusers' own tiny test
configurations (no downloads): pruning in both block kinds with the RoPE rows gathered, the FLOP model, freeze's
timesteps against FluxPipeline's, export + ORT parity with identical indices, TensorRT-RTX builds, and the runtime as
FluxPipeline's transformer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from shiva_export import backbones
from shiva_export.export import DenseModel, ExportConfig, StaticBucket, example_feed
from shiva_export.flops import block_flops_breakdown, model_flops
from shiva_export.patching import static_k
from shiva_export.pruned import load_pruned_model
from shiva_export.records import ExportRecord
from tests.conftest import make_artifact

N = 256   # tiny-flux at its default 256 x 256 px: (256 / 16)^2 packed tokens


@pytest.fixture(scope="module")
def flux():
    pruned = load_pruned_model("tiny-flux")
    cfg = ExportConfig(height=256, width=256, batch=1, context_tokens=24)
    return pruned, cfg, cfg.constants(pruned.config)


def test_the_adapter_names_both_block_kinds_and_the_graph_inputs(flux):
    pruned, cfg, constants = flux
    adapter = backbones.for_model(pruned.transformer)
    assert adapter.family == "flux" and adapter.pipeline_class == "FluxPipeline"
    kinds = [type(b).__name__ for b in adapter.blocks(pruned.transformer)]
    assert kinds == ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 4
    assert pruned.state.num_layers == 6 and pruned.state.pruned_layers == [1, 2, 3, 4, 5]
    assert len(pruned.routers.routers) == 3   # one router per adjacent pair of the 6 blocks in order
    assert cfg.input_shapes(pruned.config) == {"hidden_states": (1, N, 16), "encoder_hidden_states": (1, 24, 64),
                                               "pooled_projections": (1, 64), "timestep": (1,), "guidance": (1,)}
    ids = constants["img_ids"]
    assert ids.shape == (N, 3) and ids[17].tolist() == [0.0, 1.0, 1.0] and constants["txt_ids"].abs().sum() == 0


def test_keep_one_equals_the_unpatched_model(flux):
    pruned, cfg, constants = flux
    feed = example_feed(pruned.config, cfg, seed=1)
    with torch.no_grad():
        dense = DenseModel(pruned.transformer, constants)(**feed)
        kept_all = StaticBucket(pruned.transformer, [N] * 6, constants=constants)(**feed)
        routed_all = StaticBucket(pruned.transformer, [N] * 6, constants=constants, select_full_layers=True)(**feed)
    assert (kept_all - dense).abs().max() <= 1e-6 and (routed_all - dense).abs().max() <= 1e-6


def test_an_attention_backend_set_on_the_transformer_reaches_the_pruned_blocks():
    """diffusers' `set_attention_backend` sets a processor attribute; the pruned blocks' processor passes it on."""
    pruned = load_pruned_model("tiny-flux")
    pruned.transformer.set_attention_backend("_native_math")
    blocks = backbones.for_model(pruned.transformer).blocks(pruned.transformer)
    assert [str(b.attn.processor._attention_backend.value) for b in blocks] == ["_native_math"] * 6
    assert all(b.attn.processor.inner._attention_backend.value == "_native_math" for b in blocks[1:])


def test_exactly_k_image_tokens_run_in_both_block_kinds(flux):
    """What each block's attention is called with: k image tokens (double-stream: the image stream alone; single-
    stream: 24 text + k image tokens), with RoPE rows for the 24 text + k image tokens."""
    pruned, cfg, constants = flux
    k = (N, 64, 96, 128, 160, 192)
    seen = []

    def record(attn, args, kwargs):
        seen.append((kwargs["hidden_states"].shape[1], kwargs["image_rotary_emb"][0].shape[-2]))

    blocks = backbones.for_model(pruned.transformer).blocks(pruned.transformer)
    handles = [b.attn.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad(), static_k(pruned.transformer, k, record=True) as state:
            pruned.transformer(**example_feed(pruned.config, cfg), **constants, return_dict=False)
            processed = [state.processed_tokens[layer] for layer in range(1, 6)]
    finally:
        for handle in handles:
            handle.remove()
    assert processed == list(k[1:])
    assert seen == [(N, 24 + N), (64, 24 + 64), (24 + 96, 24 + 96), (24 + 128, 24 + 128), (24 + 160, 24 + 160),
                    (24 + 192, 24 + 192)]


def test_gathered_rope_rows_are_the_full_table_at_the_kept_positions(flux):
    pruned, cfg, constants = flux
    adapter = backbones.for_model(pruned.transformer)
    ids = torch.cat([constants["txt_ids"], constants["img_ids"]])
    cos, sin = pruned.transformer.pos_embed(ids)
    text = 24
    indices = torch.stack([torch.randperm(N)[:40].sort().values, torch.randperm(N)[:40].sort().values])
    hidden = torch.zeros(2, 40, 8)
    call = {"hidden_states": hidden, "encoder_hidden_states": torch.zeros(2, text, 8), "image_rotary_emb": (cos, sin)}
    adapter.prepare_block_call(None, call, indices, shared_rows=False)
    got_cos, got_sin = call["image_rotary_emb"]
    assert got_cos.shape == (2, text + 40, cos.shape[-1])
    for sample in range(2):
        assert torch.equal(got_cos[sample, :text], cos[:text]) and torch.equal(got_sin[sample, :text], sin[:text])
        assert torch.equal(got_cos[sample, text:], cos[text + indices[sample]])
        assert torch.equal(got_sin[sample, text:], sin[text + indices[sample]])
    call = {"encoder_hidden_states": torch.zeros(1, text, 8), "image_rotary_emb": (cos, sin)}
    adapter.prepare_block_call(None, call, indices[:1], shared_rows=True)
    assert torch.equal(call["image_rotary_emb"][0], torch.cat([cos[:text], cos[text + indices[0]]]))


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_projections_compute_what_the_separate_ones_do(batch):
    """fuse_projections: one GEMM for each single-stream block's q/k/v and MLP input and for each double-stream
    attention's q/k/v of either stream, dense and pruned alike; the same outputs and kept tokens (batch 2: samples
    keep different tokens, so the pruned blocks apply a RoPE table per sample)."""
    from shiva_export.backbones.flux import FusedColumns, FusedInputProjection

    pruned = load_pruned_model("tiny-flux")
    cfg = ExportConfig(height=256, width=256, batch=batch, context_tokens=24)
    constants = cfg.constants(pruned.config)
    feed = example_feed(pruned.config, cfg, seed=5)
    k = (N, 96, 96, 128, 128, 160)
    params = sum(p.numel() for p in pruned.transformer.parameters())

    def run():
        with torch.no_grad():
            return (DenseModel(pruned.transformer, constants)(**feed),
                    StaticBucket(pruned.transformer, k, debug_indices=True, constants=constants)(**feed))

    before = run()
    adapter = backbones.for_model(pruned.transformer)
    assert adapter.fuse_projections(pruned.transformer) == 6
    single, double = list(pruned.transformer.single_transformer_blocks), list(pruned.transformer.transformer_blocks)
    fused = ([b.fused_input for b in single] + [b.attn.fused_input for b in double]
             + [b.attn.fused_context for b in double])
    assert all(isinstance(f, FusedInputProjection) for f in fused)
    assert [f.widths for f in fused] == [[128, 128, 128, 512]] * 4 + [[128, 128, 128]] * 4
    assert all(isinstance(getattr(b.attn, name), FusedColumns) for b in single + double
               for name in ("to_q", "to_k", "to_v"))
    assert all(isinstance(b.proj_mlp, FusedColumns) for b in single)
    assert sum(p.numel() for p in pruned.transformer.parameters()) == params   # one copy of the weights
    calls = []
    handles = [f.register_forward_hook(lambda m, a, out: calls.append(len(out))) for f in fused]
    after = run()
    for handle in handles:
        handle.remove()
    # one fused GEMM per fused layout and forward (dense, then the bucket), whatever the batch; q/k/v took their
    # columns of it, which released it
    assert len(calls) == 2 * len(fused)
    assert all(f.cache is None for f in fused)
    assert (after[0] - before[0]).abs().max() <= 1e-5
    assert (after[1][0] - before[1][0]).abs().max() <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(after[1][1:], before[1][1:]))
    assert adapter.fuse_projections(pruned.transformer) == 6 and single[0].fused_input is fused[0]


def test_fused_projections_refuse_layers_with_adapters_and_leave_the_model_as_it_was():
    """A projection wrapped by an adapter (DoRA during training) is not a plain Linear: fusing its base weight would
    drop the adapter, so it is refused, before any block changes (here the last double-stream block's text k)."""
    from shiva_export.backbones.flux import FusedColumns
    from shiva_export.errors import ConfigError

    pruned = load_pruned_model("tiny-flux")
    attn = pruned.transformer.transformer_blocks[1].attn
    attn.add_k_proj = torch.nn.Sequential(attn.add_k_proj)
    before = dict(pruned.transformer.named_modules())
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"transformer_blocks\.1: add_k_proj is a Sequential, expected a plain "
                                              r"Linear"):
            backbones.for_model(pruned.transformer).fuse_projections(pruned.transformer)
    assert dict(pruned.transformer.named_modules()) == before
    assert not any(isinstance(m, FusedColumns) for m in pruned.transformer.modules())


def test_only_flux_has_a_fused_projection_layout():
    from shiva_export.errors import ConfigError

    pruned = load_pruned_model("tiny-sd35")
    with pytest.raises(ConfigError, match="no fused projection layout"):
        backbones.for_model(pruned.transformer).fuse_projections(pruned.transformer)


PER_SAMPLE_K = (N, 96, 96, 128, 128, 160)   # the batch-2 checks' kept tokens per block (block 0 dense)


def per_sample_feed(pruned) -> dict[str, torch.Tensor]:
    """A batch of 2 whose samples keep different tokens in every pruned block."""
    return example_feed(pruned.config, ExportConfig(height=256, width=256, batch=2, context_tokens=24), seed=3)


def assert_each_sample_computes_what_it_does_alone(both, alone, atol: float) -> None:
    assert not torch.equal(both[1][0], both[1][1])   # the samples do keep different tokens
    for i in range(2):
        assert (both[0][i:i + 1] - alone[i][0]).abs().max() <= atol
        assert all(torch.equal(b[i:i + 1], a) for b, a in zip(both[1:], alone[i][1:]))


def test_samples_that_keep_different_tokens_compute_what_each_sample_alone_does(flux):
    pruned, _, constants = flux
    feed = per_sample_feed(pruned)
    model = StaticBucket(pruned.transformer, PER_SAMPLE_K, debug_indices=True, constants=constants)
    with torch.no_grad():
        both = model(**feed)
        alone = [model(**{name: value[i:i + 1] for name, value in feed.items()}) for i in range(2)]
    assert_each_sample_computes_what_it_does_alone(both, alone, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the fused kernels run on CUDA tensors)")
def test_on_cuda_the_fused_kernels_keep_per_sample_tokens_and_rope_rows_as_the_cpu_torch_path_does(flux):
    """Batch 2 whose samples keep different tokens, on CUDA through the fused Triton selection/router/scatter
    kernels: each sample computes what it does alone, and the kept indices of every block are the CPU torch path's."""
    from shiva_export import kernels

    pruned, _, constants = flux
    feed = per_sample_feed(pruned)
    with torch.no_grad(), kernels.enabled(False):
        reference = StaticBucket(pruned.transformer, PER_SAMPLE_K, debug_indices=True, constants=constants)(**feed)
    pruned.transformer.to("cuda")   # the module fixture's model (backbone and routers): moved back below
    pruned.routers.to("cuda")
    try:
        on_gpu = {name: value.cuda() for name, value in feed.items()}
        gpu_constants = {name: value.cuda() for name, value in constants.items()}
        model = StaticBucket(pruned.transformer, PER_SAMPLE_K, debug_indices=True, constants=gpu_constants)
        with torch.no_grad(), kernels.enabled(True):
            assert kernels.usable(on_gpu["hidden_states"])
            both = model(**on_gpu)
            alone = [model(**{name: value[i:i + 1] for name, value in on_gpu.items()}) for i in range(2)]
    finally:
        pruned.transformer.to("cpu")
        pruned.routers.to("cpu")
    assert_each_sample_computes_what_it_does_alone(both, alone, atol=1e-4)
    assert all(torch.equal(g.cpu(), c) for g, c in zip(both[1:], reference[1:]))
    assert (both[0].cpu() - reference[0]).abs().max() <= 1e-3


def test_samples_that_keep_different_tokens_export_with_one_attention_per_block_and_match_in_ort(flux, tmp_path):
    """The per-sample RoPE tables are applied in one batch: the static graph has one Attention per block (no loop
    over the samples), and ORT keeps the same tokens as PyTorch in every layer."""
    import onnx_ir as ir
    import onnxruntime as ort

    from shiva_export.export import export_bucket
    from shiva_export.passes.manager import tensorrt_safety

    pruned, _, constants = flux
    cfg = ExportConfig(height=256, width=256, batch=2, context_tokens=24, debug_indices=True)
    k = PER_SAMPLE_K
    graph = export_bucket(pruned.transformer, k, cfg, tensorrt_safety(cfg.dtype))
    assert sum(node.op_type == "Attention" for node in graph.graph) == len(k)
    ir.save(graph, tmp_path / "b.onnx")
    feed = example_feed(pruned.config, cfg, seed=1)
    got = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {name: value.numpy() for name, value in feed.items()})
    with torch.no_grad():
        want = StaticBucket(pruned.transformer, k, debug_indices=True, constants=constants)(**feed)
    assert all(not torch.equal(indices[0], indices[1]) for indices in want[1:])   # every layer differs per sample
    assert np.abs(got[0] - want[0].numpy()).max() <= 1e-4
    assert all(np.array_equal(g, w.numpy()) for g, w in zip(got[1:], want[1:]))


def test_flop_model_matches_torch_flop_counter_exactly(flux):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    pruned, cfg, constants = flux
    feed = example_feed(pruned.config, cfg)
    for k in ((N,) * 6, (N, 64, 96, 128, 160, 192)):
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            StaticBucket(pruned.transformer, k, constants=constants)(**feed)
        assert counter.get_total_flops() == model_flops(pruned.config, k, 24, 1, num_tokens=N)
    single = block_flops_breakdown(pruned.config, 3, 64, 24, num_tokens=N)
    assert single["qkv"] == 2 * (24 + 64) * 128 * 384 and single["router"] > 0   # text + kept tokens, in full


def test_flux_dev_shape_flop_bounds_are_stated():
    from shiva_export.models import read_preset

    config = {"_class_name": "FluxTransformer2DModel", **read_preset("flux-dev-shape")["config"]}
    dense = model_flops(config, [4096] * 57, 512, 1, num_tokens=4096)
    bounds = {keep: dense / model_flops(config, [4096] + [int(4096 * keep)] * 56, 512, 1, num_tokens=4096)
              for keep in (0.6, 0.4)}
    assert 1.5 < bounds[0.6] < 1.7 and 2.0 < bounds[0.4] < 2.5, bounds   # the issue's ~1.65x and ~2.4x


def test_freeze_steps_through_the_timesteps_flux_pipeline_uses():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from shiva_export.models import preset_facts, read_preset
    from shiva_export.passes.freeze import scheduler_timesteps

    facts = preset_facts("flux-dev-shape", read_preset("flux-dev-shape"))
    for tokens, steps in ((4096, 28), (1024, 20), (256, 4)):
        ours = scheduler_timesteps(steps, facts.shift, facts.scheduler, image_seq_len=tokens)
        config = {k: v for k, v in facts.scheduler.items() if k != "_sigmas"}
        sampler = FlowMatchEulerDiscreteScheduler.from_config(config)
        mu = calculate_shift(tokens, config["base_image_seq_len"], config["max_image_seq_len"],
                             config["base_shift"], config["max_shift"])
        theirs, _ = retrieve_timesteps(sampler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        assert torch.allclose(ours, theirs, atol=1e-4), (tokens, steps)
    assert FluxPipeline  # the class the runtime drops into


@pytest.fixture(scope="module")
def flux_artifact(tmp_path_factory):
    """tiny-flux, 256 px, batch 1, fp32, 6 steps in 2 buckets: exported, linted."""
    return make_artifact(tmp_path_factory.mktemp("flux") / "tiny-flux", "tiny-flux")


def test_export_is_static_and_ort_matches_pytorch_with_identical_indices(flux_artifact):
    import onnx
    import onnxruntime as ort

    from shiva_export.pipeline import Workspace

    ws = Workspace(flux_artifact, write=False)
    record = ws.manifest.require(ExportRecord)
    schedule = ws.schedule()
    assert len(schedule.buckets) == 2
    cfg = ExportConfig(**record.config.to_json())
    pruned = ws.pruned
    constants = cfg.constants(pruned.config)
    for bucket in schedule.buckets:
        path = flux_artifact / "onnx" / f"b{bucket.index}.debug.onnx"
        model = onnx.load(str(path), load_external_data=False)
        assert [i.name for i in model.graph.input] == list(cfg.input_shapes(pruned.config))
        dims = [d for value in [*model.graph.input, *model.graph.output]
                for d in value.type.tensor_type.shape.dim]
        assert all(d.HasField("dim_value") for d in dims)   # 0 unknown dims
        assert not any(node.op_type in ("Cos", "Sin") and "double" in str(node) for node in model.graph.node)
        feed = example_feed(pruned.config, cfg, seed=bucket.index)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {name: value.numpy() for name, value in feed.items()})
        with torch.no_grad():
            reference = StaticBucket(pruned.transformer, bucket.k, debug_indices=True, constants=constants)(**feed)
        assert np.abs(outputs[0] - reference[0].numpy()).max() <= 1e-4
        for got, want in zip(outputs[1:], reference[1:]):
            assert np.array_equal(got, want.numpy())


def test_check_runs_and_reports_the_distilled_guidance_input_not_a_cfg_scale(flux_artifact, tmp_path, capsys):
    import shutil

    from shiva_export.cli import EXIT_OK, main

    out = shutil.copytree(flux_artifact, tmp_path / "art")
    for given, scale in ((None, 3.5), (2.0, 2.0)):   # FluxPipeline's default guidance_scale, then --guidance-scale
        args = [] if given is None else ["--guidance-scale", f"{given:g}"]
        assert main(["check", "--out", str(out), "--no-trajectory", "--force", *args]) == EXIT_OK
        header = capsys.readouterr().out.splitlines()[0]
        assert header.endswith(f"guidance {scale:g} (the model's guidance input, no CFG)") and "CFG scale" not in header
        check = json.loads((out / "check.json").read_text())
        assert check["guidance"] == {"kind": "embedded", "scale": scale}
        from polygraphy.json import load_json

        feeds = load_json(str(out / "check" / "bucket0" / "inputs.json"))
        assert all(np.all(feed["guidance"] == np.float32(scale)) for feed in feeds)   # what the trajectory fed


def test_check_passes_with_full_agreement_and_trt_rtx_builds_every_bucket(flux_artifact, tmp_path):
    import shutil

    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    out = tmp_path / "art"
    shutil.copytree(flux_artifact, out)
    for verb in (["engine", "--backend", "trt-rtx"], ["check"]):
        run = subprocess.run([sys.executable, "-m", "shiva_export", *verb, "--out", str(out)], capture_output=True,
                             text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
    check = json.loads((out / "check.json").read_text())
    ort_buckets = check["buckets"]   # the check verb's default: ONNX Runtime on this CPU
    assert len(ort_buckets) == 2 and all(b["passed"] for b in ort_buckets)
    assert all(value == 1.0 for b in ort_buckets for value in b["agreement"].values())
    assert sorted(p.name for p in (out / "onnx" / "engines" / "trt-rtx").glob("*.plan")) == ["b0.plan", "b1.plan"]


def test_flux_pipeline_with_the_engines_gives_the_pytorch_pruned_image(tmp_path):
    from shiva_export.models import load_pipeline
    from shiva_export.runtime import ShivaEngineTransformer, load_pruned_reference
    from tests.pipelines import save_flux_pipeline

    folder = save_flux_pipeline(tmp_path / "flux-pipe", num_layers=2, num_single_layers=2)
    out = tmp_path / "art"
    run = subprocess.run([sys.executable, "-m", "shiva_export", "export", "--model", str(folder), "--out", str(out),
                          "--height", "32", "--width", "32", "--context-tokens", "16", "--steps", "6"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    pipe = load_pipeline(folder)
    call = dict(prompt="a red cube", height=32, width=32, num_inference_steps=6, max_sequence_length=16,
                output_type="np", guidance_scale=3.5)
    with ShivaEngineTransformer.from_artifacts(out) as engines:
        pipe.transformer = engines
        with_engines = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        with pytest.raises(Exception, match="call the pipeline with height=32, width=32"):
            pipe(**{**call, "height": 48, "width": 48})
    pipe.transformer = load_pruned_reference(out)
    with_pytorch = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert with_engines.shape == (1, 32, 32, 3) and np.abs(with_engines - with_pytorch).max() <= 1e-4

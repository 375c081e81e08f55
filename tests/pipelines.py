"""StableDiffusion3Pipeline, FluxPipeline and PixArtSigmaPipeline folders assembled from diffusers' own tiny test configurations, with no
downloads.

`sd3_components` follows `StableDiffusion3PipelineFastTests.get_dummy_components` (diffusers
tests/pipelines/stable_diffusion_3): the same transformer, CLIP text encoders, T5 size and VAE (one level:
vae_scale_factor 1, 4 latent channels, shift 0.0609 / scale 1.5035) and the scheduler's own defaults (shift 1.0).
Two things differ, both because nothing may be downloaded: the tokenizers are built here (a byte-level CLIP BPE
vocabulary and a character-level T5 unigram vocabulary, in the same transformers classes), and the T5 encoder is
built from the size of hf-internal-testing/tiny-random-t5 instead of loaded. Options give what the tests vary: more
blocks (diffusers' one block has nothing to prune), SD3.5-style blocks, another VAE depth or scheduler shift.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_MAX_LENGTH = 77


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: the 256 bytes as printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in keep:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {token: index for index, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(32, 127)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def sd3_components(num_layers: int = 2, sd35: bool = False, vae_levels: int = 1,
                   shift: float | None = None, seed: int = 0, **scheduler_options) -> dict:
    """The pipeline's components, at diffusers' tiny test sizes."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    extra = {"dual_attention_layers": tuple(range(num_layers // 2)), "qk_norm": "rms_norm"} if sd35 else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=num_layers,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=32, pooled_projection_dim=64, out_channels=4, **extra)
        clip = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                              layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, pad_token_id=1,
                              vocab_size=1000, hidden_act="gelu", projection_dim=32)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(clip)
        torch.manual_seed(seed)
        text_encoder_2 = CLIPTextModelWithProjection(clip)
        torch.manual_seed(seed)
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=1103, d_model=32, d_ff=37, d_kv=8, num_layers=5,
                                                 num_heads=4, relative_attention_num_buckets=8,
                                                 decoder_start_token_id=0, eos_token_id=1, pad_token_id=0))
        torch.manual_seed(seed)
        vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,) * vae_levels,
                            down_block_types=("DownEncoderBlock2D",) * vae_levels,
                            up_block_types=("UpDecoderBlock2D",) * vae_levels, layers_per_block=1,
                            latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(**({} if shift is None else {"shift": shift}), **scheduler_options)
    tokenizer = _clip_tokenizer()
    return {"scheduler": scheduler, "text_encoder": text_encoder.eval(), "text_encoder_2": text_encoder_2.eval(),
            "text_encoder_3": text_encoder_3.eval(), "tokenizer": tokenizer, "tokenizer_2": tokenizer,
            "tokenizer_3": _t5_tokenizer(), "transformer": transformer.eval(), "vae": vae.eval()}


def save_sd3_pipeline(folder: Path, **options) -> Path:
    """A StableDiffusion3Pipeline folder (save_pretrained, safetensors) from `sd3_components(**options)`."""
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder)
    pipe = StableDiffusion3Pipeline(**sd3_components(**options))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def flux_components(num_layers: int = 1, num_single_layers: int = 2, dynamic_shifting: bool = True,
                    seed: int = 0) -> dict:
    """FluxPipeline's components at the sizes of diffusers' `FluxPipelineFastTests.get_dummy_components`
    (tests/pipelines/flux): 2-head transformer with 3-axis RoPE (4, 4, 8), CLIP text encoder, tiny T5, one-level VAE
    (vae_scale_factor 1, 1 latent channel packed to 4). Options: more blocks (one double and one single block
    leave little to prune), and the dynamically shifted scheduler FLUX.1 ships (diffusers' test uses the default)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=num_layers,
                                             num_single_layers=num_single_layers, attention_head_dim=16,
                                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                             axes_dims_rope=[4, 4, 8])
        clip = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                              layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, pad_token_id=1,
                              vocab_size=1000, hidden_act="gelu", projection_dim=32)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip)
        torch.manual_seed(seed)
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=1103, d_model=32, d_ff=37, d_kv=8, num_layers=5,
                                                 num_heads=4, relative_attention_num_buckets=8,
                                                 decoder_start_token_id=0, eos_token_id=1, pad_token_id=0))
        torch.manual_seed(seed)
        vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                            layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    shifting = ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                 "max_image_seq_len": 4096, "shift": 3.0} if dynamic_shifting else {})
    return {"scheduler": FlowMatchEulerDiscreteScheduler(**shifting), "text_encoder": text_encoder.eval(),
            "text_encoder_2": text_encoder_2.eval(), "tokenizer": _clip_tokenizer(), "tokenizer_2": _t5_tokenizer(),
            "transformer": transformer.eval(), "vae": vae.eval()}


def save_flux_pipeline(folder: Path, **options) -> Path:
    """A FluxPipeline folder (save_pretrained, safetensors) from `flux_components(**options)`."""
    from diffusers import FluxPipeline

    folder = Path(folder)
    FluxPipeline(**flux_components(**options)).save_pretrained(folder, safe_serialization=True)
    return folder


def pixart_components(num_layers: int = 3, sample_size: int = 16, seed: int = 0) -> dict:
    """PixArtSigmaPipeline's components at the sizes of diffusers' `PixArtSigmaPipelineFastTests.get_dummy_components`
    (tests/pipelines/pixart_sigma): 3-head adaLN-single transformer with learned sigma (8 output channels), the T5
    size of hf-internal-testing/tiny-random-t5 (built, not loaded), a one-level VAE (vae_scale_factor 1, 4 latent
    channels). Options: more blocks (diffusers' two leave one to prune) and a larger latent (8 x 8 px gives 16
    tokens); the scheduler is the multistep DPM-Solver++ PixArt-Sigma ships (diffusers' test uses DDIM)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = PixArtTransformer2DModel(
            sample_size=sample_size, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(T5Config(vocab_size=1103, d_model=32, d_ff=37, d_kv=8, num_layers=5,
                                               num_heads=4, relative_attention_num_buckets=8,
                                               decoder_start_token_id=0, eos_token_id=1, pad_token_id=0))
        torch.manual_seed(seed)
        vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                            layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                            use_post_quant_conv=False, scaling_factor=0.13025)
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                            timestep_spacing="linspace")
    return {"scheduler": scheduler, "text_encoder": text_encoder.eval(), "tokenizer": _t5_tokenizer(),
            "transformer": transformer.eval(), "vae": vae.eval()}


def save_pixart_pipeline(folder: Path, **options) -> Path:
    """A PixArtSigmaPipeline folder (save_pretrained, safetensors) from `pixart_components(**options)`."""
    from diffusers import PixArtSigmaPipeline

    folder = Path(folder)
    PixArtSigmaPipeline(**pixart_components(**options)).save_pretrained(folder, safe_serialization=True)
    return folder

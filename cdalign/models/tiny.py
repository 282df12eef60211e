"""Seeded, randomly initialised tiny pipelines built from configs, fully offline:

- ``cdalign/tiny-random-sd``: SD 1.x architecture (UNet2DConditionModel, AutoencoderKL,
  CLIPTextModel, CLIPTokenizer, DDIMScheduler);
- ``cdalign/tiny-random-sdxl``: SDXL base architecture (UNet2DConditionModel with the
  ``text_time`` added embedding and SDXL's 1/2-layer transformer blocks, CLIPTextModel +
  CLIPTextModelWithProjection whose states concatenate to the cross-attention width,
  AutoencoderKL with SDXL's scaling, EulerDiscreteScheduler with SDXL's config);
- ``cdalign/tiny-random-sd3``: SD3 architecture (SD3Transformer2DModel, AutoencoderKL with
  SD3's scaling and shift, two CLIPTextModelWithProjection, FlowMatchEulerDiscreteScheduler
  with shift 3.0; no T5: ``text_encoder_3=None`` as diffusers allows);
- ``cdalign/tiny-random-flux``: FLUX.1-dev architecture (FluxTransformer2DModel with the
  guidance embedding, AutoencoderKL with FLUX's scaling and shift, CLIPTextModel, a tiny
  T5EncoderModel with a character-level T5 tokenizer built in memory,
  FlowMatchEulerDiscreteScheduler with FLUX's dynamic shifting).

- ``cdalign/tiny-random-z-image``: Z-Image architecture (ZImageTransformer2DModel, a tiny
  Qwen3Model text encoder with a byte-level Qwen2 tokenizer and a chat template built in memory,
  AutoencoderKL with FLUX's scaling and shift, FlowMatchEulerDiscreteScheduler with
  Z-Image-Turbo's fixed shift 3).

Each exercises its family's code paths in about a second."""

from __future__ import annotations

import torch

TINY_RANDOM_ID = "cdalign/tiny-random-sd"
TINY_RANDOM_SD3_ID = "cdalign/tiny-random-sd3"
TINY_RANDOM_FLUX_ID = "cdalign/tiny-random-flux"
TINY_RANDOM_SDXL_ID = "cdalign/tiny-random-sdxl"
TINY_RANDOM_ZIMAGE_ID = "cdalign/tiny-random-z-image"


def byte_level_clip_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (plus their end-of-word
    forms and the two specials): any text tokenizes, nothing maps to the unknown token,
    and no vocabulary file is needed."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def clip_text_encoder(tokenizer, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int = 4,
                      with_projection: bool = False):
    """A randomly initialised CLIP text encoder sized for ``tokenizer`` (its vocabulary and
    special-token ids), projection width = ``hidden_size``; ``with_projection``: a
    ``CLIPTextModelWithProjection`` (SD3's text encoders, pooled projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_attention_heads=num_heads,
            num_hidden_layers=num_layers,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=hidden_size,
        )
    )


def sd_ddim_scheduler():
    """DDIM with Stable Diffusion 1.x's noise schedule (scaled_linear 0.00085–0.012, 1000
    steps, ``set_alpha_to_one=False``, ``steps_offset=1``), epsilon prediction."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_tiny_pipeline(seed: int = 0, sample_size: int = 32):
    """Return a randomly initialised tiny ``StableDiffusionPipeline`` (deterministic for
    ``seed``). ``sample_size`` is the latent size; images are 2x larger (VAE [32, 64])."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = byte_level_clip_tokenizer()
    cpu_rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            sample_size=sample_size * 2,
        )
        text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37, num_layers=5)
    finally:
        torch.random.set_rng_state(cpu_rng_state)
    scheduler = sd_ddim_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD3_LATENT_SCALING = (1.5305, 0.0609)  # SD3's VAE scaling factor and shift
SDXL_LATENT_SCALING = (0.13025, None)  # SDXL's (no shift)
FLUX_LATENT_SCALING = (0.3611, 0.1159)  # FLUX.1's


def tiny_scaled_vae(seed: int, scaling: tuple[float, float], sample_size: int = 32):
    """A random 4-channel VAE [32, 64] (factor 2) with a latent ``(scaling_factor, shift_factor)``
    (:data:`SD3_LATENT_SCALING`, :data:`FLUX_LATENT_SCALING`); the global RNG is left as it was."""
    from diffusers import AutoencoderKL

    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=sample_size,
            scaling_factor=scaling[0], shift_factor=scaling[1],
        )
    finally:
        torch.random.set_rng_state(rng)


def build_tiny_sd3_pipeline(seed: int = 0, sample_size: int = 16):
    """A randomly initialised tiny ``StableDiffusion3Pipeline`` (deterministic for ``seed``):
    transformer 2 layers x 4 heads x 8 dims on ``sample_size``² latents (patch 2), images
    2x larger, two CLIP text encoders with projections (hidden 32), no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = byte_level_clip_tokenizer()
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
            pooled_projection_dim=64, pos_embed_max_size=sample_size,
        )
        text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37, num_layers=2, with_projection=True)
        text_encoder_2 = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37, num_layers=2,
                                           with_projection=True)
    finally:
        torch.random.set_rng_state(rng)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_scaled_vae(seed + 1, SD3_LATENT_SCALING, sample_size * 2), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=byte_level_clip_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_scheduler():
    """``EulerDiscreteScheduler`` with SDXL base's ``scheduler_config.json`` (SD's
    scaled-linear schedule, "leading" spacing, ``steps_offset=1``, epsilon prediction, and the
    keys it carries for DDIM: ``clip_sample=False``, ``set_alpha_to_one=False``); cdalign samples
    it as DDIM (:class:`~cdalign.core.chains.DDIMChain` reads the schedule from this config)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config({
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1, "interpolation_type": "linear",
        "use_karras_sigmas": False, "clip_sample": False, "set_alpha_to_one": False, "sample_max_value": 1.0,
        "skip_prk_steps": True, "trained_betas": None,
    })


def build_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 32):
    """A randomly initialised tiny ``StableDiffusionXLPipeline`` (deterministic for ``seed``):
    a UNet (32, 64) with SDXL's ``text_time`` added embedding (time ids 6 x 8 + the pooled 32)
    and 1 then 2 transformer layers per cross-attention block, linear projections; CLIP-L-like
    (hidden 32) and a CLIP with projection (hidden 32, the pooled one) whose states concatenate
    to the cross-attention width 64; a factor-2 VAE with SDXL's scaling 0.13025, so
    ``sample_size`` latents are 2x larger images (64 px by default, SDXL's 1024 at scale)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = byte_level_clip_tokenizer(), byte_level_clip_tokenizer()
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64, norm_num_groups=32,
        )
        text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37, num_layers=2)
        text_encoder_2 = clip_text_encoder(tokenizer_2, hidden_size=32, intermediate_size=37, num_layers=2,
                                           with_projection=True)
    finally:
        torch.random.set_rng_state(rng)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_scaled_vae(seed + 1, SDXL_LATENT_SCALING, sample_size * 2), text_encoder=text_encoder,
        text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def char_level_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (``T5TokenizerFast``) built in memory: a SentencePiece-style Unigram
    model over the printable ASCII characters and their word-initial ``▁`` forms, with T5's
    specials (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and ``</s>`` appended; no vocabulary file
    and no download. ``save_pretrained`` writes a ``tokenizer.json`` that
    ``FluxPipeline.from_pretrained`` loads back."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = sorted(set(string.printable) - set(string.whitespace))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -1.0) for c in chars] + [("▁" + c, -1.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Replace("\n", " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=model_max_length)


def flux_scheduler():
    """``FlowMatchEulerDiscreteScheduler`` with FLUX.1's config: resolution-dependent
    (exponential) time shift ``mu`` between 0.5 (256 image tokens) and 1.15 (4096)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A randomly initialised tiny ``FluxPipeline`` (deterministic for ``seed``): transformer
    1 double-stream + 1 single-stream block x 2 heads x 16 dims (patch 1 on the packed 2x2
    patches of 4 VAE channels: in_channels 16), RoPE axes (4, 6, 6); CLIP (hidden 32, pooled)
    and a 1-layer T5 (d_model 32); a factor-2 VAE, so a 32 px image is 16x16 latents = 64
    image tokens. ``guidance_embeds``: FLUX.1-dev (True) or FLUX.1-schnell (False)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = byte_level_clip_tokenizer(), char_level_t5_tokenizer()
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
        text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37, num_layers=2)
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id,
        )).eval()  # as from_pretrained returns it
    finally:
        torch.random.set_rng_state(rng)
    pipe = FluxPipeline(
        scheduler=flux_scheduler(), vae=tiny_scaled_vae(seed + 1, FLUX_LATENT_SCALING), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def byte_level_qwen_tokenizer(model_max_length: int = 512):
    """A Qwen2 tokenizer built in memory: byte-level BPE over the 256 byte symbols without
    merges, Qwen's specials (``<|endoftext|>`` pad, ``<|im_start|>``, ``<|im_end|>``) and a
    ChatML chat template (what ``ZImagePipeline`` applies to every prompt); no vocabulary file."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.model_max_length = model_max_length
    return tok


def build_tiny_zimage_pipeline(seed: int = 0):
    """A randomly initialised tiny ``ZImagePipeline`` (deterministic for ``seed``): transformer
    dim 32 x 2 heads, 1 noise- and 1 context-refiner layer and 2 main layers, patch 2 on 4 VAE
    channels, RoPE axes (4, 6, 6); a 2-layer Qwen3 encoder (hidden 32, the caption width); a
    factor-2 VAE with FLUX's scaling and shift; Z-Image-Turbo's scheduler (fixed shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = byte_level_qwen_tokenizer()
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[512, 64, 64],
        )
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        )).eval()  # as from_pretrained returns it
    finally:
        torch.random.set_rng_state(rng)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=tiny_scaled_vae(seed + 1, FLUX_LATENT_SCALING), text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

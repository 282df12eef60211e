"""Seeded, randomly initialised tiny pipelines built from configs, fully offline:

- ``cdalign/tiny-random-sd``: SD 1.x architecture (UNet2DConditionModel, AutoencoderKL,
  CLIPTextModel, CLIPTokenizer, DDIMScheduler);
- ``cdalign/tiny-random-sd3``: SD3 architecture (SD3Transformer2DModel, AutoencoderKL with
  SD3's scaling and shift, two CLIPTextModelWithProjection, FlowMatchEulerDiscreteScheduler
  with shift 3.0; no T5: ``text_encoder_3=None`` as diffusers allows).

Each exercises its family's code paths in about a second."""

from __future__ import annotations

import torch

TINY_RANDOM_ID = "cdalign/tiny-random-sd"
TINY_RANDOM_SD3_ID = "cdalign/tiny-random-sd3"


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


def tiny_sd3_vae(seed: int, sample_size: int = 32):
    """A random 4-channel VAE [32, 64] with SD3's latent scaling (1.5305) and shift (0.0609)."""
    from diffusers import AutoencoderKL

    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=sample_size,
            scaling_factor=1.5305, shift_factor=0.0609,
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
        vae=tiny_sd3_vae(seed + 1, sample_size * 2), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=byte_level_clip_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""Pretraining of ``cdalign/tiny-shapes-sd`` (architecture ``sd``), both stages on freshly
rendered shapes-world batches (:mod:`cdalign.data.shapes`), so the data never repeats and
nothing is downloaded:

1. VAE (64x64 RGB <-> 4x16x16): reconstruction MSE + L1 + a small KL weight; the latent
   scaling factor is then set to 1 / std of the latents, as SD does. What the numpy
   classifier reads back from its reconstructions is logged (the ceiling it sets).
2. UNet + CLIP text encoder, jointly, with the VAE frozen: epsilon prediction on SD 1.5's
   noise schedule, with offset noise (so the background comes from the prompt, not from the
   initial noise's mean) and Min-SNR-gamma weighting; captions from
   :func:`~cdalign.models.pretraining.training_captions`. An exponential moving average of
   the weights is saved."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from cdalign.data.shapes import classify_image, render_scenes, sample_scenes, scene_records
from cdalign.models.pretraining import PretrainConfig, Trained, ema_update, image_batch, lr_lambda, training_captions
from cdalign.models.tiny_pretrained import build_untrained_components


def train_vae(vae, config: PretrainConfig, accelerator, rng: np.random.Generator) -> list[float]:
    """Stage 1: fit the VAE; set its scaling factor. Returns the per-step losses."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.vae_steps))
    vae, optimizer = accelerator.prepare(vae, optimizer)
    vae.train()
    losses = []
    bar = tqdm(range(config.vae_steps), desc="VAE", disable=not accelerator.is_local_main_process)
    for _ in bar:
        images, _ = image_batch(rng, config.vae_batch_size)
        images = images.to(accelerator.device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, images)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + config.vae_l1_weight * F.l1_loss(reconstruction, images) + config.kl_weight * kl
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(mse=f"{mse.item():.5f}", kl=f"{kl.item():.2f}")
    vae = accelerator.unwrap_model(vae).eval().requires_grad_(False)
    # SD scales latents to unit variance for the diffusion model: scaling = 1 / std.
    with torch.no_grad():
        latents = torch.cat([vae.encode(image_batch(rng, 64)[0].to(accelerator.device)).latent_dist.sample() for _ in range(8)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return losses


@torch.no_grad()
def reconstruction_fidelity(vae, rng: np.random.Generator, device, n: int = 256) -> dict:
    """What the numpy classifier reads back from VAE reconstructions of fresh scenes: the
    ceiling the VAE sets on the model's fidelity. Returns accuracy per property."""
    scenes = sample_scenes(rng, n)
    images = torch.from_numpy(render_scenes(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = torch.cat([vae.decode(vae.encode(chunk.to(device)).latent_dist.mean).sample for chunk in images.split(32)])
    decoded = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    seen = [classify_image(image) for image in decoded]
    truth = scene_records(scenes)
    return {k: float(np.mean([s[k] == t[k] for s, t in zip(seen, truth)])) for k in ("color", "shape", "background", "size")}


def train_unet(unet, text_encoder, tokenizer, vae, noise_scheduler, config, accelerator, rng):
    """Stage 2: fit UNet and text encoder jointly (epsilon prediction, frozen VAE).
    Returns (EMA unet, EMA text encoder, per-step losses)."""
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": config.unet_lr},
            {"params": text_encoder.parameters(), "lr": config.text_encoder_lr},
        ],
        weight_decay=0.01,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.unet_steps))
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    unet.train()
    text_encoder.train()
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
    losses = []
    bar = tqdm(range(config.unet_steps), desc="UNet", disable=not accelerator.is_local_main_process)
    for step in bar:
        images, scenes = image_batch(rng, config.batch_size)
        ids = tokenizer(
            training_captions(rng, scenes, config),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(accelerator.device)
        with torch.no_grad():
            latents = vae.encode(images.to(accelerator.device)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        if config.offset_noise > 0:
            noise = noise + config.offset_noise * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
        abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise  # q(x_t | x_0)
        encoder_hidden_states = text_encoder(ids)[0]
        per_sample = (unet(noisy, timesteps, encoder_hidden_states).sample - noise).pow(2).mean(dim=(1, 2, 3))
        if config.snr_gamma > 0:
            snr = (abar / (1 - abar)).flatten()
            per_sample = per_sample * snr.clamp(max=config.snr_gamma) / snr
        loss = per_sample.mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # EMA warm-up: average over ~step steps early on, then over ~1/(1-decay) steps.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, accelerator.unwrap_model(unet), decay)
        ema_update(ema_text, accelerator.unwrap_model(text_encoder), decay)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return ema_unet.eval(), ema_text.eval(), losses


def train_sd(config: PretrainConfig, accelerator, rng: np.random.Generator) -> Trained:
    """``sd``: VAE, then UNet + CLIP text encoder; a StableDiffusionPipeline."""
    parts = build_untrained_components(seed=config.seed)
    start = time.perf_counter()
    vae_losses = train_vae(parts["vae"], config, accelerator, rng)
    vae_seconds = time.perf_counter() - start
    vae_fidelity = reconstruction_fidelity(parts["vae"], np.random.default_rng(config.seed + 1), accelerator.device)
    accelerator.print(f"VAE reconstructions read back by the numpy classifier: {vae_fidelity}")
    unet, text_encoder, unet_losses = train_unet(
        parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["vae"], parts["scheduler"], config, accelerator, rng
    )
    total_seconds = time.perf_counter() - start
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=text_encoder,
        tokenizer=parts["tokenizer"],
        unet=unet,
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    log = dict(
        vae_seconds=round(vae_seconds, 1),
        unet_seconds=round(total_seconds - vae_seconds, 1),
        total_seconds=round(total_seconds, 1),
        vae_scaling_factor=parts["vae"].config.scaling_factor,
        final_vae_loss=float(np.mean(vae_losses[-50:])),
        vae_reconstruction_fidelity=vae_fidelity,
        final_unet_loss=float(np.mean(unet_losses[-50:])),
    )
    return Trained(pipe, [("VAE: MSE + KL", vae_losses), ("UNet: epsilon MSE", unet_losses)], log)

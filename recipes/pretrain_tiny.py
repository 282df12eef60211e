"""Pretrain the embedded tiny text-to-image models ``cdalign/tiny-shapes-sd`` (``--architecture sd``)
and ``cdalign/tiny-shapes-sd3`` (``--architecture sd3``) from scratch.

    accelerate launch recipes/pretrain_tiny.py [--output_dir DIR] [--seed N] [--config recipes/pretrain_tiny.yaml]
    accelerate launch recipes/pretrain_tiny.py --config recipes/pretrain_tiny_sd3.yaml

The architecture is looked up in ``ARCHITECTURES`` (one trainer function each); scene
rendering, captions and caption dropout, EMA, the learning-rate schedule, the loss curve,
the atomic save and ``training_log.json`` are shared.

``sd``: two stages, both on freshly rendered shapes-world batches (``cdalign.data.shapes``), so the
data never repeats and nothing is downloaded:

1. VAE (64x64 RGB <-> 4x16x16): reconstruction MSE + L1 + a small KL weight; the latent
   scaling factor is then set to 1 / std of the latents, as SD does. What the numpy
   classifier reads back from its reconstructions is logged (the ceiling it sets).
2. UNet + CLIP text encoder, jointly, with the VAE frozen: epsilon prediction on SD
   1.5's noise schedule, with offset noise (so the background comes from the prompt, not
   from the initial noise's mean) and Min-SNR-gamma weighting; 10% of captions are
   dropped to "" (classifier-free guidance), and the size / background phrases are each
   left out of some captions, so partial prompts ("a red circle") work. An exponential
   moving average of the weights is saved.

``sd3``: no VAE stage. The trained VAE and CLIP text encoder of ``cdalign/tiny-shapes-sd``
(``base_model``) are reused (the text encoder twice, as SD3's ``text_encoder`` and
``text_encoder_2``; no T5), the VAE frozen, the text encoders frozen unless
``train_text_encoders`` trains them with the transformer; the VAE's ``shift_factor`` / ``scaling_factor`` are measured on
fresh scenes (latent mean, 1 / std). An ``SD3Transformer2DModel`` is trained by rectified
flow: ``x_s = (1 - s) x0 + s eps``, target velocity ``eps - x0``, ``s`` logit-normal (Esser
et al. 2024) or uniform, timestep ``1000 s``; caption embeddings come from the pipeline's
own ``encode_prompt`` (cached while the encoders are frozen: the caption space is small), with
one zero T5 token standing for the pipeline's 256 (``RepeatedContextTokenAttention``: exact, and
2.4x faster: ``benchmarks/bench_pretrain_step.py``). ``position_step`` sets the spacing of the transformer's sincos position table,
which is saved with its weights.
``init_transformer`` continues a saved stage (its transformer and text encoders). Saved as a
``StableDiffusion3Pipeline`` with a ``FlowMatchEulerDiscreteScheduler``.

Writes a diffusers pipeline folder (safetensors), ``loss_curve.png``
and ``training_log.json`` (config, wall times, losses, VAE read-back). Deterministic for a
seed and a thread count (``--num_threads``; 0 keeps torch's default). Wall time of the
shipped model: ``training_log.json`` next to it and its model card. On a busy machine
prefer ``--num_threads 1`` (two threads contending for one free core ran ~5x slower).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PretrainConfig:
    architecture: str = field(default="sd", metadata={"help": "Which model to train: a key of ARCHITECTURES (sd, sd3)."})
    output_dir: str = field(default="cdalign/data/tiny-shapes-sd", metadata={"help": "Where the pipeline folder is written."})
    seed: int = field(default=0, metadata={"help": "Seeds initialisation, data and noise."})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 keeps torch's default."})
    vae_steps: int = field(default=1500, metadata={"help": "VAE optimiser steps."})
    vae_batch_size: int = field(default=8, metadata={"help": "Images per VAE step."})
    vae_lr: float = field(default=3e-4, metadata={"help": "VAE peak learning rate (AdamW, cosine decay); at 1e-3 colour (hue) is not learned."})
    kl_weight: float = field(default=1e-4, metadata={"help": "Weight of the KL term (per latent element) against the pixel MSE ([-1, 1] units)."})
    vae_l1_weight: float = field(
        default=1.0, metadata={"help": "Weight of a pixel L1 term added to the VAE's MSE (sharper edges and corners)."}
    )
    unet_steps: int = field(default=7500, metadata={"help": "UNet + text encoder optimiser steps."})
    batch_size: int = field(default=16, metadata={"help": "Images per UNet step."})
    unet_lr: float = field(default=4e-4, metadata={"help": "UNet peak learning rate (AdamW, warmup then cosine decay)."})
    text_encoder_lr: float = field(default=4e-4, metadata={"help": "Text encoder peak learning rate (trained jointly)."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warmup steps, both stages."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Probability a caption is replaced by '' (classifier-free guidance)."})
    omit_size_prob: float = field(default=0.25, metadata={"help": "Probability the size word is left out of a caption."})
    omit_background_prob: float = field(default=0.25, metadata={"help": "Probability the background phrase is left out of a caption."})
    ema_decay: float = field(default=0.998, metadata={"help": "EMA decay of the saved UNet and text encoder weights."})
    snr_gamma: float = field(
        default=5.0,
        metadata={
            "help": "Min-SNR-gamma loss weighting (Hang et al. 2023): each sample's epsilon MSE is weighted by "
            "min(SNR_t, gamma) / SNR_t, so the easy low-noise steps stop dominating; 0 turns it off."
        },
    )
    offset_noise: float = field(
        default=0.3,
        metadata={
            "help": "Std of a per-image, per-channel constant added to the training noise (offset noise, Guttenberg 2023). "
            "On 16x16 latents SD's schedule leaves the mean colour readable at t=T, so without it the model takes the "
            "background from the initial noise instead of the prompt."
        },
    )
    # --- sd3 only ---
    base_model: str = field(
        default="cdalign/tiny-shapes-sd",
        metadata={"help": "sd3: pipeline folder (or the embedded id) whose trained VAE, CLIP text encoder and tokenizer are reused."},
    )
    transformer_steps: int = field(default=6000, metadata={"help": "sd3: transformer optimiser steps."})
    transformer_lr: float = field(default=5e-4, metadata={"help": "sd3: transformer peak learning rate (AdamW, warmup then cosine decay)."})
    transformer_layers: int = field(default=4, metadata={"help": "sd3: joint transformer blocks."})
    attention_heads: int = field(default=2, metadata={"help": "sd3: attention heads per block."})
    attention_head_dim: int = field(default=32, metadata={"help": "sd3: width of one attention head."})
    patch_size: int = field(default=1, metadata={"help": "sd3: transformer patch size on the 16x16 latent (1: 256 image tokens, 2: 64)."})
    train_text_encoders: bool = field(
        default=False,
        metadata={"help": "sd3: also train both CLIP text encoders (from tiny-shapes-sd's, lr text_encoder_lr, EMA); "
                  "False keeps them frozen."},
    )
    timestep_sampling: str = field(
        default="logit_normal", metadata={"help": "sd3: how sigma is drawn in training: logit_normal (SD3 paper) or uniform."}
    )
    logit_mean: float = field(default=0.0, metadata={"help": "sd3: mean of the logit-normal sigma density."})
    logit_std: float = field(default=1.0, metadata={"help": "sd3: std of the logit-normal sigma density."})
    scheduler_shift: float = field(default=1.0, metadata={"help": "sd3: FlowMatchEulerDiscreteScheduler shift saved with the model (sampling only)."})
    transformer_init: str = field(
        default="diffusers",
        metadata={"help": "sd3: how the transformer's weights start: a key of cdalign.models.tiny_pretrained."
                  "TRANSFORMER_INITIALIZATIONS (diffusers: PyTorch's defaults; dit: DiT's adaLN-Zero, each block the identity)."},
    )
    position_step: float = field(
        default=1.0,
        metadata={"help": "sd3: spacing of the transformer's sincos position table (saved with its weights): token (i, j) "
                  "sits at (step i, step j). 1 is diffusers' table, whose fastest frequency turns 1 rad per token; at 3 it "
                  "turns 3 rad, just under pi (cdalign.models.tiny_pretrained.sincos_position_table)."},
    )
    init_transformer: str = field(
        default="",
        metadata={"help": "sd3: continue pretraining: a saved tiny flow pipeline folder whose transformer weights (same "
                  "architecture) training starts from; its training_log.json is kept under previous_stages. Empty: random init."},
    )

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> "PretrainConfig":
        """Parse ``--config file.yaml`` and ``--<field> value`` (CLI overrides YAML)."""
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        parser.add_argument("--config", default=None, help="YAML file of PretrainConfig fields.")
        for f in dataclasses.fields(cls):
            kind = _yes_no if isinstance(f.default, bool) else type(f.default)
            parser.add_argument(f"--{f.name}", type=kind, default=None, help=f.metadata["help"])
        args = vars(parser.parse_args(argv))
        config_path = args.pop("config")
        values = {}
        if config_path:
            import yaml

            values.update(yaml.safe_load(Path(config_path).read_text()) or {})
            unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"{config_path}: unknown keys {sorted(unknown)}")
        values.update({k: v for k, v in args.items() if v is not None})
        return cls(**values)


def _yes_no(text: str) -> bool:
    """A boolean flag's value: true/false (yes/no, 1/0)."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def lr_lambda(warmup: int, total: int, final_fraction: float = 0.1):
    """Linear warmup to 1, then cosine decay to ``final_fraction`` at ``total`` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def image_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict]:
    """Render ``n`` fresh scenes: images (n, 3, 64, 64) float in [-1, 1], and the scenes."""
    from cdalign.data.shapes import render_scenes, sample_scenes

    scenes = sample_scenes(rng, n)
    images = torch.from_numpy(render_scenes(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, scenes


def training_captions(rng: np.random.Generator, scenes: dict, config: PretrainConfig) -> list[str]:
    """Captions for training: full, partial (size / background left out) or empty."""
    from cdalign.data.shapes import (
        BACKGROUND_NAMES,
        COLOR_NAMES,
        SHAPES,
        SIZES,
        caption,
    )

    captions = []
    for i in range(len(scenes["shape"])):
        if rng.random() < config.caption_dropout:
            captions.append("")
            continue
        size = None if rng.random() < config.omit_size_prob else SIZES[scenes["size"][i]]
        background = None if rng.random() < config.omit_background_prob else BACKGROUND_NAMES[scenes["background"][i]]
        captions.append(caption(SHAPES[scenes["shape"][i]], COLOR_NAMES[scenes["color"][i]], size, background))
    return captions


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


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
    from cdalign.data.shapes import (
        classify_image,
        render_scenes,
        sample_scenes,
        scene_records,
    )

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


def save_loss_curve(path: Path, panels: list[tuple[str, list[float]]]):
    """Plot each (title, per-step losses) panel: raw and 50-step moving average, log scale."""
    from cdalign.publishing.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (title, losses) in zip(axes[0], panels):
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, alpha=0.3, lw=0.7)
        if len(losses) >= 50:
            ax.plot(steps[49:], np.convolve(losses, np.ones(50) / 50, mode="valid"), lw=1.5)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def drop_load_paths(folder: Path) -> None:
    """Remove ``_name_or_path`` from every component config diffusers wrote under ``folder``:
    it is the path a component was loaded from on the training machine (a reused VAE, a
    continued stage), not part of the model."""
    for path in Path(folder).glob("*/config.json"):
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass
class Trained:
    """What an architecture's trainer hands to ``main``: the pipeline to save, the loss
    panels for ``loss_curve.png`` and its entries for ``training_log.json``."""

    pipeline: object
    loss_panels: list[tuple[str, list[float]]]
    log: dict


def train_sd(config: PretrainConfig, accelerator, rng: np.random.Generator) -> Trained:
    """``sd``: VAE, then UNet + CLIP text encoder; a StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    from cdalign.models.tiny_pretrained import build_untrained_components

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


@torch.no_grad()
def measure_latent_statistics(vae, rng: np.random.Generator, device, n: int = 512) -> tuple[float, float]:
    """(mean, std) of the VAE's posterior samples over ``n`` fresh scenes: SD3's
    ``shift_factor`` and 1 / ``scaling_factor``."""
    latents = torch.cat([vae.encode(image_batch(rng, 64)[0].to(device)).latent_dist.sample() for _ in range(n // 64)])
    return float(latents.mean()), float(latents.std())


def sample_sigmas(rng: torch.Generator, n: int, config: PretrainConfig) -> torch.Tensor:
    """Training noise levels in (0, 1): logit-normal (sigmoid of N(logit_mean, logit_std))
    or uniform."""
    if config.timestep_sampling == "logit_normal":
        return torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(n, generator=rng))
    if config.timestep_sampling == "uniform":
        return torch.rand(n, generator=rng)
    raise ValueError(f"timestep_sampling={config.timestep_sampling!r}: expected 'logit_normal' or 'uniform'")


class RepeatedContextTokenAttention:
    """Joint (MMDiT) attention in which the last context token stands for ``copies`` equal
    tokens: its attention logit gets ``+ log(copies)``, which is what ``copies`` equal keys
    and values add to the softmax. Without T5, SD3's ``encode_prompt`` appends
    ``max_sequence_length`` (256) zero tokens; they enter every block equal and leave it
    equal, so training on one of them with this processor gives the pipeline's velocities
    and gradients (``tests/test_tiny_sd3.py`` checks both) at a fraction of the cost: one
    forward and backward of the tiny transformer, batch 16, 1 thread, 0.53 s -> 0.22 s
    (``python benchmarks/bench_pretrain_step.py``).
    Used in pretraining only; the saved model keeps diffusers' processors."""

    def __init__(self, copies: int):
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image_tokens = hidden_states.shape[:2]

        def split_heads(x, norm=None):
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = split_heads(attn.to_q(hidden_states), attn.norm_q)
        k = split_heads(attn.to_k(hidden_states), attn.norm_k)
        v = split_heads(attn.to_v(hidden_states))
        bias = None
        if encoder_hidden_states is not None:
            q = torch.cat([q, split_heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
            k = torch.cat([k, split_heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
            v = torch.cat([v, split_heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
            bias = torch.zeros(1, k.shape[2], dtype=q.dtype, device=q.device)
            bias[0, -1] = self.log_copies
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :image_tokens]))
        if encoder_hidden_states is None:
            return image
        context = out[:, image_tokens:]
        return image, (context if attn.context_pre_only else attn.to_add_out(context))


def t5_placeholder_tokens(pipe) -> int:
    """How many zero tokens the pipeline's ``encode_prompt`` appends when it has no T5: its
    ``max_sequence_length`` default (256 for StableDiffusion3Pipeline)."""
    import inspect

    if getattr(pipe, "text_encoder_3", None) is not None:
        raise ValueError("the zero-token shortcut is exact only without text_encoder_3 (T5)")
    return inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default


def train_transformer(pipe, config: PretrainConfig, accelerator, rng: np.random.Generator):
    """Fit ``pipe.transformer`` (and, with ``train_text_encoders``, both CLIP text encoders)
    by rectified flow, VAE frozen. Returns ({name: EMA module}, per-step losses)."""
    vae = pipe.vae
    names = ["transformer", *(["text_encoder", "text_encoder_2"] if config.train_text_encoders else [])]
    models = {name: getattr(pipe, name) for name in names}
    emas = {name: copy.deepcopy(m).requires_grad_(False) for name, m in models.items()}
    groups = [{"params": list(models["transformer"].parameters()), "lr": config.transformer_lr}]
    for name in names[1:]:
        encoder = models[name].requires_grad_(True)
        encoder.text_projection.requires_grad_(False)  # stays the identity: pooled = final-layer-norm EOS state
        groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": config.text_encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.transformer_steps))
    # One zero token with weight 256 in attention instead of 256 zero tokens (exact, ~2.4x faster).
    models["transformer"].set_attn_processor(RepeatedContextTokenAttention(t5_placeholder_tokens(pipe)))
    transformer, optimizer = accelerator.prepare(models["transformer"], optimizer)
    for m in models.values():
        m.train()
    noise_rng = torch.Generator().manual_seed(config.seed)
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(captions: list[str]):
        # CLIP x 2 and one zero token for the pipeline's 256 (RepeatedContextTokenAttention).
        return pipe.encode_prompt(captions, None, None, device=accelerator.device, do_classifier_free_guidance=False, max_sequence_length=1)

    def embed(captions: list[str]):
        """The pipeline's own prompt embeddings (CLIP x 2, the zero T5 token); cached per
        caption while the text encoders are frozen."""
        if config.train_text_encoders:
            embeds, _, pooled, _ = encode(captions)
            return embeds, pooled
        new = sorted(set(captions) - set(cache))
        if new:
            with torch.no_grad():
                embeds, _, pooled, _ = encode(new)
            cache.update({c: (e, p) for c, e, p in zip(new, embeds, pooled)})
        return torch.stack([cache[c][0] for c in captions]), torch.stack([cache[c][1] for c in captions])

    params = [p for g in groups for p in g["params"]]
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    losses = []
    bar = tqdm(range(config.transformer_steps), desc="SD3 transformer", disable=not accelerator.is_local_main_process)
    for step in bar:
        images, scenes = image_batch(rng, config.batch_size)
        prompt_embeds, pooled = embed(training_captions(rng, scenes, config))
        with torch.no_grad():
            x0 = (vae.encode(images.to(accelerator.device)).latent_dist.sample() - shift) * scale
        noise = torch.randn(x0.shape, generator=noise_rng).to(x0.device)
        sigmas = sample_sigmas(noise_rng, len(x0), config).to(x0.device)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise  # rectified flow path
        velocity = transformer(noisy, prompt_embeds, pooled, sigmas * 1000).sample
        loss = F.mse_loss(velocity, noise - x0)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        for name, m in models.items():
            ema_update(emas[name], accelerator.unwrap_model(m), decay)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return {name: ema.eval() for name, ema in emas.items()}, losses


def train_sd3(config: PretrainConfig, accelerator, rng: np.random.Generator) -> Trained:
    """``sd3``: reuse tiny-shapes-sd's VAE and text encoder, train an SD3 transformer by
    rectified flow; a StableDiffusion3Pipeline (no T5)."""
    from diffusers import StableDiffusion3Pipeline

    from cdalign.models.tiny_pretrained import (
        TINY_SHAPES_ID,
        build_untrained_sd3_components,
        tiny_shapes_sd_path,
    )

    base = tiny_shapes_sd_path() if config.base_model == TINY_SHAPES_ID else Path(config.base_model)
    parts = build_untrained_sd3_components(
        seed=config.seed,
        base_path=base,
        num_layers=config.transformer_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.attention_heads,
        scheduler_shift=config.scheduler_shift,
        patch_size=config.patch_size,
        position_step=config.position_step,
        initialization=config.transformer_init,
    )
    previous = []
    if config.init_transformer:
        previous = _load_previous_stage(parts, Path(config.init_transformer))
    start = time.perf_counter()
    vae = parts["vae"].to(accelerator.device)
    mean, std = measure_latent_statistics(vae, np.random.default_rng(config.seed + 2), accelerator.device)
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    accelerator.print(f"VAE latents on fresh scenes: mean {mean:.4f}, std {std:.4f}")
    pipe = StableDiffusion3Pipeline(text_encoder_3=None, tokenizer_3=None, **parts)
    pipe.to(accelerator.device)
    trained, losses = train_transformer(pipe, config, accelerator, rng)
    pipe.register_modules(**trained)
    transformer = trained["transformer"]
    total_seconds = time.perf_counter() - start
    vae_fidelity = reconstruction_fidelity(vae, np.random.default_rng(config.seed + 1), accelerator.device)
    log = dict(
        base_model=config.base_model,
        transformer_seconds=round(total_seconds, 1),
        total_seconds=round(total_seconds, 1),
        transformer_parameters=sum(p.numel() for p in transformer.parameters()),
        vae_shift_factor=mean,
        vae_scaling_factor=1.0 / std,
        vae_reconstruction_fidelity=vae_fidelity,
        text_encoders=(
            "trained jointly from tiny-shapes-sd's CLIP text encoder (identity text_projection kept), text_encoder and text_encoder_2 apart"
            if config.train_text_encoders
            else "frozen (the previous stage's)"
            if config.init_transformer
            else "frozen (tiny-shapes-sd's CLIP text encoder, identity text_projection, as text_encoder and text_encoder_2)"
        ),
        final_transformer_loss=float(np.mean(losses[-50:])),
        t5_placeholder_tokens=t5_placeholder_tokens(pipe),  # fed as one weighted token (RepeatedContextTokenAttention)
        previous_stages=previous,
        total_transformer_steps=config.transformer_steps + sum(st["config"]["transformer_steps"] for st in previous),
    )
    return Trained(pipe, [("SD3 transformer: velocity MSE", losses)], log)


def _load_previous_stage(parts: dict, folder: Path) -> list[dict]:
    """Replace ``parts['transformer']`` by the transformer saved in ``folder`` (refused unless
    its config equals the one this config builds) and both text encoders by the folder's (the
    previous stage may have trained them); return that folder's training stages, oldest first."""
    import json

    from diffusers import SD3Transformer2DModel

    saved = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    plain = lambda cfg: json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}))  # noqa: E731
    mine, theirs = plain(parts["transformer"].config), plain(saved.config)
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise ValueError(f"init_transformer={str(folder)!r}: its transformer differs from this config's in {diff}")
    if not torch.equal(saved.pos_embed.pos_embed, parts["transformer"].pos_embed.pos_embed):
        raise ValueError(f"init_transformer={str(folder)!r}: its position table differs from this config's (set position_step "
                         "to the value in its training_log.json)")
    parts["transformer"] = saved
    from transformers import CLIPTextModelWithProjection

    for name in ("text_encoder", "text_encoder_2"):
        parts[name] = CLIPTextModelWithProjection.from_pretrained(folder / name).eval().requires_grad_(False)
    log = json.loads((folder / "training_log.json").read_text())
    return [*log.get("previous_stages", []), {k: v for k, v in log.items() if k != "previous_stages"}]


# One trainer per architecture: PretrainConfig.architecture -> (config, accelerator, rng) -> Trained.
ARCHITECTURES = {"sd": train_sd, "sd3": train_sd3}


def main(config: PretrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from cdalign.runs.atomic import atomic_directory

    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={config.architecture!r}: expected one of {sorted(ARCHITECTURES)}")
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    accelerator = Accelerator()
    set_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    trained = ARCHITECTURES[config.architecture](config, accelerator, rng)

    if accelerator.is_main_process:
        log = dict(architecture=config.architecture, config=dataclasses.asdict(config), torch_threads=torch.get_num_threads(), **trained.log)

        def write(folder: Path):
            trained.pipeline.save_pretrained(folder, safe_serialization=True)
            drop_load_paths(folder)
            save_loss_curve(folder / "loss_curve.png", trained.loss_panels)
            (folder / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")

        # written whole in a fresh sibling folder, then swapped in: a crash mid-save never
        # leaves a half-written model behind
        with atomic_directory(Path(config.output_dir)) as folder:
            write(folder)
        print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main(PretrainConfig.parse())

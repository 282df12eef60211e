"""Pretraining of ``cdalign/tiny-shapes-sd3`` (architecture ``sd3``): no VAE stage. The
trained VAE and CLIP text encoder of ``cdalign/tiny-shapes-sd`` (``base_model``) are reused
(the text encoder twice, as SD3's ``text_encoder`` and ``text_encoder_2``; no T5), the VAE
frozen, the text encoders frozen unless ``train_text_encoders`` trains them with the
transformer; the VAE's ``shift_factor`` / ``scaling_factor`` are measured on fresh scenes
(latent mean, 1 / std). An ``SD3Transformer2DModel`` is trained by rectified flow:
``x_s = (1 - s) x0 + s eps``, target velocity ``eps - x0``, ``s`` logit-normal (Esser et al.
2024) or uniform, timestep ``1000 s``; caption embeddings come from the pipeline's own
``encode_prompt`` (cached while the encoders are frozen: the caption space is small), with
one zero T5 token standing for the pipeline's 256 (:class:`RepeatedContextTokenAttention`:
exact, and 2.4x faster: ``benchmarks/bench_pretrain_step.py``). ``init_transformer``
continues a saved stage (its transformer and text encoders). Saved as a
``StableDiffusion3Pipeline`` with a ``FlowMatchEulerDiscreteScheduler``."""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from tqdm.auto import tqdm
from transformers import CLIPTextModelWithProjection

from cdalign.models.pretraining import PretrainConfig, Trained, ema_update, image_batch, lr_lambda, training_captions
from cdalign.models.pretraining_sd import reconstruction_fidelity
from cdalign.models.tiny_pretrained import TINY_SHAPES_ID, build_untrained_sd3_components, tiny_shapes_sd_path


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
    for name in ("text_encoder", "text_encoder_2"):
        parts[name] = CLIPTextModelWithProjection.from_pretrained(folder / name).eval().requires_grad_(False)
    log = json.loads((folder / "training_log.json").read_text())
    return [*log.get("previous_stages", []), {k: v for k, v in log.items() if k != "previous_stages"}]


# One trainer per architecture: PretrainConfig.architecture -> (config, accelerator, rng) -> Trained.

"""Pretraining of the embedded tiny text-to-image models (``recipes/pretrain_tiny.py``):
:class:`PretrainConfig` (a typed config of :mod:`cdalign.fields`: the recipe YAML keys and
the flags) and what both architectures share: scene rendering and captions (caption
dropout, size / background left out), EMA, the learning-rate schedule, the atomic save and
the ``training_log.json`` entries (:class:`Trained`). The trainers are
:mod:`~cdalign.models.pretraining_sd` (VAE, then UNet + text encoder) and
:mod:`~cdalign.models.pretraining_sd3` (a rectified-flow transformer on tiny-shapes-sd's VAE
and text encoder)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cdalign.data.shapes import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, SIZES, caption, render_scenes, sample_scenes
from cdalign.fields import ConfigFields, check_fields, dataclass_from_dict, parse_args_to_dict
from cdalign.models.tiny_pretrained import TRANSFORMER_INITIALIZATIONS

ARCHITECTURES = ("sd", "sd3")  # the trainers: pretraining_sd.train_sd, pretraining_sd3.train_sd3
TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


@dataclass
class PretrainConfig(ConfigFields):
    """Pretraining of an embedded tiny model (``recipes/pretrain_tiny.py``): every field is a
    YAML key of ``recipes/pretrain_tiny*.yaml`` and a ``--field`` flag."""

    architecture: str = field(default="sd", metadata={"help": "Which model to train: sd (a UNet) or sd3 (a flow transformer).",
                                                      "choices": ARCHITECTURES})
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
        default="logit_normal", metadata={"help": "sd3: how sigma is drawn in training: logit_normal (SD3 paper) or uniform.",
                                          "choices": TIMESTEP_SAMPLINGS}
    )
    logit_mean: float = field(default=0.0, metadata={"help": "sd3: mean of the logit-normal sigma density."})
    logit_std: float = field(default=1.0, metadata={"help": "sd3: std of the logit-normal sigma density."})
    scheduler_shift: float = field(default=1.0, metadata={"help": "sd3: FlowMatchEulerDiscreteScheduler shift saved with the model (sampling only)."})
    transformer_init: str = field(
        default="diffusers",
        metadata={"help": "sd3: how the transformer's weights start: a key of cdalign.models.tiny_pretrained."
                  "TRANSFORMER_INITIALIZATIONS (diffusers: PyTorch's defaults; dit: DiT's adaLN-Zero, each block the identity).",
                  "choices": tuple(TRANSFORMER_INITIALIZATIONS)},
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
    def parse(cls, argv: list[str] | None = None, *, prog: str | None = None, description: str | None = None) -> PretrainConfig:
        """``--config file.yaml`` then ``--<field> value`` overrides (the flags win), read by the
        config engine (:mod:`cdalign.fields`): unknown keys and flags, wrong types and values
        outside a field's choices raise ``ValueError`` naming the field; ``--help`` shows the
        values that will run."""
        raw = parse_args_to_dict(cls, argv, prog=prog, description=description or cls.__doc__)
        config = dataclass_from_dict(cls, raw)
        check_fields(config)
        return config


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
    scenes = sample_scenes(rng, n)
    images = torch.from_numpy(render_scenes(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, scenes


def training_captions(rng: np.random.Generator, scenes: dict, config: PretrainConfig) -> list[str]:
    """Captions for training: full, partial (size / background left out) or empty."""
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

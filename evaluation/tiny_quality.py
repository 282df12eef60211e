"""Quality gates of the embedded tiny models ``cdalign/tiny-shapes-sd`` (Stable Diffusion
architecture) and ``cdalign/tiny-shapes-sd3`` (SD3 architecture, flow matching), measured
with the plain numpy classifier of ``cdalign.data.shapes`` (never with a learned reward).

    python evaluation/tiny_quality.py [--model cdalign/tiny-shapes-sd] [--write_card]
    python evaluation/tiny_quality.py --model cdalign/tiny-shapes-sd3 [--scheduler_shift 3.0] [--write_card]

Prints, for each guidance scale:

- colour fidelity: per colour word, the fraction of samples whose dominant foreground
  colour is the one the prompt names (gate: >= 80% for every colour);
- shape fidelity: per shape, the fraction whose bounding-box fill ratio reads as the
  named shape (gate: >= 60% overall);
- background and size accuracy (reported, not gated);
and once: diversity of one prompt over seeds (shape-centre spread, px; distinct
images), and the wall time of a 4-image batch at 20 sampler steps (the model's own
scheduler: DDIM for sd, flow-matching Euler for sd3).

The prompts are full shapes-world captions drawn with a fixed seed, ``samples_per_color``
per colour word, each with its own generator seed. ``--write_card`` writes the model
card (README.md) and a sample grid PNG into the model's folder from these numbers; the
card's architecture table and training text come from the folder's component configs and
``training_log.json`` (its ``architecture``: sd or sd3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np

GATE_COLOR = 0.8
GATE_SHAPE = 0.6
SMALL_MAX_RADIUS = 12  # px; half bounding-box extent between the small and large ranges

REPO_ROOT = Path(__file__).resolve().parents[1]


def generate(pipe, prompts: list[str], seeds: list[int], guidance_scale: float, num_inference_steps: int = 20, batch_size: int = 16) -> np.ndarray:
    """Sample one image per (prompt, seed): uint8 array (N, 64, 64, 3). Image i depends
    only on prompts[i], seeds[i] and the settings, not on the batch it is drawn in."""
    import torch

    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(s) for s in seeds[chunk]]
        out = pipe(
            prompts[chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
        ).images
        images.append(np.round(out * 255).astype(np.uint8))
    return np.concatenate(images)


def evaluation_prompts(samples_per_color: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """``samples_per_color`` full captions per colour word, shape / size / background
    drawn at random (seeded). Returns (prompts, their parsed words)."""
    from cdalign.data.shapes import (
        BACKGROUND_NAMES,
        COLOR_NAMES,
        SHAPES,
        SIZES,
        caption,
    )

    rng = np.random.default_rng(seed)
    prompts, truths = [], []
    for color in COLOR_NAMES:
        for _ in range(samples_per_color):
            truth = dict(
                color=color,
                shape=SHAPES[rng.integers(len(SHAPES))],
                size=SIZES[rng.integers(len(SIZES))],
                background=BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))],
            )
            prompts.append(caption(**truth))
            truths.append(truth)
    return prompts, truths


def fidelity(images: np.ndarray, truths: list[dict]) -> dict:
    """Accuracies of the numpy classifier on images (N, H, W, 3) uint8 against the words
    their prompts named. Returns ``color`` / ``shape``: {word: accuracy}, and
    ``color_min``, ``color_overall``, ``shape_overall``, ``background_overall``,
    ``size_overall``; all fractions in [0, 1]."""
    from cdalign.data.shapes import COLOR_NAMES, SHAPES, classify_image

    seen = [classify_image(image) for image in images]

    def accuracy(key: str, value: str | None = None) -> float:
        pairs = [(s[key], t[key]) for s, t in zip(seen, truths) if value is None or t[key] == value]
        return float(np.mean([a == b for a, b in pairs]))

    color = {c: accuracy("color", c) for c in COLOR_NAMES}
    shape = {s: accuracy("shape", s) for s in SHAPES}
    return dict(
        color=color,
        shape=shape,
        color_min=min(color.values()),
        color_overall=accuracy("color"),
        shape_overall=accuracy("shape"),
        background_overall=accuracy("background"),
        size_overall=accuracy("size"),
    )


def diversity(pipe, prompt: str, num_seeds: int, guidance_scale: float) -> dict:
    """Samples of one prompt under ``num_seeds`` seeds: ``center_std_px`` (std of the
    shape's bounding-box centre, x and y pooled, px), ``radius_std_px`` (std of its half
    extent, px), ``distinct_fraction`` (fraction of image pairs whose mean absolute
    difference exceeds 2/255) and ``images`` (uint8 (num_seeds, 64, 64, 3))."""
    from cdalign.data.shapes import classify_image

    images = generate(pipe, [prompt] * num_seeds, list(range(1000, 1000 + num_seeds)), guidance_scale)
    seen = [classify_image(image) for image in images]
    centers = np.array([s["center"] for s in seen if s["center"] is not None])
    flat = images.reshape(num_seeds, -1).astype(np.float32)
    pairs = [(i, j) for i in range(num_seeds) for j in range(i + 1, num_seeds)]
    distinct = np.mean([np.abs(flat[i] - flat[j]).mean() > 2 for i, j in pairs])
    return dict(
        prompt=prompt,
        center_std_px=float(centers.std(axis=0).mean()) if len(centers) else 0.0,
        radius_std_px=float(np.std([s["radius"] for s in seen])),
        distinct_fraction=float(distinct),
        images=images,
    )


def time_generation(pipe, guidance_scale: float, batch: int = 4, num_inference_steps: int = 20, repeats: int = 3) -> float:
    """Median wall time per image (s) of a ``batch``-image call at ``num_inference_steps``
    sampler steps (after one warm-up call)."""
    prompts = ["a large red circle on a white background"] * batch
    generate(pipe, prompts, list(range(batch)), guidance_scale, num_inference_steps)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(pipe, prompts, list(range(batch)), guidance_scale, num_inference_steps)
        times.append((time.perf_counter() - start) / batch)
    return float(np.median(times))


def sample_grid(pipe, guidance_scale: float, seed: int = 0, upscale: int = 1) -> np.ndarray:
    """One sample per (colour, shape): rows are the colour words, columns circle,
    square, triangle, each "a large <color> <shape> on a <background> background" with
    the backgrounds cycling. uint8 (6*64*upscale, 3*64*upscale, 3)."""
    from cdalign.data.shapes import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, caption

    prompts = [
        caption(shape, color, "large", BACKGROUND_NAMES[(i + j) % len(BACKGROUND_NAMES)])
        for i, color in enumerate(COLOR_NAMES)
        for j, shape in enumerate(SHAPES)
    ]
    images = generate(pipe, prompts, [seed + k for k in range(len(prompts))], guidance_scale)
    rows = [np.concatenate(images[r * len(SHAPES) : (r + 1) * len(SHAPES)], axis=1) for r in range(len(COLOR_NAMES))]
    grid = np.concatenate(rows, axis=0)
    return grid.repeat(upscale, axis=0).repeat(upscale, axis=1)


def load_model(model: str, scheduler_shift: float | None = None):
    """The pipeline of an embedded name or a diffusers folder (``load_pipeline``: its own
    class, an SD3 folder without T5). ``scheduler_shift`` replaces a flow-matching
    scheduler's shift (for measuring it)."""
    from cdalign.models.pipeline import load_pipeline

    pipe = load_pipeline(model)
    if scheduler_shift is not None:
        if "shift" not in pipe.scheduler.config:
            raise ValueError(f"--scheduler_shift: {type(pipe.scheduler).__name__} has no shift")
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=scheduler_shift)
    return pipe


def evaluate(
    model: str, guidance_scales: list[float], samples_per_color: int, diversity_seeds: int, seed: int = 0, scheduler_shift: float | None = None
) -> dict:
    """Run every measurement; returns a JSON-able dict (see the module docstring)."""
    pipe = load_model(model, scheduler_shift)
    prompts, truths = evaluation_prompts(samples_per_color, seed)
    seeds = list(range(len(prompts)))
    results = dict(
        model=model,
        samples_per_color=samples_per_color,
        diversity_seeds=diversity_seeds,
        num_inference_steps=20,
        scheduler=type(pipe.scheduler).__name__,
        scheduler_shift=pipe.scheduler.config.get("shift"),
        by_guidance={},
    )
    for scale in guidance_scales:
        results["by_guidance"][str(scale)] = fidelity(generate(pipe, prompts, seeds, scale), truths)
    # The recommended scale: the best worst-colour accuracy, then the best shape accuracy.
    best = max(guidance_scales, key=lambda g: (round(results["by_guidance"][str(g)]["color_min"], 3), results["by_guidance"][str(g)]["shape_overall"]))
    results["best_guidance_scale"] = best
    div = diversity(pipe, "a small red circle on a white background", diversity_seeds, best)
    results["diversity"] = {k: v for k, v in div.items() if k != "images"}
    results["seconds_per_image_batch4_20steps"] = time_generation(pipe, best)
    gates = results["by_guidance"][str(best)]
    results["gates"] = dict(
        color_min_ge_80=gates["color_min"] >= GATE_COLOR,
        shape_overall_ge_60=gates["shape_overall"] >= GATE_SHAPE,
        diverse=results["diversity"]["distinct_fraction"] >= 0.9 and results["diversity"]["center_std_px"] > 2,
        under_1s_per_image=results["seconds_per_image_batch4_20steps"] < 1.0,
    )
    results["_pipe"] = pipe
    return results


def format_table(results: dict) -> str:
    """The measured numbers as a Markdown table, one row per guidance scale."""
    from cdalign.data.shapes import COLOR_NAMES, SHAPES

    header = ["guidance", *COLOR_NAMES, "colour (all)", *SHAPES, "shape (all)", "background", "size"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scale, r in results["by_guidance"].items():
        cells = [scale, *(f"{r['color'][c]:.0%}" for c in COLOR_NAMES), f"{r['color_overall']:.0%}"]
        cells += [*(f"{r['shape'][s]:.0%}" for s in SHAPES), f"{r['shape_overall']:.0%}"]
        cells += [f"{r['background_overall']:.0%}", f"{r['size_overall']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_folder(model: str) -> Path:
    """The diffusers folder of an embedded model name or a local path."""
    from cdalign.models.tiny_pretrained import TINY_SHAPES_ID, TINY_SHAPES_SD3_ID, tiny_shapes_sd3_path, tiny_shapes_sd_path

    embedded = {TINY_SHAPES_ID: tiny_shapes_sd_path, TINY_SHAPES_SD3_ID: tiny_shapes_sd3_path}
    return embedded[model]() if model in embedded else Path(model)


def pipeline_class(folder: Path) -> str:
    """The pipeline class a diffusers folder's ``model_index.json`` names."""
    return json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]


def _config(folder: Path, component: str) -> dict:
    """A component's saved config (``config.json`` or ``scheduler_config.json``)."""
    for name in ("config.json", "scheduler_config.json"):
        if (folder / component / name).is_file():
            return json.loads((folder / component / name).read_text())
    raise FileNotFoundError(f"{folder / component}: no config")


def _describe_unet(c: dict, log: dict) -> str:
    size = c["sample_size"]
    attention = [f"{size // 2**i}x{size // 2**i}" for i, kind in enumerate(c["down_block_types"]) if kind.startswith("CrossAttn")]
    return (
        f"{c['in_channels']}x{size}x{size} latents, channels {tuple(c['block_out_channels'])}, {c['layers_per_block']} layers per block, "
        f"GroupNorm {c['norm_num_groups']} groups, cross-attention ({c['cross_attention_dim']}-d) at {', '.join(attention)} and the middle; "
        "epsilon prediction"
    )


def _describe_sd3_transformer(c: dict, log: dict) -> str:
    size, patch = c["sample_size"], c["patch_size"]
    width = c["num_attention_heads"] * c["attention_head_dim"]
    params = log.get("transformer_parameters")
    return (
        f"{c['in_channels']}x{size}x{size} latents, patch {patch} ({(size // patch) ** 2} image tokens), {c['num_layers']} joint (MMDiT) blocks, "
        f"{c['num_attention_heads']} heads x {c['attention_head_dim']} (width {width}), context {c['joint_attention_dim']}-d "
        f"(77 CLIP tokens + 256 zero tokens: no T5), pooled projection {c['pooled_projection_dim']}-d"
        + _describe_position_table(log)
        + (f", {params / 1e6:.2f} M parameters" if params else "")
        + "; velocity prediction (rectified flow)"
        + ("; trained from DiT's adaLN-Zero initialisation" if log["config"].get("transformer_init") == "dit" else "")
    )


def _describe_position_table(log: dict) -> str:
    """The position table's clause: empty for diffusers' own (``position_step`` 1)."""
    step = log["config"].get("position_step", 1.0)
    if step == 1.0:
        return ""
    return f", sincos position table with token i at position {step:g} i (diffusers' default: i; stored in `pos_embed.pos_embed`)"


def _describe_vae(c: dict, log: dict) -> str:
    factor = 2 ** (len(c["block_out_channels"]) - 1)
    size = c["sample_size"]
    text = (
        f"{size}x{size} RGB <-> {c['latent_channels']}x{size // factor}x{size // factor}, channels {tuple(c['block_out_channels'])}, "
        f"GroupNorm {c['norm_num_groups']} group{'s' if c['norm_num_groups'] > 1 else ''}, "
        f"{'' if c.get('mid_block_add_attention', True) else 'no '}mid-block attention; scaling factor {c['scaling_factor']:.4f} (1 / latent std)"
    )
    if c.get("shift_factor") is not None:
        text += f", shift factor {c['shift_factor']:.4f} (latent mean)"
    if log.get("architecture", "sd") != "sd":
        text += f"; {log.get('base_model', 'cdalign/tiny-shapes-sd')}'s trained VAE, frozen"
    return text


def _describe_text_encoder(c: dict, log: dict) -> str:
    text = f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, {c['max_position_embeddings']} positions"
    if "WithProjection" in c.get("architectures", [""])[0]:
        text += f", text projection {c['projection_dim']}-d (identity)"
    if log.get("architecture", "sd") == "sd":
        return text + "; trained jointly with the UNet"
    base = log.get("base_model", "cdalign/tiny-shapes-sd")
    if text_encoder_stages(log):
        return text + f"; initialised from {base}'s trained CLIP text encoder, then trained with the transformer"
    return text + f"; {base}'s trained CLIP text encoder, frozen"


def training_stages(log: dict) -> list[dict]:
    """The pretraining stages of a ``training_log.json``, oldest first: its ``previous_stages``
    (what ``init_transformer`` continued), then the log itself."""
    return [*log.get("previous_stages", []), log]


def text_encoder_stages(log: dict) -> list[int]:
    """The 1-based pretraining stages (``previous_stages`` then this one) that trained the
    text encoders with the transformer (``train_text_encoders``); empty when they stayed frozen."""
    return [i for i, st in enumerate(training_stages(log), 1) if st["config"].get("train_text_encoders")]


def _describe_tokenizer(folder: Path, component: str) -> str:
    vocab = len(json.loads((folder / component / "tokenizer.json").read_text())["model"]["vocab"])
    return f"byte-level vocabulary (256 bytes + end-of-word forms) + BPE merges making every shapes-world word one token; {vocab} tokens"


def _describe_scheduler(c: dict, log: dict) -> str:
    if c["_class_name"] == "DDIMScheduler":
        prefix = "SD 1.5's: " if (c["beta_start"], c["beta_end"], c["beta_schedule"]) == (0.00085, 0.012, "scaled_linear") else ""
        return (
            f"{prefix}{c['beta_schedule']} {c['beta_start']}-{c['beta_end']}, {c['num_train_timesteps']} steps, "
            f"set_alpha_to_one {c['set_alpha_to_one']}, steps_offset {c['steps_offset']}"
        )
    if c["_class_name"] == "FlowMatchEulerDiscreteScheduler":
        return f"{c['num_train_timesteps']} steps, Euler on the flow ODE, shift {c['shift']} (sigma -> shift sigma / (1 + (shift - 1) sigma))"
    return ", ".join(f"{k} {v}" for k, v in c.items() if not k.startswith("_"))


# Component class -> its architecture-table description, from its saved config and the training log.
COMPONENT_DESCRIPTIONS = {
    "UNet2DConditionModel": _describe_unet,
    "SD3Transformer2DModel": _describe_sd3_transformer,
    "AutoencoderKL": _describe_vae,
    "CLIPTextModel": _describe_text_encoder,
    "CLIPTextModelWithProjection": _describe_text_encoder,
    "DDIMScheduler": _describe_scheduler,
    "FlowMatchEulerDiscreteScheduler": _describe_scheduler,
}


# Table order: the denoiser, then what feeds it.
COMPONENT_ORDER = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def architecture_table(folder: Path, log: dict) -> str:
    """The card's architecture table: one row per component class of ``model_index.json``
    (components sharing a class and a description share a row, e.g. SD3's two text encoders)."""
    index = json.loads((folder / "model_index.json").read_text())
    order = {name: i for i, name in enumerate(COMPONENT_ORDER)}
    rows: dict[tuple[str, str], list[str]] = {}
    for name in sorted(index, key=lambda n: (order.get(n, len(order)), n)):
        spec = index[name]
        if name.startswith("_") or not isinstance(spec, list) or spec[1] is None:
            continue
        cls = spec[1]
        if cls == "CLIPTokenizer":
            text = _describe_tokenizer(folder, name)
        elif cls in COMPONENT_DESCRIPTIONS:
            text = COMPONENT_DESCRIPTIONS[cls](_config(folder, name), log)
        else:
            text = "(see its config)"
        rows.setdefault((cls, text), []).append(name)
    lines = ["| component | configuration |", "|---|---|"]
    for (cls, text), names in rows.items():
        label = cls if len(names) == 1 else f"{cls} ({', '.join(f'`{n}`' for n in names)})"
        lines.append(f"| {label} | {text} |")
    return "\n".join(lines)


def sampler_name(folder: Path) -> str:
    """How the card names the sampler: "DDIM" or "flow-matching Euler (shift s)"."""
    c = _config(folder, "scheduler")
    if c["_class_name"] == "FlowMatchEulerDiscreteScheduler":
        return f"flow-matching Euler (shift {c['shift']})"
    return c["_class_name"].removesuffix("Scheduler")


SD_TRAINING = """`accelerate launch recipes/pretrain_tiny.py --seed {seed} --num_threads {train_threads}` (see `recipes/pretrain_tiny.py` and
`training_log.json`): VAE {vae_steps} steps x {vae_batch} images (MSE + {vae_l1} x L1 + small KL), then UNet
and text encoder jointly {unet_steps} steps x {unet_batch} images, 10% captions dropped for
classifier-free guidance, offset noise {offset_noise} (see below), Min-SNR-gamma loss weighting
(gamma {snr_gamma}; Hang et al. 2023), EMA weights saved. Every batch is
freshly rendered, so no image repeats. Wall time on a shared 2-core CPU with {train_threads} torch
thread(s): {train_minutes:.1f} min (VAE {vae_minutes:.1f}, UNet {unet_minutes:.1f}). Loss curves: `loss_curve.png`.
The VAE alone sets a ceiling: the classifier below reads its reconstructions of fresh
scenes as {vae_fidelity}.

Offset noise (Guttenberg 2023, "Diffusion with Offset Noise"): a per-image, per-channel
constant of std {offset_noise} is added to the training noise. With SD 1.5's schedule, a
16x16 latent keeps its mean colour readable even at t = 999 (signal 0.068 x the mean
against pixel-noise 1/16), so a model trained without it takes the background from the
initial noise and ignores the prompt's: the previous version of this model, trained
without it, followed the named background in 42% of samples (chance: 33%)."""

SD3_TRAINING = """{commands} (architecture `sd3`;
see `recipes/pretrain_tiny.py` and `training_log.json`). No VAE stage: the VAE is {base_model}'s
trained one, frozen. {text_encoder_training} No T5, so SD3's prompt encoding appends zero tokens{zero_tokens}. The
VAE's shift factor {shift_factor:.4f} and scaling factor {scaling:.4f} are the mean and 1 / std of its
latents on fresh scenes. The transformer is trained by rectified flow (Esser et al. 2024):
x_s = (1 - s) x0 + s eps, target velocity eps - x0, s drawn {timestep_sampling}, timestep 1000 s,
{stages} x {unet_batch} images, AdamW lr {lr} (cosine decay), 10% captions dropped for
classifier-free guidance, size / background words left out of some captions, EMA weights
(decay {ema_decay}) saved. Every batch is freshly rendered (each stage its own seed), so no image repeats.
Wall time on a shared 2-core CPU with {train_threads} torch thread(s): {train_minutes:.1f} min; final velocity MSE {final_loss:.4f}.
Loss curve: `loss_curve.png`. The VAE alone sets a ceiling: the classifier below reads its
reconstructions of fresh scenes as {vae_fidelity}."""


def _sd_card_fields(log: dict) -> dict:
    config = log["config"]
    return dict(
        vae_steps=config["vae_steps"],
        vae_batch=config["vae_batch_size"],
        unet_steps=config["unet_steps"],
        vae_minutes=log["vae_seconds"] / 60,
        unet_minutes=log["unet_seconds"] / 60,
        vae_l1=config.get("vae_l1_weight", 0.0),
        offset_noise=config.get("offset_noise", 0.0),
        snr_gamma=config.get("snr_gamma", 0.0),
    )


def _timestep_sampling(config: dict) -> str:
    sampling = config.get("timestep_sampling", "logit_normal")
    if sampling == "logit_normal":
        return f"logit-normal (mean {config.get('logit_mean', 0.0)}, std {config.get('logit_std', 1.0)})"
    return sampling


def _per_stage(log: dict, describe: Callable[[dict], str]) -> str:
    """``describe(stage config)`` once when every training stage gives the same text, else
    each text with the stages it holds for: 'A in stages 1, 2; B in stage 3'."""
    texts = [describe(st["config"]) for st in training_stages(log)]
    if len(set(texts)) == 1:
        return texts[0]
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts, 1):
        groups.setdefault(text, []).append(i)
    return "; ".join(f"{text} in stage{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}" for text, ids in groups.items())


def _sd3_card_fields(log: dict) -> dict:
    config = log["config"]
    return dict(
        base_model=log.get("base_model", config.get("base_model")),
        shift_factor=log["vae_shift_factor"],
        timestep_sampling=_per_stage(log, _timestep_sampling),
        stages=_sd3_stages(log),
        commands=_sd3_commands(log),
        lr=_per_stage(log, lambda c: str(c["transformer_lr"])),
        ema_decay=config["ema_decay"],
        final_loss=log["final_transformer_loss"],
        text_encoder_training=_sd3_text_encoder_training(log),
        text_encoder_summary="trained with it" if text_encoder_stages(log) else "frozen",
        zero_tokens=(
            f" ({log['t5_placeholder_tokens']}; training fed one of them with attention weight {log['t5_placeholder_tokens']}, "
            "which gives the same velocities and gradients)"
            if "t5_placeholder_tokens" in log
            else ""
        ),
    )


def _sd3_text_encoder_training(log: dict) -> str:
    """The card's sentence on the CLIP text encoders: frozen, or how and in which stages they
    were trained with the transformer."""
    base = log.get("base_model", log["config"].get("base_model", "cdalign/tiny-shapes-sd"))
    stages = training_stages(log)
    trained = text_encoder_stages(log)
    if not trained:
        return f"The CLIP text encoder is {base}'s trained one, frozen; it serves as both `text_encoder` and `text_encoder_2`."
    where = "" if len(stages) == 1 else f" in stage{'s' if len(trained) > 1 else ''} {', '.join(map(str, trained))}"
    lrs = sorted({stages[i - 1]["config"]["text_encoder_lr"] for i in trained})
    return (
        f"`text_encoder` and `text_encoder_2` both start from {base}'s trained CLIP text encoder and are trained "
        f"apart, jointly with the transformer{where} (AdamW lr {', '.join(map(str, lrs))}, EMA like the transformer; "
        "their text projection stays the identity)."
    )


def _sd3_stages(log: dict) -> str:
    """'3800 steps (seed 0, warm-up 100) then 4200 steps continuing it (seed 1, no warm-up)'."""
    stages = training_stages(log)
    parts = []
    for i, st in enumerate(stages):
        c = st["config"]
        text = f"{c['transformer_steps']} steps (seed {c['seed']}, warm-up {c.get('warmup_steps', 0)})"
        parts.append(text if i == 0 else f"{text} continuing it")
    return " then ".join(parts)


SD3_PRETRAIN_RECIPE = "recipes/pretrain_tiny_sd3.yaml"
_NOT_IN_COMMANDS = {"output_dir", "init_transformer"}  # where a stage wrote / what it continued: said apart


def _pretrain_defaults(recipe: str = SD3_PRETRAIN_RECIPE) -> dict:
    """The PretrainConfig that ``--config recipe`` alone gives (recipes/pretrain_tiny.py's
    defaults under the recipe's keys)."""
    import dataclasses
    import importlib.util

    import yaml

    path = REPO_ROOT / "recipes" / "pretrain_tiny.py"
    spec = importlib.util.spec_from_file_location("_cdalign_pretrain_tiny", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    defaults = {f.name: f.default for f in dataclasses.fields(module.PretrainConfig)}
    return {**defaults, **(yaml.safe_load((REPO_ROOT / recipe).read_text()) or {})}


def _flag_value(value) -> str:
    """A config value as the recipe's command line takes it (booleans as true / false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _sd3_commands(log: dict) -> str:
    """The command of each training stage, oldest first: ``--config`` the SD3 pretraining
    recipe plus a flag for every value in which the stage's logged config differs from it,
    and ``--init_transformer`` for a stage that continued the one before."""
    recipe = _pretrain_defaults()
    commands = []
    for i, stage in enumerate(training_stages(log)):
        config = stage["config"]
        flags = [f"--{k} {_flag_value(v)}" for k, v in config.items() if k not in _NOT_IN_COMMANDS and recipe.get(k) != v]
        if i:
            flags.append(f"--init_transformer <stage {i}'s output_dir>")
        commands.append(" ".join([f"`accelerate launch recipes/pretrain_tiny.py --config {SD3_PRETRAIN_RECIPE}", *flags]) + "`")
    return " then ".join(commands)


@dataclass(frozen=True)
class CardArchitecture:
    """What the model card says differently per ``training_log.json`` architecture."""

    model_id: str
    tags: tuple[str, ...]
    summary: str
    pipeline: str  # the diffusers pipeline class, for the Use snippet
    load_kwargs: str  # extra from_pretrained arguments of the Use snippet
    training: str  # template of the Training section
    fields: object  # log -> the training template's architecture-specific fields
    remedy: Callable[[dict], str]  # training log -> what to try first when a gate fails (a sentence)


def _sd3_remedy(log: dict) -> str:
    if not text_encoder_stages(log):
        return (
            "The transformer follows the colour and background words but hardly the shape word (shape accuracy "
            "near the 33% of chance) while the text encoders stay frozen: training them with it "
            "(`--train_text_encoders true`, from this model with `--init_transformer`) is the first thing to try."
        )
    return (
        "The text encoders are already trained with the transformer, and circles and triangles mostly follow "
        "their word; squares are the weak shape (wobbly edges, so a drawn square rarely fills the 90% of its "
        "bounding box the classifier asks of a square). Continuing this model (`--init_transformer`) raised shape accuracy in every run so far; "
        "`python evaluation/shape_retention.py --model <this folder>` shows whether the transformer keeps a square "
        "it is handed at low noise. More blocks, heads or width did not help (README, flow models)."
    )

CARD_ARCHITECTURES = {
    "sd": CardArchitecture(
        model_id="cdalign/tiny-shapes-sd",
        tags=("stable-diffusion", "tiny", "shapes", "cdalign"),
        summary="A tiny Stable-Diffusion-architecture text-to-image model (64x64 pixels), trained from\nscratch on CPU",
        pipeline="StableDiffusionPipeline",
        load_kwargs="",
        training=SD_TRAINING,
        fields=_sd_card_fields,
        remedy=lambda log: "More UNet steps (`--unet_steps`) are the first thing to try.",
    ),
    "sd3": CardArchitecture(
        model_id="cdalign/tiny-shapes-sd3",
        tags=("stable-diffusion-3", "flow-matching", "rectified-flow", "tiny", "shapes", "cdalign"),
        summary=(
            "A tiny Stable-Diffusion-3-architecture (MMDiT transformer, rectified flow) text-to-image\n"
            "model (64x64 pixels) whose transformer is trained from scratch on CPU (VAE and CLIP text\n"
            "encoder reused from cdalign/tiny-shapes-sd, the VAE frozen, the text encoder {text_encoder_summary})"
        ),
        pipeline="StableDiffusion3Pipeline",
        load_kwargs=", text_encoder_3=None, tokenizer_3=None",
        training=SD3_TRAINING,
        fields=_sd3_card_fields,
        remedy=_sd3_remedy,
    ),
}


def proportion_ci(fraction: float, n: int) -> tuple[float, float]:
    """95% interval of a share measured on ``n`` images (one 0/1 outcome each), by the
    library's estimator (``cdalign.core.statistics.mean_and_ci``, normal approximation)."""
    import torch

    from cdalign.core.statistics import mean_and_ci

    hits = round(fraction * n)
    _, lo, hi = mean_and_ci(torch.cat([torch.ones(hits), torch.zeros(n - hits)]))
    return max(0.0, lo), min(1.0, hi)


def write_model_card(folder: Path, results: dict, command: str, grid: np.ndarray):
    """Write ``README.md`` (the model card, with the numbers of ``results``, the training
    log and component configs next to the weights) and ``samples.png`` (``grid``) into ``folder``."""
    from PIL import Image

    from cdalign.data.shapes import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, SIZES

    Image.fromarray(grid).save(folder / "samples.png", optimize=True)
    log = json.loads((folder / "training_log.json").read_text())
    arch = CARD_ARCHITECTURES[log.get("architecture", "sd")]
    best = results["best_guidance_scale"]
    gates = results["by_guidance"][str(best)]
    div = results["diversity"]
    shape_ci = proportion_ci(gates["shape_overall"], results["samples_per_color"] * len(COLOR_NAMES))
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    vae_config = _config(folder, "vae")
    shared = dict(
        seed=log["config"]["seed"],
        train_threads=log["torch_threads"],
        train_minutes=sum(st.get("total_seconds", 0) for st in training_stages(log)) / 60,
        unet_batch=log["config"]["batch_size"],
        scaling=vae_config["scaling_factor"],
        vae_fidelity=", ".join(f"{k} {v:.0%}" for k, v in log.get("vae_reconstruction_fidelity", {}).items()) or "not measured",
    )
    fields = arch.fields(log)
    training = arch.training.format(**shared, **fields)
    card = CARD_TEMPLATE.format(
        model_id=arch.model_id,
        tags="\n".join(f"- {t}" for t in arch.tags),
        summary=arch.summary.format(**fields),
        pipeline=arch.pipeline,
        load_kwargs=arch.load_kwargs,
        sampler=sampler_name(folder),
        architecture_table=architecture_table(folder, log),
        training=training,
        best=best,
        colors=", ".join(COLOR_NAMES),
        shapes=", ".join(SHAPES),
        backgrounds=", ".join(BACKGROUND_NAMES),
        sizes=", ".join(SIZES),
        weights_mb=weights / 1e6,
        command=command,
        eval_threads=results["torch_threads"],
        n=results["samples_per_color"],
        total=results["samples_per_color"] * len(COLOR_NAMES),
        table=format_table(results),
        color_min=gates["color_min"],
        shape_overall=gates["shape_overall"],
        shape_lo=shape_ci[0],
        shape_hi=shape_ci[1],
        center_std=div["center_std_px"],
        radius_std=div["radius_std_px"],
        distinct=div["distinct_fraction"],
        div_prompt=div["prompt"],
        div_n=results["diversity_seeds"],
        seconds=results["seconds_per_image_batch4_20steps"],
        gates=", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in results["gates"].items()),
        limitations=limitations(gates, arch.remedy(log)),
    )
    (folder / "README.md").write_text(card)


def limitations(gates: dict, remedy: str) -> str:
    """The card's limitations sentence, from the measured accuracies at the recommended guidance."""
    weakest = min(gates["shape"], key=gates["shape"].get)
    parts = [
        f"Shapes are drawn with soft edges: the weakest is the {weakest} "
        f"({gates['shape'][weakest]:.0%} recognised), the named background is followed in "
        f"{gates['background_overall']:.0%} of samples and the size in {gates['size_overall']:.0%}."
    ]
    if gates["shape_overall"] < 0.6 or gates["color_min"] < 0.8:
        parts.append(f"A quality gate fails (see above). {remedy}")
    return " ".join(parts)


CARD_TEMPLATE = """---
license: apache-2.0
library_name: diffusers
pipeline_tag: text-to-image
tags:
{tags}
---

# {model_id}

{summary} on the procedurally generated *shapes world* of `cdalign.data.shapes`. It is
embedded in cdalign so that rewards, constraints and composition have visible,
measurable effects offline and in tests; it is not a general image model.

![samples](samples.png)

*Rows: {colors}; columns: {shapes}. Prompts "a large <colour> <shape> on a <background>
background", guidance {best}, 20 {sampler} steps, one seed each.*

## Use

```python
from cdalign.models.pipeline import load_pipeline
pipe = load_pipeline("{model_id}")          # or {pipeline}.from_pretrained(<this folder>{load_kwargs})
image = pipe("a small red circle on a black background", num_inference_steps=20, guidance_scale={best}).images[0]
```

Recommended: **guidance scale {best}**, 20 {sampler} steps, resolution **64x64** (the default;
latents are 4x16x16).

## What it knows

Prompts of the form `a [size] <colour> <shape> [on a <background> background]`:
colours {colors}; shapes {shapes}; sizes {sizes}; backgrounds {backgrounds}. Size and
background may be left out ("a red circle"); the empty prompt draws any scene. Other
English tokenizes (byte-level base vocabulary, no unknown tokens) but means nothing to
the model.

## Architecture ({weights_mb:.1f} MB of fp32 safetensors)

{architecture_table}

## Training

{training}

## Quality (measured)

Command: `{command}` (torch threads: {eval_threads}).

Numbers below come from the numpy classifier of `cdalign.data.shapes` (border-median
background, majority nearest palette colour of the foreground pixels, foreground cut at
half the foreground's contrast, shape from the bounding-box fill ratio), never from a
learned reward. {n} full-caption prompts per
colour ({total} images, random shape / size / background, one seed each), 20 {sampler} steps:

{table}

At the recommended guidance {best}: worst colour {color_min:.0%} (gate >= 80%), shape
{shape_overall:.0%} [{shape_lo:.0%}, {shape_hi:.0%}] (gate >= 60% on the point estimate; 95% normal-approximation
interval over the {total} images). Diversity of "{div_prompt}" over {div_n} seeds: centre std
{center_std:.1f} px, half-extent std {radius_std:.1f} px, {distinct:.0%} of image pairs differ.
Generation: {seconds:.3f} s per image (batch of 4, 20 steps, guidance {best}).
Gates: {gates}.

## Limitations

One shape per image, no rotation, six colours, three backgrounds; anything else in a
prompt is ignored. {limitations}
"""


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cdalign/tiny-shapes-sd", help="Embedded name or diffusers folder.")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    parser.add_argument("--samples_per_color", type=int, default=32, help="Evaluation prompts per colour word.")
    parser.add_argument("--diversity_seeds", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="Seeds the evaluation prompts.")
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads; 0 keeps the default.")
    parser.add_argument(
        "--scheduler_shift", type=float, default=None, help="Flow-matching models: sample with this scheduler shift instead of the saved one."
    )
    parser.add_argument("--write_card", action="store_true", help="Write README.md and samples.png into the model folder.")
    args = parser.parse_args(argv)

    import torch

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    results = evaluate(args.model, args.guidance_scales, args.samples_per_color, args.diversity_seeds, args.seed, args.scheduler_shift)
    pipe = results.pop("_pipe")
    results["torch_threads"] = torch.get_num_threads()
    results["evaluation_seconds"] = round(time.perf_counter() - start, 1)
    print(format_table(results))
    print(json.dumps(results, indent=2))
    if args.write_card:
        folder = model_folder(args.model)
        grid = sample_grid(pipe, results["best_guidance_scale"])
        write_model_card(folder, results, " ".join(["python evaluation/tiny_quality.py", *(argv if argv is not None else sys.argv[1:])]), grid)
        print(f"wrote {folder / 'README.md'} and {folder / 'samples.png'}")


if __name__ == "__main__":
    main()

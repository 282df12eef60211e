"""The model card of an embedded tiny model (``cdalign/tiny-shapes-sd``, ``cdalign/tiny-shapes-sd3``),
written by ``python evaluation/tiny_quality.py --write_card`` through
:func:`cdalign.publishing.cards.write_model_card` (``kind="tiny_model"``): the template
``model_cards/tiny_shapes_model.md`` filled with the measured quality
(:func:`quality_table`), the architecture table read from the folder's component configs
(:func:`architecture_table`) and the training text read from ``training_log.json`` (the
``sd`` and ``sd3`` architectures differ: :data:`CARD_ARCHITECTURES`)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cdalign.core.statistics import mean_and_ci
from cdalign.data.shapes import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, SIZES
from cdalign.models.pretraining import PretrainConfig

# The repository root: the SD3 card's commands are the repository's pretraining recipe plus
# the flags each stage changed (cards are written from a checkout).
REPO_ROOT = Path(__file__).resolve().parents[2]


def quality_table(results: dict) -> str:
    """The measured numbers as a Markdown table, one row per guidance scale."""
    header = ["guidance", *COLOR_NAMES, "colour (all)", *SHAPES, "shape (all)", "background", "size"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scale, r in results["by_guidance"].items():
        cells = [scale, *(f"{r['color'][c]:.0%}" for c in COLOR_NAMES), f"{r['color_overall']:.0%}"]
        cells += [*(f"{r['shape'][s]:.0%}" for s in SHAPES), f"{r['shape_overall']:.0%}"]
        cells += [f"{r['background_overall']:.0%}", f"{r['size_overall']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    """The PretrainConfig that ``--config recipe`` alone gives (the config's defaults under
    the recipe's keys; ``recipe`` relative to the repository root)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
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
    hits = round(fraction * n)
    _, lo, hi = mean_and_ci(torch.cat([torch.ones(hits), torch.zeros(n - hits)]))
    return max(0.0, lo), min(1.0, hi)


def build_tiny_model_card(folder: str | os.PathLike, results: dict, command: str, template_path: str | os.PathLike) -> str:
    """The model card (``README.md``) of an embedded tiny model in ``folder``: the quality
    numbers of ``results`` (``cdalign.evaluation.tiny_quality.evaluate``, measured by
    ``command``), and the architecture and training read from the component configs and
    ``training_log.json`` next to the weights, rendered into ``template_path``
    (``model_cards/tiny_shapes_model.md``). The card shows ``samples.png`` from the folder."""
    folder = Path(folder)
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
    return Path(template_path).read_text(encoding="utf-8").format(
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
        table=quality_table(results),
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

"""The embedded tiny pretrained text-to-image models ``cdalign/tiny-shapes-sd`` and
``cdalign/tiny-shapes-sd3``.

A Stable-Diffusion-architecture pipeline (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, DDIMScheduler with SD 1.5's schedule) trained from scratch
on the shapes world (``cdalign.data.shapes``) by ``recipes/pretrain_tiny.py``, shipped in
diffusers format under ``cdalign/data/tiny-shapes-sd``. Its 64x64 pictures mean
something ("a large red circle on a black background"), so rewards, constraints and
composition have visible, measurable effects offline.

``cdalign/tiny-shapes-sd3`` is its flow-matching sibling: a StableDiffusion3Pipeline
(SD3Transformer2DModel trained by rectified flow, FlowMatchEulerDiscreteScheduler, no T5)
that reuses tiny-shapes-sd's trained VAE and CLIP text encoder (frozen), shipped under
``cdalign/data/tiny-shapes-sd3`` (``recipes/pretrain_tiny.py --config
recipes/pretrain_tiny_sd3.yaml``).

This module holds what the recipe and the loader share: the tokenizer, the untrained
component configs, and the packaged folder's location. Nothing runs on import.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

from cdalign.data.shapes import VOCABULARY
from cdalign.models.tiny import clip_text_encoder, sd_ddim_scheduler

TINY_SHAPES_ID = "cdalign/tiny-shapes-sd"
TINY_SHAPES_SD3_ID = "cdalign/tiny-shapes-sd3"
# Sampling defaults the model cards recommend (measured by evaluation/tiny_quality.py).
RECOMMENDED_GUIDANCE_SCALE = 3.0
RECOMMENDED_NUM_INFERENCE_STEPS = 20
RECOMMENDED_SD3_GUIDANCE_SCALE = 3.0
RECOMMENDED_SD3_NUM_INFERENCE_STEPS = 20
SD3_SCHEDULER_SHIFT = 1.0  # FlowMatchEulerDiscreteScheduler shift the sd3 model ships with
IMAGE_RESOLUTION = 64  # pixels; the UNet works on 4 x 16 x 16 latents (VAE factor 4)
LATENT_SIZE = 16
INITIAL_LOGVAR = -6.0  # initial VAE posterior log-variance (see build_untrained_components)

# Words made single tokens: the shapes-world vocabulary plus a few glue words that
# composed or rephrased prompts use.
EXTRA_WORDS = ("an", "the", "and", "with", "of", "in", "shape", "picture", "photo")


def tiny_shapes_sd_path() -> Path:
    """The packaged diffusers folder of ``cdalign/tiny-shapes-sd``."""
    path = Path(__file__).resolve().parents[1] / "data" / "tiny-shapes-sd"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded model {TINY_SHAPES_ID!r} is missing at {path}; "
            "rebuild it with `accelerate launch recipes/pretrain_tiny.py`"
        )
    return path


def tiny_shapes_sd3_path() -> Path:
    """The packaged diffusers folder of ``cdalign/tiny-shapes-sd3``."""
    path = Path(__file__).resolve().parents[1] / "data" / "tiny-shapes-sd3"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded model {TINY_SHAPES_SD3_ID!r} is missing at {path}; rebuild it with "
            "`accelerate launch recipes/pretrain_tiny.py --config recipes/pretrain_tiny_sd3.yaml`"
        )
    return path


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair-encoding merges that make every word in ``words`` one token.

    Plain BPE training on the word list: repeatedly merge the most frequent adjacent
    pair (ties broken alphabetically) until every word is a single symbol. Because the
    merges are learned jointly, applying them by rank reproduces the learned
    segmentation, so no word's merge chain is broken by another word's merge. Words are
    split into characters with CLIP's end-of-word suffix on the last one."""
    segmentation = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for seg in segmentation.values() for pair in zip(seg, seg[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, seg in segmentation.items():
            merged, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    merged.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    merged.append(seg[i])
                    i += 1
            segmentation[word] = merged


def shapes_clip_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer built offline: the byte-level base vocabulary of
    ``cdalign.models.tiny.byte_level_clip_tokenizer`` (so any text, any script, tokenizes
    without unknown tokens) plus BPE merges that make each shapes-world word one token.

    Ids: 0-255 the byte symbols, 256-511 their end-of-word forms, then the merged
    symbols in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (also pad)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer


    words = sorted({w for w in VOCABULARY + EXTRA_WORDS if len(w) > 1})
    merges = _learn_merges(words)
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_untrained_components(seed: int = 0) -> dict:
    """Randomly initialised components of the tiny shapes model (deterministic for
    ``seed``; the global torch RNG is restored afterwards). Returns a dict with ``unet``
    (4x16x16 latents, channels (32, 64, 64), cross-attention 64), ``vae`` (64x64 RGB <->
    4x16x16, channels (16, 32, 64)), ``text_encoder`` (CLIP, hidden 64 x 4 layers),
    ``tokenizer`` and ``scheduler`` (DDIM with SD 1.5's training schedule)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel


    tokenizer = shapes_clip_tokenizer()
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            # Few, wide GroupNorm groups (8-16 channels each; SD has 10): a group
            # normalises away its own mean and scale, and with 1-2 channels per group
            # that erases a flat region's absolute colour, which is all this world is.
            norm_num_groups=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=[16, 32, 64],
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            latent_channels=4,
            norm_num_groups=1,  # one group: the norm keeps the direction of a colour
            mid_block_add_attention=False,  # no global attention needed for one flat shape
            sample_size=IMAGE_RESOLUTION,
        )
        # Start the posterior narrow (log-variance -6, std 0.05): at the default 0 the
        # latent noise drowns the code and reconstruction stalls for hundreds of steps.
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels :].fill_(INITIAL_LOGVAR)
        text_encoder = clip_text_encoder(tokenizer, hidden_size=64, intermediate_size=128, num_layers=4)
    finally:
        torch.random.set_rng_state(rng_state)
    scheduler = sd_ddim_scheduler()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def clip_with_projection(text_encoder_folder: str | Path):
    """A ``CLIPTextModelWithProjection`` holding the weights of the ``CLIPTextModel`` saved
    in ``text_encoder_folder``, with an identity ``text_projection`` (projection_dim =
    hidden size), so its pooled output is the trained encoder's final-layer-norm state at
    the end-of-text token. Frozen and in eval mode."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    trained = CLIPTextModel.from_pretrained(Path(text_encoder_folder))
    config = copy.deepcopy(trained.config)
    config.projection_dim = config.hidden_size
    config.architectures = ["CLIPTextModelWithProjection"]
    model = CLIPTextModelWithProjection(config)
    # transformers 5: CLIPTextModel holds the text transformer itself; older versions nest it as .text_model
    model.text_model.load_state_dict(getattr(trained, "text_model", trained).state_dict())
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return model.eval().requires_grad_(False)


def sincos_position_table(transformer, position_step: float):
    """The 2D sincos position table of an ``SD3Transformer2DModel`` (its ``pos_embed.pos_embed``
    buffer, which diffusers saves with the weights and loads back) with token ``(i, j)`` at
    position ``(position_step * i, position_step * j)``. diffusers' own table is
    ``position_step`` 1: its fastest frequency turns 1 rad per token and most of its 16
    frequencies per axis hardly change across a 16-token grid, so neighbouring tokens' positions
    differ little; at 3 the fastest turns 3 rad (just under Nyquist, pi) and half of them vary
    across the grid. What this buys was not measured on its own (README, flow models)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    grid = transformer.config.pos_embed_max_size
    table = get_2d_sincos_pos_embed(transformer.inner_dim, grid, base_size=grid * position_step, output_type="pt")
    return table.float().unsqueeze(0)


def dit_initialization(transformer) -> None:
    """The initialisation DiT trains from (Peebles & Xie 2023, "adaLN-Zero"), on an
    ``SD3Transformer2DModel``: every linear layer and the patch embedding Xavier-uniform with
    zero bias, the timestep MLP normal(0, 0.02), and the modulation of every block
    (``norm1``, ``norm1_context``) and of the output (``norm_out``), plus ``proj_out``, zero, so
    each block starts as the identity and the model starts by predicting 0. diffusers builds
    its models for loading weights and leaves PyTorch's default initialisation."""
    import torch

    with torch.no_grad():
        for module in transformer.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        embedder = transformer.time_text_embed.timestep_embedder
        for layer in (embedder.linear_1, embedder.linear_2):
            torch.nn.init.normal_(layer.weight, std=0.02)
        zeroed = [transformer.norm_out.linear, transformer.proj_out]
        for block in transformer.transformer_blocks:
            zeroed += [block.norm1.linear, block.norm1_context.linear]
        for layer in zeroed:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)


# How a tiny flow transformer's weights start: PretrainConfig.transformer_init -> (transformer) -> None.
TRANSFORMER_INITIALIZATIONS = {"diffusers": lambda transformer: None, "dit": dit_initialization}


def build_untrained_sd3_components(
    seed: int = 0,
    base_path: str | Path | None = None,
    num_layers: int = 4,
    attention_head_dim: int = 32,
    num_attention_heads: int = 2,
    scheduler_shift: float = SD3_SCHEDULER_SHIFT,
    patch_size: int = 2,
    position_step: float = 1.0,
    initialization: str = "diffusers",
) -> dict:
    """Components of ``cdalign/tiny-shapes-sd3`` before its training: a randomly
    initialised ``transformer`` (SD3Transformer2DModel on 4x16x16 latents, ``patch_size``,
    ``num_layers`` joint blocks of ``num_attention_heads`` x ``attention_head_dim``;
    deterministic for ``seed``, the global torch RNG is restored afterwards), and the
    *trained* parts of tiny-shapes-sd (``base_path``; default the embedded folder): its
    ``vae`` (frozen; ``shift_factor`` 0.0 until the recipe measures it), ``text_encoder``
    and ``text_encoder_2`` (both its CLIP text encoder as CLIPTextModelWithProjection,
    identity projection, frozen), ``tokenizer`` / ``tokenizer_2`` (its tokenizer), and a
    ``scheduler`` (FlowMatchEulerDiscreteScheduler, 1000 steps, ``scheduler_shift``).
    ``position_step``: see :func:`sincos_position_table` (1 keeps diffusers' table).
    ``initialization``: a key of ``TRANSFORMER_INITIALIZATIONS``.

    SD3's ``encode_prompt`` concatenates the two encoders' penultimate hidden states
    (2 x 64 = 128 wide) and, with no T5, appends zero tokens of width
    ``joint_attention_dim``; so ``joint_attention_dim`` = 128 and ``pooled_projection_dim``
    = 128 (the two 64-d pooled outputs)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTokenizer

    base = Path(base_path) if base_path is not None else tiny_shapes_sd_path()
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(base / "tokenizer")
    rng_state = torch.random.get_rng_state()  # loading also initialises (then overwrites) weights
    try:
        vae = AutoencoderKL.from_pretrained(base / "vae").eval().requires_grad_(False)
        if vae.config.shift_factor is None:
            vae.register_to_config(shift_factor=0.0)
        text_encoder = clip_with_projection(base / "text_encoder")
        text_encoder_2 = clip_with_projection(base / "text_encoder")
        clip_width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        pooled_width = text_encoder.config.projection_dim + text_encoder_2.config.projection_dim
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=LATENT_SIZE,
            patch_size=patch_size,
            in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=clip_width,
            caption_projection_dim=attention_head_dim * num_attention_heads,
            pooled_projection_dim=pooled_width,
            pos_embed_max_size=LATENT_SIZE // patch_size,
        )
        if initialization not in TRANSFORMER_INITIALIZATIONS:
            raise ValueError(f"initialization={initialization!r}: expected one of {sorted(TRANSFORMER_INITIALIZATIONS)}")
        TRANSFORMER_INITIALIZATIONS[initialization](transformer)
        if position_step != 1.0:
            transformer.pos_embed.pos_embed.copy_(sincos_position_table(transformer, position_step))
    finally:
        torch.random.set_rng_state(rng_state)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=scheduler_shift)
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )

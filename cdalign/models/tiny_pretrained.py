"""The embedded tiny pretrained text-to-image model ``cdalign/tiny-shapes-sd``.

A Stable-Diffusion-architecture pipeline (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, DDIMScheduler with SD 1.5's schedule) trained from scratch
on the shapes world (``cdalign.data.shapes``) by ``recipes/pretrain_tiny.py``, shipped in
diffusers format under ``cdalign/data/tiny-shapes-sd``. Its 64x64 pictures mean
something ("a large red circle on a black background"), so rewards, constraints and
composition have visible, measurable effects offline.

This module holds what the recipe and the loader share: the tokenizer, the untrained
component configs, and the packaged folder's location. Nothing runs on import.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cdalign.data.shapes import VOCABULARY
from cdalign.models.tiny import clip_text_encoder, sd_ddim_scheduler

TINY_SHAPES_ID = "cdalign/tiny-shapes-sd"
# Sampling defaults the model card recommends (measured by evaluation/tiny_quality.py).
RECOMMENDED_GUIDANCE_SCALE = 3.0
RECOMMENDED_NUM_INFERENCE_STEPS = 20
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

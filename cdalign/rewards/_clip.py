"""Shared pieces of the CLIP-based rewards (aesthetic, CLIPScore, PickScore, HPS v2, MPS):
loading and validating tokenizers and image transforms, embedding text and images with
a transformers ``CLIPModel``, and converting OpenCLIP checkpoints to that model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from cdalign.console import quiet_libraries
from cdalign.hub_access.model_files import CLIP_TOKENIZER_FILES, PREPROCESSOR_FILES, require_file, resolve_folder
from cdalign.rewards._preprocess import (
    ImageTransform,
    transform_from_preprocessor_config,
)

# A real CLIP BPE vocabulary has 49408 tokens; transformers 5.x builds a 2-token
# tokenizer, without raising, when the vocabulary files are missing.
MIN_TOKENIZER_VOCAB = 100
CLIP_CONTEXT_LENGTH = 77


def check_tokenizer(tokenizer, embedding_rows: int | None, source: str, purpose: str):
    """Fail loudly on a tokenizer whose vocabulary was not found (a handful of tokens) or
    that does not fit the text model's embedding table."""
    size = len(tokenizer)
    if size < MIN_TOKENIZER_VOCAB:
        raise RuntimeError(
            f"{purpose}: the tokenizer loaded from {source!r} has only {size} tokens, so its vocabulary files "
            f"were not found ({', '.join(CLIP_TOKENIZER_FILES)}); fetch them or fix the path"
        )
    if embedding_rows is not None and size > embedding_rows:
        raise RuntimeError(
            f"{purpose}: the tokenizer from {source!r} has {size} tokens but the text model embeds only "
            f"{embedding_rows}; tokenizer and model do not belong together"
        )
    return tokenizer


def load_clip_tokenizer(model_id: str, *, revision: str | None, purpose: str, embedding_rows: int | None):
    """A validated ``CLIPTokenizer`` from a Hub id or local folder."""
    from transformers import CLIPTokenizer

    folder = resolve_folder(model_id, CLIP_TOKENIZER_FILES, revision=revision, purpose=f"{purpose} tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    return check_tokenizer(tokenizer, embedding_rows, model_id, purpose)


def load_image_transform(model_id: str, *, revision: str | None, purpose: str) -> ImageTransform:
    """The differentiable equivalent of the CLIP image processor stored in ``model_id``."""
    folder = resolve_folder(model_id, PREPROCESSOR_FILES, revision=revision, purpose=f"{purpose} image processor")
    return transform_from_preprocessor_config(require_file(folder, "preprocessor_config.json", model_id, purpose))


def tokenize(tokenizer, prompts: Sequence[str], device, max_length: int = CLIP_CONTEXT_LENGTH):
    """Token ids and attention mask, padded to ``max_length`` and truncated: (B, L) each."""
    batch = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def text_embeds(clip_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Projected pooled (end-of-text) text embedding, not normalised: (B, L) -> (B, D)."""
    pooled = clip_model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return clip_model.text_projection(pooled)


def image_embeds(clip_model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected pooled (class-token) image embedding, not normalised: (B, 3, h, w) -> (B, D)."""
    pooled = clip_model.vision_model(pixel_values=pixel_values).pooler_output
    return clip_model.visual_projection(pooled)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x||_2 along the last dimension."""
    return x / x.norm(dim=-1, keepdim=True)


def cosine_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of paired embeddings: (B, D), (B, D) -> (B,) in [-1, 1]."""
    return (l2_normalize(image_features) * l2_normalize(text_features)).sum(dim=-1)


# ---------------------------------------------------------------------------------------
# OpenCLIP -> transformers CLIPModel state dict.
#
# OpenCLIP (github.com/mlfoundations/open_clip) stores a CLIP as ``visual.*`` (vision
# tower), top-level text tower keys, ``nn.MultiheadAttention`` with fused
# ``in_proj_weight`` (q, k, v stacked along dim 0), and projections as (width, dim)
# matrices applied as ``x @ proj``. transformers' CLIPModel splits q/k/v and stores the
# projections as ``nn.Linear`` weights, i.e. the transpose.
# ---------------------------------------------------------------------------------------

_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_OPEN_CLIP_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_OPEN_CLIP_IGNORED = {"attn_mask", "logit_bias"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def open_clip_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/reshape an OpenCLIP ViT CLIP state dict (e.g. ViT-H-14, as in HPS v2's
    checkpoints) into transformers ``CLIPModel`` keys. Unknown keys raise ValueError, so
    an architecture this mapping does not cover (layer scale, attention pooling, a
    non-linear text projection) fails loudly instead of loading partially."""
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key in _OPEN_CLIP_IGNORED:
            continue
        if key in _OPEN_CLIP_TOP:
            converted[_OPEN_CLIP_TOP[key]] = value
        elif key in _OPEN_CLIP_TRANSPOSED:
            converted[_OPEN_CLIP_TRANSPOSED[key]] = value.t().contiguous()
        elif key == "text_projection.weight":  # OpenCLIP configs with a Linear text projection
            converted["text_projection.weight"] = value
        elif match := _RESBLOCK.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{match.group(2)}."
            rest = match.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[-1]  # "weight" or "bias"
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    converted[f"{prefix}self_attn.{name}.{kind}"] = chunk.contiguous()
                continue
            module, _, param = rest.rpartition(".")
            if module in _OPEN_CLIP_BLOCK:
                converted[f"{prefix}{_OPEN_CLIP_BLOCK[module]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"OpenCLIP checkpoint has {len(unknown)} keys with no transformers CLIPModel equivalent: "
            f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    return converted


def build_clip_from_config(config_folder: Path, purpose: str):
    """A randomly initialised ``CLIPModel`` from ``config_folder/config.json`` (weights to be
    loaded by the caller)."""
    from transformers import CLIPConfig, CLIPModel


    with quiet_libraries():
        config = CLIPConfig.from_pretrained(str(config_folder))
    return CLIPModel(config)

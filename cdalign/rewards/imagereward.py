"""ImageReward (Xu et al. 2023, arXiv 2304.05977; github.com/THUDM/ImageReward).

Architecture (``ImageReward.ImageReward``): BLIP with a ViT-L/16 image encoder at 224 px
(``blip.visual_encoder``, timm-style ViT, LayerNorm eps 1e-6) and a BERT-base text
encoder with cross-attention to the image tokens in every layer
(``blip.text_encoder``, BLIP's ``med.py``); the prompt is tokenised with
``bert-base-uncased`` (+ BLIP's ``[DEC]``/``[ENC]`` tokens, 30524 in all), padded to 35
tokens, and the [CLS] output of the image-conditioned text encoder goes through the
aesthetic-style MLP head ``mlp``:

    score = (MLP(text_encoder(prompt | image)[:, 0]) - 0.16717362830052426) / 1.0333394966054072

(mean/std of the raw head on ImageReward's data), so scores are roughly standardised.

Here the BLIP parts map onto transformers modules: ``blip.visual_encoder.*`` ->
``BlipVisionModel`` (renamed keys, same fused qkv layout), ``blip.text_encoder.*`` ->
``BlipTextModel`` (identical names; built with cross-attention layers and run
bidirectionally). Weights: ``ImageReward.pt`` (a plain state dict, read with
``weights_only=True``) and ``med_config.json`` from Hub repo ``THUDM/ImageReward``; the
vision config (width, depth, heads = width/64, patch, image size) is read off the
checkpoint's shapes. ``blip.vision_proj``/``blip.text_proj`` (unused by the score) are
ignored. Image preprocessing: bicubic resize to 224 + center crop + CLIP mean/std.
"""

from __future__ import annotations

import json
import math
import re
from typing import Mapping, Sequence

import torch

from cdalign.console import quiet_libraries
from cdalign.hub_access.model_files import require_file, resolve_folder
from cdalign.rewards._loading import load_into, load_state_dict
from cdalign.rewards._preprocess import clip_transform
from cdalign.rewards.aesthetic import AestheticMLP
from cdalign.rewards.base import REWARDS, Reward, check_inputs

DEFAULT_IMAGEREWARD_ID = "THUDM/ImageReward"
DEFAULT_IMAGEREWARD_FILE = "ImageReward.pt"
DEFAULT_IMAGEREWARD_TOKENIZER_ID = "google-bert/bert-base-uncased"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35
BLIP_VIT_LAYER_NORM_EPS = 1e-6
BLIP_VIT_HEAD_DIM = 64
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_VIT_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIT_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VIT_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def blip_vit_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BLIP ViT keys (without the ``blip.visual_encoder.`` prefix) -> ``BlipVisionModel`` keys."""
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if key in _VIT_TOP:
            converted[_VIT_TOP[key]] = value
        elif (match := _VIT_BLOCK_KEY.match(key)) and match.group(2) in _VIT_BLOCK:
            converted[f"encoder.layers.{match.group(1)}.{_VIT_BLOCK[match.group(2)]}.{match.group(3)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"BLIP ViT checkpoint keys with no BlipVisionModel equivalent: {unknown[:10]}")
    return converted


def blip_vision_config_from_checkpoint(vit: Mapping[str, torch.Tensor]):
    """``BlipVisionConfig`` read off BLIP ViT weight shapes (keys without prefix)."""
    from transformers import BlipVisionConfig

    width = vit["cls_token"].shape[-1]
    patch = vit["patch_embed.proj.weight"].shape[-1]
    num_patches = vit["pos_embed"].shape[1] - 1
    depth = 1 + max(int(m.group(1)) for k in vit if (m := _VIT_BLOCK_KEY.match(k)))
    side = math.isqrt(num_patches)
    if side * side != num_patches or width % BLIP_VIT_HEAD_DIM:
        raise ValueError(f"unexpected BLIP ViT shapes: {num_patches} patches, width {width}")
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vit["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=width // BLIP_VIT_HEAD_DIM,
        image_size=side * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=BLIP_VIT_LAYER_NORM_EPS,
    )


def blip_text_config_from_med_config(med_config: Mapping, encoder_width: int):
    """``BlipTextConfig`` equivalent to BLIP's BERT ``med_config.json`` with cross-attention
    to ``encoder_width``-dimensional image tokens."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=None,
        sep_token_id=None,
        eos_token_id=None,
        is_decoder=True,  # transformers builds the cross-attention layers only for decoders
    )


def imagereward_score(cls_features: torch.Tensor, head: AestheticMLP) -> torch.Tensor:
    """Standardised ImageReward score from the [CLS] feature: (B, 768) -> (B,)."""
    return (head(cls_features) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def load_blip_tokenizer(tokenizer_id: str, revision: str | None, vocab_size: int, purpose: str):
    """bert-base-uncased plus BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens, validated to
    have exactly the text encoder's vocabulary size."""
    from transformers import BertTokenizer

    folder = resolve_folder(tokenizer_id, BERT_TOKENIZER_FILES, revision=revision, purpose=f"{purpose} tokenizer")
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    # Same additions as BLIP's init_tokenizer(); the score never uses them, but they
    # make the vocabulary size match the checkpoint's embedding table.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    if len(tokenizer) != vocab_size:
        raise RuntimeError(
            f"{purpose}: the tokenizer from {tokenizer_id!r} has {len(tokenizer)} tokens (with [DEC], [ENC]) but the "
            f"text encoder embeds {vocab_size}; expected bert-base-uncased's vocabulary (files "
            f"{', '.join(BERT_TOKENIZER_FILES)} not found or wrong tokenizer)"
        )
    return tokenizer


class ImageRewardReward(Reward):
    """ImageReward score of each (image, prompt) pair (higher = preferred by people).

    Args:
        model_id / revision: Hub id or local folder with ``ImageReward.pt`` and ``med_config.json``.
        filename: the checkpoint file (``.pt`` read with ``weights_only=True``, or ``.safetensors``).
        tokenizer_id / tokenizer_revision: bert-base-uncased tokenizer files.
    """

    name = "imagereward"
    purpose = "imagereward reward"

    def __init__(
        self,
        model_id: str = DEFAULT_IMAGEREWARD_ID,
        revision: str | None = None,
        filename: str = DEFAULT_IMAGEREWARD_FILE,
        tokenizer_id: str = DEFAULT_IMAGEREWARD_TOKENIZER_ID,
        tokenizer_revision: str | None = None,
    ):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel


        folder = resolve_folder(model_id, (filename, "med_config.json"), revision=revision, purpose=self.purpose)
        med_config = json.loads(require_file(folder, "med_config.json", model_id, self.purpose).read_text())
        checkpoint = load_state_dict(require_file(folder, filename, model_id, self.purpose), self.purpose)
        where = f"{self.purpose} ({model_id}/{filename})"

        parts = {"blip.visual_encoder.": {}, "blip.text_encoder.": {}, "mlp.": {}}
        for key, value in checkpoint.items():
            for prefix, bucket in parts.items():
                if key.startswith(prefix):
                    bucket[key[len(prefix) :]] = value
        vit = parts["blip.visual_encoder."]
        if not vit or not parts["blip.text_encoder."] or not parts["mlp."]:
            raise RuntimeError(f"{where}: expected blip.visual_encoder.*, blip.text_encoder.* and mlp.* weights")

        with quiet_libraries():
            self.vision = BlipVisionModel(blip_vision_config_from_checkpoint(vit))
            self.text = BlipTextModel(
                blip_text_config_from_med_config(med_config, self.vision.config.hidden_size), add_pooling_layer=False
            )
        load_into(self.vision, blip_vit_to_transformers(vit), f"{where} visual encoder")
        load_into(self.text, parts["blip.text_encoder."], f"{where} text encoder", ignore=("embeddings.position_ids",))
        self.head = AestheticMLP(self.text.config.hidden_size)
        load_into(self.head, parts["mlp."], f"{where} head")

        self.tokenizer = load_blip_tokenizer(tokenizer_id, tokenizer_revision, self.text.config.vocab_size, self.purpose)
        self.transform = clip_transform(self.vision.config.image_size)
        self.max_length = min(IMAGEREWARD_MAX_LENGTH, self.text.config.max_position_embeddings)
        self.freeze()

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(images, prompts, needs_prompts=True)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        image_tokens = self.vision(pixel_values=self.transform(images)).last_hidden_state
        text = self.text(
            input_ids=tokens["input_ids"].to(images.device),
            attention_mask=tokens["attention_mask"].to(images.device),
            encoder_hidden_states=image_tokens,  # all image tokens attended (ImageReward's mask is all ones)
            is_decoder=False,
        ).last_hidden_state
        return imagereward_score(text[:, 0, :], self.head).float()


REWARDS.register("imagereward", ImageRewardReward)

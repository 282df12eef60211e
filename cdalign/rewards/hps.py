"""Human Preference Score v2 (Wu et al. 2023, arXiv 2306.09341; github.com/tgxs002/HPSv2).

HPS v2 is an OpenCLIP ViT-H-14 fine-tuned on human preferences. Its score is the
cosine similarity of the normalised image and prompt embeddings (``hpsv2.score``
computes ``image_features @ text_features.T`` on normalised features, no logit scale),
so values lie in [-1, 1] (typically ~0.2-0.3).

open_clip cannot be installed beside this project's torch, so the checkpoint is
converted in code to a transformers ``CLIPModel``:
- weights: ``HPS_v2_compressed.pt`` (HPS v2.0, the hpsv2 package's default) or
  ``HPS_v2.1_compressed.pt`` (v2.1; pass ``filename=``) from Hub repo ``xswu/HPSv2``;
  a ``{"state_dict": {...}}`` of fp16 tensors (read with ``weights_only=True``, cast to
  float32) renamed by ``open_clip_to_transformers``;
- architecture, tokenizer and preprocessing: ``config.json``, tokenizer files and
  ``preprocessor_config.json`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the OpenCLIP
  model HPS v2 was fine-tuned from; its weights are not downloaded). OpenCLIP's
  validation transform (bicubic shorter-side resize to 224, center crop, OpenAI CLIP
  mean/std) is what that file describes. The transformers CLIP tokenizer gives the same
  ids as OpenCLIP's for ordinary prompts (it does not run ftfy text repair).
"""

from __future__ import annotations

from typing import Sequence

import torch

from cdalign.hub_access.model_files import require_file, resolve_folder
from cdalign.rewards._clip import (
    build_clip_from_config,
    cosine_similarity,
    image_embeds,
    load_clip_tokenizer,
    load_image_transform,
    open_clip_to_transformers,
    text_embeds,
    tokenize,
)
from cdalign.rewards._loading import load_into, load_state_dict
from cdalign.rewards.base import REWARDS, Reward, check_inputs

DEFAULT_HPS_ID = "xswu/HPSv2"
DEFAULT_HPS_FILE = "HPS_v2_compressed.pt"
DEFAULT_HPS_CLIP_CONFIG_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def hps_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """HPS v2: cosine similarity of image and prompt embeddings, (B, D), (B, D) -> (B,)."""
    return cosine_similarity(image_features, text_features)


class HPSv2Reward(Reward):
    """HPS v2 score of each (image, prompt) pair (higher = preferred by people).

    Args:
        model_id / revision: Hub id or local folder holding the HPS checkpoint.
        filename: ``HPS_v2_compressed.pt`` (v2.0) or ``HPS_v2.1_compressed.pt`` (v2.1), or a
            ``.safetensors`` file with the same OpenCLIP keys.
        clip_config_id / clip_config_revision: where the ViT-H-14 ``config.json``, tokenizer
            and ``preprocessor_config.json`` come from.
    """

    name = "hps"
    purpose = "hps reward"

    def __init__(
        self,
        model_id: str = DEFAULT_HPS_ID,
        revision: str | None = None,
        filename: str = DEFAULT_HPS_FILE,
        clip_config_id: str = DEFAULT_HPS_CLIP_CONFIG_ID,
        clip_config_revision: str | None = None,
    ):
        super().__init__()
        config_folder = resolve_folder(
            clip_config_id, ("config.json",), revision=clip_config_revision, purpose=f"{self.purpose} CLIP config"
        )
        require_file(config_folder, "config.json", clip_config_id, self.purpose)
        self.clip = build_clip_from_config(config_folder, self.purpose)
        folder = resolve_folder(model_id, (filename,), revision=revision, purpose=f"{self.purpose} checkpoint")
        checkpoint = load_state_dict(require_file(folder, filename, model_id, self.purpose), self.purpose)
        load_into(self.clip, open_clip_to_transformers(checkpoint), f"{self.purpose} ({model_id}/{filename})")
        self.tokenizer = load_clip_tokenizer(
            clip_config_id,
            revision=clip_config_revision,
            purpose=self.purpose,
            embedding_rows=self.clip.config.text_config.vocab_size,
        )
        self.transform = load_image_transform(clip_config_id, revision=clip_config_revision, purpose=self.purpose)
        self.max_length = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        self.freeze()

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(images, prompts, needs_prompts=True)
        with torch.no_grad():
            input_ids, attention_mask = tokenize(self.tokenizer, prompts, images.device, self.max_length)
            text = text_embeds(self.clip, input_ids, attention_mask)
        image = image_embeds(self.clip, self.transform(images))
        return hps_score(image, text).float()


REWARDS.register("hps", HPSv2Reward)

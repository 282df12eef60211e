"""CLIPScore (Hessel et al. 2021, arXiv 2104.08718): image-prompt agreement measured by
CLIP ViT-L/14 (``openai/clip-vit-large-patch14``).

score = scale * cos(image embedding, prompt embedding), scale = 100 by default, i.e.
torchmetrics' ``CLIPScore`` convention (Hessel et al. use 2.5 and both clamp negative
similarities to 0). The clamp is off by default because it zeroes the gradient of
every image whose similarity is negative; pass ``clamp_negative=True`` for the metric.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cdalign.hub_access.model_files import resolve_transformers_model
from cdalign.rewards._clip import (
    cosine_similarity,
    image_embeds,
    load_clip_tokenizer,
    load_image_transform,
    text_embeds,
    tokenize,
)
from cdalign.rewards._loading import from_pretrained_checked
from cdalign.rewards.base import REWARDS, Reward, check_inputs

DEFAULT_CLIPSCORE_ID = "openai/clip-vit-large-patch14"


def clip_score(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: float = 100.0, clamp_negative: bool = False
) -> torch.Tensor:
    """``scale * cos(image, text)`` (optionally ``max(cos, 0)``): (B, D), (B, D) -> (B,)."""
    cos = cosine_similarity(image_features, text_features)
    return scale * (cos.clamp_min(0.0) if clamp_negative else cos)


class ClipSimilarityReward(Reward):
    """Base of rewards that compare a transformers ``CLIPModel``'s image and prompt
    embeddings (CLIPScore, PickScore). Text is encoded without gradient.

    Args:
        model_id / revision: Hub id or local folder of the ``CLIPModel`` (config + weights).
        processor_id / processor_revision: Hub id or folder with the tokenizer files and
            ``preprocessor_config.json``; defaults to ``model_id``.
    """

    purpose = "CLIP similarity reward"

    def __init__(
        self,
        model_id: str,
        revision: str | None = None,
        processor_id: str | None = None,
        processor_revision: str | None = None,
    ):
        super().__init__()
        from transformers import CLIPModel

        if processor_id is None:
            processor_id = model_id
            processor_revision = revision if processor_revision is None else processor_revision
        folder = resolve_transformers_model(model_id, revision=revision, purpose=f"{self.purpose} model")
        self.clip = from_pretrained_checked(CLIPModel, folder, f"{self.purpose} model")
        self.tokenizer = load_clip_tokenizer(
            processor_id,
            revision=processor_revision,
            purpose=self.purpose,
            embedding_rows=self.clip.config.text_config.vocab_size,
        )
        self.transform = load_image_transform(processor_id, revision=processor_revision, purpose=self.purpose)
        self.max_length = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        self.freeze()

    def embed(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised (image, text) embeddings, (B, D) each; gradient flows to images only."""
        check_inputs(images, prompts, needs_prompts=True)
        with torch.no_grad():
            input_ids, attention_mask = tokenize(self.tokenizer, prompts, images.device, self.max_length)
            text = text_embeds(self.clip, input_ids, attention_mask)
        image = image_embeds(self.clip, self.transform(images))
        return image, text


class CLIPScoreReward(ClipSimilarityReward):
    """CLIPScore of each (image, prompt) pair: ``scale * cos`` (see module docstring)."""

    name = "clipscore"
    purpose = "clipscore reward"

    def __init__(
        self,
        model_id: str = DEFAULT_CLIPSCORE_ID,
        revision: str | None = None,
        processor_id: str | None = None,
        processor_revision: str | None = None,
        scale: float = 100.0,
        clamp_negative: bool = False,
    ):
        super().__init__(model_id, revision, processor_id, processor_revision)
        self.scale = float(scale)
        self.clamp_negative = bool(clamp_negative)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image, text = self.embed(images, prompts)
        return clip_score(image, text, self.scale, self.clamp_negative).float()


REWARDS.register("clipscore", CLIPScoreReward)

"""PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569): a CLIP ViT-H/14
fine-tuned on human preferences between generated images.

score = exp(logit_scale) * cos(image embedding, prompt embedding), the quantity the
model card's ``calc_probs`` feeds to a softmax (typical values ~18-23).

Weights: ``yuvalkirstain/PickScore_v1`` (a transformers ``CLIPModel``); tokenizer and
image preprocessing come from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` as on the model
card (only its tokenizer and ``preprocessor_config.json`` are fetched).
"""

from __future__ import annotations

from typing import Sequence

import torch

from cdalign.rewards._clip import cosine_similarity
from cdalign.rewards.base import REWARDS
from cdalign.rewards.clipscore import ClipSimilarityReward

DEFAULT_PICKSCORE_ID = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def pick_score(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) * cos(image, text)``: (B, D), (B, D), scalar -> (B,)."""
    return logit_scale.exp() * cosine_similarity(image_features, text_features)


class PickScoreReward(ClipSimilarityReward):
    """PickScore of each (image, prompt) pair (higher = preferred by people).

    Args: see ``ClipSimilarityReward``; ``processor_id`` defaults to the LAION ViT-H-14 repo.
    """

    name = "pickscore"
    purpose = "pickscore reward"

    def __init__(
        self,
        model_id: str = DEFAULT_PICKSCORE_ID,
        revision: str | None = None,
        processor_id: str = DEFAULT_PICKSCORE_PROCESSOR_ID,
        processor_revision: str | None = None,
    ):
        super().__init__(model_id, revision, processor_id, processor_revision)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image, text = self.embed(images, prompts)
        return pick_score(image, text, self.clip.logit_scale).float()


REWARDS.register("pickscore", PickScoreReward)

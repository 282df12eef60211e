"""LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor), the
aesthetic reward of DDPO (Black et al. 2023) and of TRL's DDPO example.

score = MLP( CLIP ViT-L/14 image embedding / ||.||_2 ), roughly on a 1-10 scale (the
AVA rating scale the head was trained to regress); prompt-free.

Weights, as TRL's DDPO uses them: the MLP head ``aesthetic-model.pth`` from the Hub repo
``trl-lib/ddpo-aesthetic-predictor`` (a copy of ``sac+logos+ava1-l14-linearMSE.pth``; a
plain tensor state dict, loaded with ``weights_only=True``), on top of the image tower
of ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cdalign.hub_access.model_files import require_file, resolve_folder, resolve_transformers_model
from cdalign.rewards._clip import l2_normalize
from cdalign.rewards._loading import from_pretrained_checked, load_into, load_state_dict
from cdalign.rewards._preprocess import clip_transform
from cdalign.rewards.base import REWARDS, Reward, check_inputs

DEFAULT_AESTHETIC_HEAD_ID = "trl-lib/ddpo-aesthetic-predictor"
DEFAULT_AESTHETIC_HEAD_FILE = "aesthetic-model.pth"
DEFAULT_AESTHETIC_CLIP_ID = "openai/clip-vit-large-patch14"


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head: five linear layers with dropout between
    them and **no** non-linearities (the original keeps its ReLUs commented out, so the
    head is an affine map at inference). Parameter names (``layers.0`` ... ``layers.7``)
    match the released checkpoints; ImageReward reuses the same head."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, input_size) -> (B,)."""
        return self.layers(features).squeeze(-1)


def aesthetic_score(normalized_embedding: torch.Tensor, head: AestheticMLP) -> torch.Tensor:
    """Aesthetic score from an L2-normalised CLIP image embedding: (B, 768) -> (B,)."""
    return head(normalized_embedding)


class AestheticReward(Reward):
    """LAION aesthetic score of each image (higher = more aesthetic; prompts ignored).

    Args:
        model_id: Hub id or local folder holding the MLP head file.
        revision: Hub revision of ``model_id``.
        filename: head weights inside ``model_id`` (``.safetensors``, or a tensor-only
            ``.pth`` read with ``weights_only=True``).
        clip_model_id / clip_revision: the CLIP ViT-L/14 whose image embedding the head reads.
    """

    name = "aesthetic"

    def __init__(
        self,
        model_id: str = DEFAULT_AESTHETIC_HEAD_ID,
        revision: str | None = None,
        filename: str = DEFAULT_AESTHETIC_HEAD_FILE,
        clip_model_id: str = DEFAULT_AESTHETIC_CLIP_ID,
        clip_revision: str | None = None,
    ):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        purpose = "aesthetic reward"
        clip_folder = resolve_transformers_model(clip_model_id, revision=clip_revision, purpose=f"{purpose} CLIP model")
        # The CLIP repo holds both towers; only the vision tower is kept.
        self.clip = from_pretrained_checked(
            CLIPVisionModelWithProjection, clip_folder, f"{purpose} CLIP model", allow_unexpected=True
        )
        self.transform = clip_transform(self.clip.config.image_size)
        head_folder = resolve_folder(model_id, (filename,), revision=revision, purpose=f"{purpose} head")
        head_path = require_file(head_folder, filename, model_id, f"{purpose} head")
        self.head = AestheticMLP(self.clip.config.projection_dim)
        load_into(self.head, load_state_dict(head_path, purpose), f"{purpose} head ({model_id}/{filename})")
        self.freeze()

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_inputs(images, prompts)
        pixels = self.transform(images)
        embedding = self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output)
        return aesthetic_score(l2_normalize(embedding), self.head).float()


REWARDS.register("aesthetic", AestheticReward)

__all__ = ["AestheticMLP", "AestheticReward", "aesthetic_score"]

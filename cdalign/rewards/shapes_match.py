"""``shapes_match``: does an image of the shapes world show what its prompt names?

A reward in the registry's sense (images and prompts -> one float per image) so that any
part of cdalign can score with it, but **not differentiable**: the numpy classifier
:func:`cdalign.data.shapes.classify_image` reads each image back into words (no learned
model), and :func:`cdalign.data.shapes.prompt_match` gives 1.0 when every property the
prompt names (colour, shape, size, background) is read back, else 0.0 (NaN when the prompt
names none). Concept composition scores each concept on its own prompt with it ("red",
"square", "black background"), and the minimum over concepts is the per-image verdict
(1 = the image shows every concept)."""

from __future__ import annotations

from typing import Sequence

import torch

from cdalign.data.shapes import prompt_match
from cdalign.rewards.base import REWARDS, Reward, check_inputs
from cdalign.rewards.metrics import to_uint8


class ShapesMatch(Reward):
    name = "shapes_match"
    differentiable = False

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(images, prompts, needs_prompts=True)
        values = [prompt_match(image, prompt) for image, prompt in zip(to_uint8(images), prompts)]
        return torch.tensor(values, dtype=torch.float32, device=images.device)


@REWARDS.register("shapes_match")
def _shapes_match() -> Reward:
    return ShapesMatch()

"""Evaluation metrics: checks of generated images that are *not* rewards (they sit beside
the rewards because both are image scorers selected by name; the config validates both).

A reward is something a run optimises or constrains; a metric here only watches, so an
aligned model can be graded by something independent of what it was trained on (e.g.
"does it still draw what the prompt says?"). Each metric maps images (B, 3, H, W) in
[0, 1] and their prompts to per-image values ``{name: (B,) float tensor}``; the trainer's
evaluation reports their means with 95% CIs for the base and the aligned model, and the
paired difference. Select them with the config field ``eval_metrics``."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from cdalign.data.shapes import classify_image, parse_prompt
from cdalign.registry import Registry

EVAL_METRICS: Registry[Callable[[torch.Tensor, Sequence[str]], dict[str, torch.Tensor]]] = Registry("evaluation metric")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8, as a PNG would store them."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


@EVAL_METRICS.register("shapes_accuracy")
def shapes_accuracy(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Shapes world (``cdalign/tiny-shapes-sd``): does each image show the colour and the
    shape its prompt names? Read back with the numpy classifier ``cdalign.data.shapes.classify_image``
    (nearest palette colour of the foreground majority; bounding-box fill ratio), which no
    reward uses. Returns ``color_accuracy``, ``shape_accuracy`` and ``background_accuracy``,
    1.0 per correct image; a prompt that names no colour (shape, background) counts as NaN
    for that metric and is left out."""

    color, shape, background = [], [], []
    for image, prompt in zip(to_uint8(images), prompts):
        seen, asked = classify_image(image), parse_prompt(prompt)
        color.append(float("nan") if asked["color"] is None else float(seen["color"] == asked["color"]))
        shape.append(float("nan") if asked["shape"] is None else float(seen["shape"] == asked["shape"]))
        background.append(float("nan") if asked["background"] is None else float(seen["background"] == asked["background"]))
    return {
        "color_accuracy": torch.tensor(color),
        "shape_accuracy": torch.tensor(shape),
        "background_accuracy": torch.tensor(background),
    }

"""Prompt fidelity for the shapes world: does the picture show the colour the prompt names?

``prompt_fidelity(images, prompts)`` is the soft, differentiable fraction of foreground
pixels whose colour is the prompt's foreground colour word:

    w_p    = sigmoid((|x_p - b| - tau) / s)                  foreground weight of pixel p
    q_p(k) = softmax_k(-|x_p - c_k|^2 / T)                   soft nearest palette colour
    score  = sum_p w_p q_p(target) / (sum_p w_p + eps)       in [0, 1]

where ``x_p`` is the pixel's RGB in [0, 1], ``b`` the background colour (median of the
image border, treated as a constant), ``c_k`` the shapes-world palette
(``cdalign.data.shapes.COLORS``) and ``target`` the colour the prompt names (parsed by
``cdalign.data.shapes.parse_prompt``: the first colour word not followed by "background").
An image with no foreground scores ~0 (``eps`` is one pixel). A prompt that names no
shapes-world colour scores 0 with zero gradient: there is nothing to be faithful to.

``caption_fidelity`` adds the background the prompt names: one minus the mean RGB distance
of the 1-pixel border (where the shapes classifier reads the background) from the named
background colour ``d`` (``cdalign.data.shapes.BACKGROUNDS``), scaled by the cube's diagonal,

    bg     = 1 - mean_{p in border} |x_p - d| / sqrt(3)                      in [0, 1]

A distance, not a soft classification: a softmax over the background palette saturates once a
background is repainted (a black background turned gray has p(black) ~ 0.003 at T = 0.1, and
a gradient to match), so a floor on it could not pull a repainted background back (measured on
the flow recipe: the floor's λ rose to 3.8 while background accuracy stayed at 32%). The
distance's gradient has the same size however far the border has moved.

and scores each image by the mean of the terms its prompt names (colour, background; 1.0
when it names neither: nothing asked, nothing broken). It is the differentiable stand-in
for the hard ``shapes_match`` (which also checks shape and size) that a reward-backprop
run can hold as a fidelity floor (a constraint relative to the base model); shape has no
smooth surrogate here, so the floor guards colour and background.

These rewards are for the embedded ``cdalign/tiny-shapes-sd`` models; the quality gates in
``evaluation/tiny_quality.py`` deliberately use the hard numpy classifier of
``cdalign.data.shapes`` instead, so the reward is never graded by itself.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cdalign.data.shapes import BACKGROUNDS, COLORS, parse_prompt
from cdalign.rewards.base import REWARDS, Reward, check_inputs

FOREGROUND_THRESHOLD = 80 / 255  # RGB distance from the background, [0, 1] units
FOREGROUND_SOFTNESS = 10 / 255  # width of the sigmoid around the threshold
COLOR_TEMPERATURE = 0.1  # squared RGB distance scale ([0, 1] units) of the palette softmax; palette
# colours are 0.27-1.57 apart in squared distance, so a wrong colour keeps a usable gradient
EMPTY_EPS = 1.0  # pixels; makes an image without foreground score ~0


def background_color(images: torch.Tensor) -> torch.Tensor:
    """Median colour of the 1-pixel border, detached: (B, 3, H, W) -> (B, 3)."""
    border = torch.cat(
        [images[:, :, 0, :], images[:, :, -1, :], images[:, :, :, 0], images[:, :, :, -1]], dim=2
    )
    return border.detach().median(dim=2).values


def palette_probabilities(images: torch.Tensor, palette: torch.Tensor, temperature: float = COLOR_TEMPERATURE) -> torch.Tensor:
    """Soft assignment of every pixel to the palette colours: images (B, 3, H, W) in
    [0, 1], palette (K, 3) in [0, 1] -> (B, K, H, W), summing to 1 over K."""
    squared = (images.unsqueeze(1) - palette.view(1, -1, 3, 1, 1)).pow(2).sum(dim=2)
    return torch.softmax(-squared / temperature, dim=1)


def foreground_weights(images: torch.Tensor) -> torch.Tensor:
    """Soft foreground mask, (B, 3, H, W) -> (B, H, W) in (0, 1): pixels farther than
    FOREGROUND_THRESHOLD from the border colour."""
    distance = (images - background_color(images).view(-1, 3, 1, 1)).pow(2).sum(dim=1).add(1e-12).sqrt()
    return torch.sigmoid((distance - FOREGROUND_THRESHOLD) / FOREGROUND_SOFTNESS)


def color_fidelity(images: torch.Tensor, target: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Soft fraction of foreground pixels of palette colour ``target``.

    images (B, 3, H, W) in [0, 1]; target (B,) long indices into palette (K, 3) in
    [0, 1]. Returns (B,) in [0, 1]."""
    weights = foreground_weights(images)
    probs = palette_probabilities(images, palette)
    on_target = probs.gather(1, target.view(-1, 1, 1, 1).expand(-1, 1, *probs.shape[2:])).squeeze(1)
    return (weights * on_target).flatten(1).sum(1) / (weights.flatten(1).sum(1) + EMPTY_EPS)


@REWARDS.register("prompt_fidelity")
class PromptFidelity(Reward):
    """Shapes-world colour fidelity: the soft fraction of foreground pixels in the colour
    the prompt names (see the module docstring). Scores in [0, 1]; prompts without a
    shapes-world colour word score 0."""

    name = "prompt_fidelity"
    differentiable = True

    def __init__(self):
        super().__init__()

        self.color_names = tuple(COLORS)
        self.register_buffer("palette", torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255, persistent=False)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:

        check_inputs(images, prompts, needs_prompts=True)
        colors = [parse_prompt(p)["color"] for p in prompts]
        has_color = torch.tensor([c is not None for c in colors], device=images.device)
        target = torch.tensor([self.color_names.index(c) if c else 0 for c in colors], device=images.device)
        scores = color_fidelity(images.float(), target, self.palette.to(images.device))
        return torch.where(has_color, scores, torch.zeros_like(scores)).float()


def background_fidelity(images: torch.Tensor, target: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """One minus the border's mean RGB distance from background colour ``target``, over the
    cube diagonal: images (B, 3, H, W) in [0, 1]; target (B,) indices into the background
    palette (K, 3). Returns (B,) in [0, 1]; 1 when the border is exactly that colour."""
    border = torch.cat([images[:, :, 0, :], images[:, :, -1, :], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], dim=2)
    distance = (border - palette[target].unsqueeze(-1)).pow(2).sum(dim=1).add(1e-12).sqrt()  # (B, P)
    return 1.0 - distance.mean(dim=1) / 3 ** 0.5


@REWARDS.register("caption_fidelity")
class CaptionFidelity(Reward):
    """Shapes-world caption fidelity, differentiable: per image the mean of the soft colour
    fidelity (as ``prompt_fidelity``) and the background's closeness to the named colour over
    what its prompt names; 1.0 where it names neither (see the module docstring). Scores in [0, 1]."""

    name = "caption_fidelity"
    differentiable = True

    def __init__(self):
        super().__init__()
        self.color_names, self.background_names = tuple(COLORS), tuple(BACKGROUNDS)
        self.register_buffer("palette", torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255, persistent=False)
        self.register_buffer("backgrounds", torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 255,
                             persistent=False)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(images, prompts, needs_prompts=True)
        asked = [parse_prompt(p) for p in prompts]
        device, x = images.device, images.float()
        has_color = torch.tensor([a["color"] is not None for a in asked], device=device)
        has_bg = torch.tensor([a["background"] in self.background_names for a in asked], device=device)
        color = color_fidelity(x, torch.tensor([self.color_names.index(a["color"]) if a["color"] else 0 for a in asked],
                                               device=device), self.palette.to(device))
        bg_target = [self.background_names.index(a["background"]) if a["background"] in self.background_names else 0
                     for a in asked]
        background = background_fidelity(x, torch.tensor(bg_target, device=device), self.backgrounds.to(device))
        total = torch.where(has_color, color, torch.zeros_like(color)) + torch.where(has_bg, background, torch.zeros_like(color))
        count = has_color.float() + has_bg.float()
        return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total)).float()

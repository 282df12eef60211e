"""Differentiable image preprocessing for reward models (CLIP/BLIP style).

Reward models were trained on images preprocessed by PIL/torchvision: resize the
shorter side (bicubic), center-crop, scale to [0, 1], normalise per channel. Doing that
with PIL would cut the gradient, so ``ImageTransform`` reproduces it with torch ops on
(B, 3, H, W) tensors already in [0, 1]: ``F.interpolate`` with antialiasing (as PIL's
resize filters do when downscaling), a center crop by slicing, a clamp to [0, 1] (PIL
images cannot overshoot), and ``(x - mean) / std``. Values match the PIL path up to
uint8 rounding and small resampling differences, not bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation (also used by OpenCLIP ViT-H-14, BLIP and ImageReward).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resample codes as stored in transformers' preprocessor_config.json.
_PIL_RESAMPLE_TO_MODE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class ImageTransform(torch.nn.Module):
    """(B, 3, H, W) in [0, 1] -> normalised (B, 3, crop_h, crop_w), differentiable.

    - ``resize_shortest``: scale so that the shorter side equals this (the longer side is
      ``int(S * long / short)``, as torchvision and transformers compute it); None: no resize.
    - ``crop_size``: (height, width) of the center crop; None: no crop.
    - ``mean`` / ``std``: per-channel normalisation in [0, 1] units.
    - ``mode``: ``"bicubic"`` (CLIP, BLIP) or ``"bilinear"``; antialiased when downscaling.
    """

    def __init__(
        self,
        resize_shortest: int | None,
        crop_size: tuple[int, int] | None,
        mean: Sequence[float],
        std: Sequence[float],
        mode: str = "bicubic",
    ):
        super().__init__()
        if mode not in {"bicubic", "bilinear", "nearest"}:
            raise ValueError(f"unsupported interpolation mode {mode!r}")
        self.resize_shortest = resize_shortest
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.mode = mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def output_size(self) -> tuple[int, int] | None:
        return self.crop_size

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        short, long = min(height, width), max(height, width)
        target_long = int(self.resize_shortest * long / short)
        size = (self.resize_shortest, target_long) if height <= width else (target_long, self.resize_shortest)
        if size == (height, width):
            return images
        kwargs = {} if self.mode == "nearest" else {"align_corners": False, "antialias": True}
        return F.interpolate(images, size=size, mode=self.mode, **kwargs)

    def center_crop(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        crop_h, crop_w = self.crop_size
        if crop_h > height or crop_w > width:
            raise ValueError(f"cannot center-crop {crop_h}x{crop_w} from a {height}x{width} image")
        top = int(round((height - crop_h) / 2.0))
        left = int(round((width - crop_w) / 2.0))
        return images[..., top : top + crop_h, left : left + crop_w]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.resize_shortest is not None:
            x = self.resize(x)
        if self.crop_size is not None:
            x = self.center_crop(x)
        x = x.clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"resize_shortest={self.resize_shortest}, crop_size={self.crop_size}, mode={self.mode!r}"


def clip_transform(size: int = 224) -> ImageTransform:
    """OpenAI CLIP preprocessing at ``size``: bicubic shorter-side resize, center crop, CLIP mean/std."""
    return ImageTransform(size, (size, size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")


def _size_pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and "height" in value and "width" in value:
        return (int(value["height"]), int(value["width"]))
    if isinstance(value, dict) and "shortest_edge" in value:
        edge = int(value["shortest_edge"])
        return (edge, edge)
    raise ValueError(f"unsupported {what} {value!r} in preprocessor_config.json")


def transform_from_preprocessor_config(path: Path) -> ImageTransform:
    """An ``ImageTransform`` equivalent to a transformers CLIP image processor, read from its
    ``preprocessor_config.json`` (keys ``size``, ``crop_size``, ``do_resize``,
    ``do_center_crop``, ``do_normalize``, ``image_mean``, ``image_std``, ``resample``).
    The JSON is parsed directly so no image-processor backend (PIL, torchvision) is needed."""
    config = json.loads(Path(path).read_text())
    resize = None
    if config.get("do_resize", True):
        size = config.get("size", 224)
        if isinstance(size, dict) and "shortest_edge" not in size:
            raise ValueError(f"{path}: only shorter-side resizing is supported; got size={size!r}")
        resize = _size_pair(size, "size")[0]
    crop = _size_pair(config.get("crop_size", 224), "crop_size") if config.get("do_center_crop", True) else None
    if config.get("do_normalize", True):
        mean, std = config.get("image_mean", OPENAI_CLIP_MEAN), config.get("image_std", OPENAI_CLIP_STD)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = int(config.get("resample", 3))
    if resample not in _PIL_RESAMPLE_TO_MODE:
        raise ValueError(f"{path}: unsupported resample={resample} (supported: {sorted(_PIL_RESAMPLE_TO_MODE)})")
    return ImageTransform(resize, crop, mean, std, _PIL_RESAMPLE_TO_MODE[resample])

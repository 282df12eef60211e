"""Image-statistic rewards of the paper (arXiv 2508.19104, "Rewards used by the paper").

All take RGB images in [0, 1] of shape (B, 3, H, W) and return (B,) float32 scores in
the same [0, 1] intensity units (no 0-255 rescaling). Each formula is one function;
the registered ``Reward`` classes only validate inputs and call it. All are
differentiable except ``jpeg_compressibility``.

Conventions (all "over pixels" means over the H*W positions of one image):
- luminance ``Y = 0.2126 R + 0.7152 G + 0.0722 B`` (Rec. 709 weights);
- standard deviations are population std (divide by N, not N-1);
- square roots use ``sqrt(x + 1e-12)`` so that a flat image has a finite gradient
  (this moves a value by at most 1e-6).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from cdalign.rewards.base import REWARDS, Reward, check_inputs

LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)
SATURATION_EPS = 1e-8
_SQRT_EPS = 1e-12


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Rec. 709 luminance ``Y = 0.2126 R + 0.7152 G + 0.0722 B``: (B, 3, H, W) -> (B, H, W)."""
    r, g, b = images.unbind(dim=1)
    return LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b


def _pixel_std(x: torch.Tensor) -> torch.Tensor:
    """Population std over the last two (pixel) dimensions: (B, H, W) -> (B,)."""
    return x.flatten(1).std(dim=1, correction=0)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean luminance over pixels, in [0, 1]: (B, 3, H, W) -> (B,)."""
    return luminance(images).flatten(1).mean(dim=1)


def global_contrast(images: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of luminance over pixels, in [0, 0.5]: (B, 3, H, W) -> (B,)."""
    return _pixel_std(luminance(images))


def gaussian_kernel1d(kernel_size: int = 5, sigma: float = 1.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps at integer offsets ``-(k-1)/2 .. (k-1)/2`` (sums to 1)."""
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def gaussian_blur(y: torch.Tensor, kernel_size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur of single-channel images ``(B, H, W) -> (B, H, W)``.

    Separable 2-D convolution (``conv2d`` with a (1, k) then a (k, 1) kernel) whose taps
    are ``gaussian_kernel1d``. Borders use **reflect padding** (mirror without repeating
    the edge pixel, ``F.pad(mode="reflect")``), the padding torchvision's
    ``gaussian_blur`` uses, so H and W must exceed ``kernel_size // 2``.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd; got {kernel_size}")
    pad = kernel_size // 2
    taps = gaussian_kernel1d(kernel_size, sigma, dtype=y.dtype, device=y.device)
    x = F.pad(y.unsqueeze(1), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, kernel_size))
    x = F.conv2d(x, taps.view(1, 1, kernel_size, 1))
    return x.squeeze(1)


def local_contrast(images: torch.Tensor, kernel_size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Mean absolute difference between luminance and its Gaussian blur (kernel 5, sigma 1,
    reflect padding): ``mean |Y - blur(Y)|`` over pixels, (B, 3, H, W) -> (B,)."""
    y = luminance(images)
    return (y - gaussian_blur(y, kernel_size, sigma)).abs().flatten(1).mean(dim=1)


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV-style saturation ``(max(R,G,B) - min(R,G,B)) / (max(R,G,B) + 1e-8)`` over
    pixels, in [0, 1]: (B, 3, H, W) -> (B,)."""
    cmax = images.amax(dim=1)
    cmin = images.amin(dim=1)
    return ((cmax - cmin) / (cmax + SATURATION_EPS)).flatten(1).mean(dim=1)


def colorfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler & Suesstrunk (2003) colourfulness on [0, 1] intensities (1/255 of the 8-bit
    value): with ``rg = R - G`` and ``yb = (R + G)/2 - B``,
    ``sqrt(std_rg^2 + std_yb^2) + 0.3 * sqrt(mean_rg^2 + mean_yb^2)``; (B, 3, H, W) -> (B,)."""
    r, g, b = images.unbind(dim=1)
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    spread = torch.sqrt(rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0) + _SQRT_EPS)
    offset = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + _SQRT_EPS)
    return spread + 0.3 * offset


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1 kB = 1000 bytes) of each image encoded by PIL as JPEG at ``quality``,
    after quantising to uint8 as DDPO does (``round(255 x)`` clamped to [0, 255]).
    (B, 3, H, W) -> (B,) float32 on the images' device; **not differentiable** (detached)."""
    from PIL import Image

    pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_compressibility(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """DDPO's JPEG compressibility (Black et al. 2023, arXiv 2305.13301): minus the JPEG
    size in kB at quality 95. Higher = more compressible. Not differentiable."""
    return -jpeg_size_kb(images, quality)


class _StatisticReward(Reward):
    """A prompt-free reward computed by one pure function of the images."""

    def __init__(self, name: str, fn, differentiable: bool = True, **fn_kwargs):
        super().__init__()
        self.name = name
        self.differentiable = differentiable
        self._fn = fn
        self._fn_kwargs = fn_kwargs

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_inputs(images, prompts)
        return self._fn(images.float(), **self._fn_kwargs).float()

    def extra_repr(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self._fn_kwargs.items())
        return super().extra_repr() + (f", {kw}" if kw else "")


@REWARDS.register("brightness")
def _brightness() -> Reward:
    return _StatisticReward("brightness", brightness)


@REWARDS.register("global_contrast")
def _global_contrast() -> Reward:
    return _StatisticReward("global_contrast", global_contrast)


@REWARDS.register("local_contrast")
def _local_contrast(kernel_size: int = 5, sigma: float = 1.0) -> Reward:
    if kernel_size < 1 or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"local_contrast needs kernel_size >= 1 and sigma > 0; got {kernel_size}, {sigma}")
    return _StatisticReward("local_contrast", local_contrast, kernel_size=kernel_size, sigma=sigma)


@REWARDS.register("saturation")
def _saturation() -> Reward:
    return _StatisticReward("saturation", saturation)


@REWARDS.register("colorfulness")
def _colorfulness() -> Reward:
    return _StatisticReward("colorfulness", colorfulness)


@REWARDS.register("jpeg_compressibility")
def _jpeg_compressibility(quality: int = 95) -> Reward:
    # Not differentiable: reward_backprop refuses it; estimator policy_gradient (a score-function
    # estimator, cdalign.alignment.estimators) trains on it, and the harness evaluates it.
    return _StatisticReward("jpeg_compressibility", jpeg_compressibility, differentiable=False, quality=quality)

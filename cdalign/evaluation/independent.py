"""The formulas of ``evaluation/independent_check.py``, written apart from the code that trains
and scores runs: numpy (and PIL's JPEG encoder) on the 8-bit images a user would save, no
torch and nothing from :mod:`cdalign.rewards`, so a run's rewards are recomputed by code
that did not produce them. This module imports nothing from cdalign."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

LUMA = np.array([0.2126, 0.7152, 0.0722])


def colorfulness_np(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] -> (N,): sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²)."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    rg, yb = (r - g).reshape(len(images), -1), (0.5 * (r + g) - b).reshape(len(images), -1)
    return np.sqrt(rg.var(1) + yb.var(1)) + 0.3 * np.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)


def brightness_np(images: np.ndarray) -> np.ndarray:
    return (images @ LUMA).reshape(len(images), -1).mean(1)


def jpeg_compressibility_np(images_u8: np.ndarray, quality: int = 95) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N,): minus the JPEG size in kB (1000 bytes) at ``quality``, PIL's
    encoder on the saved 8-bit image (DDPO's compressibility)."""
    sizes = []
    for im in images_u8:
        buffer = io.BytesIO()
        Image.fromarray(im).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return -np.asarray(sizes)


# The rewards this check recomputes, from the 8-bit images alone: name -> f(floats in [0, 1], uint8).
FORMULAS = {
    "colorfulness": lambda x, u8: colorfulness_np(x),
    "brightness": lambda x, u8: brightness_np(x),
    "jpeg_compressibility": lambda x, u8: jpeg_compressibility_np(u8),
}


def summary(values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    half = 1.959964 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "n": int(len(v))}

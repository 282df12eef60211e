"""Pictures of a run: sample grids and dual/slack curves (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    # matplotlib is imported on first use only: `import cdalign` stays light.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Stack rows of images (each (N,3,H,W) in [0,1]) into one uint8 HxWx3 array."""
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[2], rows[0].shape[3]
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        arr = (row.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        for j in range(arr.shape[0]):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = arr[j]
    return grid


def save_grid(path: str | os.PathLike, rows: list[torch.Tensor], labels: list[str] | None = None, scale: int = 2) -> Path:
    """Write a PNG grid, one labelled row per entry of ``rows`` (same seeds across rows)."""
    plt = pyplot()
    grid = image_grid(rows)
    dpi = 100
    fig_w = max(grid.shape[1] * scale / dpi, 2.0) + (1.2 if labels else 0)
    fig, ax = plt.subplots(figsize=(fig_w, grid.shape[0] * scale / dpi + 0.3), dpi=dpi)
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    if labels:
        h = rows[0].shape[2]
        ax.set_yticks([2 + i * (h + 2) + h / 2 for i in range(len(rows))], labels)
    else:
        ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    fig.tight_layout(pad=0.2)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.05)  # long row labels are kept whole
    plt.close(fig)
    return path


def plot_duals(path: str | os.PathLike, steps: list[int], names: list[str], multipliers: list[list[float]], slacks: list[list[float]], kl: list[float] | None = None) -> Path:
    """λ (top) and slack (bottom, 0 = on the threshold, > 0 violated) per constraint."""
    plt = pyplot()
    import matplotlib.ticker  # after pyplot(): the backend is chosen first

    nrows = 3 if kl else 2
    fig, axes = plt.subplots(nrows, 1, figsize=(7, 2.4 * nrows), sharex=True)
    lam, sl = np.asarray(multipliers, dtype=float), np.asarray(slacks, dtype=float)
    for j, name in enumerate(names):
        axes[0].plot(steps, lam[:, j], label=name)
        axes[1].plot(steps, sl[:, j], label=name)
    axes[0].set_ylabel("dual λ")
    axes[1].axhline(0.0, color="k", lw=0.8, ls="--")
    axes[1].set_ylabel("slack (>0 violated)")
    if kl:
        axes[2].plot(steps, kl, color="tab:gray")
        axes[2].set_ylabel("chain KL")
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if names:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_loss_curves(path: str | os.PathLike, panels: list[tuple[str, list[float]]]) -> Path:
    """Plot each (title, per-step losses) panel: raw and 50-step moving average, log scale
    (a pretraining run's ``loss_curve.png``)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (title, losses) in zip(axes[0], panels):
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, alpha=0.3, lw=0.7)
        if len(losses) >= 50:
            ax.plot(steps[49:], np.convolve(losses, np.ones(50) / 50, mode="valid"), lw=1.5)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

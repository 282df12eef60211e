"""Pictures of a composition run (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cdalign.publishing.plotting import pyplot as _plt


def plot_weight_trajectory(path: str | os.PathLike, names: list[str], weights: list[list[float]], divergences: list[list[float]], ylabel: str = "KL(p_μ‖q_i)") -> Path:
    """Top: weights ω_i per dual step (step 0 = initial; one more entry than
    ``divergences`` when the final weights are included). Bottom: the divergence of each
    component measured at the weights of that step, with the max over components dashed."""
    plt = _plt()
    w, d = np.asarray(weights, dtype=float), np.asarray(divergences, dtype=float)
    fig, axes = plt.subplots(2, 1, figsize=(6.5, 5), sharex=True)
    for j, name in enumerate(names):
        axes[0].plot(range(len(w)), w[:, j], marker="o", label=name)
        axes[1].plot(range(len(d)), d[:, j], marker="o", label=name)
    axes[1].plot(range(len(d)), d.max(1), "k--", lw=1, label="max")
    axes[0].set_ylabel("weight μ_i")
    axes[1].set_ylabel(ylabel)
    axes[1].set_xlabel("dual step")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_divergence_bars(path: str | os.PathLike, names: list[str], table: dict[str, list[float]], ylabel: str = "KL(p‖q_i)") -> Path:
    """Grouped bars: for each model in ``table`` (label -> one value per component)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    width = 0.8 / max(len(table), 1)
    x = np.arange(len(names))
    for k, (label, values) in enumerate(table.items()):
        ax.bar(x + k * width, values, width, label=label)
    ax.set_xticks(x + width * (len(table) - 1) / 2, names)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

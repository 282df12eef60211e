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


def plot_toy2d_and(path, names, log_q, rows, grid, shape):
    """The 2D AND experiment: the components' contours, then per weighting the product density and its samples."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(4 * (len(rows) + 1), 4), sharex=True, sharey=True)
    X, Y = grid[:, 0].reshape(shape), grid[:, 1].reshape(shape)
    for lq, name in zip(log_q, names):
        axes[0].contour(X, Y, np.exp(lq).reshape(shape), levels=4)
    axes[0].set_title("components: " + ", ".join(names), fontsize=8)
    for ax, (label, row) in zip(axes[1:], rows.items()):
        w = np.array(list(row["weights"].values()))
        lp = w @ log_q
        ax.contourf(X, Y, np.exp(lp - lp.max()).reshape(shape), levels=12, cmap="Blues")
        s = row["_samples"]
        ax.scatter(s[:, 0], s[:, 1], s=2, c="k", alpha=0.4)
        ax.set_title(f"{label}\nμ={np.round(w, 2).tolist()} max KL={row['max_kl']:.3f}", fontsize=8)
    for ax in axes:
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_toy2d_or(path, rows):
    """The 2D OR experiment: per training weighting the samples and their mode masses."""
    plt = _plt()
    sampled = {k: v for k, v in rows.items() if "_samples" in v}
    fig, axes = plt.subplots(1, len(sampled), figsize=(4 * len(sampled), 4), sharex=True, sharey=True)
    for ax, (label, row) in zip(axes, sampled.items()):
        s = row["_samples"]
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.4)
        m = list(row["mode_masses"].values())
        ax.set_title(f"{label}\nmasses A,B+,B- = {m[0]:.2f}, {m[1]:.2f}, {m[2]:.2f}", fontsize=8)
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

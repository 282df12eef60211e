"""Statistics behind every reported number: means with 95% confidence intervals, paired
differences, and the constraint verdict. Pure functions of tensors; nothing samples here.

All intervals are normal-approximation 95% CIs of a mean, ``mean ± 1.96·s/√n`` with the
sample standard deviation ``s`` (Bessel-corrected). A *paired* difference compares two
models on the same images' noise (same prompts, same seeds): the CI of the mean of the
per-image differences is much narrower than the two CIs side by side, because most of the
image-to-image spread is shared by both models."""

from __future__ import annotations

import math
from typing import Sequence

import torch

Z95 = 1.959964  # two-sided 95% normal quantile


def ci_from_moments(mean: float, std: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Normal-approximation 95% confidence interval ``(lo, hi)`` of a mean from its sample's
    std and size; with fewer than 2 samples the interval is the mean itself."""
    if n < 2:
        return mean, mean
    half = z * std / math.sqrt(n)
    return mean - half, mean + half


def mean_and_ci(values: torch.Tensor, z: float = Z95) -> tuple[float, float, float]:
    """Mean and normal-approximation 95% confidence interval of (N,) values:
    ``(mean, lo, hi)``; with fewer than 2 values the interval is the mean itself."""
    v = torch.as_tensor(values).double().flatten()
    m = float(v.mean())
    if v.numel() < 2:
        return m, m, m
    return (m, *ci_from_moments(m, float(v.std()), v.numel(), z))


def summarize(values: torch.Tensor) -> dict:
    """``{"mean", "ci95": [lo, hi], "n"}`` of (N,) values."""
    m, lo, hi = mean_and_ci(values)
    return {"mean": m, "ci95": [lo, hi], "n": int(torch.as_tensor(values).numel())}


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) of a proportion ``successes / n``: it stays in
    [0, 1] and keeps its coverage at small n and near 0 or 1, where the normal interval runs
    outside [0, 1] (2 images: 0.5 ± 0.98) or collapses to a point (every image correct)."""
    if n < 1:
        raise ValueError(f"a proportion needs at least one value, got n={n}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def is_proportion(values: torch.Tensor) -> bool:
    """Whether (N,) values are all 0 or 1: per-image verdicts (right/wrong) whose mean is a proportion."""
    v = torch.as_tensor(values).flatten()
    return v.numel() > 0 and bool(((v == 0) | (v == 1)).all())


def summarize_metric(values: torch.Tensor, what: str = "values") -> dict:
    """:func:`summarize` for an evaluation metric, over the values where it applies (NaN:
    it does not): a proportion (0/1 values) gets its Wilson interval (``"interval":
    "wilson"``); a metric that applies to none of them is ``{"mean": None, "ci95": None,
    "n": 0, "reason": ...}``, never a NaN."""
    v = torch.as_tensor(values).double().flatten()
    v = v[~v.isnan()]
    if v.numel() == 0:
        return {"mean": None, "ci95": None, "n": 0,
                "reason": f"applies to none of the {torch.as_tensor(values).numel()} {what}"}
    if is_proportion(v):
        lo, hi = wilson_interval(float(v.sum()), v.numel())
        return {"mean": float(v.mean()), "ci95": [lo, hi], "n": int(v.numel()), "interval": "wilson"}
    return summarize(v)


def paired_difference(treated: torch.Tensor, control: torch.Tensor) -> dict:
    """Mean and 95% CI of the per-sample difference ``treated − control`` of two (N,)
    tensors measured on the same samples (e.g. aligned and base images from the same
    seeds): ``{"mean", "ci95": [lo, hi], "n"}``."""
    treated, control = torch.as_tensor(treated).flatten(), torch.as_tensor(control).flatten()
    if treated.shape != control.shape:
        raise ValueError(f"paired difference needs equal sample counts, got {treated.numel()} and {control.numel()}")
    return summarize(treated.double() - control.double())


def slack(value, threshold, direction: str):
    """The slack of METHOD.md §1, ``g = b − v`` for "high" (``E[v] ≥ b``) and ``v − b`` for
    "low" (``E[v] ≤ b``): positive means violated, in the units of ``v``. ``value`` and
    ``threshold``: floats or tensors (broadcast). The one definition: constraints, the
    verdict and the composition duals all take their slack from here."""
    if direction == "high":
        return threshold - value
    if direction == "low":
        return value - threshold
    raise ValueError(f"direction must be 'high' or 'low', got {direction!r}")


def constraint_decision(measured: float, ci95: Sequence[float], threshold: float, direction: str) -> dict:
    """Judge ``E[value] >= threshold`` (direction 'high') or ``<= threshold`` ('low').

    Returns ``slack`` (positive = violated, the trainer's sign convention), ``satisfied``
    (the mean is on the allowed side, ties count as satisfied) and ``ci_clears_threshold``
    (the whole 95% CI is on the allowed side: satisfied with confidence)."""
    g = slack(measured, threshold, direction)
    lo, hi = float(ci95[0]), float(ci95[1])
    # The CI clears the threshold when even its worst end has slack <= 0.
    clears = slack(lo if direction == "high" else hi, threshold, direction) <= 0
    return {"slack": float(g), "satisfied": bool(g <= 0), "ci_clears_threshold": bool(clears)}


# How tables mark a verdict: ✓✓ the whole 95% CI meets the threshold, ✓ the mean does, ✗ neither.
MET_MARKS = {"CI": "✓✓", "mean": "✓", "no": "✗"}


def met_label(decision: dict) -> str:
    """How a constraint verdict (:func:`constraint_decision`, or any dict with its
    ``satisfied`` and ``ci_clears_threshold``) is met: ``"CI"`` (the whole 95% CI is on the
    allowed side: met with confidence), ``"mean"`` (only the mean is: a fresh sample may read
    a miss) or ``"no"``. :data:`MET_MARKS` gives its mark in a table."""
    if decision["ci_clears_threshold"]:
        return "CI"
    return "mean" if decision["satisfied"] else "no"


def paired_max_mean_difference(treated: dict, control: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """The difference of two models' largest mean, ``max_i mean(treated_i) − max_i
    mean(control_i)``, with a paired bootstrap 95% interval: ``treated``/``control`` map the
    same names to (N,) per-image values on the same N images (e.g. the chain KL to each
    component); each resample draws N image indices with replacement and takes both maxima
    on them, so the images' shared noise cancels. Percentile interval over ``resamples``
    resamples of a fixed ``seed`` (reproducible). Returns ``{"mean", "ci95", "n", "method"}``."""
    names = list(control)
    a = torch.stack([torch.as_tensor(treated[k]).double().flatten() for k in names])  # (m, N)
    b = torch.stack([torch.as_tensor(control[k]).double().flatten() for k in names])
    if a.shape != b.shape:
        raise ValueError(f"paired max needs the same names and image counts, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[1]
    diff = float(a.mean(1).max() - b.mean(1).max())
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    boot = a[:, idx].mean(2).max(0).values - b[:, idx].mean(2).max(0).values  # (resamples,)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": diff, "ci95": [lo, hi], "n": n,
            "method": f"paired bootstrap over the images ({resamples} resamples, percentile interval)"}

"""Reward normalisation in base-model standard deviations (METHOD.md §1).

``r_norm = (r − m)/s`` with m, s the reward's mean and std on base-model samples of the
training prompts. (Where the statistics are cached between runs, and the fingerprints
that key them: :mod:`cdalign.runs.normalization_cache`, :mod:`cdalign.runs.fingerprints`.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Fewer base-model samples than this give a σ too noisy to read values like "+0.5σ" by.
MIN_NORMALIZATION_SAMPLES = 32


@dataclass
class RewardStats:
    mean: float
    std: float
    count: int

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std


def stats_from_samples(values: torch.Tensor, min_std: float = 1e-6) -> RewardStats:
    """Mean and (unbiased) std of gathered base-model reward values (N,). A reward that is
    constant on the base model cannot be normalised: its std is floored at ``min_std``."""
    values = values.double().flatten()
    if values.numel() < 2:
        raise ValueError("reward normalisation needs at least 2 base-model samples")
    if not torch.isfinite(values).all():
        raise ValueError("non-finite reward values on base-model samples; cannot normalise")
    return RewardStats(float(values.mean()), max(float(values.std()), min_std), int(values.numel()))

"""Reward statistics of the base model for reward normalisation (METHOD.md §1, "Reward
normalisation"): each reward's mean and std on base-model samples of the training prompts,
gathered over processes and cached by key (the formula: cdalign.core.normalization; the
cache and its keys: cdalign.runs.normalization_cache, cdalign.runs.fingerprints)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from cdalign.core.normalization import (
    MIN_NORMALIZATION_SAMPLES,
    RewardStats,
    stats_from_samples,
)
from cdalign.core.sampling import DiffusionSampler
from cdalign.core.seeding import NORMALIZATION_BATCH, batch_share
from cdalign.models.adapters import WithAdaptersDisabled
from cdalign.runs.normalization_cache import NormalizationCache

logger = logging.getLogger(__name__)


def compute_reward_statistics(
    sampler: DiffusionSampler,
    rewards: Mapping[str, torch.nn.Module],
    prompts: list[str],
    accelerator,
    *,
    keys: Mapping[str, dict | None],
    cache_dir: str | os.PathLike | None,
    batches: int,
    batch_size: int,
    seed: int,
) -> dict[str, RewardStats]:
    """:class:`RewardStats` of every reward in ``rewards`` on the base model (adapters off).

    A reward whose key (``keys[name]``) is in the cache at ``cache_dir`` is read from it;
    the others are measured on ``batches`` global batches of ``batch_size`` images per
    process (prompts and noise from ``seed``), gathered over processes, and cached by the
    main process. Key None (a user callable without ``cache_key``): measured every run.
    Warns when statistics rest on fewer than ``MIN_NORMALIZATION_SAMPLES`` images. Every
    process calls it (it gathers)."""
    cache = NormalizationCache(cache_dir)
    names = list(rewards)
    stats: dict[str, RewardStats] = {}
    missing = []
    for n in names:
        cached = cache.load(keys[n]) if keys[n] is not None else None
        if cached is None:
            missing.append(n)
        else:
            stats[n] = cached
        if keys[n] is None and accelerator.is_main_process:
            logger.warning(
                "reward %r is a user callable without a cache_key attribute: its base-model statistics are "
                "recomputed every run (set a cache_key string on it, changed whenever it changes, to cache them)",
                n,
            )
    if missing:
        collected = {n: [] for n in missing}
        show = accelerator.is_main_process
        for b in tqdm(range(batches), desc="reward statistics (base model)", disable=not show):
            batch_prompts, seeds, _ = batch_share(
                seed, NORMALIZATION_BATCH, b, prompts, batch_size, accelerator.num_processes, accelerator.process_index
            )
            with torch.no_grad(), accelerator.autocast():
                predictor = WithAdaptersDisabled(sampler.guided(batch_prompts))
                images = sampler.sample(predictor, seeds)
                for n in missing:
                    collected[n].append(rewards[n](images, batch_prompts).float().detach())
        for n in missing:
            values = accelerator.gather(torch.cat(collected[n]).to(accelerator.device)).cpu()
            stats[n] = stats_from_samples(values)
            if accelerator.is_main_process and keys[n] is not None:
                cache.save(keys[n], stats[n])
        accelerator.wait_for_everyone()
    few = sorted(n for n in names if stats[n].count < MIN_NORMALIZATION_SAMPLES)
    if few:
        count = min(stats[n].count for n in few)
        warnings.warn(
            f"reward normalisation of {', '.join(few)} rests on only {count} base-model samples (fewer than "
            f"{MIN_NORMALIZATION_SAMPLES}): values in σ units (thresholds, slacks, the report) are noisy; raise "
            f"normalization_batches (now {batches} batches of {batch_size * accelerator.num_processes} images)",
            stacklevel=3,
        )
    return stats

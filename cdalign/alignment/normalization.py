"""Reward statistics of the base model for reward normalisation (METHOD.md §1, "Reward
normalisation"): each reward's mean and std on base-model samples of the training prompts,
gathered over processes and cached by key (the formula: cdalign.core.normalization; the
cache and its keys: cdalign.runs.normalization_cache, cdalign.runs.fingerprints).
:class:`RewardNormalization` holds a training run's statistics.

Where a reward's statistics come from, in order: the user cache (``normalization_cache_dir``,
default ``$CDALIGN_CACHE/normalization``), then the statistics shipped with the package for the
embedded models' recipes (:mod:`cdalign.data.base_statistics`; an exact full-key match only,
not copied into the user cache), else computed on base-model samples and written to the user
cache. Each run logs which source each reward's statistics came from."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from cdalign.console import CdalignWarning
from cdalign.core.normalization import (
    MIN_NORMALIZATION_SAMPLES,
    RewardStats,
    stats_from_samples,
)
from cdalign.core.sampling import DiffusionSampler
from cdalign.core.seeding import NORMALIZATION_BATCH, batch_share
from cdalign.data.base_statistics import shipped_statistics
from cdalign.models.adapters import WithAdaptersDisabled
from cdalign.runs.fingerprints import prompts_fingerprint, reward_identity
from cdalign.runs.normalization_cache import NormalizationCache, ShippedStatistics

logger = logging.getLogger(__name__)


def reward_identities(
    rewards: Mapping[str, torch.nn.Module], user_rewards: Mapping, reward_kwargs: Mapping[str, dict]
) -> dict[str, dict | None]:
    """Per reward of a run, what it is (:func:`~cdalign.runs.fingerprints.reward_identity`:
    registry name, kwargs, weights, source file; or a user callable's ``cache_key``;
    ``user_rewards`` holds the callables as given). None: a user callable without ``cache_key``."""
    return {n: reward_identity(n, user_rewards[n] if n in user_rewards else reward, kwargs=reward_kwargs.get(n, {}),
                               user=n in user_rewards) for n, reward in rewards.items()}


def normalization_keys(
    rewards: Mapping[str, torch.nn.Module], user_rewards: Mapping, reward_kwargs: Mapping[str, dict], base_key: dict
) -> dict[str, dict | None]:
    """Per reward, the key of its base-model statistics: what the reward is
    (:func:`reward_identities`) and ``base_key`` (base model, prompts, sampler settings,
    batches, seed). None: a user callable without ``cache_key``, whose statistics are never reused."""
    keys = {}
    for n, identity in reward_identities(rewards, user_rewards, reward_kwargs).items():
        key = {"reward": n, "reward_identity": identity, **base_key}
        # Through JSON once, so keys compare equal to the ones read back from a checkpoint.
        keys[n] = None if identity is None else json.loads(json.dumps(key, default=str))
    return keys


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
    shipped: ShippedStatistics | None = None,
) -> dict[str, RewardStats]:
    """:class:`RewardStats` of every reward in ``rewards`` on the base model (adapters off).

    A reward whose key (``keys[name]``) is in the cache at ``cache_dir`` is read from it, else
    from ``shipped`` (read-only; an exact key match; None: not consulted); the others are
    measured on ``batches`` global batches of ``batch_size`` images per process (prompts and
    noise from ``seed``), gathered over processes, and cached by the main process. Key None (a
    user callable without ``cache_key``): measured every run. The main process logs each
    reward's source (cache, shipped, computed). Warns when statistics rest on fewer than
    ``MIN_NORMALIZATION_SAMPLES`` images. Every process calls it (it gathers)."""
    cache = NormalizationCache(cache_dir)
    names = list(rewards)
    stats: dict[str, RewardStats] = {}
    sources: dict[str, str] = {}
    missing = []
    for n in names:
        cached = cache.load(keys[n]) if keys[n] is not None else None
        if cached is not None:
            stats[n], sources[n] = cached, f"read from the cache in {cache.directory}"
        elif keys[n] is not None and shipped is not None and (served := shipped.load(keys[n])) is not None:
            stats[n], sources[n] = served, f"shipped with cdalign ({shipped.path})"
        else:
            missing.append(n)
            sources[n] = "computed on base-model samples" + (f", cached in {cache.directory}" if keys[n] else "")
        if keys[n] is None and accelerator.is_main_process:
            logger.warning(
                "reward %r has no cache key (a user callable without a cache_key attribute, or a remote reward "
                "without cache_key): its base-model statistics are recomputed every run (set a cache_key, changed "
                "whenever the scorer changes, to cache them)",
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
    if accelerator.is_main_process:
        for n in names:
            logger.info("reward statistics of %s: %s", n, sources[n])
    few = sorted(n for n in names if stats[n].count < MIN_NORMALIZATION_SAMPLES)
    if few:
        count = min(stats[n].count for n in few)
        warnings.warn(
            f"reward normalisation of {', '.join(few)} rests on only {count} base-model samples (fewer than "
            f"{MIN_NORMALIZATION_SAMPLES}): values in σ units (thresholds, slacks, the report) are noisy; raise "
            f"normalization_batches (now {batches} batches of {batch_size * accelerator.num_processes} images)",
            CdalignWarning,
            stacklevel=4,  # the trainer's caller of compute_normalization (through RewardNormalization.compute)
        )
    return stats


class RewardNormalization:
    """A training run's reward statistics on the base model: ``stats`` (reward name →
    :class:`RewardStats`; updated in place, the estimator reads the same dict), the key each
    is cached under (:meth:`keys`), and their computation (:meth:`compute`).

    ``model``: the base model's part of the key (``model``: its name, ``revision``: the
    commit a Hub revision resolved to, else as given; ``weights``: its fingerprint);
    ``user_rewards``: the callables the user passed, as given; ``config``: the run's
    ``ConstrainedDDPOConfig``. ``shipped``: the read-only layer behind the user cache (the
    statistics shipped with cdalign, :func:`~cdalign.data.base_statistics.shipped_statistics`;
    None: not consulted, as when they are regenerated)."""

    def __init__(self, stats: dict[str, RewardStats], *, sampler: DiffusionSampler, rewards: Mapping[str, torch.nn.Module],
                 user_rewards: Mapping, prompts: list[str], accelerator, config, model: Mapping):
        self.stats, self.sampler, self.rewards, self.user_rewards = stats, sampler, rewards, user_rewards
        self.prompts, self.accelerator, self.config, self.model = prompts, accelerator, config, dict(model)
        self.shipped: ShippedStatistics | None = shipped_statistics()
        self._keys: dict[str, dict | None] | None = None

    def keys(self) -> dict[str, dict | None]:
        """:func:`normalization_keys` of the run's rewards (computed once)."""
        if self._keys is None:
            cfg = self.config
            base_key = {
                **self.model,
                "prompts": prompts_fingerprint(self.prompts),
                "sampler": self.sampler.settings(),
                "batches": cfg.normalization_batches,
                "global_batch": cfg.train_batch_size * self.accelerator.num_processes,
                "seed": cfg.seed,
            }
            self._keys = normalization_keys(self.rewards, self.user_rewards, cfg.reward_kwargs, base_key)
        return self._keys

    def compute(self) -> dict[str, RewardStats]:
        """:func:`compute_reward_statistics` of every reward into ``stats``; returns a copy."""
        cfg = self.config
        self.stats.update(  # in place: the estimator holds this dict
            compute_reward_statistics(
                self.sampler, self.rewards, self.prompts, self.accelerator,
                keys=self.keys(), cache_dir=cfg.normalization_cache_dir,
                batches=cfg.normalization_batches, batch_size=cfg.train_batch_size, seed=cfg.seed, shipped=self.shipped,
            )
        )
        return dict(self.stats)

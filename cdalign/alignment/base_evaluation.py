"""The base model's side of a run's final evaluation, reused across runs.

``ConstrainedDDPOTrainer.evaluate`` scores the base and the aligned model on the same held-out
items; the base side depends on nothing the run trains, so runs that share the base model,
the items and the scorers (the frontier experiment's runs, ``make compare``) would redo the
same work. :class:`BaseEvaluationReuse` keeps the base model's per-image rewards (raw) and
metrics, and its first ``num_grid_images`` images (the report's grid), in
:class:`~cdalign.runs.base_evaluation_cache.BaseEvaluationCache` under a key of everything
that decides them (:func:`base_evaluation_key`), and serves them on an exact match only. The
chain KL is not kept: it is measured on the aligned model's path. Normalised values are
recomputed from the raw ones with the run's statistics, as scoring computes them, so a
report from reused values is the report from recomputed ones, bit for bit.

Off with the config field ``reuse_base_evaluation: false``; not used when a reward is a user
callable without ``cache_key`` (it cannot be recognised again)."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import version

import torch

from cdalign.alignment.normalization import reward_identities
from cdalign.console import CdalignWarning
from cdalign.core.normalization import RewardStats
from cdalign.evaluation.scoring import CheckpointScores, Item, score_batch
from cdalign.runs import distributed
from cdalign.runs.base_evaluation_cache import BaseEvaluationCache
from cdalign.runs.fingerprints import reward_identity, sampled_fingerprint, source_fingerprint

logger = logging.getLogger(__name__)

KEY_VERSION = 1  # bump when what is kept, or how it is computed, changes meaning


def items_fingerprint(items: Sequence[Item]) -> str:
    """A hash of the (prompt, seed) items, in order."""
    return hashlib.sha256(json.dumps([[p, int(s)] for p, s in items]).encode()).hexdigest()[:16]


def components_fingerprint(trainer) -> str:
    """A hash of what draws the images besides the denoiser: the VAE's and the text encoders'
    weights and the scheduler's config (the denoiser's weights are the model key's ``weights``)."""
    pipe, family = trainer.pipe, trainer.family
    named = [(f"{i}.{n}", p) for i, module in enumerate([pipe.vae, *family.text_encoder_modules(pipe)])
             for n, p in module.named_parameters()]
    # the scheduler's class and settings; not diffusers' private entries (``_use_default_values`` is a set's order)
    settings = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    scheduler = json.dumps([type(pipe.scheduler).__name__, settings], sort_keys=True, default=str)
    return hashlib.sha256((sampled_fingerprint(named) + scheduler).encode()).hexdigest()[:16]


def device_identity(device: torch.device) -> str:
    """The device type, and a GPU's model name (another GPU may round differently)."""
    device = torch.device(device)
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def base_evaluation_key(trainer, items: Sequence[Item], metric_names: Sequence[str], metrics: Mapping) -> dict | None:
    """Everything that decides the base model's values on ``items`` in ``trainer``'s evaluation:
    the base model (name, resolved revision, denoiser weights; VAE, text encoders, scheduler),
    the items, the batch size (a batch's composition), the sampler settings, each reward's and
    metric's identity (:func:`~cdalign.runs.fingerprints.reward_identity`: registry name,
    kwargs, weights, source file), precision, sharding, the device, the code that samples and
    scores, and the library versions. None: a reward cannot be identified (a user callable
    without ``cache_key``)."""
    cfg = trainer.config
    rewards = reward_identities(trainer.rewards, trainer.normalization.user_rewards, cfg.reward_kwargs)
    if any(identity is None for identity in rewards.values()):
        return None
    parameter = next(trainer.denoiser.parameters())
    return {
        "version": KEY_VERSION,
        **trainer.normalization.model,  # model, revision, weights: the statistics' model key
        "components": components_fingerprint(trainer),
        "items": items_fingerprint(items),
        "num_items": len(items),
        "batch_size": cfg.train_batch_size,
        "sampler": trainer.sampler.settings(),
        "rewards": rewards,
        "metrics": {n: reward_identity(n, metrics[n]) for n in metric_names},
        "mixed_precision": cfg.mixed_precision,
        "dtype": str(parameter.dtype),
        "sharded": trainer.sharded,
        "device": device_identity(trainer.device),
        "code": {"sampler": source_fingerprint(trainer.sampler), "chain": source_fingerprint(trainer.sampler.chain),
                 "family": source_fingerprint(trainer.family), "scoring": source_fingerprint(score_batch)},
        "libraries": {"torch": torch.__version__, "diffusers": version("diffusers"),  # metadata: importing
                      "transformers": version("transformers")},  # them here would load PIL with cdalign.rewards
    }


class BaseEvaluationReuse:
    """The base model's scores of one evaluation of ``trainer`` on ``items``: :meth:`load`
    before scoring, :meth:`save` after (see the module). Every process calls :meth:`load` (a
    collective: the values are reused only if every process finds them, so all processes
    score the same checkpoints); the main process writes."""

    def __init__(self, trainer, items: Sequence[Item], metrics: Mapping):
        cfg = trainer.config
        self.accelerator, self.num_items = trainer.accelerator, len(items)
        self.num_grid_images = min(cfg.num_grid_images, len(items))
        self.cache = BaseEvaluationCache()
        self.key = base_evaluation_key(trainer, items, cfg.eval_metrics, metrics) if cfg.reuse_base_evaluation and items else None
        self.why_not = ("off (reuse_base_evaluation: false)" if not cfg.reuse_base_evaluation else
                        "not kept: a reward is a user callable without cache_key" if self.key is None and items else "")

    def load(self, stats: Mapping[str, RewardStats]) -> CheckpointScores | None:
        """The kept base scores, normalised with ``stats`` (:meth:`CheckpointScores.with_stats
        <cdalign.evaluation.scoring.CheckpointScores.with_stats>`, as scoring normalises), or None: score it."""
        found = self.cache.load(self.key) if self.key is not None else None
        usable = found is not None and self._complete(*found)
        if not distributed.on_all_processes(usable, self.accelerator):
            if self.accelerator.is_main_process:
                logger.info("base-model evaluation: %s", self.why_not or f"scored now, kept in {self.cache.directory} "
                            "for later runs")
            return None
        if self.accelerator.is_main_process:
            logger.info("base-model evaluation: %d images' values reused from %s", self.num_items, self.cache.path(self.key))
        return CheckpointScores.from_tensors(found[0]).with_stats(stats)

    def _complete(self, tensors: Mapping[str, torch.Tensor], num_items: int) -> bool:
        """Whether a stored entry holds every reward and metric of the key for every item and
        the grid's images."""
        names = [f"reward/{n}" for n in self.key["rewards"]]
        return (num_items == self.num_items and "images" in tensors and len(tensors["images"]) >= self.num_grid_images
                and all(n in tensors and len(tensors[n]) == num_items for n in names)
                and not any(len(v) != num_items for k, v in tensors.items() if k != "images"))

    def save(self, base: CheckpointScores) -> None:
        """Keep ``base``'s raw per-image rewards and metrics and its grid's images (main process)."""
        if self.key is None or not self.accelerator.is_main_process:
            return
        tensors = {"images": base.images[: self.num_grid_images]}
        tensors.update({f"reward/{n}": v for n, v in base.rewards.items()})
        tensors.update({f"metric/{k}": v for k, v in base.metrics.items()})
        try:
            self.cache.save(self.key, tensors, base.n)
        except OSError as err:  # StorageError included: the run's own outputs matter more than the cache
            warnings.warn(f"the base model's evaluation values could not be kept for later runs ({err}); this run is "
                          "unaffected (set CDALIGN_CACHE to a writable folder, or reuse_base_evaluation: false)",
                          CdalignWarning, stacklevel=3)

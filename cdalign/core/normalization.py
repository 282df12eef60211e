"""Reward normalisation in base-model standard deviations (METHOD.md §1).

``r_norm = (r − m)/s`` with m, s the reward's mean and std on base-model samples of the
training prompts. Statistics are cached as JSON under a key naming the reward, the base
model, the prompts and the sampler settings, and reused only when the key matches.

The reward part of the key is :func:`reward_identity`: the registry name, its kwargs and a
fingerprint of its weights. A reward given as a user object (``rewards={"saturation":
my_fn}``) is cached only if it carries a ``cache_key`` attribute (any string; change it
whenever the function changes); without one its statistics are recomputed every run."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cdalign.core.sampling import adapter_parameters
from cdalign.utils.files import atomic_write_text

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


def sampled_fingerprint(named_tensors) -> str:
    """A hash of ``(name, tensor)`` pairs from about 64 evenly spaced entries per tensor:
    cheap on large models, and it changes when weights are retrained or swapped."""
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda item: item[0]):
        flat = t.detach().flatten()
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def callable_name(fn) -> str:
    """``module.qualname`` of a function, or of the class of a callable object."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(fn).__name__)}"


def reward_identity(name: str, reward, *, kwargs: dict | None = None, user: bool = False) -> dict | None:
    """What a reward *is*, for cache keys. Registry rewards (``user=False``): name, kwargs,
    class and a fingerprint of its weights (``state_dict``). User objects: their
    ``cache_key`` attribute (plus the weights if it is a module), or None when they have
    none: such a reward cannot be recognised again and must not be cached."""
    weights = None
    if isinstance(reward, torch.nn.Module):
        tensors = [(k, v) for k, v in reward.state_dict().items() if torch.is_tensor(v) and v.numel() > 0]
        weights = sampled_fingerprint(tensors) if tensors else None
    if not user:
        return {"registry": name, "kwargs": dict(kwargs or {}), "class": callable_name(reward), "weights": weights}
    key = getattr(reward, "cache_key", None)
    if key is None:
        return None
    return {"user": callable_name(reward), "cache_key": str(key), "weights": weights}


def default_cache_dir() -> Path:
    root = os.environ.get("CDALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cdalign")
    return Path(root) / "normalization"


def cache_key(fields: dict) -> str:
    """A stable hash of the JSON-serialisable ``fields`` (reward, model, prompts, sampler)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def prompts_fingerprint(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


class NormalizationCache:
    """One JSON file per key: ``{"key_fields": ..., "stats": {"mean", "std", "count"}}``."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def _path(self, fields: dict) -> Path:
        return self.directory / f"{fields.get('reward', 'reward')}-{cache_key(fields)}.json"

    def load(self, fields: dict) -> RewardStats | None:
        path = self._path(fields)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("key_fields") != json.loads(json.dumps(fields, default=str)):
            return None
        s = data["stats"]
        if not (math.isfinite(s["mean"]) and math.isfinite(s["std"]) and s["std"] > 0):
            return None
        return RewardStats(float(s["mean"]), float(s["std"]), int(s["count"]))

    def save(self, fields: dict, stats: RewardStats) -> Path:
        path = self._path(fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"key_fields": json.loads(json.dumps(fields, default=str)), "stats": stats.__dict__}
        return atomic_write_text(path, json.dumps(payload, indent=2))


def model_fingerprint(unet) -> str:
    """Identifies base weights for the normalisation cache, whatever their source: every
    parameter except those of adapters (told apart structurally, see
    :func:`cdalign.core.sampling.adapter_parameters`), so adding a LoRA leaves it unchanged."""
    adapters = {id(p) for p in adapter_parameters(unet)}
    return sampled_fingerprint([(name, p) for name, p in unet.named_parameters() if id(p) not in adapters])

"""The reward statistics of base-model samples, cached between runs as JSON under
``~/.cache/cdalign/normalization`` (or ``$CDALIGN_CACHE/normalization``), under a key naming
the reward, the base model, the prompts and the sampler settings, and reused only when
the key matches (METHOD.md §1; the formula: :mod:`cdalign.core.normalization`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cdalign.core.normalization import RewardStats
from cdalign.runs.atomic import atomic_write_text
from cdalign.runs.fingerprints import cache_key


def default_cache_dir() -> Path:
    root = os.environ.get("CDALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cdalign")
    return Path(root) / "normalization"


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

"""The reward statistics of base-model samples, cached between runs as JSON under
``~/.cache/cdalign/normalization`` (or ``$CDALIGN_CACHE/normalization``), under a key naming
the reward, the base model, the prompts and the sampler settings, and reused only when
the key matches (METHOD.md §1; the formula: :mod:`cdalign.core.normalization`).

Behind that cache sits a read-only layer, :class:`ShippedStatistics`: one JSON file of
entries in the same form (full key and statistics), shipped with the package for the
embedded models' recipes (``cdalign/data/base_statistics.json``). An entry is served only on
an exact match of the full key and only if it passes the checks a cached entry passes."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cdalign.core.normalization import RewardStats
from cdalign.runs.atomic import atomic_write_text
from cdalign.runs.fingerprints import cache_key

logger = logging.getLogger(__name__)

SHIPPED_FORMAT = 1  # bump when the shipped file's layout changes


def default_cache_root() -> Path:
    """``$CDALIGN_CACHE``, else ``~/.cache/cdalign``: the root of cdalign's caches between runs."""
    return Path(os.environ.get("CDALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cdalign"))


def default_cache_dir() -> Path:
    return default_cache_root() / "normalization"


def stored_key(fields: Mapping) -> dict:
    """``fields`` as stored and compared: through JSON once (tuples become lists, anything
    else not JSON becomes its ``str``)."""
    return json.loads(json.dumps(fields, default=str))


def checked_stats(entry, fields: Mapping) -> RewardStats | None:
    """The statistics of one stored entry ``{"key_fields": ..., "stats": {"mean", "std",
    "count"}}`` if it is for exactly the key ``fields`` and usable (finite mean, finite std
    > 0, a count); None otherwise (another key, non-finite or zero std, malformed)."""
    try:
        if entry.get("key_fields") != stored_key(fields):
            return None
        s = entry["stats"]
        mean, std, count = float(s["mean"]), float(s["std"]), int(s["count"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0 and count > 0):
        return None
    return RewardStats(mean, std, count)


def entry_of(fields: Mapping, stats: RewardStats) -> dict:
    """The stored form of one key's statistics (a cache file's content, a shipped entry)."""
    return {"key_fields": stored_key(fields), "stats": dict(stats.__dict__)}


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
        return checked_stats(data, fields)

    def save(self, fields: dict, stats: RewardStats) -> Path:
        path = self._path(fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(entry_of(fields, stats), indent=2))


class ShippedStatistics:
    """The read-only layer of statistics shipped in one JSON file ``path``:
    ``{"format": 1, "regenerate": <command>, "entries": [{"key_fields", "stats"}, ...]}``.
    :meth:`load` serves an entry only on an exact match of the full key and only if it passes
    :func:`checked_stats`; a missing, unreadable or malformed file serves nothing (it is read
    once, on the first :meth:`load`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict[str, list] | None = None

    def _index(self) -> dict[str, list]:
        if self._entries is None:
            self._entries = {}
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                entries = data["entries"] if data.get("format") == SHIPPED_FORMAT else []
            except (OSError, ValueError, AttributeError, KeyError, TypeError) as err:
                logger.warning("shipped reward statistics %s unreadable (%s): statistics are computed instead",
                               self.path, err)
                entries = []
            for entry in entries if isinstance(entries, list) else []:
                key = entry.get("key_fields") if isinstance(entry, dict) else None
                if isinstance(key, dict):
                    self._entries.setdefault(cache_key(key), []).append(entry)
        return self._entries

    def load(self, fields: dict) -> RewardStats | None:
        for entry in self._index().get(cache_key(stored_key(fields)), []):
            stats = checked_stats(entry, fields)
            if stats is not None:
                return stats
        return None

    def entries(self) -> list[dict]:
        """Every entry of the file, as read (no checks)."""
        return [e for group in self._index().values() for e in group]

    @staticmethod
    def write(path: str | os.PathLike, entries: Iterable[tuple[Mapping, RewardStats]], regenerate: str) -> Path:
        """Write ``(key, statistics)`` pairs as a shipped file (one entry per key, the last
        kept; ordered by reward and key hash, so a regeneration diffs cleanly)."""
        unique = {cache_key(stored_key(k)): entry_of(k, s) for k, s in entries}
        ordered = sorted(unique.items(), key=lambda item: (str(item[1]["key_fields"].get("reward")), item[0]))
        payload = {"format": SHIPPED_FORMAT, "regenerate": regenerate, "entries": [e for _, e in ordered]}
        return atomic_write_text(Path(path), json.dumps(payload, indent=1, sort_keys=True) + "\n")

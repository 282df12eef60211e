"""The base model's per-image evaluation values, kept between runs: one safetensors file per
key under ``$CDALIGN_CACHE/base_evaluation`` (default ``~/.cache/cdalign/base_evaluation``),
the key (everything that decides the values: model, items, sampler, rewards, metrics,
precision, device, ...) stored in the file's metadata and compared whole on every read.
A file is written atomically (:mod:`cdalign.runs.atomic`); one that is torn, foreign or for
another key is never served. What goes into the key: ``cdalign.alignment.base_evaluation``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cdalign.runs.atomic import atomic_write
from cdalign.runs.normalization_cache import default_cache_root, stored_key

NUM_ITEMS = "num_items"  # metadata entry: how many items the per-image values cover


def default_base_evaluation_dir() -> Path:
    return default_cache_root() / "base_evaluation"


class BaseEvaluationCache:
    """``{name: tensor}`` per key, read back only for exactly that key (see the module)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory else default_base_evaluation_dir()

    def path(self, fields: Mapping) -> Path:
        blob = json.dumps(stored_key(fields), sort_keys=True).encode()
        return self.directory / f"{hashlib.sha256(blob).hexdigest()[:32]}.safetensors"

    def load(self, fields: Mapping) -> tuple[dict[str, torch.Tensor], int] | None:
        """The tensors stored for ``fields`` and the number of items they cover, or None (no
        file, unreadable, or written for another key)."""
        path = self.path(fields)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if json.loads(meta.get("key", "null")) != stored_key(fields):
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}, int(meta[NUM_ITEMS])
        except Exception:  # a torn or foreign file (safetensors raises its own error types) is recomputed, never trusted
            return None

    def save(self, fields: Mapping, tensors: Mapping[str, torch.Tensor], num_items: int) -> Path:
        path = self.path(fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"key": json.dumps(stored_key(fields), sort_keys=True), NUM_ITEMS: str(int(num_items))}
        # copies: a view (the grid's rows of all images) is saved alone
        contiguous = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
        return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=meta), what="base-model evaluation cache")

"""Locating reward-model files: a Hub repo id or a local folder.

Every model-based reward resolves its repos here, so that all of them behave the same:
- a local folder is used as is (``revision`` is ignored);
- a Hub id is fetched with ``huggingface_hub.snapshot_download`` restricted to the files
  the reward needs (``allow_patterns``), so nothing else of a large repo is downloaded;
- with ``HF_HUB_OFFLINE=1`` (read at call time) only the local cache is consulted, and
  an uncached id fails at once with a ``RewardModelNotFoundError`` that names the id and
  the command that fetches it.
(Reading the weights safely, without remote code or arbitrary pickles:
``cdalign.rewards._loading``.)
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Iterable

# Files of a transformers model folder, safetensors first; ``.bin`` only as a fallback.
MODEL_CONFIG_FILES = ("config.json",)
SAFETENSORS_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")
CLIP_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)
PREPROCESSOR_FILES = ("preprocessor_config.json",)


class RewardModelNotFoundError(OSError):
    """A reward model's files could not be found locally or fetched from the Hub."""


def _offline() -> bool:
    """Whether reward files may come from the local cache only: ``HF_HUB_OFFLINE`` as set
    now, or as huggingface_hub read it at import (cf. ``downloads.hub_offline``, the latter alone)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def _looks_like_path(model_id: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a filesystem path.
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id


def fetch_command(model_id: str, patterns: Iterable[str], revision: str | None = None) -> str:
    """The shell command that downloads ``patterns`` of ``model_id`` into the HF cache."""
    include = " ".join(f"--include '{p}'" for p in patterns)
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {model_id}{rev} {include}".rstrip()


def resolve_folder(
    model_id: str,
    patterns: Iterable[str],
    *,
    revision: str | None = None,
    purpose: str,
) -> Path:
    """Return a local folder holding ``patterns`` of ``model_id`` (a local folder or a Hub id).

    ``purpose`` names the reward and component in error messages (e.g. "pickscore model").
    Raises ``RewardModelNotFoundError`` (an OSError) naming the id when the files are
    neither local nor downloadable; offline this happens without any network attempt.
    """
    patterns = tuple(patterns)
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local
    if _looks_like_path(model_id):
        raise RewardModelNotFoundError(
            f"{purpose}: {model_id!r} is not an existing folder; give a local folder that holds "
            f"{', '.join(patterns)}, or a Hub repo id"
        )
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        folder = snapshot_download(
            model_id,
            revision=revision,
            allow_patterns=list(patterns),
            local_files_only=offline,
        )
    except Exception as err:  # LocalEntryNotFoundError, RepositoryNotFoundError, HTTP errors, ...
        why = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloads"
            if offline
            else f"the download failed ({type(err).__name__}: {err})"
        )
        raise RewardModelNotFoundError(
            f"{purpose}: cannot load Hub repo {model_id!r}"
            f"{f' at revision {revision!r}' if revision else ''}: {why}. "
            f"Fetch it once while online with `{fetch_command(model_id, patterns, revision)}` "
            f"(or huggingface_hub.snapshot_download({model_id!r}, allow_patterns={list(patterns)!r})), "
            "or pass a local folder holding those files as the model id."
        ) from err
    return Path(folder)


def require_file(folder: Path, filename: str, model_id: str, purpose: str) -> Path:
    """``folder / filename``, or a ``RewardModelNotFoundError`` naming ``model_id``."""
    path = Path(folder) / filename
    if not path.is_file():
        raise RewardModelNotFoundError(
            f"{purpose}: file {filename!r} not found in {model_id!r} (looked in {folder}). "
            f"Fetch it with `{fetch_command(model_id, [filename])}` or put it in the local folder."
        )
    return path


def has_any(folder: Path, patterns: Iterable[str]) -> bool:
    """Whether ``folder`` directly contains a file matching any of ``patterns``."""
    names = [p.name for p in Path(folder).iterdir() if p.is_file()]
    return any(fnmatch.filter(names, pattern) for pattern in patterns)


def resolve_transformers_model(model_id: str, *, revision: str | None, purpose: str, extra: Iterable[str] = ()) -> Path:
    """Local folder with a transformers model (config + weights, safetensors preferred,
    ``pytorch_model.bin`` fetched only if the repo has no safetensors) plus ``extra`` files."""
    wanted = (*MODEL_CONFIG_FILES, *SAFETENSORS_WEIGHT_FILES, *extra)
    folder = resolve_folder(model_id, wanted, revision=revision, purpose=purpose)
    if not has_any(folder, SAFETENSORS_WEIGHT_FILES) and not Path(model_id).expanduser().is_dir():
        folder = resolve_folder(model_id, (*wanted, *PICKLE_WEIGHT_FILES), revision=revision, purpose=purpose)
    require_file(folder, "config.json", model_id, purpose)
    if not has_any(folder, SAFETENSORS_WEIGHT_FILES + PICKLE_WEIGHT_FILES):
        raise RewardModelNotFoundError(
            f"{purpose}: no weights (model.safetensors or pytorch_model.bin) in {model_id!r} (looked in {folder}). "
            f"Fetch them with `{fetch_command(model_id, ('config.json', 'model.safetensors'), revision)}`."
        )
    return folder

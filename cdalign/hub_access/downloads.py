"""Downloads from the Hub: single files with errors that name repo, revision and file,
and snapshots that say which commit a revision resolved to (the provenance a run records);
whether a name can be a repo id at all, and whether the Hub is off (``HF_HUB_OFFLINE``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

COMMIT_RE = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubSnapshot:
    """A Hub repo read at one commit: ``revision`` as asked (branch, tag, sha or None =
    main), ``commit`` the 40-hex sha it resolved to, ``path`` the local snapshot folder."""

    repo_id: str
    repo_type: str
    revision: str | None
    commit: str
    path: Path

    def record(self) -> dict:
        """What a run writes down: enough to fetch exactly these files again."""
        return {"repo_id": self.repo_id, "repo_type": self.repo_type, "revision": self.revision, "commit": self.commit}


def snapshot_of(repo_id: str, revision: str | None, repo_type: str, path: str | Path) -> HubSnapshot:
    """The :class:`HubSnapshot` of a folder in the Hub cache (``.../snapshots/<commit>``)."""
    path = Path(path)
    if not COMMIT_RE.fullmatch(path.name):
        raise ValueError(f"{path} is not a Hub cache snapshot folder (its name is not a commit sha)")
    return HubSnapshot(repo_id, repo_type, revision, path.name, path)


def download_snapshot(repo_id: str, *, revision: str | None = None, repo_type: str = "model") -> HubSnapshot:
    """``snapshot_download`` of a whole repo (cached; offline it answers from the cache).
    Errors are huggingface_hub's own (callers word them for their field)."""
    from huggingface_hub import snapshot_download

    return snapshot_of(repo_id, revision, repo_type, snapshot_download(repo_id, repo_type=repo_type, revision=revision))


def download_file(
    repo_id: str, filename: str, *, revision: str | None = None, endpoint: str | None = None, what: str = ""
) -> Path:
    """``hf_hub_download`` of one file (cached). A missing file raises FileNotFoundError,
    any other failure OSError, both naming repo, revision and file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    where = f"{what + ': ' if what else ''}{filename!r} in Hub repo {repo_id!r} (revision {revision or 'main'})"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=endpoint))
    except EntryNotFoundError as err:
        if isinstance(err, LocalEntryNotFoundError):
            raise OSError(f"{where} is not cached and the Hub is unreachable or offline (HF_HUB_OFFLINE): {err}") from err
        raise FileNotFoundError(f"{where} does not exist") from err
    except Exception as err:
        raise OSError(f"could not download {where}: {type(err).__name__}: {err}") from err


def repo_id_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Hub repo id (huggingface_hub's own words), or None if it can.
    No network call."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        return str(err)
    return None


def hub_offline() -> bool:
    """Whether huggingface_hub runs offline: ``HF_HUB_OFFLINE`` as huggingface_hub read it
    when it was imported (its downloads obey that value, not a later change of the variable)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)

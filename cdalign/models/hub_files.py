"""Downloading single files from the Hub with errors that name repo, revision and file."""

from __future__ import annotations

from pathlib import Path


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

"""Prompt sources: a named set shipped with cdalign, a local file, or a Hub dataset.

A prompt source is anything that gives a list of strings; the trainer draws micro-batch
prompts from it with a seeded generator (same prompts on every run with that seed)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from cdalign.data.shapes import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, SIZES, caption
from cdalign.hub_access.downloads import HubSnapshot, download_snapshot, hub_offline, repo_id_problem
from cdalign.registry import Registry

PROMPT_SETS: Registry[Callable[[], list[str]]] = Registry("prompt set")


def _packaged(name: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        text = resources.files("cdalign").joinpath("data", "prompts", f"{name}.txt").read_text(encoding="utf-8")
        return [line.strip() for line in text.splitlines() if line.strip()]

    return load


# The DDPO "simple animals" list (45 names) used by the paper's multi-reward experiment,
# and its six held-out evaluation animals (METHOD.md §1).
PROMPT_SETS.register("animals", _packaged("animals"))
PROMPT_SETS.register("animals_eval", _packaged("animals_eval"))
# The shapes world's 12 training prompts, and 12 held-out ones for evaluating aligned models: the same
# shapes, sizes and backgrounds with the colours permuted (red<->blue, green->cyan->green... see the
# file), so no prompt is in the training set and the attribute mix, hence the base statistics, match.
PROMPT_SETS.register("shapes", _packaged("shapes"))
PROMPT_SETS.register("shapes_eval", _packaged("shapes_eval"))


def _shapes_world() -> list[str]:
    """Every caption of the shapes world (colour × shape × {no size, small, large} × {no
    background, white, gray, black}: 216) except the 12 held-out ``shapes_eval`` prompts."""

    held_out = set(PROMPT_SETS.get("shapes_eval")())
    captions = [
        caption(shape, color, size, background)
        for color in COLOR_NAMES
        for shape in SHAPES
        for size in (None, *SIZES)
        for background in (None, *BACKGROUND_NAMES)
    ]
    return [c for c in captions if c not in held_out]


PROMPT_SETS.register("shapes_world", _shapes_world)


def load_prompts(
    source: str | Sequence[str] | Callable[[], Sequence[str]],
    column: str = "prompt",
    split: str = "train",
    revision: str | None = None,
) -> list[str]:
    """Resolve ``source`` to a non-empty list of prompts.

    - a list of strings or a zero-argument callable returning one;
    - a registered set name (``PROMPT_SETS``: animals, animals_eval, shapes, ...);
    - a local ``.txt`` (one prompt per line), ``.json`` (list of strings, or list of
      objects with ``column``) or ``.jsonl`` (objects with ``column``) file;
    - otherwise a Hub dataset repo id, read at ``revision`` (branch, tag or commit; None:
      main) and loaded with ``datasets.load_dataset`` (split ``split``, column ``column``).
    """
    return load_prompts_with_source(source, column, split, revision)[0]


def load_prompts_with_source(
    source: str | Sequence[str] | Callable[[], Sequence[str]],
    column: str = "prompt",
    split: str = "train",
    revision: str | None = None,
) -> tuple[list[str], HubSnapshot | None]:
    """:func:`load_prompts`, and the Hub snapshot (repo id, asked revision, resolved
    commit) the prompts came from, or None when they did not come from the Hub."""
    snapshot = None
    if callable(source):
        prompts = list(source())
        where = getattr(source, "__name__", "prompt callable")
    elif not isinstance(source, str):
        prompts, where = list(source), "prompt list"
    elif source in PROMPT_SETS:
        prompts, where = PROMPT_SETS.get(source)(), f"prompt set {source!r}"
    elif Path(source).suffix in (".txt", ".json", ".jsonl") or Path(source).is_file():
        prompts, where = _from_file(Path(source), column), f"prompt file {source!r}"
    else:
        prompts, snapshot = _from_hub(source, column, split, revision)
        where = f"Hub dataset {source!r}"
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{where}: prompts must be strings, got {type(bad[0]).__name__}")
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"{where} holds no prompts; give a non-empty prompt set")
    return prompts, snapshot


def _read_utf8(path: Path) -> str:
    """The text of a prompt file; ``ValueError`` naming the file, the line and the byte
    when it is not UTF-8 (e.g. saved as Latin-1 / Windows-1252)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"prompt file {str(path)!r}, line {line}: not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}: "
            f"{err.reason}); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _from_file(path: Path, column: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} does not exist; give a file path, a Hub dataset id, "
            f"or one of the prompt sets {PROMPT_SETS.names()}"
        )
    text = _read_utf8(path)
    if path.suffix == ".txt":
        return text.splitlines()
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
            places = [f"item {k}" for k in range(len(rows))] if isinstance(rows, list) else []
        except json.JSONDecodeError as err:
            raise ValueError(f"prompt file {str(path)!r}, line {err.lineno} column {err.colno}: not valid JSON "
                             f"({err.msg}); a .json prompt file holds one list of prompts or of objects") from None
    else:  # .jsonl: one JSON object per line
        rows, places = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
                places.append(f"line {number}")
            except json.JSONDecodeError as err:
                raise ValueError(f"prompt file {str(path)!r}, line {number}: not valid JSON ({err.msg}, column "
                                 f"{err.colno}); a .jsonl prompt file holds one JSON object per line") from None
    if not isinstance(rows, list):
        raise ValueError(f"prompt file {str(path)!r}: expected a list of prompts or of objects with {column!r}")
    out = []
    for where, row in zip(places, rows):
        if isinstance(row, dict):
            if column not in row:
                raise ValueError(f"prompt file {str(path)!r}, {where}: no {column!r} column (its keys: "
                                 f"{', '.join(map(repr, row)) or 'none'}); set prompt_column to the column holding the prompts")
            row = row[column]
        out.append(row)
    return out


def _from_hub(dataset_id: str, column: str, split: str, revision: str | None) -> tuple[list[str], HubSnapshot]:
    """Prompts of a Hub dataset repo: the repo's snapshot at ``revision`` (so the commit
    it resolved to is known and the offline cache serves it), loaded by ``datasets``."""
    import datasets  # heavy (pyarrow, pandas): only runs that read a Hub dataset need it

    at = f"revision {revision or 'main'}"
    sets = ", ".join(PROMPT_SETS.names())
    if repo_id_problem(dataset_id) is not None:
        raise ValueError(
            f"prompts={dataset_id!r} is neither a prompt set ({sets}), nor a local .txt/.json/.jsonl file "
            "(none exists there), nor a valid Hub dataset id"
        )
    try:
        snapshot = download_snapshot(dataset_id, revision=revision, repo_type="dataset")
    except Exception as err:  # huggingface_hub's errors: not found, revision not found, offline and uncached
        offline = " (HF_HUB_OFFLINE=1 and it is not in the local Hub cache)" if hub_offline() else ""
        cause = str(err).strip().splitlines()[0][:200].rstrip(".") if str(err).strip() else type(err).__name__
        raise ValueError(
            f"prompts={dataset_id!r} ({at}) is neither a prompt set ({sets}), nor a local .txt/.json/.jsonl file, "
            f"nor a Hub dataset that could be fetched{offline}: {cause}. Download it once with "
            f"`hf download {dataset_id} --repo-type dataset" + (f" --revision {revision}" if revision else "") + "`"
        ) from None
    try:
        ds = datasets.load_dataset(str(snapshot.path), split=split)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise ValueError(f"Hub dataset {dataset_id!r} ({at}, commit {snapshot.commit[:12]}): cannot load split "
                         f"{split!r} ({type(err).__name__}: {err}); set prompt_split") from None
    if column not in ds.column_names:
        raise ValueError(f"Hub dataset {dataset_id!r} has no column {column!r}; columns: {ds.column_names} (set prompt_column)")
    return list(ds[column]), snapshot

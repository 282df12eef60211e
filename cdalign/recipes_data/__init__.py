"""The recipes and the evaluation suite that ship inside the package, found by name.

They are the ones that run offline on a CPU with the embedded tiny models (``cdalign/data``),
and the defaults of the ``cdalign`` command: ``tiny/multi_reward`` (``cdalign align``),
``compose/tiny_adapters`` and its three component recipes (``cdalign compose``),
``suites/tiny`` (``cdalign evaluate``). This folder holds the only copy of each, so an
installed package (a wheel, no checkout) runs the same recipes a checkout does.

    find_recipe("tiny/multi_reward")               # .../cdalign/recipes_data/tiny/multi_reward.yaml
    find_recipe("recipes/tiny/multi_reward.yaml")  # the same file: where a checkout kept it before
    find_recipe("my_recipe.yaml")                  # a file that exists is itself

A name is a path below this folder, with or without ``.yaml``. The folders these files lived
in before they moved here (``recipes/tiny/``, ``recipes/compose/``, ``evaluation/suites/``)
resolve to the same files when nothing is there, so commands written for a checkout keep
working; a file of that name that does exist always wins."""

from __future__ import annotations

import os
from pathlib import Path, PurePath

__all__ = ["RECIPES_DIR", "SUITES_DIR", "find_recipe", "packaged_recipes"]

RECIPES_DIR = Path(__file__).resolve().parent
SUITES_DIR = RECIPES_DIR / "suites"

# Checkout folder (relative to the repository root) -> the folder here its files moved to.
MOVED_FROM: dict[tuple[str, ...], str] = {
    ("recipes", "tiny"): "tiny",
    ("recipes", "compose"): "compose",
    ("evaluation", "suites"): "suites",
}


def packaged_recipes() -> list[str]:
    """The names of every packaged recipe and suite, e.g. ``tiny/multi_reward``."""
    return sorted(p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob("*.yaml"))


def _packaged(path: PurePath) -> Path | None:
    """The packaged file a relative ``path`` names: by name, or by the checkout path it had."""
    if path.is_absolute() or ".." in path.parts:
        return None
    moved = MOVED_FROM.get(path.parts[:2])
    candidates = [RECIPES_DIR / path, RECIPES_DIR / path.with_suffix(".yaml")]
    if moved is not None and len(path.parts) == 3:
        candidates.append(RECIPES_DIR / moved / path.parts[2])
    return next((c for c in candidates if c.suffix == ".yaml" and c.is_file()), None)


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """The recipe file ``name_or_path`` names: the file itself when it exists, else the
    packaged recipe of that name (or of the checkout path it had). Neither: ``ValueError``
    saying the file is not found and listing the packaged names."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = _packaged(PurePath(name_or_path))
    if packaged is None:
        raise ValueError(f"{name_or_path}: config file not found, and no packaged recipe of that name "
                         f"(packaged: {', '.join(packaged_recipes())})")
    return packaged

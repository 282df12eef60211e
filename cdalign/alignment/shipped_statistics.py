"""The base-model reward statistics shipped with cdalign (``cdalign/data/base_statistics.json``,
:mod:`cdalign.data.base_statistics`): checked against the keys today's code computes, or
regenerated through the trainer's own code path (statistics only, no training).

    python -m cdalign.alignment.shipped_statistics            # check: exit 1 naming every stale entry
    python -m cdalign.alignment.shipped_statistics --refresh  # recompute them all and rewrite the file

Run it as one process (the key holds the global batch, ``train_batch_size`` × processes). A
refresh computes each packaged recipe's statistics as a first run of that recipe does from an
empty cache, on a CPU (the tiny models' recipes are CPU recipes); a run whose key differs in
anything (a reward's code, the weights, the seed, the process count) computes its own."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from cdalign.alignment.config import load_config_file
from cdalign.alignment.trainer import ConstrainedDDPOTrainer
from cdalign.console import command_output
from cdalign.core.normalization import RewardStats
from cdalign.data.base_statistics import (
    REGENERATE_COMMAND,
    SHIPPED_RECIPES,
    SHIPPED_STATISTICS_FILE,
    shipped_statistics,
)
from cdalign.runs.lock import release_run_lock
from cdalign.runs.normalization_cache import ShippedStatistics

logger = logging.getLogger("cdalign.alignment.shipped_statistics")  # not __name__: "__main__" under python -m


def recipe_trainer(recipe: str, workdir: Path) -> ConstrainedDDPOTrainer:
    """A trainer of the packaged ``recipe`` as a first run of it builds one (nothing sampled
    yet), writing only below ``workdir``: its output folder and an empty statistics cache."""
    cfg = load_config_file(recipe)
    cfg.output_dir = str(workdir / "run")
    cfg.normalization_cache_dir = str(workdir / "cache")
    trainer = ConstrainedDDPOTrainer(cfg)
    if trainer.accelerator.num_processes != 1:
        raise RuntimeError(f"the shipped statistics are those of one process; run `{REGENERATE_COMMAND}` without "
                           "accelerate launch / torchrun")
    return trainer


def _each_recipe(recipes: Iterable[str]):
    """``(recipe, trainer)`` for each recipe that needs base statistics, each in a fresh temporary folder."""
    for recipe in recipes:
        workdir = Path(tempfile.mkdtemp(prefix="cdalign-statistics-"))
        try:
            trainer = recipe_trainer(recipe, workdir)
            if trainer.problem.needs_base_statistics:
                yield recipe, trainer
            release_run_lock(workdir / "run")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def stale_entries(recipes: Sequence[str] = SHIPPED_RECIPES, shipped: ShippedStatistics | None = None) -> list[str]:
    """Per reward of ``recipes`` whose key today's code computes is not served by ``shipped``
    (default: the file shipped with cdalign), one line naming the recipe and the reward.
    Builds each recipe's trainer; samples nothing."""
    shipped = shipped or shipped_statistics()
    stale = []
    for recipe, trainer in _each_recipe(recipes):
        for name, key in trainer.normalization_keys().items():
            if key is not None and shipped.load(key) is None:
                stale.append(f"{recipe}: {name}")
    return stale


def refresh(recipes: Sequence[str] = SHIPPED_RECIPES, path: str | Path = SHIPPED_STATISTICS_FILE) -> Path:
    """Compute the base-model statistics of every reward of ``recipes`` through the trainer
    (:meth:`~cdalign.alignment.trainer.ConstrainedDDPOTrainer.compute_normalization`, the shipped
    layer off, an empty cache) and write them with their keys to ``path``."""
    entries: list[tuple[dict, RewardStats]] = []
    for recipe, trainer in _each_recipe(recipes):
        trainer.normalization.shipped = None  # computed, never read back from the file being replaced
        start = time.perf_counter()
        stats = trainer.compute_normalization()
        logger.info("%s: statistics of %s computed in %.1f s", recipe, ", ".join(stats), time.perf_counter() - start)
        keys = trainer.normalization_keys()
        entries += [(keys[n], s) for n, s in stats.items() if keys[n] is not None]
    return ShippedStatistics.write(path, entries, REGENERATE_COMMAND)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdalign.alignment.shipped_statistics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--refresh", action="store_true", help="recompute the statistics (no training) and rewrite the file")
    parser.add_argument("--output", default=str(SHIPPED_STATISTICS_FILE), help="the file to write (with --refresh)")
    args = parser.parse_args(argv)
    with command_output():
        if args.refresh:
            print(f"wrote {refresh(SHIPPED_RECIPES, args.output)}")
            return 0
        stale = stale_entries(SHIPPED_RECIPES)
        if stale:
            print("shipped reward statistics are stale (a reward's code, a model, the prompts or a recipe changed):\n  "
                  + "\n  ".join(stale) + f"\nregenerate them: {REGENERATE_COMMAND}", file=sys.stderr)
            return 1
        print(f"{SHIPPED_STATISTICS_FILE}: every packaged tiny recipe's statistics match today's keys")
        return 0


if __name__ == "__main__":
    sys.exit(main())

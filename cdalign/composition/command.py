"""``cdalign compose`` (and ``recipes/compose.py``): constrained composition of diffusion
models (METHOD.md §2) from a YAML recipe and ``--field`` flags; prints the KL tables and
writes report.json.

    cdalign compose                                          # compose/tiny_adapters: CPU, offline, minutes
    cdalign compose --config compose/tiny_concepts           # AND of concepts
    cdalign compose --config compose/tiny_mixture            # OR (mixture)
    cdalign compose --config recipes/compose/sd15_reward_adapters.yaml   # the paper (GPU)
    cdalign compose --config <recipe.yaml> --dual.steps 10 --dual.lr 0.5

``composition: and`` recipes are fields of :class:`~cdalign.composition.config.ComposeConfig`,
``composition: or`` recipes of :class:`~cdalign.composition.config.MixtureConfig` (``--help``
lists them). AND: components that name a ``train_recipe`` and have no LoRA yet are trained
first with the alignment trainer (then reused). Exit codes: 0 done, 2 bad input, 1 stopped."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cdalign.composition.composer import ConstrainedComposer, check_composition_inputs, train_missing_components
from cdalign.composition.concepts import run_concept_sets
from cdalign.composition.config import parse_config
from cdalign.composition.mixture import MixtureTrainer, write_demo_shapes_datasets
from cdalign.console import command_output, is_main_launch_process
from cdalign.publishing.composition_tables import (
    concept_table,
    kl_table,
    loss_table,
    mass_table,
    pairwise_table,
    reward_table,
)
from cdalign.recipes_data import find_recipe
from cdalign.runs import distributed

DEFAULT_RECIPE = find_recipe("compose/tiny_adapters")
# The data of the tiny OR recipe (compose/tiny_mixture), written on its first run.
DEMO_DATA = "outputs/compose-or-shapes"


def run_and(config) -> dict:
    """An AND composition (components or concept sets); prints its tables. Returns the report.
    One accelerator serves the component trainers and the composer; the process group ends here."""
    accelerator = distributed.make_accelerator(distributed.DEFAULT_TIMEOUT_S, mixed_precision=config.mixed_precision)
    try:
        return _run_and(config, accelerator)
    finally:
        distributed.end_process_group(accelerator)


def _run_and(config, accelerator) -> dict:
    check_composition_inputs(config, accelerator)  # bad input fails before any component trains
    t0 = time.time()
    if config.concept_sets:
        report = run_concept_sets(config, accelerator=accelerator)
        if accelerator.is_main_process:
            print(concept_table(report))
            print(f"total {time.time() - t0:.0f} s; outputs in {config.output_dir}: report.json, concepts.md, samples.png, "
                  "set_<k>/ (each set's own run)")
        return report
    trained = train_missing_components(config, accelerator)
    train_s = time.time() - t0
    composer = ConstrainedComposer(config, accelerator=accelerator)
    report = composer.run()
    if accelerator.is_main_process:
        if trained:
            print(f"trained components {', '.join(trained)} in {train_s:.0f} s")
        print(kl_table(report))
        if report.get("pairwise_kl"):
            print(pairwise_table(report))
        if report.get("rewards"):
            print(reward_table(report))
        if report["infeasible"]:
            print(f"INFEASIBLE thresholds: {', '.join(report['infeasible'])} (KL stays above b_i; loosen them)")
        d = report.get("distillation")
        if d:
            print(f"distillation: mean (ε̃_s − ε_μ)² {d['distance_to_composed_before']:.4g} -> {d['distance_to_composed_after']:.4g} "
                  f"in {d['steps']} steps; LoRA in {config.output_dir}/{d['lora']}")
        print(f"total {time.time() - t0:.0f} s; outputs in {config.output_dir}: report.json, weights.json, samples.png, "
              "weights.png, kl_per_component.png")
    return report


def run_or(config) -> dict:
    """An OR composition (a mixture of datasets); prints its tables. Returns the report."""
    demo = [f"{DEMO_DATA}/narrow", f"{DEMO_DATA}/broad"]
    if [d.source for d in config.datasets] == demo and not any(Path(p).exists() for p in demo):
        write_demo_shapes_datasets(DEMO_DATA)  # the tiny recipe's generated data
    t0 = time.time()
    trainer = MixtureTrainer(config)
    report = trainer.train()
    if trainer.accelerator.is_main_process:
        print(loss_table(report))
        if report.get("masses"):
            print(mass_table(report))
        print(f"total {time.time() - t0:.0f} s; outputs in {config.output_dir}")
    return report


# A recipe's ``composition`` key -> the run that carries it out.
RUNNERS = {"and": run_and, "or": run_or}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run ``argv`` (default ``sys.argv[1:]``); ``prog`` names the command in ``--help``
    and errors. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with command_output():
        try:
            config = parse_config(argv, default_recipe=DEFAULT_RECIPE, prog=prog)
        except (ValueError, OSError) as err:
            if is_main_launch_process():  # the same on every rank of a launch: said once
                print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            RUNNERS[config.composition](config)
        except (ValueError, OSError) as err:  # bad paths, models, LoRA files (FileNotFoundError etc. are OSErrors)
            if is_main_launch_process():
                print(f"error: {err}", file=sys.stderr)
            return 2
        except RuntimeError as err:
            print(f"error: stopped: {err}", file=sys.stderr)
            return 1
    return 0

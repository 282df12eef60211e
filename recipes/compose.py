"""Constrained composition of diffusion models (cdalign, arXiv 2508.19104, METHOD.md §2).

    accelerate launch recipes/compose.py                       # default: tiny adapters, CPU, offline, minutes
    accelerate launch recipes/compose.py --config recipes/compose/sd15_reward_adapters.yaml   # the paper (GPU)
    accelerate launch recipes/compose.py --config recipes/compose/sd15_concepts.yaml
    accelerate launch recipes/compose.py --config recipes/compose/tiny_mixture.yaml           # OR (mixture)
    python recipes/compose.py --config <recipe.yaml> --dual.steps 10 --dual.lr 0.5

``composition: and`` recipes are fields of ``cdalign.composition.ComposeConfig``,
``composition: or`` recipes of ``cdalign.composition.MixtureConfig`` (``--help`` lists them).
AND: components that name a ``train_recipe`` and have no LoRA yet are trained first with
recipes/align.py's trainer (then reused). Prints the KL table and writes report.json."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning (see recipes/align.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_RECIPE = Path(__file__).resolve().parent / "compose" / "tiny_adapters.yaml"


def run_and(config) -> dict:
    from accelerate import Accelerator

    from cdalign.composition import ConstrainedComposer, run_concept_sets, train_missing_components
    from cdalign.composition.composer import check_composition_inputs
    from cdalign.publishing.composition_tables import concept_table, kl_table, pairwise_table, reward_table

    check_composition_inputs(config)  # bad input fails before any component trains
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
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


DEMO_DATA = "outputs/compose-or-shapes"


def run_or(config) -> dict:
    from cdalign.composition.mixture import MixtureTrainer, write_demo_shapes_datasets
    from cdalign.publishing.composition_tables import loss_table, mass_table

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


RUNNERS = {"and": run_and, "or": run_or}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from cdalign.composition import parse_config

    try:
        config = parse_config(argv, default_recipe=DEFAULT_RECIPE)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        RUNNERS[config.composition](config)
    except (ValueError, OSError) as err:  # bad paths, models, LoRA files (FileNotFoundError etc. are OSErrors)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

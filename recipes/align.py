"""Constrained alignment of a diffusion model (cdalign, arXiv 2508.19104).

    accelerate launch recipes/align.py                                   # embedded tiny model, CPU, offline
    accelerate launch recipes/align.py --config recipes/sd15/multi_reward.yaml   # the paper's experiment (GPU)
    accelerate launch recipes/align.py --config <recipe.yaml> --max_steps 5 --dual.kappa_i 0.1

Every YAML key is a field of ``cdalign.ConstrainedDDPOConfig`` (``--help`` lists them).
Without ``--config`` the default recipe ``recipes/tiny/multi_reward.yaml`` runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a small CPU
# shared with anything else, spinning threads slowed the tiny model's UNet 10-20x (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_RECIPE = Path(__file__).resolve().parent / "tiny" / "multi_reward.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from cdalign import ConstrainedDDPOTrainer, TrainingInterrupted, parse_config
    from cdalign.publishing.summaries import summary_table

    try:  # bad input (config, paths, models, trackers) is refused here, before any training
        config = parse_config(argv, default_recipe=DEFAULT_RECIPE)
        trainer = ConstrainedDDPOTrainer(config)
    except (ValueError, OSError) as err:  # FileNotFoundError, FileExistsError, ... are OSErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        report = trainer.train()
    except TrainingInterrupted as stop:  # SIGINT/SIGTERM: a checkpoint at the last whole step
        if trainer.accelerator.is_main_process:
            print(f"interrupted at step {stop.step}; checkpoint at {stop.checkpoint}; "
                  "resume with `--resume_from_checkpoint latest`", file=sys.stderr)
        return stop.exit_code
    except ValueError as err:  # bad input found once training started, e.g. a corrupt checkpoint to resume
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as err:  # e.g. too many non-finite batches: the last good outputs stay
        print(f"error: training stopped: {err}", file=sys.stderr)
        return 1
    if trainer.accelerator.is_main_process:
        print(summary_table(report))
        print(f"outputs in {config.output_dir}: LoRA, report.json, log.jsonl, samples_base_vs_aligned.png, duals.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

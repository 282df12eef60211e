"""``cdalign align`` (and ``recipes/align.py``): constrained alignment of a diffusion model
from a YAML recipe and ``--field`` flags; prints the held-out verdict table.

    cdalign align                                         # tiny/multi_reward: embedded model, CPU, offline
    cdalign align --config recipes/sd15/multi_reward.yaml # the paper's experiment (GPU)
    cdalign align --config tiny/policy_gradient --max_steps 5 --dual.kappa_i 0.1
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml -m cdalign align ...

Every YAML key is a field of :class:`~cdalign.alignment.config.ConstrainedDDPOConfig`
(``--help`` lists them with the values that will run). Exit codes: 0 done, 2 bad input
(refused before any training), 1 training stopped, 130/143 interrupted (a checkpoint at the
last whole step)."""

from __future__ import annotations

import sys

from cdalign.alignment.config import parse_config
from cdalign.alignment.trainer import ConstrainedDDPOTrainer
from cdalign.console import command_output, is_main_launch_process
from cdalign.publishing.summaries import summary_table
from cdalign.recipes_data import find_recipe
from cdalign.runs.signals import TrainingInterrupted

DEFAULT_RECIPE = find_recipe("tiny/multi_reward")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run ``argv`` (default ``sys.argv[1:]``); ``prog`` names the command in ``--help``
    and errors. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with command_output():
        return _run(argv, prog)


def _run(argv: list[str], prog: str | None) -> int:
    try:  # bad input (config, paths, models, trackers) is refused here, before any training
        config = parse_config(argv, default_recipe=DEFAULT_RECIPE, prog=prog)
        trainer = ConstrainedDDPOTrainer(config)
    except (ValueError, OSError) as err:  # FileNotFoundError, FileExistsError, ... are OSErrors
        if is_main_launch_process():  # the same on every rank of a launch: said once
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

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


def _ci(entry_mean: float, ci) -> str:
    return f"{entry_mean:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def summary_table(report) -> str:
    """The run's verdict (an ``AlignmentReport``, or its JSON form): per constraint, the base
    and the aligned model's held-out means with 95% CIs, the paired aligned − base
    difference (same seeds) and λ; then the chain KL (estimator named) and the evaluation
    metrics."""
    from cdalign import AlignmentReport

    report = AlignmentReport.coerce(report)
    n = "?" if report.num_eval_images is None else report.num_eval_images
    lines = [
        f"held-out evaluation: {n} images, base and aligned on the same seeds; means with 95% CI",
        f"{'constraint':<24} {'threshold':>9} {'aims at':>8} {'base':>24} {'aligned':>24} {'aligned − base':>24} "
        f"{'met':>4} {'λ':>7}",
    ]
    for c in report.constraints:
        op = ">=" if c.direction == "high" else "<="
        base_ci = c.base_ci95 if c.base_ci95 is not None else [c.base_measured, c.base_measured]
        diff_s = _ci(c.difference.mean, c.difference.ci95) if c.difference else "n/a"
        target = c.threshold if c.target is None else c.target
        lines.append(
            f"{c.name:<24} {op}{c.threshold:>+7.3g} {target:>+8.3f} "
            f"{_ci(c.base_measured, base_ci):>24} {_ci(c.measured, c.ci95):>24} {diff_s:>24} "
            f"{'NO' if not c.satisfied else c.met or 'yes':>4} {c.dual:>7.3f}"
        )
    for name, m in (report.metrics or {}).items():
        lines.append(
            f"{name:<24} {'':>9} {_ci(m.base.mean, m.base.ci95):>24} "
            f"{_ci(m.aligned.mean, m.aligned.ci95):>24} {_ci(m.difference.mean, m.difference.ci95):>24}"
        )
    kl, obj = report.kl, report.objective
    what = "chain KL to the base (minimised)" if obj.type == "kl" else f"mean {obj.reward} (maximised)"
    lines.append(
        f"objective: {what} = {obj.value:.4g}; chain KL to base ({kl.estimator} estimator, nats) = "
        f"{_ci(kl.mean, kl.ci95)}"
    )
    lines.append("met: CI = the whole 95% CI is past the threshold; mean = only the mean is (a fresh sample may "
                 "read a miss); aims at = the threshold plus the margin the run trained toward (confidence/margin)")
    verdict = "every constraint satisfied" if report.all_satisfied else "NOT every constraint satisfied"
    lines.append(f"all_satisfied: {str(bool(report.all_satisfied)).lower()} ({verdict} on held-out prompts)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from cdalign import ConstrainedDDPOTrainer, TrainingInterrupted, parse_config

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

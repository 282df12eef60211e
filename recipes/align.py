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


def summary_table(report: dict) -> str:
    lines = [
        f"{'constraint':<26} {'threshold':>10} {'base':>9} {'aligned':>9} {'95% CI':>19} {'ok':>4} {'λ':>7}",
    ]
    for c in report["constraints"]:
        op = ">=" if c["direction"] == "high" else "<="
        ci = f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
        lines.append(
            f"{c['name']:<26} {op}{c['threshold']:>8.3g} {c['base_measured']:>9.4f} {c['measured']:>9.4f} "
            f"{ci:>19} {'yes' if c['satisfied'] else 'NO':>4} {c['dual']:>7.3f}"
        )
    obj = report["objective"]
    what = "chain KL to the base (minimised)" if obj["type"] == "kl" else f"mean {obj['reward']} (maximised)"
    lines.append(f"objective: {what} = {obj['value']:.4g}; chain KL to base = {report['kl']['mean']:.4g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from cdalign import ConstrainedDDPOTrainer, parse_config

    if not any(a == "--config" or a.startswith("--config=") for a in argv) and "--help" not in argv and "-h" not in argv:
        argv = ["--config", str(DEFAULT_RECIPE), *argv]
    try:
        config = parse_config(argv)
        trainer = ConstrainedDDPOTrainer(config)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        report = trainer.train()
    except RuntimeError as err:  # e.g. too many non-finite batches: the last good outputs stay
        print(f"error: training stopped: {err}", file=sys.stderr)
        return 1
    if trainer.accelerator.is_main_process:
        print(summary_table(report))
        print(f"outputs in {config.output_dir}: LoRA, report.json, log.jsonl, samples_base_vs_aligned.png, duals.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

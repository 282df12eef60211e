"""Equal weights, side by side: the paper's baseline next to a finished constrained run.

    accelerate launch recipes/align.py                      # the constrained run (outputs/tiny-multi-reward)
    accelerate launch recipes/equal_weights.py --run outputs/tiny-multi-reward

Reruns the constrained run's recipe (same steps, prompts, seeds, evaluation) twice with the
dual variables frozen (``dual.freeze: true``; the same trainer and code path, λ never
updated):

(a) ``init``: every λ at the recipe's initial value ``dual.init`` (the paper's "equal weights");
(b) ``final_mean``: every λ at the mean of the constrained run's final λ (the one equal weight
    a user would tune by hand after seeing the constrained run).

Writes ``<run>/equal_weights/{init,final_mean}/`` (each a complete run) and, in ``<run>``,
``comparison.json``, ``comparison.md`` (per constraint: base, (a), (b), constrained, each
mean with its 95% CI over the same held-out images, and the chain KL) and
``samples_comparison.png`` (base, (a), (b), constrained on the same seeds, drawn through
diffusers' ``load_lora_weights``). The claim holds where the constrained run meets every
constraint and each equal-weights run misses one or pays a larger chain KL (95% CIs apart).
The logic is :mod:`cdalign.evaluation.equal_weights`; the table
:func:`cdalign.publishing.summaries.equal_weights_table`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see recipes/align.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished constrained run (holds config.yaml and report.json)")
    parser.add_argument(
        "--reuse", action="store_true",
        help="reuse finished baselines under <run>/equal_weights whose config matches (default: retrain them)",
    )
    args = parser.parse_args(argv)
    from cdalign import AlignmentReport, ConstrainedDDPOTrainer, TrainingInterrupted, load_config_file
    from cdalign.alignment.config import config_to_dict
    from cdalign.console import is_main_launch_process
    from cdalign.evaluation.equal_weights import baseline_config, baseline_multipliers, compare, comparison_grid
    from cdalign.publishing.summaries import EQUAL_WEIGHTS_LABELS as LABELS
    from cdalign.publishing.summaries import equal_weights_table
    from cdalign.runs import distributed

    main_process = is_main_launch_process()  # under a launcher every process runs this; rank 0 speaks and writes

    def say(text: str, error: bool = False) -> None:
        if main_process:
            print(text, file=sys.stderr if error else sys.stdout)

    run_dir = Path(args.run)
    missing = [f for f in ("config.yaml", "report.json") if not (run_dir / f).is_file()]
    if missing:
        say(f"error: --run {str(run_dir)!r} is not a finished run (no {', '.join(missing)}); run "
            "`accelerate launch recipes/align.py` first, or pass its output_dir", error=True)
        return 2
    try:
        config = load_config_file(run_dir / "config.yaml")
        report = AlignmentReport.read(run_dir / "report.json")
    except (ValueError, OSError) as err:
        say(f"error: {err}", error=True)
        return 2
    if config.dual.freeze:
        say(f"error: {str(run_dir)!r} is itself a frozen-λ run; pass the constrained run", error=True)
        return 2
    # One accelerator (one process group) for both baselines; ended here, not by each trainer.
    accelerator = distributed.make_accelerator(config.ddp_timeout, mixed_precision=config.mixed_precision)
    try:
        reports = {}
        for name, lam in baseline_multipliers(config, report).items():
            cfg = baseline_config(config, name, lam, run_dir)
            out = Path(cfg.output_dir)
            saved = out / "config.yaml"
            if args.reuse and (out / "report.json").is_file() and saved.is_file() and config_to_dict(load_config_file(saved)) == config_to_dict(cfg):
                say(f"{LABELS[name]}: reusing {out} (same config)")
            else:
                say(f"{LABELS[name]}: training with every λ frozen at {lam:.4g} -> {out}")
                try:
                    ConstrainedDDPOTrainer(cfg, accelerator=accelerator).train()
                except TrainingInterrupted as stop:
                    say(f"interrupted at step {stop.step}; checkpoint at {stop.checkpoint}; rerun this command "
                        "(the baseline restarts; its folder is replaced)", error=True)
                    return stop.exit_code
                except (ValueError, OSError) as err:
                    say(f"error: {err}", error=True)
                    return 2
            reports[name] = AlignmentReport.read(out / "report.json")
        if not accelerator.is_main_process:
            return 0
        reports["constrained"] = report
        bases = {k: [c.base_measured for c in r.constraints] for k, r in reports.items()}
        if any(abs(a - b) > 1e-6 for v in bases.values() for a, b in zip(v, bases["constrained"])):
            say("warning: the runs' base-model evaluations differ (different evaluation images?): " + json.dumps(bases), error=True)
        result = compare(reports)
        table = equal_weights_table(result)
        (run_dir / "comparison.json").write_text(json.dumps(result, indent=2))
        (run_dir / "comparison.md").write_text(table + "\n")
        grid = comparison_grid(
            run_dir, config, {"init": run_dir / "equal_weights" / "init", "final_mean": run_dir / "equal_weights" / "final_mean", "constrained": run_dir}, run_dir / "samples_comparison.png"
        )
        print(table)
        print(f"written: {run_dir / 'comparison.md'}, {run_dir / 'comparison.json'}, {grid}")
        return 0
    finally:
        if accelerator.num_processes > 1:
            accelerator.wait_for_everyone()  # the others wait while rank 0 writes the comparison and its grid
        distributed.end_process_group(accelerator)


if __name__ == "__main__":
    sys.exit(main())

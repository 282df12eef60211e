"""Score checkpoints on one footing (cdalign evaluation harness).

    python evaluation/evaluate.py                                    # default suite: tiny model, CPU, offline
    python evaluation/evaluate.py --checkpoint aligned=outputs/tiny-multi-reward
    python evaluation/evaluate.py --config evaluation/suites/sd15_multi_reward.yaml \\
        --checkpoint constrained=you/sd15-constrained@main --checkpoint equal=you/sd15-equal-weights
    python evaluation/evaluate.py --suite tiny --output_dir outputs/eval --num_prompts 4

Every checkpoint (the base model, a local output folder, a Hub repo id with @revision) is
sampled through cdalign's one DiffusionSampler with the same prompts, seeds and sampler
settings, and scored with the same rewards. Writes evaluation.json, evaluation.md,
grid.png (one row per checkpoint, same seeds) and rewards.png into --output_dir. An
interrupted run continues from <output_dir>/cache (pass --no_cache to recompute).
Suites: the YAML files in evaluation/suites/; every field of
cdalign.evaluation.EvaluationSuite is a flag that overrides the suite's value (--help
shows the values that will run). The chain KL uses the suite's kl_estimator (or
--kl_estimator); unset, the one the checkpoints were trained with (their config.yaml)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning (shared small CPUs).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from cdalign.evaluation.harness import evaluate  # noqa: E402
from cdalign.evaluation.suite import EvaluationSuite, parse_suite_command_line  # noqa: E402
from cdalign.fields import check_output_dir_writable  # noqa: E402
from cdalign.models.pipeline import ModelNotFoundError  # noqa: E402

SUITES_DIR = Path(__file__).resolve().parent / "suites"
DEFAULT_SUITE = "tiny"
PROG = "evaluation/evaluate.py"


def parse_suite(argv: list[str] | None = None) -> tuple[EvaluationSuite, dict]:
    """The suite this command line describes (a suite of ``evaluation/suites`` by default),
    and this script's own options."""
    return parse_suite_command_line(argv, SUITES_DIR, default_suite=DEFAULT_SUITE, prog=PROG,
                                    description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])


def main(argv: list[str] | None = None) -> int:
    try:
        suite, options = parse_suite(argv)
        out = Path(options["output_dir"] or f"outputs/eval-{suite.name}")
        check_output_dir_writable(out, "--output_dir")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if options["num_threads"]:
        torch.set_num_threads(options["num_threads"])
    try:
        result = evaluate(suite, out, device=options["device"], use_cache=not options["no_cache"])
    except (ValueError, FileNotFoundError, ModelNotFoundError) as err:  # bad input: missing/corrupt checkpoint, unknown model
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (NotImplementedError, OSError) as err:  # e.g. the Hub unreachable
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.files:  # the main process (under accelerate launch, the others write nothing)
        print((out / "evaluation.md").read_text())
        print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

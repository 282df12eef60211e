"""``cdalign evaluate`` (and ``evaluation/evaluate.py``): score checkpoints on one footing.

    cdalign evaluate                                        # the packaged tiny suite: CPU, offline
    cdalign evaluate --checkpoint aligned=outputs/tiny-multi-reward
    cdalign evaluate --config evaluation/suites/sd15_multi_reward.yaml \\
        --checkpoint constrained=you/sd15-constrained@main --checkpoint equal=you/sd15-equal-weights
    cdalign evaluate --suite tiny --output_dir outputs/eval --num_prompts 4

Every checkpoint (the base model, a local output folder, a Hub repo id with @revision) is
sampled through cdalign's one DiffusionSampler with the same prompts, seeds and sampler
settings, and scored with the same rewards. Writes evaluation.json, evaluation.md,
grid.png (one row per checkpoint, same seeds) and rewards.png into --output_dir. An
interrupted run continues from <output_dir>/cache (pass --no_cache to recompute).
Suites by name: those in ./evaluation/suites (a checkout) and the suites packaged with
cdalign (tiny); every field of cdalign.evaluation.EvaluationSuite is a flag that overrides
the suite's value (--help shows the values that will run). The chain KL uses the suite's
kl_estimator (or --kl_estimator); unset, the one the checkpoints were trained with (their
config.yaml)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from cdalign.console import command_output
from cdalign.evaluation.harness import evaluate
from cdalign.evaluation.suite import EvaluationSuite, parse_suite_command_line
from cdalign.fields import check_output_dir_writable
from cdalign.models.pipeline import ModelNotFoundError

DEFAULT_SUITE = "tiny"
# Suites found by name besides the packaged ones: a checkout's, relative to the current folder.
SUITES_DIRS: tuple[Path, ...] = (Path("evaluation") / "suites",)


def parse_suite(argv: list[str] | None = None, prog: str | None = None,
                suites_dirs: Sequence[str | os.PathLike] = SUITES_DIRS) -> tuple[EvaluationSuite, dict]:
    """The suite this command line describes (the packaged ``tiny`` by default), and the
    command's own options."""
    return parse_suite_command_line(argv, suites_dirs, default_suite=DEFAULT_SUITE, prog=prog,
                                    description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])


def main(argv: list[str] | None = None, prog: str | None = None,
         suites_dirs: Sequence[str | os.PathLike] = SUITES_DIRS) -> int:
    """Run ``argv`` (default ``sys.argv[1:]``); ``prog`` names the command in ``--help``
    and errors; ``suites_dirs``: folders searched for a suite by name before the packaged
    suites. Exit codes: 0 done, 2 bad input, 1 the Hub or the machine failed."""
    with command_output():
        return _run(argv, prog, suites_dirs)


def _run(argv, prog, suites_dirs) -> int:
    try:
        suite, options = parse_suite(argv, prog, suites_dirs)
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

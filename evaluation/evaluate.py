"""Score checkpoints on one footing (cdalign evaluation harness): ``cdalign evaluate`` as a
script, with this folder's suites (``evaluation/suites/``) found by name.

    cdalign evaluate                                                 # the same, installed
    python evaluation/evaluate.py                                    # default suite: tiny model, CPU, offline
    python evaluation/evaluate.py --checkpoint aligned=outputs/tiny-multi-reward
    python evaluation/evaluate.py --config evaluation/suites/sd15_multi_reward.yaml \\
        --checkpoint constrained=you/sd15-constrained@main --checkpoint equal=you/sd15-equal-weights
    python evaluation/evaluate.py --suite tiny --output_dir outputs/eval --num_prompts 4

Suites by name: the YAML files in evaluation/suites/, then those packaged with cdalign
(``tiny``). The command is :mod:`cdalign.evaluation.command` (``--help`` lists every flag)."""

import sys
from pathlib import Path

from cdalign.evaluation import command

SUITES_DIR = Path(__file__).resolve().parent / "suites"


def main(argv: list[str] | None = None) -> int:
    return command.main(argv, suites_dirs=[SUITES_DIR])


if __name__ == "__main__":
    sys.exit(main())

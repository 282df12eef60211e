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

import argparse
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning (shared small CPUs).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from cdalign.evaluation.harness import evaluate  # noqa: E402
from cdalign.evaluation.suite import (  # noqa: E402
    CheckpointSpec,
    EvaluationSuite,
    find_suite,
    load_suite,
    resolve_suite_paths,
)
from cdalign.fields import check_output_dir_writable, dataclass_from_dict, parse_args  # noqa: E402
from cdalign.models.pipeline import ModelNotFoundError  # noqa: E402

SUITES_DIR = Path(__file__).resolve().parent / "suites"
DEFAULT_SUITE = "tiny"
PROG = "evaluation/evaluate.py"


def _script_options(p: argparse.ArgumentParser) -> None:
    """The options of this script that are not suite fields."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--suite", default=None, help=f"suite name in {SUITES_DIR} (default: {DEFAULT_SUITE}); "
                   "--config takes a suite file (or a name) instead")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=SOURCE[@REVISION]",
                   help="add a LoRA checkpoint: a local output folder or a Hub repo id (repeatable); 'base' adds the base model")
    p.add_argument("--only", action="store_true", help="evaluate only the --checkpoint entries, not the suite's own")
    p.add_argument("--output_dir", default=None, help="where to write (default: outputs/eval-<suite name>)")
    p.add_argument("--no_cache", action="store_true", help="recompute every batch instead of resuming from the cache")
    p.add_argument("--device", default=None, help="torch device (default: this process's accelerate device: its GPU, else cpu)")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")


def parse_suite(argv: list[str] | None = None) -> tuple[EvaluationSuite, dict]:
    """The suite the command line describes, and this script's own options. The suite
    file (``--config`` path or name, or ``--suite`` name; default ``tiny``) is read and
    checked first, so its errors name the file; then every ``--field`` flag overrides it,
    ``--checkpoint`` entries are added (``--only``: they replace the suite's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--suite")
    chosen, rest = pre.parse_known_args(argv)
    if chosen.config and chosen.suite:
        raise ValueError("give --config or --suite, not both")
    path = find_suite(chosen.config or chosen.suite or DEFAULT_SUITE, [SUITES_DIR])
    if not any(a in ("-h", "--help") for a in rest):
        load_suite(path)  # the file alone: its errors name it
    raw, options = parse_args(EvaluationSuite, rest, default_recipe=path, resolve_paths=resolve_suite_paths,
                              prog=PROG, description=__doc__.split("\n\n")[0], add_arguments=_script_options)
    if "rewards" in raw and isinstance(raw["rewards"], list):  # --rewards a,b as well as --rewards a b
        raw["rewards"] = [r.strip() for text in raw["rewards"] for r in str(text).split(",") if r.strip()]
    extra = [CheckpointSpec.from_value(c, f"--checkpoint {c!r}") for c in options["checkpoint"]]
    raw["checkpoints"] = extra if options["only"] else list(raw.get("checkpoints") or []) + extra
    return dataclass_from_dict(EvaluationSuite, raw), options


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

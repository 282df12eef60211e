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
Suites: the YAML files in evaluation/suites/ (fields of cdalign.evaluation.EvaluationSuite).
The chain KL uses the suite's kl_estimator (or --kl_estimator); unset, the one the
checkpoints were trained with (their config.yaml)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning (shared small CPUs).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SUITES_DIR = Path(__file__).resolve().parent / "suites"
DEFAULT_SUITE = "tiny"
OVERRIDES = {  # CLI flag -> (suite field, type)
    "model": str, "revision": str, "prompts": str, "num_prompts": int, "images_per_prompt": int,
    "num_inference_steps": int, "guidance_scale": float, "eta": float, "resolution": int,
    "batch_size": int, "seed": int, "kl_estimator": str, "grid_images": int, "dtype": str,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluation/evaluate.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="suite YAML file")
    p.add_argument("--suite", default=None, help=f"suite name in {SUITES_DIR} (default: {DEFAULT_SUITE})")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=SOURCE[@REVISION]",
                   help="add a LoRA checkpoint: a local output folder or a Hub repo id (repeatable); 'base' adds the base model")
    p.add_argument("--only", action="store_true", help="evaluate only the --checkpoint entries, not the suite's own")
    p.add_argument("--rewards", default=None, help="comma-separated reward names (replaces the suite's)")
    p.add_argument("--output_dir", default=None, help="where to write (default: outputs/eval-<suite>)")
    p.add_argument("--no_cache", action="store_true", help="recompute every batch instead of resuming from the cache")
    p.add_argument("--device", default=None, help="torch device (default: this process's accelerate device: its GPU, else cpu)")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    for flag, tp in OVERRIDES.items():
        p.add_argument(f"--{flag}", type=tp, default=None, help=f"override the suite's {flag}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from cdalign.alignment.config import check_output_dir_writable
    from cdalign.evaluation.harness import (
        CheckpointSpec,
        EvaluationSuite,
        evaluate,
        load_suite,
    )
    from cdalign.models.pipeline import ModelNotFoundError

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.config and args.suite:
        print("error: give --config or --suite, not both", file=sys.stderr)
        return 2
    try:
        suite = load_suite(args.config or args.suite or DEFAULT_SUITE, [SUITES_DIR])
        fields = {f: getattr(suite, f) for f in EvaluationSuite.__dataclass_fields__}
        for flag in OVERRIDES:
            if getattr(args, flag) is not None:
                fields[flag] = getattr(args, flag)
        if args.rewards:
            fields["rewards"] = [r.strip() for r in args.rewards.split(",") if r.strip()]
        extra = [CheckpointSpec.from_value(c, f"--checkpoint {c!r}") for c in args.checkpoint]
        fields["checkpoints"] = extra if args.only else list(suite.checkpoints) + extra
        suite = EvaluationSuite(**fields)
        out = Path(args.output_dir or f"outputs/eval-{suite.name}")
        check_output_dir_writable(out, "--output_dir")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = evaluate(suite, out, device=args.device, use_cache=not args.no_cache)
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

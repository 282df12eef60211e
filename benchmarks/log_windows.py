"""A run's training log in windows: the mean of chosen ``log.jsonl`` values over each block
of steps, and each multiplier at the window's last step.

    python benchmarks/log_windows.py outputs/ff7/flow_floor200_s0
    python benchmarks/log_windows.py RUN --window 10 --keys reward/caption_fidelity reward_normalized/brightness kl

What the docs' "10-step means on the training batches" are: values measured on each step's
training images (not held out), averaged over ``--window`` consecutive logged steps; the
``dual/*`` columns are the λ logged at the window's last step (the rule's units, std units for a
normalised or base-relative constraint). Reads only ``log.jsonl``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_KEYS = ("reward/caption_fidelity", "reward_normalized/brightness", "reward_normalized/colorfulness", "kl")


def windows(rows: list[dict], keys: list[str], window: int) -> list[dict]:
    """Per block of ``window`` rows: ``first``/``last`` step, the mean of each key present in
    every row of the block (None otherwise), and every ``dual/*`` value of the block's last row."""
    out = []
    for lo in range(0, len(rows), window):
        block = rows[lo : lo + window]
        entry = {"first": block[0].get("step", lo + 1), "last": block[-1].get("step", lo + len(block))}
        for key in keys:
            values = [r[key] for r in block if key in r]
            entry[key] = float(np.mean(values)) if len(values) == len(block) else None
        entry.update({k: v for k, v in block[-1].items() if k.startswith("dual/")})
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders with a log.jsonl")
    parser.add_argument("--window", type=int, default=10, help="logged steps per window")
    parser.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="log.jsonl values to average")
    args = parser.parse_args(argv)
    if args.window < 1:
        print(f"error: --window: must be at least 1, got {args.window}", file=sys.stderr)
        return 2
    for run in map(Path, args.runs):
        log = run / "log.jsonl"
        if not log.is_file():
            print(f"error: {str(run)!r} has no log.jsonl (not a training run folder)", file=sys.stderr)
            return 2
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        print(f"{run}: {len(rows)} logged steps, means over {args.window}")
        for w in windows(rows, args.keys, args.window):
            means = "  ".join(f"{k} {'—' if w[k] is None else format(w[k], '+.3f')}" for k in args.keys)
            duals = "  ".join(f"{k[5:]} {v:.2f}" for k, v in w.items() if k.startswith("dual/"))
            print(f"  steps {w['first']:>3}-{w['last']:<3}  {means}  | λ {duals}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

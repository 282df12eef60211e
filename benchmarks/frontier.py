"""The frontier experiment: one constrained run per threshold setting against a sweep of
hand-set weights, all on the embedded tiny model, offline on a CPU.

    python benchmarks/frontier.py                 # the whole experiment (outputs/frontier)
    python benchmarks/frontier.py --quick         # the same code on two grid points, for CI

Every run is ``recipes/align.py`` on the main job's recipe (``cdalign/recipes_data/tiny/multi_reward.yaml``),
the same trainer, steps, prompts and seeds; only the duals differ:

- the weighted family: λ frozen (``dual.freeze``) at equal weights on a grid from "misses
  both" to "overshoots both", and unequal pairs;
- the constrained method: one run per threshold setting, each constraint asking for
  ``confidence`` 0.95 on its held-out verdict.

Every run is scored by its own held-out evaluation on the same items (``eval_batches`` × 4
images of the 12 held-out captions, same seeds), and each image's values are kept
(``eval_values.safetensors``), so KL differences are paired over the images. Runs go in
``--workers`` processes of one thread each (on this 2-core CPU two one-thread processes are
~3x faster than one two-thread process, docs/FACTS). A run whose resolved config is unchanged
and finished is reused; any other is retrained (its folder replaced). Writes ``frontier.md``,
``frontier.json``, ``frontier_plane.png`` and ``frontier_kl.png`` in ``--out``. The runs and
the comparison are :mod:`cdalign.evaluation.frontier`; the table
:func:`cdalign.publishing.summaries.frontier_table`."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cdalign.evaluation.frontier import (
    QUICK,
    SETTINGS,
    X,
    Y,
    Setting,
    compare_setting,
    grid,
    is_reusable,
    load_point,
    plot_frontier,
    resolved_config,
)
from cdalign.publishing.summaries import frontier_table

ROOT = Path(__file__).resolve().parents[1]
ALIGN = ROOT / "recipes" / "align.py"


def train(name: str, cfg, out: Path, threads: int) -> tuple[str, float]:
    """``recipes/align.py`` on this run's config in a process of ``threads`` threads."""
    from cdalign.alignment.config import save_config

    cfg_path = out / "configs" / f"{name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    save_config(dataclasses.replace(cfg, overwrite_output_dir=True), cfg_path)
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(ALIGN), "--config", str(cfg_path)], stdout=f, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT).returncode
    if rc != 0:
        raise RuntimeError(f"run {name!r} failed (exit {rc}); its log: {log}")
    return name, time.time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default outputs/frontier, or outputs/frontier-quick)")
    parser.add_argument("--quick", action="store_true", help="two equal weights and the default setting, 2 steps each (CI)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="runs trained at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--eval_batches", type=int, default=None,
                        help="held-out batches of 4 images per run (default 64: 256 images; --quick: 2)")
    parser.add_argument("--only", choices=("fixed", "constrained"), default=None, help="train only these runs")
    args = parser.parse_args(argv)
    out = Path(args.out or ("outputs/frontier-quick" if args.quick else "outputs/frontier"))
    overrides = dict(QUICK["overrides"]) if args.quick else {}
    eval_batches = args.eval_batches or overrides.pop("eval_batches", 64)
    overrides.pop("eval_batches", None)
    runs, constrained_of = grid(args.quick)
    try:
        configs = {n: resolved_config(n, spec, out, overrides, eval_batches) for n, spec in runs.items()}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    wanted = [n for n in runs if args.only is None or (args.only == "fixed") == ("weights" in runs[n])]
    todo = [n for n in wanted if not is_reusable(configs[n])]
    for n in wanted:
        if n not in todo:
            print(f"{n}: reusing {configs[n].output_dir} (same config, finished)")
    start = time.time()
    if todo:
        from tqdm.auto import tqdm

        print(f"training {len(todo)} run(s) in {args.workers} process(es) of {args.threads} thread(s); logs in {out / 'logs'}")
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool, tqdm(total=len(todo), desc="frontier runs") as bar:
            futures = [pool.submit(train, n, configs[n], out, args.threads) for n in todo]
            try:
                for fut in concurrent.futures.as_completed(futures):
                    name, secs = fut.result()
                    bar.set_postfix_str(f"{name} {secs / 60:.1f} min")
                    bar.update(1)
            except RuntimeError as err:
                for f in futures:
                    f.cancel()
                print(f"error: {err}", file=sys.stderr)
                return 1
    missing = [n for n in runs if not is_reusable(configs[n])]
    if missing:
        print(f"not every run is finished ({', '.join(missing)}); rerun without --only to train them", file=sys.stderr)
        return 0 if args.only else 1

    points, reports = {}, {}
    for n in runs:
        points[n], reports[n] = load_point(n, configs[n], runs[n].get("weights"))
    fixed = [points[n] for n in runs if "weights" in runs[n]]
    sweep = sorted((p for p in fixed if len(set(p.weights.values())) == 1), key=lambda p: next(iter(p.weights.values())))
    settings = {s: Setting(s, {X: ("high", SETTINGS[s][0]), Y: ("high", SETTINGS[s][1])}) for s in constrained_of}
    rows = [compare_setting(points[constrained_of[s]], fixed, sweep, settings[s]) for s in constrained_of]
    num_images = int(points[next(iter(points))].kl.numel())
    table = frontier_table(rows, num_images)
    out.mkdir(parents=True, exist_ok=True)
    targets = {n: {c.name: {"threshold": c.threshold, "target": c.target, "met": c.met}
                   for c in reports[n].constraints} for n in constrained_of.values()}
    result = {"num_images": num_images, "settings": rows, "constrained_targets": targets,
              "runs": {n: {"weights": runs[n].get("weights"), "kl": points[n].kl_summary(),
                           **{c: points[n].summary(c) for c in (X, Y)},
                           "metrics": {k: v.aligned.mean for k, v in (reports[n].metrics or {}).items()}}
                       for n in runs},
              "wall_minutes_this_invocation": (time.time() - start) / 60, "quick": args.quick}
    (out / "frontier.json").write_text(json.dumps(result, indent=2))
    (out / "frontier.md").write_text(table + "\n")
    plot_frontier(out / "frontier_plane.png", out / "frontier_kl.png", list(points.values()), [p.name for p in fixed],
                  settings, constrained_of, X, Y, binding=Y)
    print(table)
    print(f"written: {out / 'frontier.md'}, {out / 'frontier.json'}, {out / 'frontier_plane.png'}, {out / 'frontier_kl.png'} "
          f"({(time.time() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

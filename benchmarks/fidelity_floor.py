"""The fidelity-floor experiment: each tiny recipe without a floor, with a fidelity floor,
and with the peers' remedy (the KL weight raised by hand), side by side on the same seeds.

    python benchmarks/fidelity_floor.py                  # both models (outputs/fidelity_floor)
    python benchmarks/fidelity_floor.py --models flow    # the flow recipe only

Per model (``main``: the packaged recipe ``tiny/multi_reward``; ``flow``: ``tiny/flow_multi_reward``):

- ``no_floor``: the recipe as shipped;
- ``floor``: its ``*_floor.yaml`` twin, the same problem plus a ``caption_fidelity`` floor
  relative to the base model (``relative_to_base``), on every ``--seeds`` seed
  (``floor_seed<k>``: another training draw and other reward statistics);
- ``kl_x<β>``: the peers' remedy. Their runs maximise ``Σ w_i r_i − β·KL`` with hand-set
  weights; on this problem (objective: chain KL) that is λ frozen at ``w / β``. ``w`` is what
  the ``no_floor`` run's duals settled at (mean λ over the second half of its log), so
  ``kl_x1`` would be the no-floor run with its prices fixed, and each β raises the KL
  weight by that factor.

Every run is ``recipes/align.py`` in a one-thread process (``--workers`` at once; the
frontier experiment's runner), scored by its own held-out evaluation (the recipe's 64
images of the 12 held-out captions, the same seeds in every run, so differences to the base
are paired), and then all runs of a model together by ``evaluation/independent_check.py``
(plain diffusers ``pipe()``, ``--images`` fresh seeds, numpy classifier), which also draws
the picture grid. A finished run whose config is unchanged is reused. Writes
``fidelity_floor.md`` / ``.json`` and ``grid_<model>.png`` into ``--out``."""

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

from frontier import train  # benchmarks/frontier.py: one run of recipes/align.py in a subprocess

from cdalign.alignment.config import load_config_file
from cdalign.alignment.specs import DualSpec
from cdalign.evaluation.frontier import is_reusable
from cdalign.publishing.tables import format_ci
from cdalign.runs.report import AlignmentReport

ROOT = Path(__file__).resolve().parents[1]
# Recipes packaged with cdalign (cdalign/recipes_data), by name: without and with the floor.
MODELS = {
    "main": ("tiny/multi_reward", "tiny/multi_reward_floor"),
    "flow": ("tiny/flow_multi_reward", "tiny/flow_multi_reward_floor"),
}
BETAS = (4.0,)
SEEDS = (0, 1)
# Floor runs beside the recipe's own floor (name -> overrides; ``floor_gradient`` sets the floor's
# ``gradient:``). Empty: the flow floor recipe already sends the floor's gradient and the chain KL's
# through every step (``gradient: whole_chain``, ``kl_grad_steps: all``), the levers
# benchmarks/hack_timing.py points to; the results page keeps the earlier runs without them.
FLOOR_VARIANTS: dict[str, dict[str, dict]] = {"flow": {}, "main": {}}
ACCURACIES = ("background_accuracy", "color_accuracy", "shape_accuracy")


def settled_prices(run: Path) -> list[float]:
    """Mean λ of each constraint over the second half of a run's logged steps (``log.jsonl``)."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    names = [k for k in rows[0] if k.startswith("dual/")]
    tail = rows[len(rows) // 2:]
    return [sum(r[k] for r in tail) / len(tail) for k in names]


def _variant(floor, overrides: dict):
    """The floor recipe with ``overrides``; ``floor_gradient`` sets the floor constraint's ``gradient:``."""
    overrides = dict(overrides)
    gradient = overrides.pop("floor_gradient", None)
    cfg = dataclasses.replace(floor, **overrides)
    if gradient is not None:
        cfg = dataclasses.replace(cfg, constraints=[dataclasses.replace(c, gradient=gradient) if c.relative_to_base else c
                                                    for c in cfg.constraints])
    return cfg


def configs_for(model: str, out: Path, betas, prices: list[float] | None, seeds=(0,)) -> dict:
    """The runs of one model. Every floor run is repeated on each of ``seeds`` (another training draw
    and other reward statistics; the held-out images stay the same): a floor held on one seed only
    is a coin flip, not a result. The references (no floor, the KL weight) run on the recipe's seed."""
    plain, floor = (load_config_file(name) for name in MODELS[model])
    runs = {"no_floor": dataclasses.replace(plain, output_dir=str(out / model / "no_floor"))}
    for name, overrides in {"floor": {}, **FLOOR_VARIANTS[model]}.items():
        for seed in seeds:
            tag = name if seed == floor.seed else f"{name}_seed{seed}"
            runs[tag] = dataclasses.replace(_variant(floor, overrides), output_dir=str(out / model / tag), seed=seed)
    if prices is not None:
        for beta in betas:
            weights = [round(p / beta, 4) for p in prices]
            runs[f"kl_x{beta:g}"] = dataclasses.replace(
                plain, output_dir=str(out / model / f"kl_x{beta:g}"),
                dual=DualSpec(freeze=True, init=weights, warmup_steps=0),
                # fixed weights: no targets to aim at (the thresholds are only read in the verdict)
                constraints=[dataclasses.replace(c, confidence=None, margin=None) for c in plain.constraints])
    for cfg in runs.values():
        cfg.validate()
    return runs


def train_all(configs: dict, out: Path, workers: int) -> None:
    todo = {n: c for n, c in configs.items() if not is_reusable(c)}
    for n in configs:
        if n not in todo:
            print(f"{n}: reusing {configs[n].output_dir} (same config, finished)")
    if not todo:
        return
    print(f"training {', '.join(todo)} in {workers} one-thread process(es); logs in {out / 'logs'}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(train, f"{Path(c.output_dir).parent.name}-{n}", c, out, 1): n for n, c in todo.items()}
        for fut in concurrent.futures.as_completed(futures):
            name, secs = fut.result()
            print(f"  {name}: {secs / 60:.1f} min")


def independent(model: str, configs: dict, out: Path, images: int) -> dict:
    names = list(configs)
    target = out / f"independent_{model}.json"
    cmd = [sys.executable, str(ROOT / "evaluation" / "independent_check.py"), *[configs[n].output_dir for n in names],
           "--names", *names, "--num_images", str(images), "--out", str(target), "--grid", str(out / f"grid_{model}.png")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads(target.read_text())


def _d(entry) -> str:
    return "n/a" if entry is None or entry.mean is None else format_ci(entry.mean, entry.ci95, "+.3f")


def table(model: str, configs: dict, check: dict) -> list[str]:
    lines = [f"### {model}: `{MODELS[model][0]}`", "",
             "| run | λ | colorfulness (σ) | brightness (σ) | caption fidelity floor | background acc. Δ | colour acc. Δ | "
             "shape acc. Δ | chain KL (nats) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, cfg in configs.items():
        report = AlignmentReport.from_json(json.loads((Path(cfg.output_dir) / "report.json").read_text()))
        cons = {c.source: c for c in report.constraints}
        cells = []
        for reward in ("colorfulness", "brightness"):
            c = cons[reward]
            cells.append(f"{format_ci(c.measured, c.ci95, '+.2f')} {'NO' if not c.satisfied else c.met}")
        floor = cons.get("caption_fidelity")
        cells.append(f"Δ {_d(floor.difference)} {'NO' if not floor.satisfied else floor.met}" if floor else "—")
        m = report.metrics or {}
        cells += [_d(m[k].difference) if k in m else "n/a" for k in ACCURACIES]
        lam = "frozen " + ", ".join(f"{v:g}" for v in cfg.dual.init) if cfg.dual.freeze else \
            "learned " + ", ".join(f"{c.dual:.2f}" for c in report.constraints)
        lines.append(f"| {name} | {lam} | " + " | ".join(cells) + f" | {format_ci(report.kl.mean, report.kl.ci95, '.3f')} |")
    res = check["results"]
    lines += ["", f"Independent check (plain diffusers `pipe()`, {check['num_images']} images, seeds "
              f"{check['seeds'][0]}..{check['seeds'][1]}, numpy classifier; Δ: paired difference to the base):", "",
              "| run | colorfulness (σ) | brightness (σ) | background acc. Δ | colour acc. Δ | shape acc. Δ |",
              "|---|---|---|---|---|---|"]
    for name in ["base", *configs]:
        row = res[name]
        cells = [format_ci(row[r]["mean"], row[r]["ci95"], "+.2f") for r in ("colorfulness", "brightness")]
        for k in ACCURACIES:
            e = row[k].get("difference") if name != "base" else row[k]
            cells.append(format_ci(e["mean"], e["ci95"], "+.3f") if name != "base" else f"{e['mean']:.3f} (base)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--out", default="outputs/fidelity_floor")
    parser.add_argument("--betas", nargs="+", type=float, default=list(BETAS), help="KL weight factors of the peers' remedy")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds of every floor run")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--images", type=int, default=128, help="images per model in the independent check")
    parser.add_argument("--train_only", action="store_true", help="train (or reuse) the runs; no check, no table")
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    lines, result = ["# Fidelity floors against the KL weight", ""], {}
    try:
        for model in args.models:
            first = configs_for(model, out, args.betas, None, args.seeds)
            train_all({"no_floor": first["no_floor"]}, out, args.workers)  # its prices decide the remedy's weights
            prices = settled_prices(Path(first["no_floor"].output_dir))
            configs = configs_for(model, out, args.betas, prices, args.seeds)
            train_all(configs, out, args.workers)
            if args.train_only:
                continue
            check = independent(model, configs, out, args.images)
            lines += table(model, configs, check) + [""]
            result[model] = {"no_floor_prices": prices, "runs": {n: c.output_dir for n, c in configs.items()},
                             "independent": check}
    except (RuntimeError, subprocess.CalledProcessError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.train_only:
        return 0
    lines.append(f"_{(time.time() - start) / 60:.1f} min wall for this invocation (reused runs not counted)._")
    (out / "fidelity_floor.md").write_text("\n".join(lines) + "\n")
    (out / "fidelity_floor.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

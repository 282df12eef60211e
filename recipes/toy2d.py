"""The paper's 2D composition experiments, exactly checkable, on a CPU in minutes.

    python recipes/toy2d.py                       # both setups, outputs in outputs/toy2d
    python recipes/toy2d.py --out /tmp/toy --quick

AND (reverse KL, product): three component score models, two similar ones on the left and
one on the right. Composed ε_μ = Σ μ_i ε_i (cdalign's ComposedPredictor) sampled with
cdalign's DDIM chain; μ learned by projected dual ascent on the chain KL to each component
(cdalign's ComponentKL hook). Equal weights are pulled toward the similar pair; the
min-max weights sit between the groups.
OR (forward KL, mixture): dataset A = one Gaussian at (0.75, 0), dataset B = two at
(-0.75, ±0.75), variance 0.025; one model trained on Σ μ_i·DSM_i (cdalign's dsm_loss) with
μ ascending on the raw losses or on the excess losses (loss minus each dataset's
irreducible loss).

Because everything is 2D, the exact answer is computed on a dense grid from the true data
densities: the product Π q_i^μ_i / Z (or the mixture Σ μ_i q_i), KL to each component,
and the min-max weights μ* by search over the simplex. The table compares equal weights,
learned weights and μ*. The experiments are :mod:`cdalign.composition.toy2d`; the table
:func:`cdalign.publishing.composition_tables.toy2d_table`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see recipes/align.py)

import torch  # noqa: E402

from cdalign.composition.toy2d import Toy2DSettings, run_toy2d, without_samples  # noqa: E402
from cdalign.publishing.composition_tables import toy2d_table  # noqa: E402


def main(argv=None):
    defaults = Toy2DSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=defaults.out)
    p.add_argument("--train_steps", type=int, default=defaults.train_steps, help="optimiser steps per score model")
    p.add_argument("--samples", type=int, default=defaults.samples, help="samples per chain-KL estimate / scatter")
    p.add_argument("--num_inference_steps", type=int, default=defaults.num_inference_steps, help="DDIM steps (η = 1)")
    p.add_argument("--and_dual_steps", type=int, default=defaults.and_dual_steps)
    p.add_argument("--and_lr", type=float, default=defaults.and_lr,
                   help="dual step per unit of the largest KL (normalised ascent)")
    p.add_argument("--or_lr", type=float, default=defaults.or_lr, help="dual step per unit of loss")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--quick", action="store_true", help="fewer steps and samples (smoke test)")
    p.add_argument("--no_plots", dest="plots", action="store_false")
    args = vars(p.parse_args(argv))
    quick = args.pop("quick")
    settings = Toy2DSettings(**args)
    if quick:
        settings.quick()
    torch.set_num_threads(1)
    settings.out.mkdir(parents=True, exist_ok=True)
    results = run_toy2d(settings)
    table = toy2d_table(results)
    print(table)
    print(f"total {results['seconds']:.0f} s; outputs in {settings.out}")
    (settings.out / "results.json").write_text(json.dumps(without_samples(results), indent=2))
    (settings.out / "table.md").write_text(table)
    return results


if __name__ == "__main__":
    main()

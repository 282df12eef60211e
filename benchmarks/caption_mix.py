"""Does the held-out verdict measure what training asked for? A finished run's held-out
values split by what each caption names, and reweighted to the training prompts' mix.

    python benchmarks/caption_mix.py outputs/ff6/flow_frozen_b6_f65 outputs/fidelity_floor/flow/no_floor
    python benchmarks/caption_mix.py RUN --value brightness_high --property background

A constraint is trained on the training prompts and judged on the held-out ones. When the two
sets name a property in different proportions (the shapes world's held-out captions name no
background in 6 of 12, the training captions in 48 of 204), a reward that some kinds of
caption can gain more cheaply than others reads differently on the two: the held-out mean can
pass while the training mix does not. Per run this prints, for each kind of caption (the value
of ``--property`` its prompt names, ``None`` for none), the base model's and the run's mean of
the per-image value ``--value`` (a key of ``eval_values.safetensors`` without its
``base/``/``aligned/`` prefix; the constraint's own units) and their paired difference; then
the held-out mean and the same means reweighted to the training prompts' proportions of each
kind (each kind's mean weighted by its share of the training prompts, over the kinds the held-out
images show; the CI from the kinds' paired differences, normal approximation). Images whose value
is NaN (an accuracy where the caption names nothing to read) are left out. Reads only the run folder (``config.yaml``,
``eval_values.safetensors``); samples nothing."""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

from cdalign.core.seeding import evaluation_items
from cdalign.core.statistics import Z95, paired_difference
from cdalign.data.prompt_sets import load_prompts
from cdalign.data.shapes import parse_prompt
from cdalign.fields import read_yaml_mapping
from cdalign.publishing.tables import format_ci

PROPERTIES = ("background", "color", "shape", "size")


def kinds(prompts: list[str], prop: str) -> list[str]:
    """What each prompt names for ``prop`` ("None" where it names nothing)."""
    return [str(parse_prompt(p)[prop]) for p in prompts]


def weighted(values: dict[str, np.ndarray], weights: dict[str, float]) -> tuple[float, float]:
    """Σ_k w_k mean_k and its standard error √(Σ_k w_k² var_k / n_k), over the kinds present."""
    present = {k: w for k, w in weights.items() if k in values and len(values[k]) > 0}
    total = sum(present.values())
    mean = sum(w / total * values[k].mean() for k, w in present.items())
    var = sum((w / total) ** 2 * (values[k].var(ddof=1) / len(values[k]) if len(values[k]) > 1 else 0.0)
              for k, w in present.items())
    return float(mean), float(np.sqrt(var))


def run_table(run: Path, value: str, prop: str) -> list[str]:
    from safetensors.numpy import load_file

    config = read_yaml_mapping(run / "config.yaml")
    eval_prompts = load_prompts(config.get("eval_prompts") or config["prompts"])
    train_prompts = load_prompts(config["prompts"])
    tensors = load_file(str(run / "eval_values.safetensors"))
    if f"aligned/{value}" not in tensors:
        names = sorted({k.split("/", 1)[1] for k in tensors if k.startswith("aligned/")})
        raise ValueError(f"{run}/eval_values.safetensors: no value {value!r}; --value is one of {names}")
    base, aligned = tensors[f"base/{value}"], tensors[f"aligned/{value}"]
    # the trainer's item scheme: which prompt each evaluation image shows (its seeds are not needed here)
    shown = [prompt for prompt, _ in evaluation_items(eval_prompts, len(aligned), seed=0)]
    valid = ~(np.isnan(base) | np.isnan(aligned))  # an accuracy is NaN where the caption names nothing to read
    base, aligned = base[valid], aligned[valid]
    of_image = np.array(kinds(shown, prop))[valid]
    train_counts = collections.Counter(kinds(train_prompts, prop))
    weights = {k: c / len(train_prompts) for k, c in train_counts.items()}
    lines = [f"{run}: {value} by the {prop} the caption names (held-out images; training prompts' share)",
             f"  {'names':<10} {'images':>6} {'train share':>11}  {'base':>7} {'run':>7}  {'run − base':>24}"]
    groups = sorted(set(of_image) | set(train_counts), key=lambda k: (k != "None", k))
    for k in groups:
        m = of_image == k
        if not m.any():
            lines.append(f"  {k:<10} {0:>6} {weights.get(k, 0):>11.2f}  (no held-out image)")
            continue
        diff = paired_difference(aligned[m], base[m])
        lines.append(f"  {k:<10} {int(m.sum()):>6} {weights.get(k, 0):>11.2f}  {base[m].mean():>+7.2f} "
                     f"{aligned[m].mean():>+7.2f}  {format_ci(diff['mean'], diff['ci95'], '+.2f'):>24}")
    by_kind = {k: aligned[of_image == k] for k in groups}
    by_kind_base = {k: base[of_image == k] for k in groups}
    by_kind_diff = {k: aligned[of_image == k] - base[of_image == k] for k in groups}
    share = {k: float((of_image == k).mean()) for k in groups}
    for label, w in (("held-out mix", share), ("training mix", weights)):
        b, _ = weighted(by_kind_base, w)
        a, _ = weighted(by_kind, w)
        d, se = weighted(by_kind_diff, w)
        lines.append(f"  {label:<22} base {b:+.2f}  run {a:+.2f}  run − base "
                     f"{format_ci(d, [d - Z95 * se, d + Z95 * se], '+.2f')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run folders (config.yaml, eval_values.safetensors)")
    parser.add_argument("--value", default="brightness_high",
                        help="per-image value: a key of eval_values.safetensors without base/ or aligned/")
    parser.add_argument("--property", default="background", choices=PROPERTIES,
                        help="what the caption names that splits the images")
    args = parser.parse_args(argv)
    for run in map(Path, args.runs):
        missing = [f for f in ("config.yaml", "eval_values.safetensors") if not (run / f).is_file()]
        if missing:
            print(f"error: {str(run)!r} is not a finished run (no {', '.join(missing)})", file=sys.stderr)
            return 2
    try:
        for run in map(Path, args.runs):
            print("\n".join(run_table(run, args.value, args.property)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

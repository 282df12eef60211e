"""The Markdown the demo page shows (``demo/app.py``, :mod:`cdalign.demo`): a LoRA's
constraints measured live on the page's images, its model card's constraint table, the chain
KL to the base, and a composition's weights and KLs per component. Pure functions of the
plain dicts :class:`cdalign.demo.engine.DemoEngine` returns (and of a run's
:class:`~cdalign.runs.report.AlignmentReport`)."""

from __future__ import annotations

from cdalign.core.statistics import MET_MARKS, met_label
from cdalign.publishing.cards import constraints_table
from cdalign.publishing.tables import format_ci, md
from cdalign.runs.report import AlignmentReport


def constraint_markdown(rows: list[dict], n: int) -> str:
    """The page's table: each constraint of the LoRA on these images, base vs aligned."""
    if not rows:
        return "_No constraint this demo can measure is recorded for this LoRA._"

    def cell(v: dict) -> str:
        return f"{format_ci(v['measured'], v['ci95'])} {MET_MARKS[met_label(v)]}"

    out = [f"On these {n} images (same seeds for both; mean [95% CI]; ✓ mean meets the threshold, ✓✓ the whole CI "
           "does). The LoRA's constraint is on the average over its training prompts (its model card, below): one "
           "prompt alone may sit above or below the threshold.",
           "", "| constraint | requirement | base | aligned |", "|---|---|---|---|"]
    for r in rows:
        op = "≥" if r["direction"] == "high" else "≤"
        out.append(f"| {md(r['constraint'])} | {md(r['reward'])} {op} {r['threshold']:g} ({r['units']}) | "
                   f"{cell(r['base'])} | {cell(r['aligned'])} |")
    return "\n".join(out)


def card_table(report: AlignmentReport | None) -> str:
    """The model card's constraint table (thresholds, achieved values with CI, λ as prices)
    of a run's report, or a sentence saying why there is none."""
    if not report or not report.constraints:
        return "_This LoRA has no report.json with constraints (not trained by cdalign?): no constraint table._"
    try:
        return constraints_table(report)
    except (KeyError, TypeError, ValueError, IndexError):
        return "_This LoRA's report.json is not a cdalign report this demo can read: no constraint table._"


def kl_line(kl: dict) -> str:
    """The sentence under the live constraint table: the aligned images' chain KL to the base."""
    return (f"\n\nChain KL of the aligned images to the base ({kl['estimator']} estimator, nats per image): "
            f"{format_ci(kl['mean'], kl['ci95'], '.4g')} (mean [95% CI], n = {kl['n']}).")


def _num(x: float) -> str:
    """A KL for a table: whole numbers with thousands separators when large ('path' KLs), else 4 digits."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def compose_markdown(result: dict) -> str:
    """Weights and KL(p_ω‖q_i) per component (mean [95% CI], nats per image) of each model."""
    names, labels = result["component_names"], result["components"]
    models = list(result["kl"])
    kl = next(iter(result["kl"].values()))
    weights = ", ".join(f"{md(lab)} {w:.3f}" for lab, w in zip(labels, result["weights"]))
    lines = [f"**Weights ω** ({result['mode']}): {weights}",
             "", f"Chain KL(p‖q_i) to each component along the composed model's own path ('{kl['estimator']}' "
             f"estimator: {kl['units']}), mean [95% CI] over these {kl['n']} images; lower is closer. Constrained weights "
             "aim at the smallest largest KL (the min-max composition).",
             "", "| component | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for name, label in zip(names, labels):
        cells = []
        for m in models:
            e = result["kl"][m]["per_component"][name]
            cells.append(format_ci(e["mean"], e["ci95"], _num))
        lines.append(f"| {md(label)} | " + " | ".join(cells) + " |")
    lines.append("| **max** | " + " | ".join(f"**{_num(result['kl'][m]['max'])}** ({md(result['kl'][m]['worst_component'])})"
                                            for m in models) + " |")
    if "distilled" in result:
        d = result["distilled"]
        before, after = d["distance_to_composed_before"], d["distance_to_composed_after"]
        lines += ["", f"**Distilled LoRA** ({d['steps']} steps; one UNet pass per step instead of {len(names)}): mean "
                  f"squared distance to ε_ω {before:.3g} → {after:.3g}; "
                  "max KL " + f"{_num(max(v['mean'] for v in d['kl'].values()))}."]
    return "\n".join(lines)

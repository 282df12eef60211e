"""Plain-text and Markdown summaries of constrained runs: the verdict ``recipes/align.py``
prints after training (:func:`summary_table`), the equal-weights comparison of
``recipes/equal_weights.py`` (:func:`equal_weights_table`) and the frontier comparison of
``benchmarks/frontier.py`` (:func:`frontier_table`). Pure functions of a run's
:class:`~cdalign.runs.report.AlignmentReport` (or its ``report.json`` form) and of the plain
``comparison.json`` / ``frontier.json`` dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cdalign.core.statistics import MET_MARKS, met_label
from cdalign.publishing.tables import format_ci
from cdalign.runs.report import AlignmentReport

# The equal-weights baselines beside the constrained run (cdalign.evaluation.equal_weights),
# in table order, and how the tables and the sample grid name each model.
BASELINES = ("init", "final_mean")
EQUAL_WEIGHTS_LABELS = {"base": "base", "init": "equal λ = init", "final_mean": "equal λ = mean final",
                        "constrained": "constrained"}


def summary_table(report: AlignmentReport | Mapping) -> str:
    """The run's verdict (an :class:`~cdalign.runs.report.AlignmentReport`, or its JSON form):
    per constraint, the base and the aligned model's held-out means with 95% CIs, the paired
    aligned − base difference (same seeds) and λ; then the chain KL (estimator named) and the
    evaluation metrics."""
    report = AlignmentReport.coerce(report)
    n = "?" if report.num_eval_images is None else report.num_eval_images
    lines = [
        f"held-out evaluation: {n} images, base and aligned on the same seeds; means with 95% CI",
        f"{'constraint':<24} {'threshold':>9} {'aims at':>8} {'base':>24} {'aligned':>24} {'aligned − base':>24} "
        f"{'met':>4} {'λ':>7}",
    ]
    for c in report.constraints:
        op = ">=" if c.direction == "high" else "<="
        base_ci = c.base_ci95 if c.base_ci95 is not None else [c.base_measured, c.base_measured]
        diff_s = format_ci(c.difference.mean, c.difference.ci95) if c.difference else "n/a"
        target = c.threshold if c.target is None else c.target
        b = "b" if c.relative_to_base else ""  # an offset from the base model's mean
        lines.append(
            f"{c.name:<24} {op}{b + format(c.threshold, '+.3g'):>7} {b + format(target, '+.3f'):>8} "
            f"{format_ci(c.base_measured, base_ci):>24} {format_ci(c.measured, c.ci95):>24} {diff_s:>24} "
            f"{'NO' if not c.satisfied else c.met or 'yes':>4} {c.dual:>7.3f}"
        )
    if any(c.relative_to_base for c in report.constraints):
        lines.append("b: the base model's mean on the same images; a constraint relative to the base is judged on "
                     "its aligned − base column (paired)")
    metrics = report.metrics or {}
    for name, m in metrics.items():
        lines.append(
            f"{name:<24} {'':>9} {'':>8} {format_ci(m.base.mean, m.base.ci95):>24} "
            f"{format_ci(m.aligned.mean, m.aligned.ci95):>24} {format_ci(m.difference.mean, m.difference.ci95):>24}"
        )
    for name, m in metrics.items():
        if m.aligned.mean is None:
            lines.append(f"{name}: n/a, {m.aligned.reason or 'no value'}")
    wilson = [name for name, m in metrics.items() if m.aligned.interval == "wilson"]
    if wilson:
        lines.append(f"{', '.join(wilson)}: proportions of images, with Wilson score 95% intervals (they stay in [0, 1])")
    kl, obj = report.kl, report.objective
    what = "chain KL to the base (minimised)" if obj.is_kl else f"mean {obj.reward} (maximised)"
    lines.append(
        f"objective: {what} = {obj.value:.4g}; chain KL to base ({kl.estimator} estimator, nats) = "
        f"{format_ci(kl.mean, kl.ci95)}"
    )
    lines.append("met: CI = the whole 95% CI is past the threshold; mean = only the mean is (a fresh sample may "
                 "read a miss); aims at = the threshold plus the margin the run trained toward (confidence/margin)")
    verdict = "every constraint satisfied" if report.all_satisfied else "NOT every constraint satisfied"
    lines.append(f"all_satisfied: {str(bool(report.all_satisfied)).lower()} ({verdict} on held-out prompts)")
    return "\n".join(lines)


def _cell(entry: dict | None) -> str:
    return "n/a" if entry is None else format_ci(entry["mean"], entry["ci95"])


def equal_weights_table(result: dict) -> str:
    """Markdown table: rows are constraints, the chain KL and metrics; columns the models."""
    cols = ["base", *BASELINES, "constrained"]
    lines = [
        "| | " + " | ".join(EQUAL_WEIGHTS_LABELS[c] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in result["constraints"]:
        op = "≥" if r["direction"] == "high" else "≤"
        cells = []
        for c in cols:
            e = r.get(c)
            mark = "" if c == "base" else (" ✓" if e["satisfied"] else " ✗")
            cells.append(_cell(e) + mark)
        lines.append(f"| {r['name']} {op} {r['threshold']:+g} ({r['units']}) | " + " | ".join(cells) + " |")
    lam = [f"{', '.join(f'{x:.3g}' for x in [row[c]['dual'] for row in result['constraints']])}" for c in cols[1:]]
    lines.append("| λ | – | " + " | ".join(lam) + " |")
    est = result["kl"]["constrained"]["estimator"]
    lines.append(f"| chain KL to base (nats, {est}) | 0 | " + " | ".join(_cell(result["kl"][c]) for c in cols[1:]) + " |")
    for name, m in result["metrics"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(m.get(c)) for c in cols) + " |")
    n = result["num_eval_images"]
    lines.append("")
    lines.append(f"Means with 95% CIs over the same {n} held-out images (same prompts and seeds for every model).")
    lines.append(("Claim holds: " if result["claim_holds"] else "Claim does not hold: ") + "; ".join(result["reasons"]) + ".")
    return "\n".join(lines)


def _fmt(entry: dict) -> str:
    return format_ci(entry["mean"], entry["ci95"], "+.4g")


def _met(c: dict) -> str:
    return MET_MARKS[met_label(c)]


def frontier_table(rows: Sequence[dict], num_images: int) -> str:
    """Markdown of the frontier comparison (``benchmarks/frontier.py``; the rows of
    :func:`cdalign.evaluation.frontier.compare_setting`): one block of rows per threshold setting
    (constrained run, cheapest feasible fixed weight), then the paired KL difference and the
    sweep count."""
    lines = ["| setting | run | constraint values (✓ mean met, ✓✓ CI clears) | chain KL (nats) | its KL − constrained's (paired) |",
             "|---|---|---|---|---|"]
    for r in rows:
        th = ", ".join(f"{k} {'≥' if v['direction'] == 'high' else '≤'} {v['threshold']:+g}" for k, v in r["thresholds"].items())
        c = r["constrained"]
        vals = "; ".join(f"{_fmt(v)} {_met(v)} ({v['overshoot']:+.2f} past)" for v in c["constraints"].values())
        lam = ", ".join(f"{v:.2f}" for v in c["duals"].values())
        lines.append(f"| {r['setting']}: {th} | constrained (one run; final λ {lam}) | {vals} | {_fmt(c['kl'])} | – |")
        for key, what, family in (("equal", "equal weight", r["sweep_runs"]), ("mean", "weight", r["fixed_runs"]),
                                  ("ci", "weight with every CI clear", r["fixed_runs"])):
            best = r[f"cheapest_feasible_{key}"]
            if best is None:
                lines.append(f"| | no {what} of {family} meets every threshold | | | |")
                continue
            w = ", ".join(f"{v:g}" for v in (best["weights"] or {}).values())
            vals = "; ".join(f"{_fmt(v)} {_met(v)} ({v['overshoot']:+.2f} past)" for v in best["constraints"].values())
            d = best["kl_difference"]
            lines.append(f"| | cheapest feasible {what}, λ = ({w}) | {vals} | {_fmt(best['kl'])} | "
                         f"{format_ci(-d['mean'], [-d['ci95'][1], -d['ci95'][0]], '+.4f')}: constrained is {d['verdict']} |")
        lines.append(f"| | verdict | one constrained run {'meets' if r['constrained']['feasible'] else 'MISSES'} every "
                     f"threshold; KL no larger than the cheapest feasible weight's: "
                     f"{'yes' if r['claim_holds'] else 'NO'}; than the cheapest feasible equal weight's: "
                     f"{'yes' if r['claim_holds_vs_equal_weights'] else 'NO'} | | |")
        k = r["sweep_runs_to_first_feasible"]
        lines.append(f"| | sweep | {len(r['feasible_fixed'])} of {r['fixed_runs']} fixed weights feasible; an ascending "
                     f"equal-weight sweep finds its first after {k if k else 'none of'} {'' if k else str(r['sweep_runs']) + ' '}run(s) | | |")
    lines += ["", f"Means with 95% CIs over the same {num_images} held-out images for every run (same prompts and "
              "seeds); the KL difference is paired over those images (fixed − constrained: positive means the fixed "
              "weight pays more KL)."]
    return "\n".join(lines)

"""The frontier comparison: constrained runs against a sweep of hand-set (frozen) weights.

Every run is scored on the *same* held-out items (same prompts, same seeds), so each per-image
value pairs across runs. A :class:`RunPoint` is one run's per-image constraint values and
chain KL; from a family of fixed-weight points and one constrained point per threshold
setting this module finds, per setting:

- which fixed-weight runs meet every threshold (by the mean; and by the whole 95% CI);
- the cheapest of those (smallest mean chain KL), and the paired KL difference
  ``constrained − cheapest`` with its 95% CI over the shared images;
- how far past each threshold each lands (the overshoot, positive = beyond);
- how many runs of an ascending equal-weight sweep a user needs before one is feasible.

Nothing here trains or samples: ``benchmarks/frontier.py`` runs the trainer and calls these."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from cdalign.core.statistics import MET_MARKS, constraint_decision, mean_and_ci, met_label, paired_difference, slack
from cdalign.evaluation.scoring import EVAL_VALUES_FILE, load_eval_values
from cdalign.publishing.plotting import pyplot
from cdalign.runs.report import REPORT_FILE, AlignmentReport


@dataclass
class RunPoint:
    """One run on the shared held-out items. ``values``: constraint name -> (N,) per-image
    values (base-model std units for normalised rewards); ``kl``: (N,) per-image chain KL to
    the base (nats); ``weights``: the frozen λ per constraint (None for a constrained run)."""

    name: str
    values: dict[str, torch.Tensor]
    kl: torch.Tensor
    weights: dict[str, float] | None = None
    duals: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_run(cls, name: str, run_dir: str | Path, weights: Sequence[float] | None = None) -> tuple[RunPoint, AlignmentReport]:
        """A finished run's point (its per-image values, ``eval_values.safetensors``, and the
        final λ of its report) and its report. ``weights``: the frozen λ per constraint, in
        the report's constraint order (None for a constrained run)."""
        run = Path(run_dir)
        values = load_eval_values(run / EVAL_VALUES_FILE)
        report = AlignmentReport.read(run / REPORT_FILE)
        names = [c.name for c in report.constraints]
        point = cls(name, {n: values[f"aligned/{n}"] for n in names}, values["kl"],
                    weights=dict(zip(names, weights)) if weights else None,
                    duals={c.name: c.dual for c in report.constraints})
        return point, report

    def mean(self, constraint: str) -> float:
        return float(self.values[constraint].double().mean())

    def summary(self, constraint: str) -> dict:
        m, lo, hi = mean_and_ci(self.values[constraint])
        return {"mean": m, "ci95": [lo, hi]}

    def kl_summary(self) -> dict:
        m, lo, hi = mean_and_ci(self.kl)
        return {"mean": m, "ci95": [lo, hi]}


@dataclass(frozen=True)
class Setting:
    """A threshold setting: constraint name -> (direction, threshold)."""

    name: str
    thresholds: Mapping[str, tuple[str, float]]


def overshoot(measured: float, threshold: float, direction: str) -> float:
    """How far past its threshold a measured mean lands, in its units: positive beyond the
    threshold on the allowed side, negative short of it (minus the slack)."""
    return -float(slack(measured, threshold, direction))


def judge(point: RunPoint, setting: Setting) -> dict[str, dict]:
    """Per constraint of ``setting``: mean, CI, overshoot, ``satisfied`` (mean) and
    ``ci_clears_threshold`` (the whole CI)."""
    out = {}
    for name, (direction, threshold) in setting.thresholds.items():
        m, lo, hi = mean_and_ci(point.values[name])
        decision = constraint_decision(m, (lo, hi), threshold, direction)
        out[name] = {"mean": m, "ci95": [lo, hi], "overshoot": overshoot(m, threshold, direction),
                     "satisfied": decision["satisfied"], "ci_clears_threshold": decision["ci_clears_threshold"]}
    return out


def feasible(point: RunPoint, setting: Setting, by: str = "mean") -> bool:
    """Whether ``point`` meets every threshold of ``setting``: ``by='mean'`` (the mean is
    on the allowed side) or ``by='ci'`` (the whole 95% CI is)."""
    key = {"mean": "satisfied", "ci": "ci_clears_threshold"}[by]
    return all(v[key] for v in judge(point, setting).values())


def cheapest_feasible(points: Sequence[RunPoint], setting: Setting, by: str = "mean") -> RunPoint | None:
    """The feasible point (:func:`feasible`) with the smallest mean chain KL; None if none is."""
    ok = [p for p in points if feasible(p, setting, by)]
    return min(ok, key=lambda p: float(p.kl.double().mean())) if ok else None


def runs_to_first_feasible(sweep: Sequence[RunPoint], setting: Setting, by: str = "mean") -> int | None:
    """In a sweep taken in the given order (equal weights, smallest first), how many runs a
    user trains before the first feasible one (that run included); None if none is."""
    for k, p in enumerate(sweep, start=1):
        if feasible(p, setting, by):
            return k
    return None


def kl_verdict(diff: dict) -> str:
    """The paired KL difference ``constrained − fixed`` read off its 95% CI: 'cheaper'
    (CI below 0), 'dearer' (CI above 0) or 'tie' (the CI spans 0)."""
    lo, hi = diff["ci95"]
    return "cheaper" if hi < 0 else ("dearer" if lo > 0 else "tie")


def compare_setting(constrained: RunPoint, fixed: Sequence[RunPoint], sweep: Sequence[RunPoint], setting: Setting) -> dict:
    """The frontier table's row for one threshold setting (JSON-ready): the constrained run's
    values, overshoots and KL; the cheapest feasible fixed-weight run (by mean and by CI) and
    the paired KL difference to it; the equal-weight sweep's runs to a first feasible weight."""
    row = {
        "setting": setting.name,
        "thresholds": {k: {"direction": d, "threshold": t} for k, (d, t) in setting.thresholds.items()},
        "constrained": {"run": constrained.name, "constraints": judge(constrained, setting),
                        "kl": constrained.kl_summary(), "duals": constrained.duals,
                        "feasible": feasible(constrained, setting), "feasible_ci": feasible(constrained, setting, "ci")},
        "fixed_runs": len(fixed),
        "feasible_fixed": [p.name for p in fixed if feasible(p, setting)],
        "sweep_runs_to_first_feasible": runs_to_first_feasible(sweep, setting),
        "sweep_runs": len(sweep),
    }
    for key, family, by in (("mean", fixed, "mean"), ("ci", fixed, "ci"), ("equal", sweep, "mean")):
        best = cheapest_feasible(family, setting, by)
        entry = None
        if best is not None:
            diff = paired_difference(constrained.kl, best.kl)
            entry = {"run": best.name, "weights": best.weights, "constraints": judge(best, setting),
                     "kl": best.kl_summary(), "kl_difference": {**diff, "verdict": kl_verdict(diff)}}
        row[f"cheapest_feasible_{key}"] = entry
    # the claim: every threshold met, at a KL no larger (within the paired CI) than the cheapest
    # feasible fixed weight; against the paper's baseline, the equal weights alone
    for key, suffix in (("mean", ""), ("equal", "_vs_equal_weights")):
        best = row[f"cheapest_feasible_{key}"]
        row["claim_holds" + suffix] = bool(row["constrained"]["feasible"]
                                           and (best is None or best["kl_difference"]["ci95"][0] <= 0))
    return row


def _fmt(entry: dict) -> str:
    lo, hi = entry["ci95"]
    return f"{entry['mean']:+.4g} [{lo:+.4g}, {hi:+.4g}]"


def _met(c: dict) -> str:
    return MET_MARKS[met_label(c)]


def frontier_table(rows: Sequence[dict], num_images: int) -> str:
    """Markdown: one block of rows per threshold setting (constrained run, cheapest feasible
    fixed weight), then the paired KL difference and the sweep count."""
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
                         f"{-d['mean']:+.4f} [{-d['ci95'][1]:+.4f}, {-d['ci95'][0]:+.4f}]: constrained is {d['verdict']} |")
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


def _draw_run(ax, sx: dict, sy: dict, colour: str, label: str, fixed: bool) -> None:
    """One run at (mean x, mean y) with its 95% CIs as a cross, and its label."""
    ax.errorbar(sx["mean"], sy["mean"], xerr=[[sx["mean"] - sx["ci95"][0]], [sx["ci95"][1] - sx["mean"]]],
                yerr=[[sy["mean"] - sy["ci95"][0]], [sy["ci95"][1] - sy["mean"]]],
                fmt="o" if fixed else "*", ms=6 if fixed else 13, color=colour, capsize=2, lw=1)
    ax.annotate(label, (sx["mean"], sy["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=7, color=colour)


def plot_frontier(plane_path: str | Path, kl_path: str | Path, points: Sequence[RunPoint], fixed_names: Sequence[str],
                  settings: Mapping[str, Setting], constrained_of: Mapping[str, str], x: str, y: str, binding: str) -> None:
    """Two figures. The reward plane: every run at (mean x, mean y) with 95% CI crosses, each
    setting's thresholds as lines in its colour. KL against the ``binding`` reward: the
    fixed-weight runs (equal weights joined in λ order) and each constrained run."""
    plt = pyplot()
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]
    by_name = {p.name: p for p in points}
    setting_colour = {s: colours[i % len(colours)] for i, s in enumerate(settings)}
    setting_of = {n: s for s, n in constrained_of.items()}

    def style(p: RunPoint) -> tuple[str, str, bool]:
        if p.name in fixed_names:
            return "0.35", "λ=" + ",".join(f"{v:g}" for v in dict.fromkeys((p.weights or {}).values())), True
        return setting_colour[setting_of[p.name]], "constrained: " + setting_of[p.name], False

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for p in points:
        _draw_run(ax, p.summary(x), p.summary(y), *style(p))
    for s, setting in settings.items():
        dx, tx = setting.thresholds[x]
        dy, ty = setting.thresholds[y]
        ax.axvline(tx, color=setting_colour[s], ls="--", lw=1)
        ax.axhline(ty, color=setting_colour[s], ls="--", lw=1, label=f"{s}: {x} {'≥' if dx == 'high' else '≤'} {tx:g}, "
                                                                     f"{y} {'≥' if dy == 'high' else '≤'} {ty:g}")
    ax.set_xlabel(f"{x} (base-model std, held-out mean)")
    ax.set_ylabel(f"{y} (base-model std, held-out mean)")
    ax.set_title("fixed weights (gray) vs one constrained run per setting (stars)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(plane_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    equal = sorted((by_name[n] for n in fixed_names if len(set((by_name[n].weights or {}).values())) == 1),
                   key=lambda p: next(iter(p.weights.values())))
    if equal:
        ax.plot([p.mean(binding) for p in equal], [float(p.kl.mean()) for p in equal], "-", color="0.6", lw=1,
                label="equal weights (λ ascending)")
    for p in points:
        _draw_run(ax, p.summary(binding), p.kl_summary(), *style(p))
    for s, setting in settings.items():
        ax.axvline(setting.thresholds[binding][1], color=setting_colour[s], ls="--", lw=1)
    ax.set_xlabel(f"{binding} (base-model std, held-out mean)")
    ax.set_ylabel("chain KL to the base (nats, held-out mean)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(kl_path, dpi=120)
    plt.close(fig)

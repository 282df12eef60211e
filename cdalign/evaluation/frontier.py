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

The experiment itself (:func:`grid`: the weighted family and one constrained run per setting,
:func:`resolved_config`, :func:`is_reusable`, :func:`load_point`) is defined here too. Nothing
here trains or samples: ``benchmarks/frontier.py`` runs the trainer and calls these; the table
is :func:`cdalign.publishing.summaries.frontier_table`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from cdalign.alignment.config import config_to_dict, load_config_file
from cdalign.alignment.specs import ConstraintSpec, DualSpec
from cdalign.core.statistics import constraint_decision, mean_and_ci, paired_difference, slack
from cdalign.evaluation.scoring import EVAL_VALUES_FILE, load_eval_values
from cdalign.publishing.plotting import pyplot
from cdalign.recipes_data import find_recipe
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


# ---------------------------------------------------------------------------------
# The experiment of benchmarks/frontier.py: its runs, their configs, reuse
# ---------------------------------------------------------------------------------

# The main job's recipe (packaged with cdalign).
RECIPE = find_recipe("tiny/multi_reward")
X, Y = "colorfulness_high", "brightness_high"  # the recipe's two constraints, in its order

# Equal weights: from "misses both" to "overshoots both" (λ=0.5 is the recipe's dual.init).
EQUAL = (0.05, 0.15, 0.5, 1.5, 4.0)
# Unequal (λ_colorfulness, λ_brightness): one leaning on each reward.
UNEQUAL = ((0.05, 0.5), (0.5, 0.05))
# Threshold settings (colorfulness ≥ a, brightness ≥ b), in base-model std.
SETTINGS = {
    "default": (0.75, 0.35),   # the main job's
    "uneven": (0.25, 0.5),     # colour easy, brightness hard: no equal weight reaches brightness +0.5σ (colour outpulls it)
    "colour_first": (1.5, 0.0),  # colour hard, brightness only guarded (vivid colour darkens)
}
CONFIDENCE = 0.95
QUICK = {"equal": (0.5, 1.5), "unequal": (), "settings": ("default",),
         "overrides": {"max_steps": 2, "eval_batches": 2, "normalization_batches": 2, "num_grid_images": 0}}


def _weights_name(lam: tuple[float, float]) -> str:
    return "fixed_" + "_".join(f"{v:g}" for v in lam)


def grid(quick: bool) -> tuple[dict[str, dict], dict[str, str]]:
    """``{run name: config overrides}`` and ``{setting: constrained run name}``."""
    equal = QUICK["equal"] if quick else EQUAL
    unequal = QUICK["unequal"] if quick else UNEQUAL
    settings = {k: SETTINGS[k] for k in QUICK["settings"]} if quick else SETTINGS
    runs: dict[str, dict] = {}
    for lam in [(v, v) for v in equal] + list(unequal):
        runs[_weights_name(lam)] = {"dual": {"freeze": True, "init": list(lam), "warmup_steps": 0}, "weights": lam}
    constrained_of = {}
    for s, (a, b) in settings.items():
        name = f"constrained_{s}"
        runs[name] = {"constraints": [
            {"reward": "colorfulness", "direction": "high", "threshold": a, "normalize": True, "confidence": CONFIDENCE},
            {"reward": "brightness", "direction": "high", "threshold": b, "normalize": True, "confidence": CONFIDENCE}]}
        constrained_of[s] = name
    return runs, constrained_of


def resolved_config(name: str, spec: dict, out: Path, overrides: dict, eval_batches: int, recipe: str | Path = RECIPE):
    """The recipe (default: the main job's) with this run's duals or thresholds, its folder
    ``out/runs/<name>`` and the shared evaluation."""
    cfg = load_config_file(recipe)
    fields = {"output_dir": str(out / "runs" / name), "eval_batches": eval_batches, **overrides}
    if "dual" in spec:
        # A frozen λ makes the gains and the thresholds inert: the weighted runs' configs name
        # the library's defaults and no confidence, so tuning the recipe's duals or targets
        # leaves these runs reusable.
        fields["dual"] = DualSpec(**spec["dual"])
        fields["constraints"] = [dataclasses.replace(c, confidence=None, margin=None) for c in cfg.constraints]
    if "constraints" in spec:
        fields["constraints"] = [ConstraintSpec(**c) for c in spec["constraints"]]
    cfg = dataclasses.replace(cfg, **fields)
    cfg.validate()
    return cfg


def _comparable(cfg) -> dict:
    """What decides a run's numbers: its resolved config without where it was written
    (a finished run moved or copied into another frontier folder is the same run) and
    without how it was started (overwrite, resume)."""
    d = config_to_dict(cfg)
    for k in ("output_dir", "overwrite_output_dir", "resume_from_checkpoint"):
        d.pop(k, None)
    return d


def is_reusable(cfg) -> bool:
    """A finished run (report.json and its per-image values) whose saved config is this one."""
    run = Path(cfg.output_dir)
    if not all((run / f).is_file() for f in (REPORT_FILE, "config.yaml", EVAL_VALUES_FILE)):
        return False
    try:
        return _comparable(load_config_file(run / "config.yaml")) == _comparable(cfg)
    except (ValueError, OSError):
        return False


def load_point(name: str, cfg, weights) -> tuple[RunPoint, AlignmentReport]:
    """A finished run as a :class:`RunPoint` (its per-image values, ``weights``: its frozen λ
    or None), and its report."""
    return RunPoint.from_run(name, cfg.output_dir, weights)

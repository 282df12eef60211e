"""The trainer's evaluation report, built from the scores of the one scoring path.

``ConstrainedDDPOTrainer.evaluate`` scores base and aligned images from the same noise with
:func:`~cdalign.evaluation.scoring.score_checkpoints`; :func:`build_report` turns those
scores into an :class:`~cdalign.runs.report.AlignmentReport`: each reward's and metric's
mean with its 95% CI for both models and the *paired* aligned − base difference, the chain
KL, and each constraint's verdict (:meth:`Constraint.verdict
<cdalign.core.problem.Constraint.verdict>`) with the base model's on the same images.
:func:`write_evaluation_files` writes the per-image values and the sample grid beside the
report; :func:`plot_history` the duals over training."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cdalign.alignment.specs import REWARD
from cdalign.console import CdalignWarning
from cdalign.core.problem import KL
from cdalign.core.statistics import met_label, paired_difference, summarize, summarize_metric
from cdalign.core.targets import target_of
from cdalign.evaluation.scoring import EVAL_VALUES_FILE, CheckpointScores, save_eval_values
from cdalign.publishing.plotting import plot_duals, save_grid
from cdalign.runs.report import (
    AlignmentReport,
    ConstraintResult,
    Estimate,
    EstimatorSummary,
    KLResult,
    MetricResult,
    ObjectiveResult,
    RewardResult,
    RewardSummary,
    constraint_units,
)

# Below this many evaluation images a constraint verdict is mostly sampling noise (measured on the
# tiny model: 16 base images read +0.15σ / +0.55σ against the base model's own statistics).
MIN_VERDICT_IMAGES = 32
SAMPLE_GRID_FILE = "samples_base_vs_aligned.png"
DUALS_PLOT_FILE = "duals.png"


def build_report(trainer, base: CheckpointScores, aligned: CheckpointScores) -> AlignmentReport:
    """The report of ``trainer`` (a ``ConstrainedDDPOTrainer``) from the scores of its base
    and aligned model on the held-out items: reads its config, problem, rewards, confidence
    targets, duals, infeasibility monitor, reward statistics, sources, history and the
    description of its model and sampler. Warns when the verdicts rest on fewer than
    :data:`MIN_VERDICT_IMAGES` images."""
    cfg, prob = trainer.config, trainer.problem
    n_images = aligned.n
    if n_images < MIN_VERDICT_IMAGES:
        warnings.warn(
            f"evaluation on {n_images} images: a constraint verdict from fewer than {MIN_VERDICT_IMAGES} is "
            "mostly sampling noise (raise eval_batches)",
            CdalignWarning, stacklevel=3,
        )
    kl = summarize(aligned.kl["base"])
    kl_result = KLResult(estimator=cfg.kl_estimator, units="nats", mean=kl["mean"], ci95=kl["ci95"], n=n_images)
    constraints = constraint_results(
        prob.constraints, base, aligned, kl_estimator=cfg.kl_estimator, margins=prob.margins,
        targets=trainer.targets, multipliers=prob.primal_multipliers(trainer.duals.multipliers),  # per unit of each bound
        flagged=trainer.monitor.flagged, reference=prob.reference_estimate,
    )
    obj = prob.objective
    if obj.is_kl:
        objective = ObjectiveResult(type=KL, value=kl_result.mean)
    else:
        values = aligned.normalized[obj.source] if obj.normalize else aligned.rewards[obj.source]
        objective = ObjectiveResult(type=REWARD, reward=obj.source, value=float(values.mean()))
    return AlignmentReport(
        model=trainer.model_name,
        pipeline_class=trainer.family.pipeline_class,
        pipeline_absent_components=trainer.family.absent_components(trainer.pipe),
        sampler={**trainer.sampler.settings(), "chain": type(trainer.sampler.chain).__name__,
                 "eta_meaning": trainer.family.eta_meaning},
        steps=trainer.global_step,
        num_eval_images=n_images,
        eval={"seed": cfg.eval_seed, "images": n_images, "prompts": len(trainer.eval_prompts), "paired": True},
        rewards=reward_results(trainer.rewards, base, aligned),
        metrics=metric_results(base, aligned) if cfg.eval_metrics else None,
        kl=kl_result,
        constraints=constraints,
        objective=objective,
        # the estimator and its own settings (the model card's training table lists them)
        estimator=estimator_summary(cfg.estimator, {f: getattr(cfg, f) for f in type(trainer.estimator).config_fields},
                                    trainer.history),
        all_satisfied=all(c.satisfied for c in constraints),
        infeasible=sorted(trainer.monitor.flagged),
        normalization={n: s.__dict__ for n, s in trainer.normalizers.items()},
        sources=trainer.sources,
    )


def reward_results(names: Iterable[str], base: CheckpointScores, aligned: CheckpointScores) -> dict[str, RewardResult]:
    """Per reward: both models' raw means with 95% CIs (and in base-model std where
    normalised) and the paired aligned − base difference (in base-model std where normalised)."""
    out = {}
    for n in names:
        summaries = {}
        for key, model in (("base", base), ("aligned", aligned)):
            s = summarize(model.rewards[n])
            summary = RewardSummary(mean=s["mean"], ci95=s["ci95"])
            if n in model.normalized:
                s = summarize(model.normalized[n])
                summary.normalized_mean, summary.normalized_ci95 = s["mean"], s["ci95"]
            summaries[key] = summary
        normed = n in aligned.normalized
        treated, control = (aligned.normalized[n], base.normalized[n]) if normed else (aligned.rewards[n], base.rewards[n])
        difference = Estimate(**paired_difference(treated, control), units=constraint_units(False, normed, ""))
        out[n] = RewardResult(base=summaries["base"], aligned=summaries["aligned"], difference=difference)
    return out


def metric_results(base: CheckpointScores, aligned: CheckpointScores) -> dict[str, MetricResult]:
    """Per evaluation metric: both models and the paired difference, over the images where
    both are defined (a metric is NaN where it does not apply)."""
    out = {}
    for k in aligned.metrics:
        aligned_v, base_v = aligned.metrics[k], base.metrics[k]
        keep = ~(aligned_v.isnan() | base_v.isnan())
        if not bool(keep.any()):  # e.g. background accuracy when no evaluated caption names a background
            none = summarize_metric(aligned_v.new_full(aligned_v.shape, float("nan")),
                                    f"evaluated images: no prompt names what {k} checks")
            out[k] = MetricResult(base=Estimate(**none), aligned=Estimate(**none), difference=Estimate(**none))
            continue
        out[k] = MetricResult(base=Estimate(**summarize_metric(base_v[keep])), aligned=Estimate(**summarize_metric(aligned_v[keep])),
                              difference=Estimate(**paired_difference(aligned_v[keep], base_v[keep])))
    return out


def constraint_results(
    constraints: Sequence, base: CheckpointScores, aligned: CheckpointScores, *, kl_estimator: str, margins,
    targets, multipliers, flagged: Mapping[str, int], reference=lambda j: {},
) -> list[ConstraintResult]:
    """Each constraint's verdict on the aligned images beside the base model's on the same
    images, the paired difference, the target it trained toward (threshold plus margin,
    ``targets.describe`` says why), its final λ and the step it was flagged infeasible at.
    A constraint relative to the base model is judged on the paired difference; ``reference(j)``
    gives the base-model mean on the training prompts it trained against, with its CI
    (:meth:`~cdalign.core.problem.ConstrainedProblem.reference_estimate`). ``multipliers``: each
    constraint's price per unit of its own bound (a relative floor's λ / s,
    :meth:`~cdalign.core.problem.ConstrainedProblem.primal_multipliers`)."""
    out = []
    for j, c in enumerate(constraints):
        values, base_values = aligned.constraint_values(c), base.constraint_values(c)
        verdict, base_verdict = c.verdict(values, base_values), c.verdict(base_values, base_values)
        more = reference(j) if c.relative else {}
        out.append(ConstraintResult.from_verdict(
            c, verdict, constraint_units(c.is_kl, c.normalize, kl_estimator),
            base_measured=base_verdict["measured"], base_ci95=base_verdict["ci95"], base_slack=base_verdict["slack"],
            difference=Estimate(**paired_difference(values, base_values)), met=met_label(verdict),
            target=target_of(c.threshold, float(margins[j]), c.direction), target_from=targets.describe(j),
            dual=float(multipliers[j]), flagged_infeasible_at_step=flagged.get(c.name), **more,
        ))
    return out


def estimator_summary(name: str, settings: dict, history: Sequence[Mapping]) -> EstimatorSummary:
    """The estimator, its settings and, for the policy gradient, its PPO diagnostics over
    the run's rounds (from the step log ``history``)."""
    summary = EstimatorSummary(name=name, settings=settings)
    ppo = [h for h in history if "ppo/ratio_mean" in h]
    if ppo:  # the policy gradient's PPO diagnostics over the run's rounds
        summary.diagnostics = {
            "rounds": len(ppo),
            "optimizer_updates": int(sum(h["ppo/updates"] for h in ppo)),
            **{k: float(sum(h[f"ppo/{k}"] for h in ppo) / len(ppo)) for k in ("ratio_mean", "clip_fraction", "approx_kl")},
            "first_update_max_abs_log_ratio": max(h["ppo/first_update_max_abs_log_ratio"] for h in ppo),
            "what": "means over rounds of each round's mean over trained steps: PPO ratio, share of clipped ratios, "
            "½·mean(log ratio)²; first_update_max_abs_log_ratio: max |log ratio| in each round's first update, "
            "before any parameter changed (0: the ratio is exactly 1 there)",
        }
    return summary


def write_evaluation_files(
    output_dir: str | os.PathLike, report: AlignmentReport, constraints: Sequence,
    base: CheckpointScores, aligned: CheckpointScores, num_grid_images: int,
) -> None:
    """Beside the report (main process): the per-image values in item order, for paired
    comparisons across runs (``eval_values.safetensors``, benchmarks/frontier.py), and the
    first ``num_grid_images`` base and aligned images from the same seeds; ``report`` names
    the files it got."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_image = {"kl": aligned.kl["base"]}
    for c in constraints:
        per_image[f"aligned/{c.name}"] = aligned.constraint_values(c)
        per_image[f"base/{c.name}"] = base.constraint_values(c)
    for k in aligned.metrics:
        per_image[f"aligned/metric/{k}"], per_image[f"base/metric/{k}"] = aligned.metrics[k], base.metrics[k]
    save_eval_values(out / EVAL_VALUES_FILE, per_image)
    report.eval_values = EVAL_VALUES_FILE
    if num_grid_images > 0:
        k = num_grid_images
        rows = [base.images[:k].float() / 255.0, aligned.images[:k].float() / 255.0]
        save_grid(out / SAMPLE_GRID_FILE, rows, ["base", "aligned"])
        report.sample_grid = SAMPLE_GRID_FILE


def plot_history(output_dir: str | os.PathLike, history: Sequence[Mapping], names: Sequence[str]) -> None:
    """``duals.png``: each constraint's λ and slack over the logged steps, and the chain KL."""
    if not history:
        return
    steps = [h["step"] for h in history]
    lam = [[h.get(f"dual/{n}", float("nan")) for n in names] for h in history]
    sl = [[h.get(f"slack/{n}", float("nan")) for n in names] for h in history]
    kl = [h["kl"] for h in history] if "kl" in history[0] else None
    plot_duals(Path(output_dir) / DUALS_PLOT_FILE, steps, names, lam, sl, kl)

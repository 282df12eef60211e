"""The paper's equal-weights baseline beside a finished constrained run
(``recipes/equal_weights.py``): the run's recipe with every λ frozen (``dual.freeze``) at
(a) the recipe's initial value and (b) the mean of the run's final λ; the comparison of
the three runs on the same held-out images (:func:`compare`: the claim holds where the
constrained run meets every constraint and each baseline misses one or pays a larger chain
KL, 95% CIs apart; the reports read as :class:`~cdalign.runs.report.AlignmentReport`) and
their samples on the same seeds (:func:`comparison_grid`). The baselines train with the same
trainer (the recipe does that); their table is
:func:`cdalign.publishing.summaries.equal_weights_table`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch

from cdalign.core.sampling import DiffusionSampler
from cdalign.core.seeding import evaluation_items
from cdalign.data.prompt_sets import load_prompts
from cdalign.models.adapters import set_denoiser_adapter
from cdalign.models.lora import load_lora
from cdalign.models.pipeline import load_pipeline
from cdalign.publishing.plotting import save_grid
from cdalign.publishing.summaries import BASELINES
from cdalign.publishing.summaries import EQUAL_WEIGHTS_LABELS as LABELS
from cdalign.runs.report import AlignmentReport


def baseline_multipliers(config, report: AlignmentReport | Mapping) -> dict[str, float]:
    """λ of each baseline: (a) the recipe's initial value, (b) the mean of the run's final λ."""
    init = config.dual.init
    init = float(sum(init) / len(init)) if isinstance(init, (list, tuple)) else float(init)
    constraints = AlignmentReport.coerce(report).constraints
    final = [c.dual for c in constraints if not c.is_kl] or [c.dual for c in constraints]
    return {"init": init, "final_mean": float(sum(final) / len(final))}


def baseline_config(config, name: str, multiplier: float, run_dir: Path):
    """The constrained run's config with every λ frozen at ``multiplier``."""
    dual = dataclasses.replace(config.dual, init=multiplier, freeze=True, warmup_steps=0)
    return dataclasses.replace(
        config,
        dual=dual,
        output_dir=str(run_dir / "equal_weights" / name),
        overwrite_output_dir=True,
        resume_from_checkpoint=None,
        push_to_hub=False,
        hub_model_id=None,
    )


def compare(reports: dict) -> dict:
    """Per constraint and model: measured mean with CI and verdict; the chain KL; the claim.
    ``reports``: each run's report (``AlignmentReport`` or its JSON form) by name."""
    reports = {key: AlignmentReport.coerce(rep) for key, rep in reports.items()}
    constrained = reports["constrained"]
    rows = []
    for j, c in enumerate(constrained.constraints):
        row = {"name": c.name, "direction": c.direction, "threshold": c.threshold, "units": c.units}
        row["base"] = {"mean": c.base_measured, "ci95": c.base_ci95}
        for key, rep in reports.items():
            cj = rep.constraints[j]
            row[key] = {"mean": cj.measured, "ci95": cj.ci95, "satisfied": cj.satisfied, "dual": cj.dual}
        rows.append(row)
    kl = {key: rep.kl.to_json() for key, rep in reports.items()}
    metrics = {}
    for key, rep in reports.items():
        for name, m in (rep.metrics or {}).items():
            metrics.setdefault(name, {"base": m.base.to_json()})[key] = m.aligned.to_json()
    ok = constrained.all_satisfied
    reasons = []
    holds = ok
    for key in BASELINES:
        rep = reports[key]
        missed = [c.name for c in rep.constraints if not c.satisfied]
        # "larger" only when the 95% CIs do not overlap: a KL gap inside the noise proves nothing
        dearer = rep.kl.ci95[0] > constrained.kl.ci95[1]
        within_noise = rep.kl.mean > constrained.kl.mean and not dearer
        if missed:
            reasons.append(f"{LABELS[key]} misses {', '.join(missed)}")
        elif dearer:
            reasons.append(
                f"{LABELS[key]} meets every constraint at a larger chain KL "
                f"({rep.kl.mean:.4g} vs {constrained.kl.mean:.4g}, 95% CIs apart)"
            )
        elif within_noise:
            lo, hi = rep.kl.ci95
            clo, chi = constrained.kl.ci95
            reasons.append(
                f"{LABELS[key]} meets every constraint at a chain KL the evaluation cannot tell apart "
                f"({rep.kl.mean:.4g} [{lo:.4g}, {hi:.4g}] vs {constrained.kl.mean:.4g} [{clo:.4g}, {chi:.4g}]: "
                "the 95% CIs overlap)"
            )
            holds = False
        else:
            reasons.append(f"{LABELS[key]} meets every constraint at no larger chain KL")
            holds = False
    if not ok:
        reasons.insert(0, "the constrained run misses " + ", ".join(c.name for c in constrained.constraints if not c.satisfied))
    return {
        "constraints": rows,
        "kl": kl,
        "metrics": metrics,
        "num_eval_images": constrained.num_eval_images,
        "claim_holds": bool(holds),
        "reasons": reasons,
    }


def comparison_grid(run_dir: Path, config, runs: dict[str, Path], path: Path) -> Path:
    """Base and each run's LoRA on the first evaluation seeds, loaded with diffusers'
    ``load_lora_weights`` and sampled by cdalign's sampler."""
    pipe = load_pipeline(config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant)
    pipe.set_progress_bar_config(disable=True)
    for name, folder in runs.items():
        load_lora(pipe, str(folder), name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    sampler = DiffusionSampler(pipe, config.num_inference_steps, config.eta, config.guidance_scale, config.resolution, device)
    prompts = load_prompts(config.eval_prompts or config.prompts, config.prompt_column, config.prompt_split)
    k = max(config.num_grid_images, 1)
    first = evaluation_items(prompts, k, config.eval_seed)  # the first images of every run's report
    batch_prompts, seeds = [p for p, _ in first], [s for _, s in first]
    rows, labels = [], []
    with torch.no_grad():
        for name in ["base", *runs]:
            set_denoiser_adapter(sampler.denoiser, None if name == "base" else name)
            rows.append(sampler.sample(sampler.guided(batch_prompts), seeds).float().cpu())
            labels.append(LABELS.get(name, name))
    return save_grid(path, rows, labels)

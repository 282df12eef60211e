"""Equal weights, side by side: the paper's baseline next to a finished constrained run.

    accelerate launch recipes/align.py                      # the constrained run (outputs/tiny-multi-reward)
    accelerate launch recipes/equal_weights.py --run outputs/tiny-multi-reward

Reruns the constrained run's recipe (same steps, prompts, seeds, evaluation) twice with the
dual variables frozen (``dual.freeze: true``; the same trainer and code path, λ never
updated):

(a) ``init``: every λ at the recipe's initial value ``dual.init`` (the paper's "equal weights");
(b) ``final_mean``: every λ at the mean of the constrained run's final λ (the one equal weight
    a user would tune by hand after seeing the constrained run).

Writes ``<run>/equal_weights/{init,final_mean}/`` (each a complete run) and, in ``<run>``,
``comparison.json``, ``comparison.md`` (per constraint: base, (a), (b), constrained, each
mean with its 95% CI over the same held-out images, and the chain KL) and
``samples_comparison.png`` (base, (a), (b), constrained on the same seeds, drawn through
diffusers' ``load_lora_weights``). The claim holds where the constrained run meets every
constraint and each equal-weights run misses one or pays a larger chain KL (95% CIs apart)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see recipes/align.py

BASELINES = ("init", "final_mean")
LABELS = {"base": "base", "init": "equal λ = init", "final_mean": "equal λ = mean final", "constrained": "constrained"}


def baseline_multipliers(config, report: dict) -> dict[str, float]:
    """λ of each baseline: (a) the recipe's initial value, (b) the mean of the run's final λ."""
    init = config.dual.init
    init = float(sum(init) / len(init)) if isinstance(init, (list, tuple)) else float(init)
    final = [c["dual"] for c in report["constraints"] if c["source"] != "kl"] or [c["dual"] for c in report["constraints"]]
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


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{entry['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def compare(reports: dict[str, dict]) -> dict:
    """Per constraint and model: measured mean with CI and verdict; the chain KL; the claim."""
    constrained = reports["constrained"]
    rows = []
    for j, c in enumerate(constrained["constraints"]):
        row = {"name": c["name"], "direction": c["direction"], "threshold": c["threshold"], "units": c.get("units")}
        row["base"] = {"mean": c["base_measured"], "ci95": c["base_ci95"]}
        for key, rep in reports.items():
            cj = rep["constraints"][j]
            row[key] = {"mean": cj["measured"], "ci95": cj["ci95"], "satisfied": cj["satisfied"], "dual": cj["dual"]}
        rows.append(row)
    kl = {key: rep["kl"] for key, rep in reports.items()}
    metrics = {}
    for key, rep in reports.items():
        for name, m in rep.get("metrics", {}).items():
            metrics.setdefault(name, {"base": m["base"]})[key] = m["aligned"]
    ok = constrained["all_satisfied"]
    reasons = []
    holds = ok
    for key in BASELINES:
        rep = reports[key]
        missed = [c["name"] for c in rep["constraints"] if not c["satisfied"]]
        # "larger" only when the 95% CIs do not overlap: a KL gap inside the noise proves nothing
        dearer = rep["kl"]["ci95"][0] > constrained["kl"]["ci95"][1]
        within_noise = rep["kl"]["mean"] > constrained["kl"]["mean"] and not dearer
        if missed:
            reasons.append(f"{LABELS[key]} misses {', '.join(missed)}")
        elif dearer:
            reasons.append(
                f"{LABELS[key]} meets every constraint at a larger chain KL "
                f"({rep['kl']['mean']:.4g} vs {constrained['kl']['mean']:.4g}, 95% CIs apart)"
            )
        elif within_noise:
            lo, hi = rep["kl"]["ci95"]
            clo, chi = constrained["kl"]["ci95"]
            reasons.append(
                f"{LABELS[key]} meets every constraint at a chain KL the evaluation cannot tell apart "
                f"({rep['kl']['mean']:.4g} [{lo:.4g}, {hi:.4g}] vs {constrained['kl']['mean']:.4g} [{clo:.4g}, {chi:.4g}]: "
                "the 95% CIs overlap)"
            )
            holds = False
        else:
            reasons.append(f"{LABELS[key]} meets every constraint at no larger chain KL")
            holds = False
    if not ok:
        reasons.insert(0, "the constrained run misses " + ", ".join(c["name"] for c in constrained["constraints"] if not c["satisfied"]))
    return {
        "constraints": rows,
        "kl": kl,
        "metrics": metrics,
        "num_eval_images": constrained["num_eval_images"],
        "claim_holds": bool(holds),
        "reasons": reasons,
    }


def comparison_table(result: dict) -> str:
    """Markdown table: rows are constraints, the chain KL and metrics; columns the models."""
    cols = ["base", *BASELINES, "constrained"]
    lines = [
        "| | " + " | ".join(LABELS[c] for c in cols) + " |",
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


def comparison_grid(run_dir: Path, config, runs: dict[str, Path], path: Path) -> Path:
    """Base and each run's LoRA on the first evaluation seeds, loaded with diffusers'
    ``load_lora_weights`` and sampled by cdalign's sampler."""
    import torch

    from cdalign.core.sampling import DiffusionSampler
    from cdalign.models.adapters import set_unet_state
    from cdalign.core.seeding import evaluation_items
    from cdalign.data.prompt_sets import load_prompts
    from cdalign.models.lora import load_lora
    from cdalign.models.pipeline import load_pipeline
    from cdalign.publishing.plotting import save_grid

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
            set_unet_state(pipe.unet, None if name == "base" else name)
            rows.append(sampler.sample(sampler.guided(batch_prompts), seeds).float().cpu())
            labels.append(LABELS.get(name, name))
    return save_grid(path, rows, labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished constrained run (holds config.yaml and report.json)")
    parser.add_argument(
        "--reuse", action="store_true",
        help="reuse finished baselines under <run>/equal_weights whose config matches (default: retrain them)",
    )
    args = parser.parse_args(argv)
    from cdalign import ConstrainedDDPOTrainer, TrainingInterrupted, load_config_file
    from cdalign.alignment.config import config_to_dict

    run_dir = Path(args.run)
    missing = [f for f in ("config.yaml", "report.json") if not (run_dir / f).is_file()]
    if missing:
        print(
            f"error: --run {str(run_dir)!r} is not a finished run (no {', '.join(missing)}); run "
            "`accelerate launch recipes/align.py` first, or pass its output_dir",
            file=sys.stderr,
        )
        return 2
    try:
        config = load_config_file(run_dir / "config.yaml")
        report = json.loads((run_dir / "report.json").read_text())
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config.dual.freeze:
        print(f"error: {str(run_dir)!r} is itself a frozen-λ run; pass the constrained run", file=sys.stderr)
        return 2
    reports = {}
    for name, lam in baseline_multipliers(config, report).items():
        cfg = baseline_config(config, name, lam, run_dir)
        out = Path(cfg.output_dir)
        saved = out / "config.yaml"
        if args.reuse and (out / "report.json").is_file() and saved.is_file() and config_to_dict(load_config_file(saved)) == config_to_dict(cfg):
            print(f"{LABELS[name]}: reusing {out} (same config)")
        else:
            print(f"{LABELS[name]}: training with every λ frozen at {lam:.4g} -> {out}")
            try:
                ConstrainedDDPOTrainer(cfg).train()
            except TrainingInterrupted as stop:
                print(f"interrupted at step {stop.step}; checkpoint at {stop.checkpoint}; rerun this command "
                      "(the baseline restarts; its folder is replaced)", file=sys.stderr)
                return stop.exit_code
            except (ValueError, OSError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        reports[name] = json.loads((out / "report.json").read_text())
    reports["constrained"] = report
    bases = {k: [c["base_measured"] for c in r["constraints"]] for k, r in reports.items()}
    if any(abs(a - b) > 1e-6 for v in bases.values() for a, b in zip(v, bases["constrained"])):
        print("warning: the runs' base-model evaluations differ (different evaluation images?): " + json.dumps(bases), file=sys.stderr)
    result = compare(reports)
    table = comparison_table(result)
    (run_dir / "comparison.json").write_text(json.dumps(result, indent=2))
    (run_dir / "comparison.md").write_text(table + "\n")
    grid = comparison_grid(
        run_dir, config, {"init": run_dir / "equal_weights" / "init", "final_mean": run_dir / "equal_weights" / "final_mean", "constrained": run_dir}, run_dir / "samples_comparison.png"
    )
    print(table)
    print(f"written: {run_dir / 'comparison.md'}, {run_dir / 'comparison.json'}, {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

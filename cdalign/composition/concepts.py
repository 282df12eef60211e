"""Concept composition over several sets of concepts (METHOD.md §2, AND; the paper's
concept experiment): for each set the 'concept' components take that set's prompts,
``ε = ε_∅ + Σ μ_i w (ε_{c_i} − ε_∅)``, the weights are found by dual ascent for that set
alone (:class:`~cdalign.composition.composer.ConstrainedComposer`, as the paper does per
prompt set), and equal weights, the constrained weights and the set's single joint prompt
are scored on the same items. Each image's score is the minimum over concepts of the
concept's reward on its own prompt (the paper: CLIP similarity; on the shapes model,
``shapes_match``: 1 when the classifier reads back every concept). The report pools the
per-image scores over sets: means with 95% CIs and paired differences (same items)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from cdalign.composition.composer import ConstrainedComposer
from cdalign.composition.config import ComposeConfig, save_config
from cdalign.core.statistics import paired_difference, summarize
from cdalign.publishing.composition_tables import CONCEPT_LABELS as LABELS
from cdalign.publishing.composition_tables import concept_table
from cdalign.publishing.plotting import save_grid
from cdalign.runs.atomic import atomic_write_text
from cdalign.runs.folders import RunFolder
from cdalign.runs.lock import release_run_lock
from cdalign.runs.report import REPORT_FILE

MODELS = tuple(LABELS)  # equal weights, constrained, joint prompt
RUN_FOLDER = RunFolder(markers=(REPORT_FILE,), what="a concept composition run")
GRID_IMAGES_PER_SET = 2  # samples.png: one row per model, the sets side by side (2 images each)


def set_config(config: ComposeConfig, k: int) -> ComposeConfig:
    """The one-set run ``k`` of ``config``: its concept prompts and joint prompt, its own
    output folder ``output_dir/set_<k>``."""
    cs = config.concept_sets[k]
    cfg = copy.deepcopy(config)
    prompts = iter(cs.prompts)
    for component in cfg.components:
        if component.component_kind.concept:
            component.prompt = next(prompts)
    cfg.joint_prompt = cs.joint_prompt
    cfg.concept_sets = []
    cfg.output_dir = str(Path(config.output_dir) / f"set_{k}")
    return cfg


def run_concept_sets(config: ComposeConfig, accelerator=None, progress: bool = True) -> dict:
    """Run every set of ``config.concept_sets`` and pool the results; writes
    ``output_dir/report.json`` (per set and pooled), ``concepts.md`` and ``samples.png``
    (rows: equal weights, constrained, joint prompt; columns: the sets in order, 2 images
    each, the same seeds in every row). Returns the report."""
    config.validate()
    if not config.concept_sets:
        raise ValueError("concept_sets: empty; give the sets of concept prompts to compose (or run one composition)")
    if not any(c.reward for c in config.components if c.component_kind.concept):
        raise ValueError("components: no 'concept' component names a `reward`; the concept minimum needs one per concept")
    out = Path(config.output_dir)
    RUN_FOLDER.check(out, fresh=not config.overwrite_output_dir)
    if accelerator is None or accelerator.is_main_process:
        RUN_FOLDER.claim(out, fresh=not config.overwrite_output_dir)
    reuse = not any(c.component_kind.lora for c in config.components)  # concepts and the base: nothing to reload per set
    pipe, sets, rows = None, [], {m: [] for m in MODELS}
    for k in range(len(config.concept_sets)):
        cfg = set_config(config, k)
        composer = ConstrainedComposer(cfg, pipeline=pipe, accelerator=accelerator)
        accelerator = composer.accelerator
        pipe = composer.pipe if reuse else None
        report = composer.run()
        low = report["rewards"]["min_over_components"]
        sets.append({
            "prompts": config.concept_sets[k].prompts,
            "joint_prompt": config.concept_sets[k].joint_prompt,
            "weights": report["learned_weights"],
            "min_over_concepts": {m: {kk: v for kk, v in low[m].items() if kk != "per_image"} for m in low},
            "max_kl": {m: report["models"][m]["max_kl"] for m in report["models"]},
            "per_image": {m: low[m]["per_image"] for m in low},
            "folder": f"set_{k}",
        })
        for m in MODELS:
            if m in composer.entries:
                rows[m].append(composer.entries[m]["_scores"].images[:GRID_IMAGES_PER_SET].float() / 255.0)
    pooled = {}
    models = [m for m in MODELS if all(m in s["per_image"] for s in sets)]
    values = {m: torch.tensor([v for s in sets for v in s["per_image"][m]], dtype=torch.float64) for m in models}
    for m in models:
        pooled[m] = summarize(values[m])
    differences = {}
    if "constrained" in values:
        for other in ("equal_weights", "joint_prompt"):
            if other in values:
                differences[f"constrained − {other}"] = paired_difference(values["constrained"], values[other])
    report = {
        "model": config.pretrained_model_name_or_path,
        "concepts": [c.name for c in config.components if c.component_kind.concept],
        "score": "per image, the minimum over concepts of each concept's reward on its own prompt; pooled over sets",
        "sets": [{k: v for k, v in s.items() if k != "per_image"} for s in sets],
        "pooled": pooled,
        "paired_differences": differences,
        "num_eval_images_per_set": len(sets[0]["per_image"]["constrained"]),
    }
    if accelerator is None or accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        shown = [m for m in MODELS if len(rows[m]) == len(sets)]
        save_grid(out / "samples.png", [torch.cat(rows[m]) for m in shown], [LABELS[m] for m in shown])
        report["sample_grid"] = "samples.png"
        atomic_write_text(out / "concepts.md", concept_table(report) + "\n")
        atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    release_run_lock(out)  # the run is complete: the folder is free for the next one
    return report


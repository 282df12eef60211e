"""Model cards, written by :func:`write_model_card` from one of two templates: a constrained
LoRA's (``kind="lora"``, below) or an embedded tiny model's (``kind="tiny_model"``:
:mod:`cdalign.publishing.tiny_card`, template ``model_cards/tiny_shapes_model.md``).

A LoRA's card is rendered with ``huggingface_hub.ModelCard``.

The card is generated from what a run wrote (``config.yaml``, ``report.json`` read as an
:class:`~cdalign.runs.report.AlignmentReport`, the pictures) and, optionally, an
evaluation (``evaluation.json`` of ``cdalign.evaluation``):

- front matter (``ModelCardData``): base model, ``library_name: diffusers``,
  ``pipeline_tag: text-to-image``, tags, license, and ``model-index`` with one
  ``EvalResult`` per reward and the chain KL;
- body (template ``model_cards/cdalign_lora.md``): the constraints with achieved values,
  95% CIs and their dual variables read as prices, base vs aligned rewards, the
  evaluation table, pictures, a usage snippet, the training configuration, the citation.

User strings (prompts, names, repo ids) go into YAML only through ``yaml.dump`` (after
collapsing newlines), into Markdown only escaped, into Python only via ``repr``, so none
of them can break the front matter, a table or the snippet.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from cdalign.console import CdalignWarning
from cdalign.core.families import MODEL_FAMILIES
from cdalign.core.normalization import MIN_NORMALIZATION_SAMPLES
from cdalign.core.problem import KL
from cdalign.core.statistics import MET_MARKS, met_label
from cdalign.models.lora import is_local_source
from cdalign.models.pipeline import EMBEDDED_MODELS
from cdalign.publishing.tables import comparison_table, fence, format_ci, md
from cdalign.publishing.tiny_card import build_tiny_model_card
from cdalign.runs.atomic import atomic_write_text
from cdalign.runs.report import REPORT_FILE, AlignmentReport, Estimate

TEMPLATE_NAME = "cdalign_lora.md"
TINY_MODEL_TEMPLATE_NAME = "tiny_shapes_model.md"
TAGS = ["lora", "cdalign", "constrained-alignment", "diffusers", "text-to-image", "stable-diffusion"]
# Licenses of known base models (a LoRA inherits its base model's terms); others: "other".
BASE_MODEL_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "cdalign/tiny-random-sd": "apache-2.0",
    "cdalign/tiny-shapes-sd": "apache-2.0",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "cdalign/tiny-random-sdxl": "apache-2.0",
}
PICTURES = (("samples: base (top) vs aligned (bottom), same seeds", "samples_base_vs_aligned.png"),
            ("dual variables, slacks and chain KL over training", "duals.png"))


def default_template_path(name: str = TEMPLATE_NAME) -> Path:
    """A card template shipped with the package: ``cdalign/data/<name>`` (default: the LoRA
    card's ``cdalign_lora.md``), which in the repository is a link to ``model_cards/<name>``
    (built wheels hold a copy)."""
    path = Path(__file__).resolve().parents[1] / "data" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {str(path)!r} not found (a broken install: it ships with the package, "
            "from model_cards/ in the repository); reinstall cdalign or pass template_path= explicitly"
        )
    return path


def yaml_safe(text: Any) -> str:
    """A user string for the YAML front matter: one line (newlines collapsed), no control
    characters. Quoting is ``yaml.dump``'s job."""
    s = str(text)
    s = "".join(ch if ch.isprintable() or ch == " " else " " for ch in s)
    return " ".join(s.split())


def _ci(mean: float | None, ci95: Sequence[float] | None) -> str:
    if mean is None or ci95 is None:
        return "n/a"
    return format_ci(mean, ci95, "+.4g")


def _estimate(entry: Estimate | None) -> str:
    return "n/a" if entry is None else _ci(entry.mean, entry.ci95)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def constraints_table(report: AlignmentReport | Mapping) -> str:
    """Per constraint: requirement (and the target it was trained toward, if past the
    threshold), this LoRA and the base model on the same held-out images (means with 95%
    CIs), the paired difference, the verdict (✓✓ the whole CI clears the threshold, ✓ only
    the mean) and the price λ."""
    rows = [
        "| constraint | requirement | this LoRA [95% CI] | base model [95% CI] | paired difference [95% CI] | satisfied | price λ |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in AlignmentReport.coerce(report).constraints:
        op = "≥" if c.direction == "high" else "≤"
        units = " σ" if c.normalized else ""
        ok = MET_MARKS[met_label(c.decision)]
        achieved = _ci(c.measured, c.ci95)
        base = _ci(c.base_measured, c.base_ci95) if c.base_ci95 else _num(c.base_measured)
        aim = c.target_from or {}
        if aim.get("margin"):  # trained toward a target past the threshold (cdalign.core.targets)
            why = f"{aim['confidence']:g} confidence" if aim.get("confidence") is not None else "a fixed margin"
            aimed = "the base" if c.relative_to_base and abs(c.target) < 1e-12 else \
                f"{'base ' if c.relative_to_base else ''}{c.target:+.3g}"
            units += f" (aimed at {aimed} for {why})"
        bound = f"base {'+' if c.threshold >= 0 else '−'} {abs(c.threshold):g}" if c.relative_to_base else f"{c.threshold:g}"
        if c.relative_to_base:
            units += " (judged on the paired difference)"
            if c.reference is not None and c.reference_ci95:
                units += (f"; base on the training prompts {_ci(c.reference, c.reference_ci95)}"
                          f"{f', {c.reference_n} images' if c.reference_n else ''}")
        rows.append(f"| {md(c.name)} | {md(c.source)} {op} {bound}{units} | {achieved} | "
                    f"{base} | {_estimate(c.difference)} | {ok} | {_num(c.dual)} |")
    return "\n".join(rows)


def metrics_table(report: AlignmentReport | Mapping) -> str:
    """Evaluation metrics (checks that are not rewards, e.g. shapes_accuracy), or '' without any."""
    metrics = AlignmentReport.coerce(report).metrics or {}
    if not metrics:
        return ""
    rows = ["| metric | base model [95% CI] | this LoRA [95% CI] | paired difference [95% CI] | images |", "|---|---|---|---|---|"]
    for name, m in metrics.items():
        rows.append(f"| {md(name)} | {_estimate(m.base)} | {_estimate(m.aligned)} | {_estimate(m.difference)} | "
                    f"{'n/a' if m.aligned.n is None else m.aligned.n} |")
    return "\n".join(rows)


def _sigma_units(report: AlignmentReport, name: str) -> str:
    """``base-model σ`` with the number of base-model images its statistics rest on."""
    count = ((report.normalization or {}).get(name) or {}).get("count")
    return "base-model σ" if count is None else f"base-model σ (from {count} images)"


def rewards_table(report: AlignmentReport | Mapping) -> str:
    report = AlignmentReport.coerce(report)
    rows = ["| reward | base model [95% CI] | this LoRA [95% CI] | units |", "|---|---|---|---|"]
    for name, e in report.rewards.items():
        normed = e.normalized
        base, aligned = ((e.base.normalized_mean, e.base.normalized_ci95), (e.aligned.normalized_mean, e.aligned.normalized_ci95)) \
            if normed else ((e.base.mean, e.base.ci95), (e.aligned.mean, e.aligned.ci95))
        rows.append(f"| {md(name)} | {_ci(*base)} | {_ci(*aligned)} | "
                    f"{_sigma_units(report, name) if normed else 'raw'} |")
    kl = report.kl
    if kl:
        rows.append(f"| chain KL to base ({md(kl.estimator)}) | 0 | {_ci(kl.mean, kl.ci95)} | nats/image |")
    return "\n".join(rows)


def prompts_label(value: Any) -> str:
    """How a card names a ``prompts`` config value: a source name as it is; a list (what
    config.yaml records for prompts a library run passed) by its length and first items."""
    if isinstance(value, (list, tuple)):
        shown = ", ".join(str(p) for p in value[:3]) + (", …" if len(value) > 3 else "")
        return f"{len(value)} prompts given as a list ({shown})"
    return str(value)


def record_notes(report: AlignmentReport | Mapping | None, config: dict) -> str:
    """What a reader must know to trust the numbers: rewards that came from user code (a
    rerun from config.yaml would use the registry reward of that name) and reward
    statistics resting on fewer than ``MIN_NORMALIZATION_SAMPLES`` base-model images."""
    report = AlignmentReport.coerce(report) or AlignmentReport()
    notes = []
    sources = {**(config.get("reward_sources") or {}), **(report.reward_sources or {})}
    if sources:
        listed = "; ".join(f"`{md(n)}`: {md(s)}" for n, s in sources.items())
        notes.append(f"**Rewards from user code**, not recordable (a rerun from `config.yaml` would use the "
                     f"registry reward of the same name): {listed}.")
    few = {n: s.get("count") for n, s in (report.normalization or {}).items()
           if isinstance(s, dict) and s.get("count") is not None and s["count"] < MIN_NORMALIZATION_SAMPLES}
    if few:
        listed = ", ".join(f"`{md(n)}` ({c} images)" for n, c in few.items())
        notes.append(f"**Few normalisation samples**: the base-model mean and σ of {listed} rest on fewer than "
                     f"{MIN_NORMALIZATION_SAMPLES} base-model images, so values in σ units are noisy.")
    return "\n\n".join(notes)


TRAINING_FIELDS = ("pretrained_model_name_or_path", "revision", "prompts", "eval_prompts", "prompt_revision", "estimator",
                   "num_inference_steps", "eta", "guidance_scale", "resolution", "kl_estimator", "lora_rank",
                   "lora_alpha", "learning_rate", "train_batch_size", "global_batch_size", "gradient_accumulation_steps", "max_steps", "seed",
                   "mixed_precision")
# Reports written before they named the estimator's own settings all came from reward backpropagation.
LEGACY_ESTIMATOR_FIELDS = ("backprop_strategy", "backprop_steps")


def training_table(config: dict, report: AlignmentReport | Mapping | None = None) -> str:
    """The run's settings: the common fields, then the estimator's own (from the report's
    ``estimator.settings``; the reward-backprop truncation for reports that predate it)."""
    rows = ["| field | value |", "|---|---|"]
    estimator = (AlignmentReport.coerce(report) or AlignmentReport()).estimator
    own = estimator.settings if estimator is not None else None
    own_fields = list(own) if own is not None else [k for k in LEGACY_ESTIMATOR_FIELDS if k in config]
    for key in (*TRAINING_FIELDS, *own_fields):
        if key == "train_batch_size" and config.get("global_batch_size") is not None:
            continue  # derived from global_batch_size and the process count
        if key in config and config[key] is not None:
            value = config[key]
            listed = key in ("prompts", "eval_prompts") and isinstance(value, list)
            value = prompts_label(value) if listed else json.dumps(value, ensure_ascii=False)
            rows.append(f"| `{key}` | {md(value)} |")
    dual = config.get("dual") or {}
    if dual:
        rows.append(f"| `dual` | {md(json.dumps(dual, ensure_ascii=False))} |")
    return "\n".join(rows)


def eval_results(report: AlignmentReport | Mapping | None, config: dict, evaluation: dict | None, checkpoint: str | None):
    """``EvalResult`` per reward mean (and the chain KL) on the held-out prompts, from the
    run's report and, where given, from the evaluation's entry ``checkpoint``."""
    from huggingface_hub import EvalResult

    report = AlignmentReport.coerce(report)
    results = []

    def add(dataset_type, dataset_name, metric_type, value, metric_name, source_name):
        results.append(EvalResult(
            task_type="text-to-image", task_name="Text-to-image generation",
            dataset_type=yaml_safe(dataset_type), dataset_name=yaml_safe(dataset_name),
            metric_type=yaml_safe(metric_type), metric_name=yaml_safe(f"{metric_name}; {source_name}"),
            metric_value=float(value),
        ))

    if report:
        prompts = config.get("eval_prompts") or config.get("prompts") or "prompts"
        prompts = "custom" if isinstance(prompts, (list, tuple)) else prompts
        n = report.num_eval_images
        for name, e in report.rewards.items():
            add(f"cdalign-prompts/{prompts}", f"{prompts} (held out, {n} images)", name, e.aligned.mean,
                f"{name} (mean, raw)", "cdalign training report")
        if report.kl:
            add(f"cdalign-prompts/{prompts}", f"{prompts} (held out, {n} images)", "chain_kl",
                report.kl.mean, f"chain KL to base ({report.kl.estimator})", "cdalign training report")
    if evaluation and checkpoint in evaluation.get("checkpoints", {}):
        e = evaluation["checkpoints"][checkpoint]
        src = evaluation.get("prompts", {}).get("source", "prompts")
        suite = evaluation.get("suite", "evaluation")
        for name, r in e.get("rewards", {}).items():
            add(f"cdalign-prompts/{src}", f"{suite}: {src} ({e.get('num_images')} images)", name, r["mean"],
                f"{name} (mean, raw)", f"cdalign evaluation suite {suite}")
        kl = e.get("kl", {}).get("base")
        if kl:
            add(f"cdalign-prompts/{src}", f"{suite}: {src} ({e.get('num_images')} images)", "chain_kl", kl["mean"],
                f"chain KL to base ({kl.get('estimator')})", f"cdalign evaluation suite {suite}")
    return results


def _is_embedded(base_model: str) -> bool:

    return base_model in EMBEDDED_MODELS


def _portable_path(path: str) -> str:
    """A path as the card may show it: relative ones as they are, absolute ones (this
    machine's) by their last component."""
    p = Path(path)
    return p.name if p.is_absolute() else p.as_posix()


def usage_snippet(base_model: str, repo: str, prompt: str, steps: int, guidance: float,
                  resolution: int | None = None, revision: str | None = None,
                  pipeline_class: str = "StableDiffusionPipeline", absent_components: Sequence[str] = ()) -> str:
    """Code that loads the base model and the LoRA and samples one image; user strings
    enter only as Python literals. An embedded base model (not a Hub repo) loads with
    ``cdalign.load_pipeline``, any other with diffusers' ``<pipeline_class>.from_pretrained``
    (``pipeline_class``: a registered family's class, e.g. ``StableDiffusion3Pipeline``;
    ``absent_components``: components the base lacks that diffusers needs named as None, e.g.
    an SD3 base without T5: ``text_encoder_3``, ``tokenizer_3``)."""
    if pipeline_class not in MODEL_FAMILIES:
        raise ValueError(f"pipeline_class {pipeline_class!r}: not one of {', '.join(MODEL_FAMILIES.names())}")
    cls = pipeline_class
    guidance = MODEL_FAMILIES.get(cls).pipeline_guidance(guidance)  # the pipeline's own convention (Z-Image: w - 1)
    none = "".join(f", {str(name)}=None" for name in absent_components if str(name).isidentifier())

    if _is_embedded(base_model):
        head = ("from cdalign import load_pipeline\n\n"
                f"pipe = load_pipeline({str(base_model)!r})  # embedded in the cdalign package\n")
    elif is_local_source(base_model):
        head = (f"from diffusers import {cls}\n\n"
                f"pipe = {cls}.from_pretrained({_portable_path(base_model)!r}{none})  "
                "# the base model: a local folder where it was trained\n")
    else:
        pin = f", revision={str(revision)!r}" if revision else ""  # the commit the run trained on
        head = (f"from diffusers import {cls}\n\n"
                f"pipe = {cls}.from_pretrained({str(base_model)!r}{pin}{none})\n")
    size = f", height={resolution}, width={resolution}" if resolution else ""
    return (
        head
        + f"pipe.load_lora_weights({str(repo)!r}, weight_name=\"pytorch_lora_weights.safetensors\")\n"
        + f"image = pipe({prompt!r}, num_inference_steps={steps}, guidance_scale={guidance}{size}).images[0]\n"
    )


# config.yaml fields that say where and how one invocation ran (its folders, how it started,
# where it pushed), not what was trained: left out of the card's rerun configuration.
RUN_LOCAL_FIELDS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_allow_config_change",
                    "normalization_cache_dir", "push_to_hub", "hub_model_id", "hub_private")


def rerun_config(config: dict) -> dict:
    """``config`` without :data:`RUN_LOCAL_FIELDS`: a recipe that reruns the training on
    another machine (those fields take their defaults there)."""
    return {k: v for k, v in config.items() if k not in RUN_LOCAL_FIELDS}


def build_model_card(
    output_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    report: AlignmentReport | Mapping | None = None,
    config: dict | None = None,
    evaluation: dict | None = None,
    evaluation_checkpoint: str | None = None,
    license: str | None = None,
    template_path: str | os.PathLike | None = None,
):
    """The :class:`huggingface_hub.ModelCard` of a run in ``output_dir``. ``report`` (an
    :class:`~cdalign.runs.report.AlignmentReport` or its JSON form) / ``config`` default to
    the folder's ``report.json`` / ``config.yaml``; ``evaluation``
    is an ``evaluation.json`` dict whose entry ``evaluation_checkpoint`` (default: the
    first non-base checkpoint) describes this model."""
    from huggingface_hub import ModelCard, ModelCardData


    out = Path(output_dir)
    report = AlignmentReport.coerce(report)
    if report is None and (out / REPORT_FILE).is_file():
        report = AlignmentReport.read(out / REPORT_FILE)
    if config is None:
        config = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").is_file() else {}
    config = config or {}
    run = report or AlignmentReport()  # no report: every field absent
    base_model = config.get("pretrained_model_name_or_path") or run.model or "unknown"
    name = repo_id or out.resolve().name
    if evaluation is not None and evaluation_checkpoint is None:
        evaluation_checkpoint = next((k for k, v in evaluation.get("checkpoints", {}).items() if v.get("kind") != "base"), None)

    card_data = ModelCardData(
        base_model=yaml_safe(base_model),
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=license or BASE_MODEL_LICENSES.get(base_model, "other"),
        tags=list(TAGS),
        model_name=yaml_safe(name),
        eval_results=eval_results(report, config, evaluation, evaluation_checkpoint) or None,
    )
    objective = config.get("objective") or {"type": KL}
    if objective.get("type", KL) != KL:  # a reward objective
        objective_md, units = f"maximise the reward `{md(objective.get('reward'))}`", "reward units"
    else:
        objective_md, units = "stay as close as possible to the base model (minimise the chain KL)", "KL, nats/image"
    prompts = config.get("eval_prompts") or config.get("prompts") or "the training prompts"
    if isinstance(prompts, (list, tuple)) and prompts:
        example = str(prompts[0])
    else:
        example = "a photo of a cat" if not isinstance(prompts, str) or prompts in ("animals", "animals_eval") else "a red circle"
    pictures = [(alt, f) for alt, f in PICTURES if (out / f).is_file()]
    embedded = _is_embedded(base_model)
    # The LoRA in the snippet: the Hub repo once pushed, else this card's folder (relative,
    # as given; never this machine's absolute path).
    lora_source = repo_id or (out.as_posix() if not out.is_absolute() else out.name)
    kwargs = dict(
        title=md(name),
        base_model_md=md(base_model),
        base_model_url=f"https://huggingface.co/{base_model}".replace(" ", "%20").replace(")", "%29"),
        objective_md=objective_md,
        objective_units=units,
        constraints_table=constraints_table(run) if run.constraints else "",
        num_eval_images="n/a" if run.num_eval_images is None else run.num_eval_images,
        eval_prompts_md=f"prompts: {md(prompts_label(prompts))}",
        infeasible=", ".join(md(x) for x in run.infeasible or []),
        rewards_table=rewards_table(run) if run.rewards else "",
        metrics_table=metrics_table(report) if report else "",
        record_notes=record_notes(report, config),
        evaluation_table=comparison_table(evaluation) if evaluation else "",
        evaluation_intro=(f"Suite **{md(evaluation.get('suite'))}** on `{md(evaluation.get('model'))}`, "
                          f"{evaluation.get('num_images')} images per checkpoint, same prompts and seeds for every row."
                          if evaluation else ""),
        evaluation_grid="evaluation/grid.png" if (out / "evaluation" / "grid.png").is_file() else "",
        pictures=pictures,
        usage_block=fence(usage_snippet(base_model, lora_source, example,
                                         int(config.get("num_inference_steps") or 25),
                                         float(config.get("guidance_scale") or 5.0),
                                         config.get("resolution"), config.get("revision"),
                                         run.pipeline_class or "StableDiffusionPipeline",
                                         run.pipeline_absent_components or ()), "python"),
        embedded_note=" ".join(
            ([f"`{md(base_model)}` ships inside the cdalign package, not as a Hub repo, hence "
              "`cdalign.load_pipeline` instead of `from_pretrained`."] if embedded else [])
            + ([] if repo_id else [f"Run the snippet from the folder that holds `{md(lora_source)}` (or put the "
                                   "LoRA's Hub repo id there once it is pushed)."])),
        training_table=training_table(config, report),
        config_block=(fence(yaml.safe_dump(rerun_config(config), sort_keys=False, allow_unicode=True), "yaml")
                      if config else "(no config.yaml)"),
    )
    tpl = Path(template_path) if template_path else default_template_path()
    return ModelCard.from_template(card_data, template_path=str(tpl), **kwargs)


def tiny_model_card(output_dir: str | os.PathLike, *, results: dict, command: str,
                    template_path: str | os.PathLike | None = None) -> str:
    """The card of an embedded tiny model in ``output_dir`` (:func:`~cdalign.publishing.tiny_card.build_tiny_model_card`:
    ``results`` of ``cdalign.evaluation.tiny_quality.evaluate``, measured by ``command``)."""
    tpl = Path(template_path) if template_path else default_template_path(TINY_MODEL_TEMPLATE_NAME)
    return build_tiny_model_card(output_dir, results, command, tpl)


# What write_model_card renders, per kind of model: output_dir, keyword arguments -> the card.
CARD_KINDS = {"lora": build_model_card, "tiny_model": tiny_model_card}


def write_model_card(output_dir: str | os.PathLike, kind: str = "lora", **kwargs) -> Path:
    """Render the card of ``kind`` into ``output_dir/README.md`` (atomically): ``"lora"`` a
    constrained run (:func:`build_model_card`, its keyword arguments), ``"tiny_model"`` an
    embedded tiny model (:func:`tiny_model_card`: ``results=``, ``command=``)."""
    if kind not in CARD_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(CARD_KINDS)}")
    card = CARD_KINDS[kind](output_dir, **kwargs)
    path = Path(output_dir) / "README.md"
    atomic_write_text(path, str(card))
    return path


def write_model_card_or_warn(output_dir: str | os.PathLike, **kwargs) -> Path | None:
    """:func:`write_model_card`, warning instead of raising: a card that cannot be rendered
    must not fail a finished run. Returns the card's path, or None when it was not written."""
    try:
        return write_model_card(output_dir, **kwargs)
    except Exception as err:
        warnings.warn(f"model card not written to {str(Path(output_dir) / 'README.md')!r}: {err}", CdalignWarning,
                      stacklevel=2)
        return None

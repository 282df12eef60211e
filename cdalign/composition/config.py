"""Configuration of composition runs (METHOD.md §2): dataclasses whose fields document
themselves, read from YAML and the command line by the typed config engine
(:mod:`cdalign.fields`; same conversion, duplicate-key check, did-you-mean suggestions and
error messages naming the field and the fix as the alignment config).

``composition: and`` -> :class:`ComposeConfig` (reverse KL, product of adapters/concepts);
``composition: or``  -> :class:`MixtureConfig` (forward KL, mixture fine-tuning on datasets)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cdalign.composition.components import COMPONENT_KINDS, ComponentKind
from cdalign.composition.simplex import STEP_SCHEDULES
from cdalign.composition.supports import SUPPORT_LABELERS
from cdalign.core.kl import KL_ESTIMATORS
from cdalign.fields import (
    CommandLineParser,
    ConfigFields,
    check_fields,
    dataclass_from_dict,
    not_allowed,
    parse_args_to_dict,
    read_yaml_mapping,
    save_yaml,
)
from cdalign.fields import build_parser as _build_parser
from cdalign.models.pipeline import MIXED_PRECISIONS
from cdalign.recipes_data import find_recipe


@dataclass
class ComponentSpec(ConfigFields):
    """One component q_i of an AND composition."""

    name: str = field(default="", metadata={"help": "Unique name of the component (adapter name, table rows, plots)."})
    kind: str = field(
        default="lora",
        metadata={
            "help": "'lora': a LoRA adapter on the base model, activated alone (needs `source`). 'base': the base "
            "model itself. 'concept': the base model under the prompt `prompt` (concept composition). A name of "
            "cdalign.COMPONENT_KINDS.",
            "choices": COMPONENT_KINDS,
            "renamed_from": "type",
        },
    )
    source: str | None = field(
        default=None,
        metadata={
            "help": "'lora': a folder holding pytorch_lora_weights.safetensors (e.g. an output_dir of "
            "recipes/align.py) or a Hub repo id. With `train_recipe`, the folder the adapter is trained into "
            "when it holds no LoRA yet.",
            "renamed_from": "path",
        },
    )
    weight_name: str | None = field(default=None, metadata={"help": "'lora': file name inside `source` if not the default."})
    revision: str | None = field(default=None, metadata={"help": "'lora' from the Hub: branch, tag or commit."})
    prompt: str | None = field(
        default=None,
        metadata={
            "help": "Prompt override: unset = the run's prompts; a text = that prompt for every image (required "
            "for 'concept'); a text containing {prompt} = the run's prompt substituted into it."
        },
    )
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "Optional bound b_i on KL(p‖q_i) (same units as kl_estimator). Unset: the component takes part "
            "in the min-max objective. Set: it becomes the constraint KL_i ≤ b_i with its own multiplier.",
            "gt": 0.0,
        },
    )
    reward: str | None = field(
        default=None,
        metadata={
            "help": "Reward this component was aligned to (a cdalign.rewards name). Evaluation scores every model "
            "with it and reports it relative to this component alone (the paper's metric)."
        },
    )
    train_recipe: str | None = field(
        default=None,
        metadata={
            "help": "'lora': an align recipe (YAML of recipes/align.py) that trains this adapter into `source` when "
            "`source` holds no LoRA yet (the base model is set to this run's). A relative path in a recipe file is "
            "relative to that file's folder (given with --components: to the current directory)."
        },
    )
    train_overrides: list[str] = field(
        default_factory=list,
        metadata={"help": "'lora' with train_recipe: extra recipes/align.py flags, e.g. [--max_steps, '6']."},
    )

    @property
    def component_kind(self) -> ComponentKind:
        """What ``kind`` names in :data:`~cdalign.composition.components.COMPONENT_KINDS`:
        whether this component is a LoRA read from ``source``, a concept, or the base."""
        return COMPONENT_KINDS.get(self.kind)


@dataclass
class DualAscentSpec(ConfigFields):
    """Projected dual ascent of the weights: μ ← Proj_simplex(μ + η_k·KL)."""

    steps: int = field(default=5, metadata={"help": "Dual steps (the paper: 5). 0 keeps the initial weights.", "ge": 0})
    lr: float = field(default=1.0, metadata={"help": "Step size η (weight per nat of KL; the paper: 1).", "gt": 0.0})
    schedule: str = field(
        default="constant",
        metadata={"help": "Step schedule η_k: constant, inverse_sqrt (η/√(k+1)), harmonic (η/(k+1)).", "choices": STEP_SCHEDULES},
    )
    normalize: bool = field(
        default=False,
        metadata={
            "help": "Divide each step by the largest divergence (normalised subgradient ascent): η is then a "
            "weight change per step whatever the KL's units. Off reproduces the paper (η = 1 on 'uniform' KL)."
        },
    )
    batch_size: int = field(default=4, metadata={"help": "Images sampled per dual step to estimate each KL.", "ge": 1})
    init: list[float] | None = field(
        default=None,
        metadata={"help": "Initial multipliers, one per component; unset = equal weights (λ = 0 for thresholded).", "ge": 0.0},
    )


@dataclass
class DistillSpec(ConfigFields):
    """Distil ε_μ into one LoRA (one denoiser pass per step at inference instead of n)."""

    enabled: bool = field(default=False, metadata={"help": "Train the distilled LoRA after the dual steps."})
    steps: int = field(default=50, metadata={"help": "Optimiser steps of the student.", "ge": 1})
    batch_size: int = field(default=2, metadata={"help": "Composed chains sampled per optimiser step.", "ge": 1})
    timesteps_per_chain: int = field(
        default=4,
        metadata={"help": "Denoising steps per chain where the student is regressed onto ε_μ (uniformly drawn).", "ge": 1},
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate.", "gt": 0.0})
    lora_rank: int = field(default=4, metadata={"help": "Rank of the distilled LoRA.", "ge": 1})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA α of the distilled LoRA.", "gt": 0.0})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={"help": "Denoiser modules with LoRA layers."}
    )


@dataclass
class ConceptSetSpec(ConfigFields):
    """One set of concept prompts of a concept composition run over several sets."""

    prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "One prompt per 'concept' component, in the order of `components` (e.g. [red, square, black background])."},
    )
    joint_prompt: str | None = field(
        default=None,
        metadata={"help": "The single prompt baseline for this set (e.g. 'a red square on a black background'); unset = none."},
    )


@dataclass
class ComposeConfig(ConfigFields):
    """An AND (product) composition run: constrained weights by dual ascent on the chain
    KL to each component, evaluation against equal weights, optional distillation."""

    composition: str = field(default="and", metadata={"help": "'and': product composition (this config).", "choices": ("and",)})
    pretrained_model_name_or_path: str = field(
        default="cdalign/tiny-random-sd",
        metadata={"help": "Shared base model: an embedded name (cdalign/tiny-random-sd, cdalign/tiny-shapes-sd), a local folder or a Hub id."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the base model."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant of the base model (e.g. fp16)."})
    components: list[ComponentSpec] = field(
        default_factory=list,
        metadata={"help": "The components q_1..q_n (at least 2): a YAML list of mappings with the keys below."},
    )
    prompts: str = field(default="shapes", metadata={"help": "Prompts for the dual steps (a prompt-set name, .txt/.json/.jsonl file or Hub dataset)."})
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column for dataset sources."})
    prompt_split: str = field(default="train", metadata={"help": "Split for Hub dataset prompts."})
    eval_prompts: str | None = field(default=None, metadata={"help": "Evaluation prompts; unset = `prompts`."})
    num_inference_steps: int = field(default=10, metadata={"help": "DDIM steps (the paper: 25).", "ge": 1})
    eta: float = field(default=1.0, metadata={"help": "Per-step stochasticity: DDIM η (SD 1.x/2.x) or the flow SDE noise level a "
                                               "(SD3; Flow-GRPO: 0.7); 'path' KL needs it > 0.", "ge": 0.0, "le": 1.0})
    guidance_scale: float = field(default=5.0, metadata={"help": "CFG scale w of every component (the paper: 5); FLUX.1-dev: its guidance-embedding input.", "ge": 0.0})
    resolution: int | None = field(default=None, metadata={"help": "Image side in pixels; unset = the model's default.", "ge": 1})
    kl_estimator: str = field(
        default="path",
        metadata={
            "help": "Chain KL(p_μ‖q_i) along the composed path: 'path' (exact, nats per image) or 'uniform' "
            "(the paper code's unweighted mean of squared ε differences).",
            "choices": KL_ESTIMATORS,
        },
    )
    dual: DualAscentSpec = field(default_factory=DualAscentSpec, metadata={"help": "Dual ascent of the weights (see dual.*)."})
    distill: DistillSpec = field(default_factory=DistillSpec, metadata={"help": "Distillation into one LoRA (see distill.*)."})
    joint_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Concept composition's baseline: the base model under this one prompt (e.g. the concepts joined "
            "into a caption), evaluated beside equal and constrained weights on the same seeds, each concept's "
            "reward taken on that concept's own prompt. Unset: no baseline."
        },
    )
    concept_sets: list[ConceptSetSpec] = field(
        default_factory=list,
        metadata={
            "help": "Concept composition over several sets of concepts: each set replaces the 'concept' components' "
            "prompts (and joint_prompt); the weights are found for each set on its own (as the paper does per "
            "prompt set), each set's run goes to output_dir/set_<k>, and the report pools the evaluation over sets. "
            "Empty: one run with the components as given."
        },
    )
    eval_batches: int = field(default=2, metadata={"help": "Evaluation batches of dual.batch_size images (fixed seeds).", "ge": 1})
    eval_batch_size: int | None = field(
        default=None,
        metadata={"help": "Evaluation images sampled per call (None: dual.batch_size). The images, their seeds and "
                  "every number stay the same (to float rounding); larger calls cost less per image, the tiny "
                  "model's 16.6 ms per image at 16 prompts against 20.2 at 4 on one CPU thread, at more memory.", "ge": 1},
    )
    eval_seed: int = field(default=1234, metadata={"help": "Seed of the evaluation images (same for every model).", "ge": 0})
    num_grid_images: int = field(default=6, metadata={"help": "Images per row of the sample grid (0: no grid).", "ge": 0})
    mixed_precision: str = field(default="no", metadata={"help": "Frozen weights in fp16/bf16 (GPU); 'fp16' is refused on a CPU (use 'no' or 'bf16' there).", "choices": MIXED_PRECISIONS})
    output_dir: str = field(default="outputs/compose", metadata={"help": "Where the report, weights, grids and plots go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing run in output_dir."})
    seed: int = field(default=0, metadata={"help": "Seed of the dual-step batches and the distillation.", "ge": 0})

    def validate(self) -> None:
        check_fields(self)
        if len(self.components) < 2:
            raise ValueError(f"components: {len(self.components)} given; a composition needs at least 2")
        seen = set()
        for i, c in enumerate(self.components):
            where = f"components[{i}]"
            if not c.name.strip():
                raise ValueError(f"{where}.name: required (a unique name)")
            if c.name in seen:
                raise ValueError(f"{where}.name: {c.name!r} is used twice; names must be unique")
            seen.add(c.name)
            kind = c.component_kind
            if kind.lora and not c.source:
                raise ValueError(f"{where}.source: required for kind {c.kind!r} (a LoRA folder or Hub repo id)")
            if not kind.lora and (c.source or c.train_recipe):
                raise ValueError(f"{where}: source/train_recipe only apply to a LoRA (kind 'lora'; this is {c.kind!r})")
            if kind.concept and not c.prompt:
                raise ValueError(f"{where}.prompt: required for kind {c.kind!r} (the concept's prompt)")
        if self.dual.init is not None and len(self.dual.init) != len(self.components):
            raise ValueError(f"dual.init: {len(self.dual.init)} values for {len(self.components)} components")
        concepts = [c for c in self.components if c.component_kind.concept]
        for k, cs in enumerate(self.concept_sets):
            if len(cs.prompts) != len(concepts):
                raise ValueError(
                    f"concept_sets[{k}].prompts: {len(cs.prompts)} prompts for {len(concepts)} 'concept' components "
                    f"({[c.name for c in concepts]}); give one prompt per concept, in order"
                )
            if any(not p.strip() for p in cs.prompts):
                raise ValueError(f"concept_sets[{k}].prompts: a prompt is empty; every concept needs its prompt")
        if self.kl_estimator == "path" and self.eta == 0:
            raise ValueError("eta: 0 makes the sampler deterministic, so kl_estimator 'path' is undefined; use eta > 0 or 'uniform'")


@dataclass
class DatasetSpec(ConfigFields):
    """One dataset D_i of an OR (mixture) composition."""

    name: str = field(default="", metadata={"help": "Unique name of the dataset (tables, plots)."})
    source: str = field(
        default="",
        metadata={
            "help": "A local image folder (captions from metadata.jsonl/metadata.csv with a `text` column, or "
            "`caption` below) or a Hub dataset id (datasets.load_dataset).",
            "renamed_from": "path",
        },
    )
    split: str = field(default="train", metadata={"help": "Split to read."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    caption_column: str = field(default="text", metadata={"help": "Column holding the captions (if present)."})
    caption: str | None = field(default=None, metadata={"help": "Caption for every image (when the data has none)."})
    threshold: float | None = field(
        default=None,
        metadata={"help": "Optional bound b_i on this dataset's (excess) loss; unset = part of the min-max objective.", "gt": 0.0},
    )
    irreducible_loss: float | None = field(
        default=None,
        metadata={
            "help": "excess_loss: a given irreducible DSM loss of this dataset; unset = estimated by fitting a "
            "LoRA on this dataset alone (irreducible_fit_steps)."
        },
    )


@dataclass
class MixtureConfig(ConfigFields):
    """An OR (mixture) composition run: fine-tune one LoRA on Σ μ_i·DSM_i with μ ascending
    on the simplex with the per-dataset losses (or excess losses)."""

    composition: str = field(default="or", metadata={"help": "'or': mixture composition (this config).", "choices": ("or",)})
    pretrained_model_name_or_path: str = field(default="cdalign/tiny-random-sd", metadata={"help": "Base model."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the base model."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant of the base model."})
    datasets: list[DatasetSpec] = field(default_factory=list, metadata={"help": "The datasets D_1..D_n (at least 2)."})
    resolution: int = field(default=32, metadata={"help": "Training image side in pixels.", "ge": 8})
    loss: str = field(
        default="excess",
        metadata={
            "help": "Per-dataset divergence for the dual step. 'raw': the DSM loss (equalising it over-weights "
            "high-entropy datasets, whose irreducible loss is larger). 'excess': DSM minus the dataset's own "
            "irreducible loss, ≈ KL(q_i‖p) up to the DSM weighting (METHOD.md §2).",
            "choices": ("raw", "excess"),
        },
    )
    irreducible_fit_steps: int = field(
        default=50, metadata={"help": "excess: steps of the per-dataset LoRA fit estimating each irreducible loss.", "ge": 1}
    )
    dual: DualAscentSpec = field(default_factory=lambda: DualAscentSpec(steps=0, lr=0.5), metadata={"help": "Dual ascent (dual.lr, dual.schedule, dual.init; dual.steps unused: see dual_every)."})
    dual_every: int = field(default=5, metadata={"help": "Optimiser steps between dual steps.", "ge": 1})
    max_steps: int = field(default=100, metadata={"help": "Optimiser steps.", "ge": 1})
    train_batch_size: int = field(default=4, metadata={"help": "Images per dataset per optimiser step.", "ge": 1})
    eval_size: int = field(default=16, metadata={"help": "Fixed (image, t, noise) triples per dataset for loss estimates.", "ge": 1})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate.", "gt": 0.0})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank.", "ge": 1})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA α.", "gt": 0.0})
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={"help": "Denoiser modules with LoRA layers."})
    num_inference_steps: int = field(default=10, metadata={"help": "DDIM steps for the sample grid.", "ge": 1})
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale for the sample grid.", "ge": 0.0})
    num_grid_images: int = field(default=4, metadata={"help": "Grid images per dataset caption (0: none).", "ge": 0})
    support_labeler: str | None = field(
        default=None,
        metadata={
            "help": "Count the mass the trained model (and the base) puts in each dataset's support with this "
            "labeler (e.g. 'shapes': (colour, shape) read by the shapes classifier; the datasets need those "
            "columns). With disjoint supports the exact min-max answer is equal masses. Unset: not measured.",
            "choices": SUPPORT_LABELERS,
        },
    )
    mass_samples: int = field(default=64, metadata={"help": "support_labeler: images sampled to count the masses.", "ge": 1})
    mass_prompt: str = field(
        default="", metadata={"help": "support_labeler: the prompt the masses are sampled with (\"\": unconditional)."}
    )
    output_dir: str = field(default="outputs/compose-or", metadata={"help": "Output folder."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing run in output_dir."})
    seed: int = field(default=0, metadata={"help": "Seed.", "ge": 0})

    def validate(self) -> None:
        check_fields(self)
        if len(self.datasets) < 2:
            raise ValueError(f"datasets: {len(self.datasets)} given; a mixture needs at least 2")
        names = [d.name for d in self.datasets]
        for i, d in enumerate(self.datasets):
            if not d.name.strip() or names.count(d.name) > 1:
                raise ValueError(f"datasets[{i}].name: required and unique, got {d.name!r}")
            if not d.source.strip():
                raise ValueError(f"datasets[{i}].source: required (an image folder or a Hub dataset id)")
        if self.dual.init is not None and len(self.dual.init) != len(self.datasets):
            raise ValueError(f"dual.init: {len(self.dual.init)} values for {len(self.datasets)} datasets")


CONFIG_CLASSES = {"and": ComposeConfig, "or": MixtureConfig}


def config_from_dict(data: dict):
    """Build and validate the config class that ``data['composition']`` names (default 'and')."""
    kind = data.get("composition", "and")
    if kind not in CONFIG_CLASSES:
        raise not_allowed("composition", kind, tuple(CONFIG_CLASSES))
    cfg = dataclass_from_dict(CONFIG_CLASSES[kind], data)
    cfg.validate()
    return cfg


def resolve_recipe_paths(data: dict, recipe) -> dict:
    """``data`` (a recipe file's mapping) with each relative ``components[i].train_recipe``
    resolved against the folder of the file ``recipe``, so a recipe runs the same from any
    current directory. Other paths (``source``, ``output_dir``) are outputs, relative to the
    current directory like every output_dir."""
    for component in data.get("components") or []:
        if not isinstance(component, dict) or not isinstance(component.get("train_recipe"), str):
            continue
        target = Path(component["train_recipe"]).expanduser()
        if component["train_recipe"].strip() and not target.is_absolute():
            component["train_recipe"] = os.path.normpath(Path(recipe).parent / target)
    return data


def load_config_file(path):
    """Load and validate a composition recipe (``and`` or ``or``): a file, or a recipe packaged
    with cdalign by name (``"compose/tiny_adapters"``); errors name the file."""
    path = find_recipe(path)
    data = resolve_recipe_paths(read_yaml_mapping(path), path)
    try:
        return config_from_dict(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def save_config(cfg, path) -> None:
    """Write ``cfg`` as a YAML recipe that :func:`load_config_file` reads back equal."""
    save_yaml(cfg, path)


def build_parser(cls, recipe=None, default_recipe=None, prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of composition config ``cls`` (``--help`` shows ``recipe``'s values)."""
    return _build_parser(
        cls,
        prog=prog,
        description=f"Constrained composition of diffusion models ({cls.__name__}; arXiv 2508.19104). "
        "Give a YAML recipe with --config; --field flags override it (--dual.lr 0.5).",
        recipe=recipe,
        default_recipe=default_recipe,
    )


def parse_config(argv: list[str] | None = None, default_recipe=None, prog: str | None = None):
    """``--config recipe.yaml`` (``default_recipe`` when none is given) then ``--field
    value`` overrides -> a validated config of the class that the recipe's
    ``composition`` key names. ``--help`` shows the defaults that will run (``prog``: the
    command it names)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = CommandLineParser(prog=prog, add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--composition")
    known, _ = pre.parse_known_args(argv)
    recipe = known.config or (str(default_recipe) if default_recipe is not None else None)
    raw = read_yaml_mapping(find_recipe(recipe)) if recipe else {}
    kind = known.composition or raw.get("composition", "and")
    if kind not in CONFIG_CLASSES:
        raise not_allowed("composition", kind, tuple(CONFIG_CLASSES))
    cls = CONFIG_CLASSES[kind]
    wants_help = any(a in ("-h", "--help") for a in argv)
    shown = recipe if wants_help and raw.get("composition", "and") == kind else None
    raw = parse_args_to_dict(
        cls, argv, build_parser(cls, recipe=shown, default_recipe=default_recipe, prog=prog),
        default_recipe=default_recipe, resolve_paths=resolve_recipe_paths,
    )
    try:
        return config_from_dict(raw)
    except ValueError as error:
        where = f"{recipe}: " if recipe else ""
        raise ValueError(f"{where}{error}") from None

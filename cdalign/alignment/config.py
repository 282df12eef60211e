"""Configuration of a constrained alignment run: :class:`ConstrainedDDPOConfig`, whose
fields document themselves, read from YAML recipes and the command line by the typed
config engine (:mod:`cdalign.fields`).

The problem is three specs (:mod:`cdalign.alignment.specs`): ``objective`` f_0,
``constraints`` g_i ≤ 0 and ``dual``, how the multipliers λ_i are updated. The settings
of one gradient estimator are declared by it (:mod:`cdalign.alignment.estimator_settings`)
and kept here as flat fields. Rules that relate several fields are in
:mod:`cdalign.alignment.rules`.

A recipe is a YAML file whose keys are the fields below; on the command line
``--config recipe.yaml`` loads it and ``--field value`` flags override it
(``--dual.kappa_i 0.1`` for a field of a nested spec, ``--constraints '<YAML list>'``
for the whole constraint list).

Field metadata: ``help`` (required), and optionally ``choices`` (allowed values) and
bounds ``ge``/``gt``/``le``/``lt`` that :meth:`ConstrainedDDPOConfig.validate` enforces
(through :func:`cdalign.fields.check_fields`) and ``--help`` prints.
"""

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from cdalign.alignment.estimator_settings import PolicyGradientSettings as _PolicyGradient
from cdalign.alignment.estimator_settings import RewardBackpropSettings as _RewardBackprop
from cdalign.alignment.estimator_settings import estimator_field
from cdalign.alignment.estimators import ESTIMATORS
from cdalign.alignment.rules import check_rules
from cdalign.alignment.specs import ConstraintSpec, DualSpec, ObjectiveSpec
from cdalign.core.kl import KL_ESTIMATORS
from cdalign.core.seeding import per_process
from cdalign.fields import (
    CommandLineParser,
    ConfigFields,
    HelpGroup,
    check_fields,
    dataclass_from_dict,
    read_yaml_mapping,
    save_yaml,
)
from cdalign.fields import build_parser as _build_parser
from cdalign.fields import parse_args_to_dict as _parse_args_to_dict
from cdalign.models.pipeline import MIXED_PRECISIONS
from cdalign.recipes_data import find_recipe
from cdalign.rewards.remote import RemoteRewardSpec

__all__ = [
    "ConstrainedDDPOConfig",
    "parse_config",
    "load_config_file",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "build_parser",
    "estimator_help_groups",
    "parse_args_to_dict",
]


@dataclass
class ConstrainedDDPOConfig(ConfigFields):
    """Everything a constrained alignment run needs; every field is a YAML key and a
    ``--flag``. Build one with :func:`parse_config`, :func:`load_config_file` or
    :func:`config_from_dict` (these validate), or directly and then call
    :meth:`validate` (construction alone does not validate, so a config can be built
    up field by field)."""

    # model
    pretrained_model_name_or_path: str = field(
        default="cdalign/tiny-random-sd",
        metadata={
            "help": "Base model q: an embedded model name (cdalign/tiny-random-sd, for tests), a local "
            "diffusers folder, or a Hub id of a Stable Diffusion 1.x/2.x pipeline (the paper: "
            "stable-diffusion-v1-5)."
        },
    )
    revision: str | None = field(
        default=None,
        metadata={
            "help": "Hub branch, tag or commit of the base model; unset = the default branch. config.yaml records the "
            "commit it resolved to."
        },
    )
    variant: str | None = field(
        default=None, metadata={"help": "Weight file variant of the base model, e.g. 'fp16'; unset = the full-precision files."}
    )
    # prompts
    prompts: str | list[str] = field(
        default="tiny",
        metadata={
            "help": "Training prompts: a prompt-set registry name (e.g. the paper's animal names), a .txt file "
            "(one prompt per line), a .json list or .jsonl file, a Hub dataset id (see prompt_column, prompt_split), "
            "or the prompts themselves as a list (what config.yaml records when a library run passed a list)."
        },
    )
    prompt_column: str = field(
        default="prompt", metadata={"help": "Column (or .json/.jsonl key) that holds the prompt text, for dataset sources."}
    )
    prompt_split: str = field(default="train", metadata={"help": "Split to read when `prompts` is a Hub dataset id."})
    prompt_revision: str | None = field(
        default=None,
        metadata={
            "help": "Hub branch, tag or commit of the prompt dataset(s) (`prompts`, `eval_prompts` when they are Hub "
            "dataset ids); unset = the default branch. config.yaml records the commit it resolved to."
        },
    )
    eval_prompts: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Prompts for the end-of-training evaluation, in the same forms as `prompts` (a list too); unset = "
            "`prompts`. The paper evaluated on held-out animals (snail, hippopotamus, cheetah, …)."
        },
    )
    eval_prompt_split: str | None = field(
        default=None,
        metadata={"help": "Split to read when `eval_prompts` is a Hub dataset id (e.g. 'test'); unset = `prompt_split`."},
    )
    # problem
    objective: ObjectiveSpec = field(
        default_factory=ObjectiveSpec, metadata={"help": "What is minimised (a mapping; see the objective.* fields)."}
    )
    constraints: list[ConstraintSpec] = field(
        default_factory=list,
        metadata={
            "help": "The constraints, a list of mappings with the keys listed below. May be empty only with a "
            "reward objective (plain reward fine-tuning). On the command line: a YAML or JSON list, e.g. "
            "--constraints '[{reward: saturation, direction: low, threshold: -0.5}]'."
        },
    )
    dual: DualSpec = field(
        default_factory=DualSpec, metadata={"help": "Dual (multiplier) updates (a mapping; see the dual.* fields)."}
    )
    # sampler
    num_inference_steps: int = field(
        default=20, metadata={"help": "DDIM sampling steps T per image (the paper: 15).", "ge": 1}
    )
    eta: float = field(
        default=1.0,
        metadata={
            "help": "Per-step stochasticity in [0, 1]: DDIM η for SD 1.x/2.x UNets (1, the paper, makes every "
            "step Gaussian); for flow models (SD3/SD3.5, FLUX.1) the SDE noise level a of "
            "σ_t = a·sqrt(t/(1−t)) (Flow-GRPO: 0.7; 0 is the deterministic Euler ODE). The exact chain KL "
            "(kl_estimator 'path') needs it > 0.",
            "ge": 0.0,
            "le": 1.0,
        },
    )
    guidance_scale: float = field(
        default=5.0,
        metadata={"help": "Classifier-free guidance w in ε̃ = ε_u + w·(ε_c − ε_u) (velocities for flow models); 1 = no guidance "
                  "(the paper: 5). For guidance-distilled FLUX.1-dev the value enters its guidance embedding "
                  "instead (no unconditional pass; FLUX.1-dev's default 3.5).", "ge": 0.0},
    )
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "Image side in pixels; unset = the model's default (512 for SD 1.5). Must suit the model "
            "(a multiple of the VAE scale factor, 8 for SD), which is checked when the model is loaded.",
            "ge": 1,
        },
    )
    # gradient estimator; each estimator's own settings below are declared (default, help,
    # bounds) by its settings class in alignment.estimator_settings, and sit here flat
    estimator: str = field(
        default="reward_backprop",
        metadata={
            "help": "Primal gradient estimator. 'reward_backprop' (the paper's): backpropagate differentiable "
            "rewards and the KL through the last K sampling steps and the VAE decoder. 'policy_gradient' (DDPO/GRPO, "
            "METHOD.md §3): score-function gradient with PPO clipping, for rewards without gradients (e.g. "
            "jpeg_compressibility, detectors, black-box scorers); needs eta > 0. Then max_steps counts rounds of "
            "sampling, each followed by ppo_epochs × ppo_updates_per_epoch optimiser updates.",
            "choices": ESTIMATORS,
        },
    )
    backprop_strategy: str = estimator_field(_RewardBackprop, "backprop_strategy")
    backprop_steps: int = estimator_field(_RewardBackprop, "backprop_steps")
    backprop_min_steps: int = estimator_field(_RewardBackprop, "backprop_min_steps")
    backprop_gaussian_mean: float = estimator_field(_RewardBackprop, "backprop_gaussian_mean")
    backprop_gaussian_std: float = estimator_field(_RewardBackprop, "backprop_gaussian_std")
    gradient_checkpointing: bool = estimator_field(_RewardBackprop, "gradient_checkpointing")
    fuse_micro_batches: bool | None = estimator_field(_RewardBackprop, "fuse_micro_batches")
    # KL
    kl_estimator: str = field(
        default="path",
        metadata={
            "help": "How KL(p_θ ‖ q) is computed along the sampled chain. 'path' (default): the exact chain KL, "
            "Σ_t c_t²/(2σ_t²)·‖ε̃_θ − ε̃_q‖² summed over latent elements (nats per image). 'uniform': the "
            "paper's code, the unweighted mean of (ε̃_θ − ε̃_q)² over steps and elements (use it to reproduce "
            "the paper's numbers).",
            "choices": KL_ESTIMATORS,
        },
    )
    kl_value_steps: int | None = field(
        default=None,
        metadata={
            "help": "Base-model predictions per chain for the KL value: unset = at every step. m = at the K "
            "gradient steps (always) plus m of the other steps, drawn uniformly without replacement and "
            "weighted by their inverse inclusion probability: an unbiased estimate of the all-steps sum for "
            "fewer base-model passes (the gradient is unchanged; it only flows through the K steps). In "
            "[1, num_inference_steps]; m at or above the number of other steps means every step. With estimator "
            "policy_gradient the trained steps play the K steps' part, and 0 is allowed: the KL value from the "
            "trained steps alone, each weighted by its inverse probability of being drawn (no base-model pass "
            "beyond those the KL's gradient needs).",
            "ge": 0,
        },
    )
    kl_grad_steps: str = estimator_field(_RewardBackprop, "kl_grad_steps")
    score_function_advantage: str = estimator_field(_RewardBackprop, "score_function_advantage")
    # policy gradient (estimator: policy_gradient)
    images_per_prompt: int = estimator_field(_PolicyGradient, "images_per_prompt")
    advantage: str = estimator_field(_PolicyGradient, "advantage")
    advantage_clip: float = estimator_field(_PolicyGradient, "advantage_clip")
    ppo_clip_range: float = estimator_field(_PolicyGradient, "ppo_clip_range")
    ppo_epochs: int = estimator_field(_PolicyGradient, "ppo_epochs")
    ppo_updates_per_epoch: int = estimator_field(_PolicyGradient, "ppo_updates_per_epoch")
    timestep_fraction: float = estimator_field(_PolicyGradient, "timestep_fraction")
    prompt_tracker_buffer: int = estimator_field(_PolicyGradient, "prompt_tracker_buffer")
    prompt_tracker_min_count: int = estimator_field(_PolicyGradient, "prompt_tracker_min_count")
    # LoRA
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank r of the trained adapter (the paper: 4).", "ge": 1})
    lora_alpha: float = field(
        default=4.0, metadata={"help": "LoRA α; the adapter's update is scaled by α/r (the paper: α = r).", "gt": 0.0}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        metadata={
            "help": "Denoiser module names that receive LoRA layers (the paper: the attention projections "
            "to_q to_k to_v to_out.0). On the command line: space-separated."
        },
    )
    # optimisation
    learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate of the LoRA weights (the paper: 1e-3).", "gt": 0.0}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW β1, in [0, 1).", "ge": 0.0, "lt": 1.0})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW β2, in [0, 1).", "ge": 0.0, "lt": 1.0})
    adam_weight_decay: float = field(
        default=1e-4, metadata={"help": "AdamW decoupled weight decay (the paper: 1e-4).", "ge": 0.0}
    )
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW ε added to the denominator for numerical stability.", "gt": 0.0})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the LoRA gradient to this global L2 norm; unset = no clipping.", "gt": 0.0}
    )
    train_batch_size: int = field(
        default=4,
        metadata={"help": "Prompts (images) per micro-batch, per process (the paper: 4). Derived from "
                  "global_batch_size when that is set.", "ge": 1},
    )
    global_batch_size: int | None = field(default=None, metadata={"ge": 1, "help": (
        "Images per micro-batch summed over all processes. Set: each process takes global_batch_size / processes "
        "(train_batch_size is derived; a different train_batch_size is refused), so one config and seed give one run "
        "whatever the process count: the same prompts, image seeds, reward statistics, dual steps and held-out images "
        "on 1 or 2 processes. Unset: train_batch_size per process.")})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimiser step; images per step = train_batch_size × this × processes "
            "(the paper: 4 × 16 = 64).",
            "ge": 1,
        },
    )
    max_steps: int = field(default=20, metadata={"help": "Optimiser steps to train for (the paper: 20).", "ge": 1})
    # reward normalisation
    normalization_batches: int = field(
        default=10,
        metadata={
            "help": "Batches of train_batch_size base-model samples (per process) used to estimate each "
            "normalised reward's mean and std before training (the paper: 10 batches of 4); fewer than 32 "
            "images in all warn (cdalign.core.normalization.MIN_NORMALIZATION_SAMPLES).",
            "ge": 1,
        },
    )
    normalization_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where normalisation statistics are cached, keyed by the reward itself (registry name, kwargs, "
            "weights; a user callable only by its cache_key attribute, else not cached), the base model, prompts "
            "and sampler settings; unset = ~/.cache/cdalign/normalization."
        },
    )
    # evaluation at the end of training
    eval_batches: int = field(
        default=16,
        metadata={
            "help": "Batches of train_batch_size images (per process) of eval_prompts (each prompt in turn) after "
            "training to report rewards, constraints and KL, base and trained model on the same seeds (the "
            "evaluation harness's images for the same prompts, count and seed); 0 only when you drive step() "
            "yourself (train() refuses it). "
            "Default 16 × 4 = 64 images: fewer make a verdict mostly sampling noise.",
            "ge": 0,
        },
    )
    eval_metrics: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Checks of the evaluation images that are not rewards (cdalign.rewards.metrics.EVAL_METRICS, e.g. "
            "shapes_accuracy: colour and shape read back by the shapes-world classifier), reported for the "
            "base and the trained model with the paired difference. On the command line: space-separated."
        },
    )
    eval_seed: int = field(
        default=1234,
        metadata={"help": "Seed of the evaluation samples (the same images for the base and the trained model).", "ge": 0},
    )
    num_grid_images: int = field(
        default=8, metadata={"help": "Images in the base-versus-trained comparison grid saved after evaluation; 0 = none.", "ge": 0}
    )
    reuse_base_evaluation: bool = field(
        default=True,
        metadata={
            "help": "Reuse the base model's per-image evaluation values (rewards, metrics, its grid images) from an "
            "earlier run with the same base model (weights, revision, VAE and text encoders, scheduler), evaluation "
            "items (prompts, seeds, count), train_batch_size, sampler settings, precision, device, library versions "
            "and rewards/metrics (each by its code and weights; a user callable only by its cache_key, else "
            "recomputed), kept under $CDALIGN_CACHE/base_evaluation (default ~/.cache/cdalign/base_evaluation). The "
            "report's numbers are the same, bit for bit. false: sample and score the base model every run."
        },
    )
    # run
    output_dir: str = field(
        default="outputs/align",
        metadata={"help": "Folder for the LoRA weights, checkpoints, config, metrics and images."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a fresh run in an output_dir that holds one: the earlier run's cdalign files (config, log, "
            "LoRA, report, pictures, model card, checkpoint-N folders) are removed when the trainer is created; "
            "other files stay."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the training run (prompts, noise, K).", "ge": 0})
    mixed_precision: str = field(
        default="no",
        metadata={
            "help": "Mixed precision of the frozen base weights and the forward passes; LoRA weights and the "
            "optimiser stay in float32. 'fp16' needs a GPU and is refused on a CPU (use 'no' or 'bf16' there).",
            "choices": MIXED_PRECISIONS,
        },
    )
    num_threads: int | None = field(default=None, metadata={"ge": 1, "help": (
        "torch CPU threads per process. Unset: the launcher's OMP_NUM_THREADS when it sets one (accelerate launch gives "
        "cores / processes), else 1 on a CPU, the fastest measured for the embedded tiny models "
        "(benchmarks/bench_recipes.py); a GPU run keeps torch's default. Raise it for a large model on a CPU.")})
    ddp_timeout: int = field(
        default=600,
        metadata={
            "help": "Seconds a multi-process run's collective (gradient and slack averages, the stop check, "
            "barriers) waits for the other processes before it fails: a process that died or hangs takes the run "
            "down with an error naming the ranks instead of a hang. Raise it if one process legitimately works "
            "alone longer (e.g. the main process pushing to the Hub).",
            "ge": 1,
        },
    )
    logging_steps: int = field(default=1, metadata={"help": "Log metrics every this many optimiser steps.", "ge": 1})
    save_steps: int = field(
        default=0,
        metadata={"help": "Save a resumable checkpoint every this many optimiser steps; 0 = only the final weights.", "ge": 0},
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Keep at most this many checkpoints (oldest deleted first); unset = keep all.", "ge": 1}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Resume training (LoRA, optimiser, duals, RNG, step) from a checkpoint folder, or 'latest' "
            "for the newest one in output_dir; unset = start fresh."
        },
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "Experiment trackers, comma-separated: tensorboard, wandb, trackio; or 'all' (those installed) "
            "or 'none' alone. A named tracker must be installed (pip install wandb, ...); the run refuses to start "
            "otherwise. Metrics are always written to output_dir as well."
        },
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Upload the final LoRA weights and a model card to the Hub repo hub_model_id."},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo id ('user/name') for push_to_hub; required when pushing."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    reward_kwargs: dict[str, dict] = field(
        default_factory=dict,
        metadata={
            "help": "Keyword arguments for building each reward from the registry, by reward name, e.g. "
            "{mps: {model_id: /path/to/mps-safetensors}, aesthetic: {revision: main}}. On the command line: "
            "--reward_kwargs '{mps: {model_id: ./mps}}'."
        },
    )
    remote_rewards: dict[str, RemoteRewardSpec] = field(
        default_factory=dict,
        metadata={
            "help": "Rewards scored by a server (any scorer, in any environment; docs/guides/remote_rewards.md), by "
            "the name the run gives each: the name then works wherever a reward name does (objective, constraints, "
            "evaluation), e.g. {jpeg_served: {url: http://127.0.0.1:8765, cache_key: v1}}. Not differentiable "
            "(estimator policy_gradient); a name may not be a registered reward's. On the command line: "
            "--remote_rewards '{jpeg_served: {url: http://127.0.0.1:8765}}'."
        },
    )
    max_nonfinite_batches: int = field(
        default=3,
        metadata={
            "help": "A micro-batch whose rewards, KL or loss are NaN/inf is skipped with a warning; stop with an "
            "error once more than this many were skipped in the run (0 = stop at the first).",
            "ge": 0,
        },
    )
    resume_allow_config_change: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint whose saved config differs from this one in fields that change the run "
            "(learning rate, constraints, prompts, ...), with a warning naming them; by default such a resume is "
            "refused. Cadence, destination and length (max_steps, save_steps, output_dir, ...) may always differ."
        },
    )
    reward_sources: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Written by the trainer into the config.yaml it saves: rewards that came from user callables "
            "(ConstrainedDDPOTrainer(rewards=...)), by name, e.g. {saturation: 'user callable mymod.fn (not "
            "recordable)'}. A run from such a config that does not pass the callable again builds the registry "
            "reward of that name instead, and warns."
        },
    )

    # -- derived values ------------------------------------------------------------

    @property
    def dual_update_every(self) -> int:
        """Micro-batches between dual updates, with the default resolved."""
        return self.dual.update_every if self.dual.update_every is not None else self.gradient_accumulation_steps

    @property
    def dual_init_values(self) -> list[float]:
        """Initial λ, one float per constraint, in the order of ``constraints``."""
        if isinstance(self.dual.init, list):
            return [float(v) for v in self.dual.init]
        return [float(self.dual.init)] * len(self.constraints)

    @property
    def report_to_list(self) -> list[str]:
        """``report_to`` as a list of tracker names: [] for 'none', ['all'] for 'all'."""
        names = [n.strip() for n in self.report_to.split(",")]
        return [] if names == ["none"] else names

    @property
    def uses_kl(self) -> bool:
        """Whether the run needs base-model predictions for a KL (objective or constraint)."""
        return self.objective.is_kl or any(c.is_kl for c in self.constraints)

    def validate(self) -> None:
        """Check types, allowed values, ranges and the consistency of the problem; raise
        ``ValueError`` naming the field path (e.g. ``constraints[1].direction``), the bad
        value and the fix. Pure: it reads the config and changes nothing."""
        check_fields(self)
        check_rules(self)

    def for_processes(self, num_processes: int) -> "ConstrainedDDPOConfig":
        """The config each of ``num_processes`` processes runs: with ``global_batch_size`` set, a
        validated copy with ``train_batch_size = global_batch_size / num_processes`` (``ValueError``
        naming the fix if it does not divide or a different ``train_batch_size`` was given)."""
        if self.global_batch_size is None:
            return self
        per = per_process(self.global_batch_size, num_processes, "global_batch_size")
        if self.train_batch_size not in (ConstrainedDDPOConfig.__dataclass_fields__["train_batch_size"].default, per):
            raise ValueError(f"train_batch_size: {self.train_batch_size} disagrees with global_batch_size "
                             f"{self.global_batch_size} over {num_processes} process(es) ({per} per process); give one of the two")
        resolved = dataclasses.replace(self, train_batch_size=per)
        resolved.validate()
        return resolved


# ---------------------------------------------------------------------------------
# Dicts, YAML files and the command line (the engine, for this config)
# ---------------------------------------------------------------------------------


def config_from_dict(d: Mapping) -> ConstrainedDDPOConfig:
    """Build and validate a config from a plain mapping (YAML or JSON shaped): values are
    converted by their declared types and unknown keys are rejected at every level."""
    cfg = dataclass_from_dict(ConstrainedDDPOConfig, d)
    cfg.validate()
    return cfg


def config_to_dict(cfg: ConstrainedDDPOConfig) -> dict:
    """A plain dict of builtins (YAML/JSON serialisable) that round-trips through
    :func:`config_from_dict`. Derived values (``ConstraintSpec.name``) are not included."""
    return dataclasses.asdict(cfg)


def load_config_file(path) -> ConstrainedDDPOConfig:
    """Load and validate a YAML recipe: a file, or a recipe packaged with cdalign by name
    (``"tiny/multi_reward"``, :func:`cdalign.recipes_data.find_recipe`); errors name the file."""
    path = find_recipe(path)
    data = read_yaml_mapping(path)
    try:
        return config_from_dict(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def save_config(cfg: ConstrainedDDPOConfig, path) -> None:
    """Write ``cfg`` as a YAML recipe that :func:`load_config_file` reads back equal."""
    save_yaml(config_to_dict(cfg), path)


_ALIGN_DESCRIPTION = (
    "Constrained alignment of a diffusion model (arXiv 2508.19104). Give a YAML recipe with --config; any "
    "--field flag overrides the recipe's value. Nested fields: --objective.type, --dual.kappa_i, ...; 'null' "
    "unsets an optional field."
)


def estimator_help_groups(estimator: str | None = None) -> list[HelpGroup]:
    """One ``--help`` group per registered estimator with settings (its ``config_fields``):
    in full for ``estimator``, the one the run uses, and collapsed to a list of flags for
    the others, which that run refuses; ``None``: every group in full."""
    groups = []
    for name in ESTIMATORS:
        owner = ESTIMATORS.get(name)
        if not owner.config_fields:
            continue
        applies = estimator is None or name == estimator
        about = " ".join((getattr(owner, "settings", None) or owner).__doc__.split("\n\n")[0].split())
        if not applies:
            about = f"Settings of estimator {name}, not used by this run (estimator: {estimator}); --estimator {name} --help describes them."
        groups.append(HelpGroup(f"estimator {name}", about, tuple(owner.config_fields), collapsed=not applies))
    return groups


def build_parser(
    cls=None,
    prog: str | None = None,
    description: str | None = None,
    recipe: str | os.PathLike | None = None,
    default_recipe: str | os.PathLike | None = None,
    estimator: str | None = None,
) -> argparse.ArgumentParser:
    """:func:`cdalign.fields.build_parser` for config dataclass ``cls`` (default
    :class:`ConstrainedDDPOConfig`, with the alignment description): ``--config``, one
    ``--field`` flag per field; ``--help`` shows ``recipe``'s values as the defaults.
    For :class:`ConstrainedDDPOConfig` each estimator's settings form a group of their own,
    shown in full only for ``estimator`` when one is named (:func:`estimator_help_groups`)."""
    cls = cls or ConstrainedDDPOConfig
    groups = estimator_help_groups(estimator) if cls is ConstrainedDDPOConfig else ()
    description = description or (_ALIGN_DESCRIPTION if cls is ConstrainedDDPOConfig else None)
    return _build_parser(cls, prog=prog, description=description, recipe=recipe, default_recipe=default_recipe,
                         help_groups=groups)


def _help_parser(argv: list[str], default_recipe=None, prog: str | None = None, description: str | None = None):
    """The parser that prints ``--help`` for a run from ``argv``: the values of its recipe
    (``--config``, else ``default_recipe``) as defaults, and in full the settings of the
    estimator it would use (``--estimator``, else the recipe's, else the default)."""
    pre = CommandLineParser(prog=prog, add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--estimator")
    known, _ = pre.parse_known_args(argv)
    recipe = known.config or (str(default_recipe) if default_recipe is not None else None)
    values = read_yaml_mapping(find_recipe(recipe)) if recipe is not None else {}
    estimator = known.estimator or values.get("estimator") or ConstrainedDDPOConfig.estimator
    return build_parser(prog=prog, description=description, recipe=recipe, default_recipe=default_recipe,
                        estimator=str(estimator))


def parse_args_to_dict(cls, argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None, **kwargs) -> dict:
    """:func:`cdalign.fields.parse_args_to_dict`, with the alignment description and the
    estimator groups of ``--help`` (:func:`build_parser`) for :class:`ConstrainedDDPOConfig`."""
    if cls is ConstrainedDDPOConfig:
        argv = list(sys.argv[1:] if argv is None else argv)
        kwargs.setdefault("description", _ALIGN_DESCRIPTION)
        if parser is None and any(a in ("-h", "--help") for a in argv):
            parser = _help_parser(argv, kwargs.get("default_recipe"), kwargs.get("prog"), kwargs["description"])
    return _parse_args_to_dict(cls, argv, parser, **kwargs)


def parse_config(argv: list[str] | None = None, default_recipe: str | os.PathLike | None = None,
                 prog: str | None = None) -> ConstrainedDDPOConfig:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None) into a validated
    config: ``--config recipe.yaml`` (``default_recipe`` when none is given) first, then
    every ``--field value`` on top of it (dotted ``--dual.kappa_i 0.1`` for nested specs).
    ``--help`` prints every field with the default that will run (``prog``: the command
    it names, default the script's name)."""
    return config_from_dict(parse_args_to_dict(ConstrainedDDPOConfig, argv, default_recipe=default_recipe, prog=prog))

"""Configuration of a constrained alignment run: the problem's specs and
:class:`ConstrainedDDPOConfig`, whose fields document themselves, with the rules that
relate fields, read from YAML recipes and the command line by the typed config engine
(:mod:`cdalign.fields`).

    minimise_θ  f_0(θ)   subject to   g_i(θ) ≤ 0,   i = 1..m

``objective`` is f_0 (the chain KL to the base model, or minus a reward),
``constraints`` are the g_i (reward thresholds in either direction, or a KL budget),
``dual`` says how the multipliers λ_i are updated (arXiv 2508.19104, section on
constrained alignment; the README's "Method choices").

A recipe is a YAML file whose keys are the fields below; on the command line
``--config recipe.yaml`` loads it and ``--field value`` flags override it
(``--dual.kappa_i 0.1`` for a field of a nested spec, ``--constraints '<YAML list>'``
for the whole constraint list).

Field metadata: ``help`` (required), and optionally ``choices`` (allowed values) and
bounds ``ge``/``gt``/``le``/``lt`` that :meth:`ConstrainedDDPOConfig.validate` enforces
(through :func:`cdalign.fields.check_fields`) and ``--help`` prints. Rules that relate
several fields live here, in ``_check_problem``, ``_check_sampler`` and ``_check_run``.

The engine's names (``ConfigFields``, ``dataclass_from_dict``, ``check_fields``,
``read_yaml_mapping``, ``not_allowed``, ``build_parser``, ``parse_args_to_dict``, the run
checks ``check_output_dir_writable``, ``check_trackers_installed``,
``check_mixed_precision``) stay importable from here; they live in :mod:`cdalign.fields`.
"""

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from huggingface_hub.utils import HFValidationError, validate_repo_id

from cdalign.alignment.estimators import ESTIMATORS
from cdalign.core.duals import DUAL_OPTIMIZERS
from cdalign.core.kl import KL_ESTIMATORS
from cdalign.core.policy_gradient import ADVANTAGES
from cdalign.core.truncation import TRUNCATION_STRATEGIES
from cdalign.fields import (
    TRACKER_PACKAGES,  # noqa: F401  (re-exported: its old home)
    ConfigFields,
    check_fields,
    check_mixed_precision,
    check_output_dir_writable,
    check_trackers_installed,
    dataclass_from_dict,
    did_you_mean,
    not_allowed,
    read_yaml_mapping,
    save_yaml,
)
from cdalign.fields import build_parser as _build_parser
from cdalign.fields import parse_args_to_dict as _parse_args_to_dict
from cdalign.models.pipeline import MIXED_PRECISIONS
from cdalign.rewards import available_rewards
from cdalign.rewards.metrics import EVAL_METRICS

__all__ = [
    "ObjectiveSpec",
    "ConstraintSpec",
    "DualSpec",
    "ConstrainedDDPOConfig",
    "parse_config",
    "load_config_file",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "build_parser",
    "parse_args_to_dict",
    "dataclass_from_dict",
    "check_fields",
    "read_yaml_mapping",
    "not_allowed",
    "check_output_dir_writable",
    "check_trackers_installed",
    "check_mixed_precision",
    "ConfigFields",
]

OBJECTIVE_TYPES = ("kl", "reward")
CONSTRAINT_TYPES = ("reward", "kl")
DIRECTIONS = ("high", "low")
REPORT_TO = ("none", "all", "tensorboard", "wandb", "trackio")


# ---------------------------------------------------------------------------------
# The problem: objective, constraints, dual updates
# ---------------------------------------------------------------------------------


@dataclass
class ObjectiveSpec(ConfigFields):
    """What is minimised: f_0 = KL(p_θ ‖ q) (the paper's main form), or f_0 = −E[r_0]."""

    type: str = field(
        default="kl",
        metadata={
            "help": "What the primal step minimises. 'kl': the chain KL(p_θ ‖ q) to the base model "
            "(the paper's main form: stay close to the base while constraints hold). 'reward': "
            "maximise E[r_0] of `objective.reward` (then bound drift with a `type: kl` constraint).",
            "choices": OBJECTIVE_TYPES,
        },
    )
    reward: str | None = field(
        default=None,
        metadata={
            "help": "Registry name of the reward r_0 to maximise (see cdalign.rewards.available_rewards()). "
            "Required when objective.type is 'reward'; must be unset when it is 'kl'."
        },
    )
    normalize: bool = field(
        default=True,
        metadata={
            "help": "Maximise the reward in base-model standard units, (r_0 − m_0)/s_0, with m_0 and s_0 "
            "estimated on base-model samples (see normalization_batches). Rescales the reward's gradient "
            "to a comparable size across rewards. Ignored when objective.type is 'kl'."
        },
    )


@dataclass
class ConstraintSpec(ConfigFields):
    """One constraint g_i ≤ 0 of the Lagrangian L = f_0 + Σ_i λ_i g_i.

    - reward, direction 'high':  E[r_i] ≥ threshold,  g_i = threshold − E[r_i]
    - reward, direction 'low':   E[r_i] ≤ threshold,  g_i = E[r_i] − threshold
    - kl:                        KL(p_θ ‖ q) ≤ max,   g_i = KL − max
    """

    type: str = field(
        default="reward",
        metadata={
            "help": "'reward': bound the expected value of `reward` by `threshold` (in `direction`). "
            "'kl': bound the chain KL(p_θ ‖ q) to the base model by `max` (at most one such constraint, "
            "and only with a reward objective).",
            "choices": CONSTRAINT_TYPES,
        },
    )
    reward: str | None = field(
        default=None,
        metadata={
            "help": "Reward constraints: registry name of the reward r_i (see "
            "cdalign.rewards.available_rewards()). Must be unset for 'kl' constraints."
        },
    )
    direction: str = field(
        default="high",
        metadata={
            "help": "Reward constraints: 'high' requires E[r_i] ≥ threshold (e.g. the paper's MPS ≥ +0.5σ); "
            "'low' requires E[r_i] ≤ threshold (e.g. the paper's saturation ≤ −0.5σ). Ignored for 'kl' "
            "constraints, which are always upper bounds.",
            "choices": DIRECTIONS,
        },
    )
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "Reward constraints (required): the bound b_i. With normalize (the default) it is in "
            "base-model standard deviations from the base-model mean, so 0.5 means 'half a std above what "
            "the base model scores'; otherwise in the reward's raw units. Must be unset for 'kl' constraints."
        },
    )
    normalize: bool = field(
        default=True,
        metadata={
            "help": "Reward constraints: state E[r_i] and the threshold in base-model std units, "
            "(r_i − m_i)/s_i (the paper's convention). Ignored for 'kl' constraints."
        },
    )
    max: float | None = field(
        default=None,
        metadata={
            "help": "KL constraints (required, > 0): the budget ε in KL(p_θ ‖ q) ≤ ε, in nats per image, "
            "measured by `kl_estimator` (so 'path' and 'uniform' budgets are not interchangeable). "
            "Must be unset for reward constraints.",
            "gt": 0.0,
        },
    )

    confidence: float | None = field(
        default=None,
        metadata={
            "help": "Reward constraints: ask for the constraint to be met with this confidence on a fresh held-out "
            "sample (e.g. 0.95). The run then aims at threshold + z·s/√n (z the one-sided normal quantile, s its "
            "running estimate of the per-image std, n the held-out images of its verdict: eval_batches × "
            "train_batch_size × processes) instead of at the threshold itself; the report names both "
            "(cdalign.core.targets). Unset: aim at the threshold.",
            "ge": 0.5,
            "lt": 1.0,
        },
    )
    margin: float | None = field(
        default=None,
        metadata={
            "help": "Reward constraints: aim this far past the threshold (in the constraint's units, base-model std "
            "when normalised), a fixed margin instead of one derived from `confidence`. Unset: no fixed margin.",
            "ge": 0.0,
        },
    )

    @property
    def name(self) -> str:
        """A stable display name for logs and metrics: ``<reward>_<direction>`` for a
        reward constraint (e.g. ``saturation_low``), ``kl`` for the KL constraint.
        Unique within a valid config."""
        if self.type == "kl":
            return "kl"
        return f"{self.reward or 'reward'}_{self.direction}"


@dataclass
class DualSpec(ConfigFields):
    """How the multipliers λ_i ≥ 0 are updated from the slacks g_i (averaged over the
    whole global batch of a dual step)."""

    optimizer: str = field(
        default="nupi",
        metadata={
            "help": "Dual update rule. 'ascent': projected gradient ascent λ ← max(0, λ + lr·g). "
            "'nupi': the νPI controller (Sohrabi et al. 2024), λ ← max(0, λ + kappa_i·e + kappa_p·(ξ_t − ξ_{t−1})) "
            "with ξ_t = nu·ξ_{t−1} + (1 − nu)·e; the paper's choice.",
            "choices": DUAL_OPTIMIZERS,
        },
    )
    lr: float = field(
        default=0.05,
        metadata={
            "help": "Step size η of 'ascent' (λ units per unit of slack). Not used by 'nupi', whose "
            "integral gain `kappa_i` plays the same role (nupi with nu=0, kappa_p=0 is ascent with step kappa_i).",
            "gt": 0.0,
        },
    )
    kappa_i: float = field(
        default=0.05,
        metadata={"help": "'nupi' integral gain κ_i (the paper: 0.05).", "ge": 0.0},
    )
    kappa_p: float = field(
        default=0.0,
        metadata={
            "help": "'nupi' proportional gain κ_p, applied to the change of the smoothed error (the paper: 0; "
            "a positive value damps oscillations of λ).",
            "ge": 0.0,
        },
    )
    nu: float = field(
        default=0.1,
        metadata={
            "help": "'nupi' smoothing ν of the error average ξ, in [0, 1) (the paper: 0.1).",
            "ge": 0.0,
            "lt": 1.0,
        },
    )
    anti_windup: bool = field(
        default=False,
        metadata={
            "help": "'nupi' conditional integration: while a constraint is violated but its slack is shrinking "
            "(e_t below the smoothed ξ_{t−1}), skip its integral term, so λ rises only while progress stalls. "
            "Under Adam the primal moves at the learning rate's speed whatever λ is, so a larger λ does not "
            "close a violation faster; integrating during the lag of the primal only winds λ up (overshoot, then "
            "an excess that λ = 0 does not give back). Decreases of λ are never held.",
        },
    )
    init: float | list[float] = field(
        default=0.2,
        metadata={
            "help": "Initial λ ≥ 0: one value for every constraint, or a list with one value per constraint "
            "in the order of `constraints` (the paper: 0.2).",
            "ge": 0.0,
        },
    )
    update_every: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches between dual updates (slacks are averaged over them and over all processes). "
            "Default (unset): gradient_accumulation_steps, i.e. one dual step per optimiser step. The paper "
            "updated every 5 micro-batches of 4 images.",
            "ge": 1,
        },
    )
    warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Number of dual steps over which the gains (lr, or kappa_i and kappa_p) ramp linearly from "
            "warmup_start × gain to the full gain; 0 disables warm-up (the paper: 10).",
            "ge": 0,
        },
    )
    warmup_start: float = field(
        default=0.1,
        metadata={"help": "Fraction of the gains used at the first dual step of the warm-up, in [0, 1].", "ge": 0.0, "le": 1.0},
    )
    freeze: bool = field(
        default=False,
        metadata={
            "help": "Keep λ fixed at `init` (no dual updates): a weighted-penalty run, the paper's "
            "'equal weights' baseline when init is the same for every constraint."
        },
    )

# ---------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------


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
    # gradient estimator
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
    backprop_strategy: str = field(
        default="fixed",
        metadata={
            "help": "How K, the number of final sampling steps the gradient flows through, is chosen per batch. "
            "'fixed': K = backprop_steps. 'uniform': K ~ U{backprop_min_steps, …, backprop_steps}. 'gaussian' "
            "(the paper's): a cut-off index ~ N(backprop_gaussian_mean·T, backprop_gaussian_std), rounded and clipped "
            "to [1, T−1], and K = T − index (about 0.2·T with the paper's settings).",
            "choices": TRUNCATION_STRATEGIES,
        },
    )
    backprop_steps: int = field(
        default=4,
        metadata={"help": "K for 'fixed'; the upper bound of K for 'uniform'. In [1, num_inference_steps].", "ge": 1},
    )
    backprop_min_steps: int = field(
        default=1,
        metadata={"help": "Lower bound of K for 'uniform', in [1, backprop_steps].", "ge": 1},
    )
    backprop_gaussian_mean: float = field(
        default=0.8,
        metadata={
            "help": "'gaussian': mean of the cut-off index as a fraction of T, in (0, 1] (the paper: 0.8, i.e. "
            "gradient through the last ~20% of the steps).",
            "gt": 0.0,
            "le": 1.0,
        },
    )
    backprop_gaussian_std: float = field(
        default=5.0,
        metadata={"help": "'gaussian': std of the cut-off index, in sampling steps (the paper: 5).", "ge": 0.0},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Checkpoint each UNet call: memory flat in K for about one extra forward pass per step."},
    )
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
    kl_grad_steps: str = field(
        default="trained",
        metadata={
            "help": "estimator reward_backprop: which steps' KL terms carry gradient. 'trained' (default): the K "
            "gradient steps only, as the rewards. 'all': every step whose KL value is evaluated, each "
            "differentiated at its fixed (detached) state as the policy-gradient estimator does, so the LoRA's "
            "drift at the early, noisy steps (which no reward gradient reaches) is pulled back too; costs a "
            "backward pass of the denoiser at each of those steps.",
            "choices": ("trained", "all"),
        },
    )
    # policy gradient (estimator: policy_gradient)
    images_per_prompt: int = field(
        default=1,
        metadata={
            "help": "policy_gradient: images per prompt in a micro-batch (a prompt group, GRPO); train_batch_size must be a "
            "multiple of it, so a group never spans two processes. 1 with reward_backprop.",
            "ge": 1,
        },
    )
    advantage: str = field(
        default="group_std",
        metadata={
            "help": "policy_gradient: how each reward's values become advantages before the duals weigh them, "
            "A = s_0 A_0 + Σ_i λ_i s_i A_i. 'group_std' (GRPO): standardised within each prompt group "
            "(images_per_prompt >= 2). 'group_mean': centred within the group, unscaled (the Lagrangian's own units, "
            "so λ keeps its meaning as a price). 'batch_std': standardised over the global batch (trl DDPO's default). "
            "'prompt_tracker': DDPO's per-prompt statistics tracking (see prompt_tracker_buffer).",
            "choices": ADVANTAGES,
        },
    )
    advantage_clip: float = field(
        default=5.0,
        metadata={
            "help": "policy_gradient: each reward's advantage is clipped to [-advantage_clip, advantage_clip] before the "
            "duals weigh it (trl DDPO's train_adv_clip_max, applied per reward).",
            "gt": 0.0,
        },
    )
    ppo_clip_range: float = field(
        default=0.2,
        metadata={
            "help": "policy_gradient: PPO clips the ratio ρ = π_θ/π_old of each step's exact Gaussian density (summed "
            "over latent elements) to [1 − ε, 1 + ε]. trl DDPO's train_clip_range is on the per-element mean log-ratio; "
            "to first order ε ≈ D·train_clip_range (D latent elements: 1024 on the tiny model, 16384 for SD 1.5 at 512 px).",
            "gt": 0.0,
            "lt": 1.0,
        },
    )
    ppo_epochs: int = field(
        default=1,
        metadata={"help": "policy_gradient: inner epochs over each round's samples (trl DDPO's train_num_inner_epochs).", "ge": 1},
    )
    ppo_updates_per_epoch: int = field(
        default=1,
        metadata={
            "help": "policy_gradient: optimiser updates per inner epoch; the round's gradient_accumulation_steps "
            "micro-batches are split evenly among them (must divide gradient_accumulation_steps).",
            "ge": 1,
        },
    )
    timestep_fraction: float = field(
        default=1.0,
        metadata={
            "help": "policy_gradient: fraction of the stochastic sampling steps trained on per inner epoch, drawn afresh "
            "for each micro-batch and epoch (trl DDPO's train_timestep_fraction), at least one step.",
            "gt": 0.0,
            "le": 1.0,
        },
    )
    prompt_tracker_buffer: int = field(
        default=16,
        metadata={"help": "advantage 'prompt_tracker': rewards kept per prompt (trl's per_prompt_stat_tracking_buffer_size).", "ge": 1},
    )
    prompt_tracker_min_count: int = field(
        default=16,
        metadata={
            "help": "advantage 'prompt_tracker': below this many rewards of a prompt, the batch's statistics are used "
            "(trl's per_prompt_stat_tracking_min_count).",
            "ge": 1,
        },
    )
    # LoRA
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank r of the trained adapter (the paper: 4).", "ge": 1})
    lora_alpha: float = field(
        default=4.0, metadata={"help": "LoRA α; the adapter's update is scaled by α/r (the paper: α = r).", "gt": 0.0}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        metadata={
            "help": "UNet module names that receive LoRA layers (the paper: the attention projections "
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
        metadata={"help": "Prompts (images) per micro-batch, per process (the paper: 4).", "ge": 1},
    )
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
        return self.objective.type == "kl" or any(c.type == "kl" for c in self.constraints)

    def validate(self) -> None:
        """Check types, allowed values, ranges and the consistency of the problem; raise
        ``ValueError`` naming the field path (e.g. ``constraints[1].direction``), the bad
        value and the fix. Pure: it reads the config and changes nothing."""
        check_fields(self)
        _check_problem(self)
        _check_sampler(self)
        _check_estimator(self)
        _check_run(self)



# ---------------------------------------------------------------------------------
# Rules that relate fields
# ---------------------------------------------------------------------------------


def _known_rewards() -> list[str]:
    """Reward names of ``cdalign.rewards.available_rewards()`` (registered at import)."""
    return list(available_rewards())


def _check_reward_name(path: str, name: str, known: list[str] | None) -> None:
    if known is not None and name not in known:
        close = did_you_mean(name, known)
        hint = f"{close} " if close else ""
        raise ValueError(f"{path}: unknown reward {name!r}; {hint}available rewards: {', '.join(sorted(known))}")


def _check_problem(cfg: ConstrainedDDPOConfig) -> None:
    """The objective, the constraints and the duals make a well-posed problem."""
    objective, constraints, dual = cfg.objective, cfg.constraints, cfg.dual
    if objective.type == "reward" and objective.reward is None:
        raise ValueError("objective.reward: required when objective.type is 'reward'; name the reward to maximise")
    if objective.type == "kl" and objective.reward is not None:
        raise ValueError(
            f"objective.reward: {objective.reward!r} is only used when objective.type is 'reward'; "
            "remove it, or set objective.type: reward to maximise it"
        )

    for i, c in enumerate(constraints):
        where = f"constraints[{i}]"
        if c.type == "reward":
            if c.reward is None:
                raise ValueError(f"{where}.reward: required for a reward constraint; name the reward to bound")
            if c.threshold is None:
                raise ValueError(
                    f"{where}.threshold: required for reward constraint {c.reward!r} "
                    f"(E[r] {'>=' if c.direction == 'high' else '<='} threshold)"
                )
            if c.max is not None:
                raise ValueError(f"{where}.max: only used by kl constraints; use threshold for a reward bound")
        else:
            if c.max is None:
                raise ValueError(f"{where}.max: required for a kl constraint (KL <= max, a positive number)")
            for unused in ("reward", "threshold"):
                if getattr(c, unused) is not None:
                    raise ValueError(f"{where}.{unused}: not used by kl constraints (KL <= max); remove it")
            for unused in ("confidence", "margin"):
                if getattr(c, unused) is not None:
                    raise ValueError(f"{where}.{unused}: reward constraints only; a KL budget is aimed at as "
                                     "given (lower max to leave room); remove it")
        if c.confidence is not None and c.margin is not None:
            raise ValueError(f"{where}.confidence: set confidence or margin, not both (confidence derives the "
                             "margin from the run's own noise estimate; margin fixes it)")

    known = _known_rewards()
    if objective.type == "reward":
        _check_reward_name("objective.reward", objective.reward, known)
    for i, c in enumerate(constraints):
        if c.type == "reward":
            _check_reward_name(f"constraints[{i}].reward", c.reward, known)

    for name in cfg.reward_kwargs:
        _check_reward_name(f"reward_kwargs.{name}", name, known)

    kl_indices = [i for i, c in enumerate(constraints) if c.type == "kl"]
    if len(kl_indices) > 1:
        raise ValueError(
            f"constraints[{kl_indices[1]}].type: more than one kl constraint (constraints{kl_indices}); "
            "keep only the one with the smallest max"
        )
    if objective.type == "kl" and kl_indices:
        # min KL s.t. KL <= max: the bound is either inactive or makes the problem infeasible.
        raise ValueError(
            f"constraints[{kl_indices[0]}].type: a kl constraint with objective.type 'kl' is pointless (the "
            "objective already minimises the KL; the bound can only be inactive or infeasible); remove it, or "
            "set objective.type: reward to maximise a reward under the KL budget"
        )
    if not constraints and objective.type == "kl":
        raise ValueError(
            "constraints: empty with objective.type 'kl', a trivial problem (the base model itself is the "
            "optimum); add reward constraints, or set objective.type: reward for plain reward fine-tuning"
        )
    _check_repeated_rewards(constraints)

    if isinstance(dual.init, list) and len(dual.init) != len(constraints):
        raise ValueError(
            f"dual.init: has {len(dual.init)} values but there are {len(constraints)} constraints; give one "
            "value per constraint, or a single number for all"
        )
    if dual.anti_windup and dual.optimizer != "nupi":
        raise ValueError(
            f"dual.anti_windup: conditional integration needs the smoothed error of 'nupi', but dual.optimizer "
            f"is {dual.optimizer!r}; set dual.optimizer: nupi, or remove anti_windup"
        )
    if dual.optimizer == "nupi" and not dual.freeze and dual.kappa_i == 0 and dual.kappa_p == 0:
        raise ValueError(
            "dual.kappa_i: kappa_i and kappa_p are both 0, so λ would never move; set a gain, or dual.freeze: true "
            "to keep λ at dual.init on purpose"
        )


def _check_repeated_rewards(constraints: list[ConstraintSpec]) -> None:
    """One constraint per (reward, direction); a high and a low bound on one reward must
    leave a non-empty interval (a two-sided band is fine, equal bounds pin E[r]). Bounds
    in different units (normalize differs) cannot be compared here and are allowed."""
    seen: dict[tuple[str, str], int] = {}
    for i, c in enumerate(constraints):
        if c.type != "reward":
            continue
        key = (c.reward, c.direction)
        if key in seen:
            j = seen[key]
            other = constraints[j]
            if other.normalize == c.normalize:
                tighter = max if c.direction == "high" else min
                keep = j if tighter(other.threshold, c.threshold) == other.threshold else i
                advice = f"keep the tighter one, constraints[{keep}] (threshold {constraints[keep].threshold})"
            else:
                advice = "keep one (their thresholds are in different units: normalize differs)"
            raise ValueError(
                f"constraints[{i}]: repeats reward {c.reward!r} with direction {c.direction!r} of constraints[{j}] "
                f"(redundant, and both would be named {c.name!r}); {advice} and remove the other"
            )
        seen[key] = i
    for (reward, direction), i in seen.items():
        j = seen.get((reward, "low"))
        if direction != "high" or j is None:
            continue
        high, low = constraints[i], constraints[j]
        if high.normalize == low.normalize and high.threshold > low.threshold:
            raise ValueError(
                f"constraints[{j}].threshold: reward {reward!r} must be >= {high.threshold} (constraints[{i}]) and "
                f"<= {low.threshold} (constraints[{j}]), an empty feasible set; make the low threshold at least "
                "the high one, or drop one of them"
            )


def _check_sampler(cfg: ConstrainedDDPOConfig) -> None:
    """Sampling, truncation and KL settings fit together."""
    T = cfg.num_inference_steps
    if cfg.kl_value_steps is not None and cfg.kl_value_steps > T:
        raise ValueError(f"kl_value_steps: {cfg.kl_value_steps} exceeds num_inference_steps ({T}); must be in [1, {T}]")
    if cfg.uses_kl and cfg.kl_estimator == "path" and cfg.eta == 0:
        raise ValueError(
            "eta: 0 makes DDIM deterministic, so the exact chain KL (kl_estimator 'path') is undefined; "
            "use eta > 0 (the paper: 1), or kl_estimator: uniform"
        )


def _check_estimator(cfg: ConstrainedDDPOConfig) -> None:
    """The estimator's own fields fit together (its ``check_config``), and no field of another
    estimator is set away from its default (it would be silently ignored): each estimator of
    :data:`~cdalign.alignment.estimators.ESTIMATORS` lists its fields in ``config_fields``."""
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cfg)}
    for name in ESTIMATORS:
        if name == cfg.estimator:
            continue
        for key in ESTIMATORS.get(name).config_fields:
            if getattr(cfg, key) != defaults[key]:
                raise ValueError(
                    f"{key}: {getattr(cfg, key)!r} is only used by estimator: {name} (this run uses "
                    f"{cfg.estimator}); remove it, or set estimator: {name}"
                )
    ESTIMATORS.get(cfg.estimator).check_config(cfg)


def _check_run(cfg: ConstrainedDDPOConfig) -> None:
    """Run-level settings: normalisation sample size, trackers, Hub, LoRA targets."""
    normalized = (cfg.objective.type == "reward" and cfg.objective.normalize) or any(
        c.type == "reward" and c.normalize for c in cfg.constraints
    )
    if normalized and cfg.normalization_batches * cfg.train_batch_size < 2:
        raise ValueError(
            f"normalization_batches: {cfg.normalization_batches} batch(es) of {cfg.train_batch_size} image(s) "
            "cannot estimate a standard deviation; use at least 2 images in total"
        )
    if not cfg.lora_target_modules:
        raise ValueError("lora_target_modules: empty; name at least one UNet module, e.g. to_q to_k to_v to_out.0")
    for i, name in enumerate(cfg.lora_target_modules):
        if not name.strip():
            raise ValueError(f"lora_target_modules[{i}]: empty module name")
    names = [n.strip() for n in cfg.report_to.split(",")]
    for name in names:
        if name not in REPORT_TO:
            raise not_allowed("report_to", name, REPORT_TO)
    if len(names) > 1 and ({"none", "all"} & set(names)):
        raise ValueError(f"report_to: {cfg.report_to!r}; 'none' and 'all' must stand alone")
    if len(set(names)) != len(names):
        raise ValueError(f"report_to: {cfg.report_to!r} names a tracker twice")
    if cfg.push_to_hub and cfg.hub_model_id is None:
        raise ValueError("hub_model_id: required when push_to_hub is true; set it to 'user/repo'")
    if cfg.hub_model_id is not None:
        try:
            validate_repo_id(cfg.hub_model_id)
        except HFValidationError as err:
            raise ValueError(f"hub_model_id: {cfg.hub_model_id!r} is not a valid Hub repo id ({err}); use 'user/name'") from None
    for i, name in enumerate(cfg.eval_metrics):
        if name not in EVAL_METRICS:
            raise not_allowed(f"eval_metrics[{i}]", name, EVAL_METRICS.names())


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
    """Load and validate a YAML recipe; errors name the file."""
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


def build_parser(
    cls=None,
    prog: str | None = None,
    description: str | None = None,
    recipe: str | os.PathLike | None = None,
    default_recipe: str | os.PathLike | None = None,
) -> argparse.ArgumentParser:
    """:func:`cdalign.fields.build_parser` for config dataclass ``cls`` (default
    :class:`ConstrainedDDPOConfig`, with the alignment description): ``--config``, one
    ``--field`` flag per field; ``--help`` shows ``recipe``'s values as the defaults."""
    cls = cls or ConstrainedDDPOConfig
    description = description or (_ALIGN_DESCRIPTION if cls is ConstrainedDDPOConfig else None)
    return _build_parser(cls, prog=prog, description=description, recipe=recipe, default_recipe=default_recipe)


def parse_args_to_dict(cls, argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None, **kwargs) -> dict:
    """:func:`cdalign.fields.parse_args_to_dict`, with the alignment description for
    :class:`ConstrainedDDPOConfig`."""
    if cls is ConstrainedDDPOConfig:
        kwargs.setdefault("description", _ALIGN_DESCRIPTION)
    return _parse_args_to_dict(cls, argv, parser, **kwargs)


def parse_config(argv: list[str] | None = None, default_recipe: str | os.PathLike | None = None) -> ConstrainedDDPOConfig:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None) into a validated
    config: ``--config recipe.yaml`` (``default_recipe`` when none is given) first, then
    every ``--field value`` on top of it (dotted ``--dual.kappa_i 0.1`` for nested specs).
    ``--help`` prints every field with the default that will run."""
    return config_from_dict(parse_args_to_dict(ConstrainedDDPOConfig, argv, default_recipe=default_recipe))

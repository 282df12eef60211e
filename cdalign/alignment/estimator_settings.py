"""The settings each gradient estimator reads, declared by that estimator.

An estimator of :data:`~cdalign.alignment.estimators.ESTIMATORS` names its settings class
(``settings``); the class declares each setting once (type, default, ``help``, bounds) and
the estimator lists their names in ``config_fields`` and checks how they fit the rest of
the run in ``check_config``. :class:`~cdalign.alignment.config.ConstrainedDDPOConfig`
carries them as flat fields built by :func:`estimator_field` from these declarations (it
repeats only the annotation, which tests/test_estimator_settings.py holds equal); another
estimator's run refuses them (:mod:`cdalign.alignment.rules`), and ``--help`` shows them
in a group per estimator, in full only for the estimator the run uses. A run's
``config.yaml`` still lists every field, so that it reads back as the same config.

Why flat keys owned by the estimator rather than nested sections (``reward_backprop:
{steps: 4}``, like ``dual:``): the keys are what recipes, written ``config.yaml`` files,
published model cards and trl's DDPO field map (:mod:`cdalign.alignment.trl_compat`)
already say (``backprop_steps``, ``ppo_clip_range``, ...). A nested section would need
the flat keys as aliases, and a run's ``config.yaml`` would change form (or be written
flat from a nested config, two forms of one field). Flat fields keep one spelling in
YAML, on the command line (``--ppo_clip_range``) and in Python (``config.ppo_clip_range``);
the estimator owns what a section would have given: the declaration, the checks, the
refusal of another estimator's settings and their place in ``--help``."""

import dataclasses
from dataclasses import dataclass, field

from cdalign.core.policy_gradient import ADVANTAGES
from cdalign.core.truncation import TRUNCATION_STRATEGIES
from cdalign.fields import ConfigFields

__all__ = ["RewardBackpropSettings", "PolicyGradientSettings", "estimator_field", "setting_names"]


@dataclass
class RewardBackpropSettings(ConfigFields):
    """Settings of estimator reward_backprop: how many final sampling steps the gradient
    flows through (K), memory, which steps' KL terms carry gradient, and the advantages of
    the constraints whose gradient is the score-function estimate."""

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
        metadata={"help": "Checkpoint each denoiser call: memory flat in K for about one extra forward pass per step."},
    )
    fuse_micro_batches: bool | None = field(
        default=None,
        metadata={
            "help": "Sample and backpropagate the micro-batches between two dual steps (gradient_accumulation_steps "
            "of them by default) in one call per process instead of one call each: the same images, Lagrangians and "
            "gradient up to float rounding, fewer and larger denoiser calls, and memory for all of them at once. "
            "None (default): on a CPU, where small calls are dominated by their overhead, and not on a GPU, where "
            "train_batch_size is usually set by memory. Not with a score-function constraint (its advantage baseline "
            "is each micro-batch's own).",
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
    score_function_advantage: str = field(
        default="leave_one_out",
        metadata={
            "help": "estimator reward_backprop, constraints with gradient: score_function or hybrid: how the constraint's "
            "per-image values become the advantages A of its score-function term, over the global micro-batch "
            "(no prompt groups). 'leave_one_out' (default): r minus the mean of the other images, unbiased and in "
            "the constraint's units, so its λ prices it as the backprop constraints' λ do. 'batch_mean': r minus "
            "the batch mean, (N−1)/N of that gradient. 'batch_std': standardised, so λ weighs a unitless advantage "
            "(a larger step for a low-spread reward; λ then means something else than for the other constraints).",
            "choices": ADVANTAGES,
        },
    )


@dataclass
class PolicyGradientSettings(ConfigFields):
    """Settings of estimator policy_gradient (DDPO/GRPO with duals, METHOD.md §3): prompt
    groups, advantages, PPO clipping and the updates of each round."""

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
            "'batch_mean' / 'leave_one_out': centred over the global batch, unscaled, without prompt groups "
            "(leave-one-out: minus the other images' mean, unbiased); a 0/1 reward whose prompt groups mostly agree "
            "keeps its signal. 'prompt_tracker': DDPO's per-prompt statistics tracking (see prompt_tracker_buffer).",
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


def setting_names(settings: type) -> tuple[str, ...]:
    """The setting names of settings class ``settings``, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(settings))


def estimator_field(settings: type, name: str) -> dataclasses.Field:
    """The config field for setting ``name`` of settings class ``settings``: its default
    and metadata (``help``, ``choices``, bounds) as declared there. A fresh ``Field``,
    since a ``Field`` object belongs to one dataclass."""
    (declared,) = [f for f in dataclasses.fields(settings) if f.name == name]
    return field(default=declared.default, default_factory=declared.default_factory, metadata=declared.metadata)

"""The constrained problem of an alignment run, as config specs (YAML mappings):

    minimise_θ  f_0(θ)   subject to   g_i(θ) ≤ 0,   i = 1..m

:class:`ObjectiveSpec` is f_0 (the chain KL to the base model, or minus a reward),
:class:`ConstraintSpec` one g_i (a reward threshold in either direction, or a KL budget),
:class:`DualSpec` how the multipliers λ_i are updated (arXiv 2508.19104, section on
constrained alignment; the README's "Method choices"). Every default of the dual rules
is declared here once: the rules of :mod:`cdalign.core.duals` take their gains as
arguments. Rules that relate these fields to each other and to the rest of the run are
in :mod:`cdalign.alignment.rules`."""

from dataclasses import dataclass, field

from cdalign.core.constraint_gradients import CONSTRAINT_GRADIENTS, ConstraintGradient
from cdalign.core.duals import DUAL_OPTIMIZERS
from cdalign.core.problem import KL
from cdalign.fields import ConfigFields

__all__ = ["ObjectiveSpec", "ConstraintSpec", "DualSpec", "OBJECTIVE_TYPES", "CONSTRAINT_TYPES", "DIRECTIONS"]

REWARD = "reward"
OBJECTIVE_TYPES = (KL, REWARD)
CONSTRAINT_TYPES = (REWARD, KL)
DIRECTIONS = ("high", "low")
DEFAULT_GRADIENT = "backprop"  # a constraint's term backpropagated through the last K steps, as every other term


@dataclass
class ObjectiveSpec(ConfigFields):
    """What is minimised: f_0 = KL(p_θ ‖ q) (the paper's main form), or f_0 = −E[r_0]."""

    type: str = field(
        default=KL,
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
            "help": "Registry name of the reward r_0 to maximise (see cdalign.rewards.available_rewards()), or a "
            "name of remote_rewards. Required when objective.type is 'reward'; must be unset when it is 'kl'."
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

    @property
    def is_kl(self) -> bool:
        """Whether f_0 is the chain KL (``type`` 'kl'); otherwise it is minus a reward."""
        return self.type == KL


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
            "cdalign.rewards.available_rewards()), or a name of remote_rewards (a reward scored by a server). "
            "Must be unset for 'kl' constraints."
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
    relative_to_base: bool = field(
        default=False,
        metadata={
            "help": "Reward constraints: `threshold` is an offset from the base model's mean of this reward, in the "
            "reward's own units (needs normalize: false): direction 'high' with threshold -0.05 asks for "
            "E[r] ≥ E_base[r] − 0.05, a floor 5 points under the base for an accuracy such as shapes_match "
            "(what the prompt asks for must survive). Training measures the base mean with the reward "
            "statistics (normalization_batches, cached); the held-out verdict judges the paired difference "
            "aligned − base on the same images against the offset. Its dual variable is priced in the base "
            "model's std of the reward, as a normalised constraint's is (the duals step on slack / std, the "
            "primal step weighs λ / std), so a floor in raw units binds as fast as one in σ units."
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
            "(cdalign.core.targets). Unset: aim at the threshold. Not with relative_to_base (whose verdict's noise "
            "is the paired difference's, which training does not see): give it a `margin` instead.",
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

    gradient: str = field(
        default=DEFAULT_GRADIENT,
        metadata={
            "help": "Reward constraints, estimator reward_backprop: how this constraint's term of the Lagrangian is "
            "differentiated (cdalign.core.constraint_gradients). 'backprop' (default): through the last K sampling "
            "steps and the VAE, as every other term. 'whole_chain': backpropagated through every sampling step, for "
            "this term alone (the others keep the last K), in a second sampling pass with gradient at every step "
            "(about twice the sampling cost; memory for the whole chain unless gradient_checkpointing): for a "
            "floor whose violation is made at early steps the truncated gradient never reaches. 'score_function': "
            "a REINFORCE (policy-gradient) estimate over every step, −λ·s·mean_b[A(b)·Σ_t log p_θ(x_{t−1} | x_t)] with "
            "A the constraint's value minus a baseline (score_function_advantage), in the constraint's own units "
            "(the same gradient in expectation, so λ keeps its meaning), for rewards without gradients (e.g. "
            "shapes_match); needs eta > 0 and large batches (on the tiny flow model 32 images gave no usable "
            "direction). 'hybrid': the last K steps backpropagated and the score function at the earlier ones "
            "(unbiased for the whole chain; the same variance caveat). The score function costs a forward and "
            "backward pass of the denoiser per step it covers.",
            "choices": CONSTRAINT_GRADIENTS,
        },
    )

    @property
    def differentiation(self) -> ConstraintGradient:
        """How this constraint's term is differentiated (:data:`CONSTRAINT_GRADIENTS` entry of ``gradient``)."""
        return CONSTRAINT_GRADIENTS.get(self.gradient)

    @property
    def by_score_function(self) -> bool:
        """Whether this constraint's gradient has a score-function term (``gradient``
        'score_function' or 'hybrid')."""
        return self.differentiation.score_function

    @property
    def name(self) -> str:
        """A stable display name for logs and metrics: ``<reward>_<direction>`` for a
        reward constraint (e.g. ``saturation_low``), ``kl`` for the KL constraint.
        Unique within a valid config."""
        if self.is_kl:
            return KL
        return f"{self.reward or 'reward'}_{self.direction}"

    @property
    def is_kl(self) -> bool:
        """Whether this is the KL budget (``type`` 'kl'); otherwise a reward bound."""
        return self.type == KL


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
    decrease_rate: float = field(
        default=1.0,
        metadata={
            "help": "Fraction ρ in (0, 1] of a dual step that lowers λ which is taken (both rules): λ_i ← λ_i + "
            "ρ·(λ'_i − λ_i) where the rule's λ'_i is below λ_i; steps that raise λ are taken whole. 1: the rule "
            "as stated. Below 1 a met constraint keeps its price longer while another one is bought, for two "
            "constraints that take turns (docs/results/fidelity_floor.md); fixed points are the rule's own.",
            "gt": 0.0,
            "le": 1.0,
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

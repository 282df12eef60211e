"""What an estimator returns for one micro-batch (:class:`BatchEstimate`), what it keeps to
train on afterwards (a policy-gradient :class:`Rollout`, a reward-backprop run's
:class:`ScoreFunctionTerm`), and the scoring of a micro-batch's images (:func:`score`).
The estimators themselves are in :mod:`cdalign.alignment.estimators`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from cdalign.core.chains import GaussianChain, Predictor
from cdalign.core.policy_gradient import score_function_loss
from cdalign.core.sampling import Trajectory

@dataclass
class Rollout:
    """What a policy-gradient micro-batch keeps for its updates: the prompts, the sampled
    :class:`~cdalign.core.sampling.Trajectory`, the combined advantage A (B,) (λ as at
    sampling), the steps trained on in each inner epoch, the KL's coefficient in the
    Lagrangian and the base model's ε̃_q at the recorded states of those steps."""

    prompts: list[str]
    trajectory: Trajectory
    advantages: torch.Tensor
    train_steps: list[list[int]]
    kl_weight: float
    base_eps: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class ScoreFunctionTerm:
    """The score-function part of a ``reward_backprop`` micro-batch: the terms of the
    constraints whose ``gradient`` has one (:data:`~cdalign.core.constraint_gradients.CONSTRAINT_GRADIENTS`).
    Holds the sampled chain (:class:`~cdalign.core.sampling.Trajectory`, detached states),
    the predictor that sampled it and, per sampling step t, the combined advantage
    ``A_t = Σ_j s_j λ_j A_j`` (B,) over the constraints whose score function covers step t
    (λ as at sampling; s = +1 for "high", −1 for "low"; each ``A_j`` the constraint's values
    in its own units minus a baseline). :meth:`losses` yields ``−mean_b A_t(b)·log p_θ(x_{t−1} | x_t)``
    at the recorded states, step by step: summed, the score-function estimate of those
    constraints' part of ``Σ_j λ_j ∇g_j`` (METHOD.md §3)."""

    predictor: Predictor
    chain: GaussianChain
    trajectory: Trajectory
    # step index -> A_t (B,), this process's share; only steps whose global-batch advantages are not all 0
    step_advantages: dict[int, torch.Tensor]

    def losses(self, autocast=contextlib.nullcontext) -> Iterator[torch.Tensor]:
        """One loss per step of :attr:`step_advantages` (backpropagate each at once: memory
        holds one denoiser call's graph), the predictions under ``autocast()`` as the sampling
        ran. Every process runs the same steps (the advantages are the global batch's)."""
        states = self.trajectory.states
        for i, advantages in sorted(self.step_advantages.items()):
            with autocast():
                prediction = self.predictor(states[i], self.chain.timesteps[i])
                log_prob = self.chain.log_prob(i, states[i], prediction, states[i + 1])
            yield score_function_loss(log_prob, advantages)


@dataclass
class BatchEstimate:
    """What an estimator measured on one micro-batch: the Lagrangian to backpropagate (or
    the rollout to train on), and the batch's estimates of f_0, each constraint's value and
    slack, the rewards and the chain KL, which the dual step and the step log average."""

    loss: torch.Tensor  # Lagrangian (scalar): to backpropagate (reward_backprop), or its detached value (rollouts)
    objective: torch.Tensor  # f_0 (scalar, detached)
    values: torch.Tensor  # per-constraint batch means (m,), detached
    slacks: torch.Tensor  # (m,), detached
    rewards_raw: dict[str, torch.Tensor]  # name -> (B,) detached
    rewards_norm: dict[str, torch.Tensor]
    kl: torch.Tensor | None  # (B,) detached
    num_grad_steps: int
    rollout: Rollout | None = None  # policy gradient: what its updates train on
    score_function: ScoreFunctionTerm | None = None  # reward_backprop: the terms to backpropagate step by step
    diagnostics: dict[str, float] = field(default_factory=dict)  # estimator-specific, for the step log


def score(images: torch.Tensor, prompts: list[str], names: list[str], rewards: dict, normalizers: dict):
    """Raw and normalised values (B,) of each named reward (as float32). Non-finite values
    pass through unchanged: the trainer checks each micro-batch with :func:`is_finite_estimate`
    and skips a non-finite one (up to ``max_nonfinite_batches``)."""
    raw, norm = {}, {}
    for name in names:
        values = rewards[name](images, prompts).float()
        raw[name] = values
        stats = normalizers.get(name)
        norm[name] = stats.normalize(values) if stats is not None else values
    return raw, norm


def is_finite_estimate(estimate: BatchEstimate) -> bool:
    vals = [estimate.loss.detach(), *estimate.rewards_raw.values()] + ([estimate.kl] if estimate.kl is not None else [])
    return all(bool(torch.isfinite(v).all()) for v in vals)

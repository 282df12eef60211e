"""Gradient estimators: how one micro-batch turns into a differentiable Lagrangian.

An estimator samples through the shared :class:`~cdalign.core.sampling.DiffusionSampler`,
scores the images, adds the chain KL where the problem needs it, and returns a
:class:`MicroBatch`. Reward backpropagation (the paper's) is the one registered in
:data:`ESTIMATORS`; another estimator (e.g. a DDPO-style policy gradient for rewards
without gradients, METHOD.md §3) would register there under its own name."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdalign.core.kl import ChainKLAccumulator, choose_kl_steps
from cdalign.core.problem import ConstrainedProblem
from cdalign.core.sampling import DiffusionSampler, WithAdaptersDisabled
from cdalign.core.statistics import mean_and_ci  # noqa: F401  (re-exported: estimators report with it)
from cdalign.core.truncation import TRUNCATION_STRATEGIES, truncation_steps  # noqa: F401  (re-exported)
from cdalign.registry import Registry

ESTIMATORS: Registry = Registry("estimator")


@dataclass
class MicroBatch:
    loss: torch.Tensor  # Lagrangian to backpropagate (scalar)
    objective: torch.Tensor  # f_0 (scalar, detached)
    values: torch.Tensor  # per-constraint batch means (m,), detached
    slacks: torch.Tensor  # (m,), detached
    rewards_raw: dict[str, torch.Tensor]  # name -> (B,) detached
    rewards_norm: dict[str, torch.Tensor]
    kl: torch.Tensor | None  # (B,) detached
    num_grad_steps: int


@ESTIMATORS.register("reward_backprop")
class RewardBackprop:
    """Reward backpropagation through DDIM sampling (the paper's primal estimator).

    Gradient flows through the last K steps and the VAE decode; the chain KL's value is
    estimated over all steps (``kl_value_steps`` may subsample the no-gradient steps,
    unbiasedly) with base predictions from the same UNet, adapters disabled."""

    def __init__(self, sampler: DiffusionSampler, problem: ConstrainedProblem, rewards: dict, normalizers: dict, config):
        self.sampler, self.problem, self.rewards, self.normalizers = sampler, problem, rewards, normalizers
        self.config = config

    def __call__(self, prompts: list[str], seeds: list[int], multipliers: torch.Tensor, generator: torch.Generator) -> MicroBatch:
        cfg, T = self.config, len(self.sampler.chain)
        k = truncation_steps(cfg.backprop_strategy, T, cfg, generator)
        grad_steps = set(range(T - k, T))
        policy = self.sampler.guided(prompts)
        kl_acc = None
        if self.problem.needs_kl:
            steps = choose_kl_steps(T, grad_steps, cfg.kl_value_steps, generator)
            kl_acc = ChainKLAccumulator(
                WithAdaptersDisabled(policy), self.sampler.chain, cfg.kl_estimator, steps, cfg.gradient_checkpointing
            )
        images = self.sampler.sample(
            policy, seeds, grad_steps=grad_steps, gradient_checkpointing=cfg.gradient_checkpointing, on_step=kl_acc
        )
        raw, norm = score(images, prompts, self.problem.reward_names, self.rewards, self.normalizers)
        used = {n: (norm[n] if self.problem.normalized(n) else raw[n]) for n in raw}
        kl = kl_acc.per_sample if kl_acc is not None else None
        if isinstance(kl, float):  # no KL step was evaluated (kl_value_steps=0 and K=0)
            kl = torch.zeros(len(seeds))
        objective = self.problem.objective.value(kl, used)
        values = self.problem.values(kl, used)
        slacks = self.problem.slacks(values)
        loss = self.problem.lagrangian(objective, slacks, multipliers)
        return MicroBatch(
            loss=loss,
            objective=objective.detach(),
            values=values.detach(),
            slacks=slacks.detach(),
            rewards_raw={n: v.detach() for n, v in raw.items()},
            rewards_norm={n: v.detach() for n, v in norm.items()},
            kl=None if kl is None else kl.detach(),
            num_grad_steps=k,
        )


def score(images: torch.Tensor, prompts: list[str], names: list[str], rewards: dict, normalizers: dict):
    """Raw and normalised values (B,) of each named reward (as float32). Non-finite values
    pass through unchanged: the trainer checks each micro-batch with :func:`is_finite_batch`
    and skips a non-finite one (up to ``max_nonfinite_batches``)."""
    raw, norm = {}, {}
    for name in names:
        values = rewards[name](images, prompts).float()
        raw[name] = values
        stats = normalizers.get(name)
        norm[name] = stats.normalize(values) if stats is not None else values
    return raw, norm


def is_finite_batch(mb: MicroBatch) -> bool:
    vals = [mb.loss.detach(), *mb.rewards_raw.values()] + ([mb.kl] if mb.kl is not None else [])
    return all(bool(torch.isfinite(v).all()) for v in vals)

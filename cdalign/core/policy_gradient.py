"""The policy-gradient formulas of METHOD.md §3, one per function: advantages, their
combination through the duals, and PPO's clipped surrogate. Nothing here samples.

Each DDIM step with η > 0 is a Gaussian policy ``x_{t'} ~ N(μ_θ(x_t), σ_t² I)``
(:meth:`cdalign.core.chains.DDIMChain.log_prob`). The Lagrangian's reward part is
linear in the rewards, so its policy gradient uses the per-sample advantage

    A = s_0 A_0 + Σ_i λ_i s_i A_i          (s = +1 raises a reward, −1 lowers it)

with each ``A_j`` an advantage of reward j alone (:data:`ADVANTAGES`), so a large-scale
reward does not drown a small one before λ weighs them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch

from cdalign.core.problem import ConstrainedProblem
from cdalign.registry import Registry

STD_EPS = 1e-6  # added to a standard deviation before dividing (DDPO's per-prompt tracker uses 1e-6)


def group_view(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / group_size, group_size): consecutive images are one prompt's group."""
    if values.ndim != 1 or values.numel() % group_size:
        raise ValueError(f"expected (N,) values with N a multiple of the group size {group_size}; got {tuple(values.shape)}")
    return values.view(-1, group_size)


def group_centered(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``r − mean(r of its prompt group)`` (N,): a baseline that leaves the policy gradient's
    scale that of the Lagrangian (the group mean includes the image itself, as GRPO's)."""
    g = group_view(values.double(), group_size)
    return (g - g.mean(1, keepdim=True)).flatten().to(values.dtype)


def group_standardized(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO: ``(r − mean_group) / (std_group + 1e-6)`` (N,), population std within each
    prompt group of ``group_size`` consecutive images."""
    g = group_view(values.double(), group_size)
    std = g.std(1, correction=0, keepdim=True)
    return ((g - g.mean(1, keepdim=True)) / (std + STD_EPS)).flatten().to(values.dtype)


def batch_centered(values: torch.Tensor) -> torch.Tensor:
    """``r − mean(r)`` over the whole batch given (N,), unscaled: the Lagrangian's units. The
    mean includes the image itself, so the score-function gradient it gives is (N−1)/N of
    the reward's (see :func:`leave_one_out`)."""
    v = values.double()
    return (v - v.mean()).to(values.dtype)


def leave_one_out(values: torch.Tensor) -> torch.Tensor:
    """``r_b − mean_{b' ≠ b} r_b'`` (N,), unscaled (RLOO's baseline, Kool et al. 2019): a
    baseline independent of the image it is subtracted from, so ``E[A·∇log p] = ∇E[r]``
    exactly, in the reward's own units. Equals ``N/(N−1)·(r − mean r)``; needs N ≥ 2."""
    n = values.numel()
    if values.ndim != 1 or n < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 values (N,), got shape {tuple(values.shape)}; "
                         "use train_batch_size >= 2")
    v = values.double()
    return ((v - v.mean()) * (n / (n - 1))).to(values.dtype)


def batch_standardized(values: torch.Tensor) -> torch.Tensor:
    """DDPO's default: ``(r − mean) / (std + 1e-6)`` over the whole batch given (N,)."""
    v = values.double()
    return ((v - v.mean()) / (v.std(correction=0) + STD_EPS)).to(values.dtype)


class PerPromptStatTracker:
    """DDPO's per-prompt statistics (Black et al. 2023; trl 0.23 ``PerPromptStatTracker``):
    each prompt keeps its last ``buffer_size`` rewards; a reward's advantage is
    ``(r − mean) / (std + 1e-6)`` over its prompt's buffer (after adding this batch), or
    over the batch while the buffer holds fewer than ``min_count``. Stateful: its
    ``state_dict`` goes into checkpoints, so a resumed run continues exactly."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = int(buffer_size), int(min_count)
        self.buffers: dict[str, deque] = {}

    def __call__(self, values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        v = values.double().cpu()
        out = torch.empty_like(v)
        batch_mean, batch_std = v.mean(), v.std(correction=0)
        index: dict[str, list[int]] = {}
        for k, p in enumerate(prompts):
            index.setdefault(p, []).append(k)
        for p, ks in index.items():  # in order of first appearance: deterministic
            buffer = self.buffers.setdefault(p, deque(maxlen=self.buffer_size))
            buffer.extend(float(v[k]) for k in ks)
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                held = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = held.mean(), held.std(correction=0)
            out[ks] = (v[ks] - mean) / (std + STD_EPS)
        return out.to(values)

    def state_dict(self) -> dict:
        return {"buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque(b, maxlen=self.buffer_size) for p, b in state.get("buffers", {}).items()}


@dataclass(frozen=True)
class AdvantageKind:
    """How one reward's per-sample values (N,) become advantages (N,):
    ``compute(values, group_size, tracker, prompts)``. ``needs_groups``: standardised
    within prompt groups (``images_per_prompt`` consecutive images); ``global_batch``:
    computed on the whole global batch (all processes); ``stateful``: one
    :class:`PerPromptStatTracker` per reward, saved in checkpoints."""

    compute: Callable[[torch.Tensor, int, "PerPromptStatTracker | None", Sequence[str]], torch.Tensor]
    needs_groups: bool
    global_batch: bool
    stateful: bool


ADVANTAGES: Registry[AdvantageKind] = Registry("advantage")
ADVANTAGES.register("group_std", AdvantageKind(lambda v, k, tr, p: group_standardized(v, k), True, False, False))
ADVANTAGES.register("group_mean", AdvantageKind(lambda v, k, tr, p: group_centered(v, k), True, False, False))
ADVANTAGES.register("batch_std", AdvantageKind(lambda v, k, tr, p: batch_standardized(v), False, True, False))
ADVANTAGES.register("batch_mean", AdvantageKind(lambda v, k, tr, p: batch_centered(v), False, True, False))
ADVANTAGES.register("leave_one_out", AdvantageKind(lambda v, k, tr, p: leave_one_out(v), False, True, False))
ADVANTAGES.register("prompt_tracker", AdvantageKind(lambda v, k, tr, p: tr(v, p), False, True, True))


def inclusion_probability(num_drawn: int, num_steps: int, draws: int) -> float:
    """The probability that a given step is among those trained when each of ``draws`` inner
    epochs draws ``num_drawn`` of ``num_steps`` steps uniformly without replacement,
    independently: ``1 − (1 − n/N)^E``. Dividing a trained step's KL by it (Horvitz–Thompson)
    makes the KL value from the trained steps alone unbiased for the all-steps sum."""
    return 1.0 - (1.0 - num_drawn / num_steps) ** draws


def reward_weights(
    problem: ConstrainedProblem, multipliers: torch.Tensor, constraints: Collection[int] | None = None
) -> dict[str, float]:
    """The signed weight of each reward in the Lagrangian's reward part,
    ``L = const − Σ_j w_j E[r_j]``: ``w = +1`` for a reward objective, ``+λ_i`` for a
    "high" constraint, ``−λ_i`` for a "low" one (summed when one reward has both). KL
    terms are not rewards: see :func:`kl_weight`. ``constraints``: the indices of the
    constraints to weigh, without the objective (default: every constraint and the objective)."""
    weights: dict[str, float] = {}
    if constraints is None and not problem.objective.is_kl:
        weights[problem.objective.source] = 1.0
    for j, c in enumerate(problem.constraints):
        if c.is_kl or (constraints is not None and j not in constraints):
            continue
        sign = 1.0 if c.direction == "high" else -1.0
        weights[c.source] = weights.get(c.source, 0.0) + sign * float(multipliers[j])
    return weights


def kl_weight(problem: ConstrainedProblem, multipliers: torch.Tensor) -> float:
    """The coefficient of the chain KL in the Lagrangian: 1 for a KL objective, λ of the
    KL constraint, else 0."""
    if problem.objective.is_kl:
        return 1.0
    return sum(float(multipliers[j]) for j, c in enumerate(problem.constraints) if c.is_kl)


def combined_advantage(advantages: dict[str, torch.Tensor], weights: dict[str, float], clip: float | None = None) -> torch.Tensor:
    """``A = Σ_j w_j clip(A_j)`` (N,) with the signed weights of :func:`reward_weights`;
    each reward's advantage is clipped to ``[−clip, clip]`` before λ weighs it (DDPO's
    advantage clip, applied per reward so that it never caps λ's effect)."""
    total = None
    for name, w in weights.items():
        a = advantages[name]
        if clip is not None:
            a = a.clamp(-clip, clip)
        total = w * a if total is None else total + w * a
    if total is None:
        raise ValueError("no reward in the problem's reward part")
    return total


def score_function_loss(log_prob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE's surrogate to minimise for one step (scalar): ``−mean_b A_b·log π_θ(x'_b | x_b)``
    of the step's log-probabilities (B,) under the policy being trained (which sampled them) and
    the signed, λ-weighted advantages A (B,). Summed over the chain's steps, its gradient is the
    score-function estimate of ``−∇ Σ_j w_j E[r_j]`` (METHOD.md §3); PPO's ratio at 1 is the same."""
    return -(advantages.detach().to(log_prob) * log_prob).mean()


def ppo_clipped_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    """PPO's clipped surrogate to minimise (scalar) and its diagnostics, for one step's
    log-probabilities (B,) under the policy being trained and the one that sampled:

        ρ = exp(log π_θ − log π_old),   loss = mean_b max(−A ρ, −A clip(ρ, 1−ε, 1+ε))

    Diagnostics (floats): ``ratio_mean``, ``clip_fraction`` (share with |ρ − 1| > ε),
    ``approx_kl`` (½ mean (log ρ)², DDPO's), ``max_abs_log_ratio``."""
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    a = advantages.detach().to(ratio)
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    lr = log_ratio.detach()
    stats = {
        "ratio_mean": float(ratio.detach().mean()),
        "clip_fraction": float(((ratio.detach() - 1).abs() > clip_range).float().mean()),
        "approx_kl": float(0.5 * lr.pow(2).mean()),
        "max_abs_log_ratio": float(lr.abs().max()),
    }
    return loss, stats

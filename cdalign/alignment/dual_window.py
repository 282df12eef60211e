"""The dual side of a training step (METHOD.md §1): slacks summed over the micro-batches
since the last dual step, averaged over the global batch, then one update of λ.

:class:`DualWindow` holds the running sums between dual steps (and, for constraints with a
``confidence`` target, the per-image moments that refresh their margins);
:func:`confidence_targets` builds those targets from the config."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch

from cdalign.alignment.estimators import BatchEstimate
from cdalign.console import CdalignWarning
from cdalign.core.duals import InfeasibilityMonitor
from cdalign.core.normalization import RewardStats
from cdalign.core.problem import ConstrainedProblem
from cdalign.core.targets import ConfidenceTargets


def confidence_targets(
    problem: ConstrainedProblem, specs: Sequence, stats: Mapping[str, RewardStats], num_images: int
) -> ConfidenceTargets:
    """The constraints' margins (:mod:`cdalign.core.targets`): from each spec's ``confidence``
    (the verdict's held-out sample size is ``num_images``), or a fixed ``margin``; none for a
    KL constraint. ``stats``: the base-model reward statistics loaded so far."""
    prior = []
    # per-image std before the first dual step: 1 in base-model std units; in raw units the base
    # statistics when already loaded, else 0 (that first window aims at the threshold itself)
    for c in problem.constraints:
        raw = stats.get(c.source)
        prior.append(1.0 if (c.normalize or c.is_kl) else (raw.std if raw is not None else 0.0))
    return ConfidenceTargets([s.confidence for s in specs], [s.margin for s in specs], prior, num_images)


def per_image_values(problem: ConstrainedProblem, estimate: BatchEstimate) -> list[torch.Tensor]:
    """Each constraint's per-image values (B,) in a micro-batch, in its own units."""
    out = []
    for c in problem.constraints:
        if c.is_kl:
            out.append(estimate.kl if estimate.kl is not None else torch.zeros(0))
        else:
            out.append((estimate.rewards_norm if c.normalize else estimate.rewards_raw)[c.source])
    return out


class DualWindow:
    """The micro-batches since the last dual step: ``slack_sum`` (M,) and ``slack_count``,
    and ``moment_sum`` (M, 3) of the per-image values for confidence targets (float64, this
    process's). :meth:`step` averages them over every process's micro-batches and updates
    the ``duals``, the ``targets``' margins (into ``problem.margins``) and the infeasibility
    ``monitor``."""

    def __init__(self, problem: ConstrainedProblem, duals, monitor: InfeasibilityMonitor, targets: ConfidenceTargets):
        self.problem, self.duals, self.monitor, self.targets = problem, duals, monitor, targets
        m = len(problem.constraints)
        self.slack_sum = torch.zeros(m, dtype=torch.float64)
        self.slack_count = 0
        self.moment_sum = torch.zeros(m, 3, dtype=torch.float64)

    def add(self, estimate: BatchEstimate) -> None:
        """Count one finite micro-batch's slacks (and per-image moments)."""
        self.slack_sum += estimate.slacks.double().cpu()
        self.slack_count += 1
        if self.targets.active:
            self.moment_sum += self.targets.batch_moments(per_image_values(self.problem, estimate))

    def step(self, accelerator, device, global_step: int) -> None:
        """One dual step on the window's slacks averaged over the global batch (summed over
        processes), then an empty window. Every process calls it. No micro-batch counted
        (all skipped) or no constraint: λ stays."""
        stats = torch.cat([self.slack_sum, torch.tensor([float(self.slack_count)], dtype=torch.float64),
                           self.moment_sum.flatten()])
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats.to(device), reduction="sum").cpu()
        m = len(self.problem.constraints)
        self.slack_sum.zero_()
        self.slack_count = 0
        self.moment_sum.zero_()
        count = float(stats[m])
        if count == 0 or not self.problem.constraints:
            return
        slacks = self.problem.priced_slacks(stats[:m] / count)  # a relative floor's in base-std units
        multipliers = self.duals.step(slacks)
        if self.targets.active:  # the next window's slacks are measured from the refreshed targets
            self.problem.margins = self.targets.update(stats[m + 1 :].reshape(m, 3))
        for name in self.monitor.update(multipliers, slacks, global_step):
            msg = (
                f"constraint {name!r} looks infeasible: its dual variable keeps growing while its slack "
                f"does not improve (step {global_step}); consider loosening its threshold"
            )
            warnings.warn(msg, CdalignWarning, stacklevel=2)


def fused_groups(start: int, count: int, update_every: int, fuse: bool) -> list[list[int]]:
    """The micro-batches ``start … start + count − 1`` of one optimiser step, grouped as they
    are estimated: one group per micro-batch, or (``fuse``) the runs between dual steps, so
    that every micro-batch of a group is priced with the same λ and margins (a dual step
    falls after micro-batch j when ``(j + 1) % update_every == 0``)."""
    indices = range(start, start + count)
    if not fuse:
        return [[i] for i in indices]
    groups, current = [], []
    for i in indices:
        current.append(i)
        if (i + 1) % update_every == 0:
            groups.append(current)
            current = []
    return groups + ([current] if current else [])

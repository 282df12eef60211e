"""The constrained problem of METHOD.md §1 as data: an objective, constraints with
thresholds, their slacks, and the Lagrangian. Nothing here samples or trains."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdalign.core.statistics import ci_from_moments, constraint_decision, mean_and_ci, slack
from cdalign.core.targets import target_of

KL = "kl"  # the source of a KL objective or constraint (its ``type`` in configs, its ``source`` in reports)


@dataclass(frozen=True)
class Constraint:
    """``E[value] >= threshold`` ("high") or ``E[value] <= threshold`` ("low").

    ``source`` is a reward name, or ``"kl"`` for the chain KL to the base model (a KL
    constraint is "low" with ``threshold`` = its ``max``). ``relative``: the threshold is an
    offset from the base model's mean of the reward (a fidelity floor such as "shape accuracy
    ≥ base − 0.05"): ``E[r] ≥ E_base[r] + threshold``."""

    name: str
    source: str
    direction: str
    threshold: float
    normalize: bool = False
    relative: bool = False

    @property
    def is_kl(self) -> bool:
        return self.source == KL

    def slack(self, value: torch.Tensor, margin: float = 0.0, reference: float | None = None) -> torch.Tensor:
        """``g = b − E[r]`` for "high", ``E[r] − b`` for "low": positive means violated
        (:func:`cdalign.core.statistics.slack`). With ``margin`` the slack is measured from
        the target ``b ± margin`` (:func:`cdalign.core.targets.target_of`) instead of b. A
        relative constraint's b is ``reference`` (the base model's mean, required) plus
        its threshold."""
        if self.relative and reference is None:
            raise ValueError(f"constraint {self.name!r} is relative to the base model but no base-model mean of "
                             f"{self.source!r} is known yet (compute the reward statistics first)")
        bound = self.threshold + (reference if self.relative else 0.0)
        return slack(value, target_of(bound, margin, self.direction), self.direction)

    def verdict(self, values: torch.Tensor, base_values: torch.Tensor | None = None) -> dict:
        """The constraint judged on per-sample values (N,) in its own units (raw, base-model
        std, or KL nats): ``measured`` (their mean), ``ci95`` ([lo, hi], normal 95% CI of
        the mean), ``n``, ``slack`` (positive = violated), ``satisfied`` (the mean is on the
        allowed side; ties count) and ``ci_clears_threshold`` (the whole CI is). A relative
        constraint is judged on the paired difference ``values − base_values`` (the base
        model's values on the same items, required) against its offset; ``measured`` and
        ``ci95`` still describe ``values``, and ``judged_on`` says so. The one place a
        measured mean meets a threshold: the trainer's report, the evaluation harness and
        the composer all judge here."""
        m, lo, hi = mean_and_ci(values)
        n = int(torch.as_tensor(values).numel())
        if not self.relative:
            return {"measured": m, "ci95": [lo, hi], "n": n, **constraint_decision(m, (lo, hi), self.threshold, self.direction)}
        if base_values is None:
            raise ValueError(f"constraint {self.name!r} is relative to the base model: its verdict needs the base "
                             "model's values on the same items")
        dm, dlo, dhi = mean_and_ci(torch.as_tensor(values, dtype=torch.float64) - torch.as_tensor(base_values, dtype=torch.float64))
        decision = constraint_decision(dm, (dlo, dhi), self.threshold, self.direction)
        return {"measured": m, "ci95": [lo, hi], "n": n, **decision, "judged_on": "aligned − base (paired, same items)"}


@dataclass(frozen=True)
class Objective:
    """Minimise the chain KL (``source`` :data:`KL`) or maximise a reward."""

    source: str
    normalize: bool = False

    @property
    def is_kl(self) -> bool:
        return self.source == KL

    def value(self, kl: torch.Tensor | None, rewards: dict[str, torch.Tensor]) -> torch.Tensor:
        """``f_0`` to minimise (scalar): KL, or minus the mean reward."""
        return kl.mean() if self.is_kl else -rewards[self.source].mean()


class ConstrainedProblem:
    """Objective plus constraints. ``rewards`` passed to :meth:`evaluate` map a reward name
    to per-sample values (B,) already normalised where the spec asks for it."""

    def __init__(self, objective: Objective, constraints: list[Constraint]):
        self.objective, self.constraints = objective, list(constraints)
        # how far past its threshold each constraint aims (cdalign.core.targets); 0: at it
        self.margins = torch.zeros(len(self.constraints), dtype=torch.float64)
        # reward name -> base-model statistics (.mean) for relative constraints; the trainer binds
        # its own dict, filled when the reward statistics are computed or loaded
        self.base_statistics: dict = {}

    @classmethod
    def from_config(cls, config) -> "ConstrainedProblem":
        obj = config.objective
        objective = Objective(KL) if obj.is_kl else Objective(obj.reward, obj.normalize)
        constraints = []
        for spec in config.constraints:
            if spec.is_kl:
                constraints.append(Constraint(spec.name, KL, "low", float(spec.max)))
            else:
                constraints.append(Constraint(spec.name, spec.reward, spec.direction, float(spec.threshold), spec.normalize,
                                              relative=bool(getattr(spec, "relative_to_base", False))))
        return cls(objective, constraints)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.constraints]

    @property
    def needs_kl(self) -> bool:
        return self.objective.is_kl or any(c.is_kl for c in self.constraints)

    @property
    def reward_names(self) -> list[str]:
        """Rewards the problem reads, objective first, without repeats."""
        names = [] if self.objective.is_kl else [self.objective.source]
        for c in self.constraints:
            if not c.is_kl and c.source not in names:
                names.append(c.source)
        return names

    @property
    def needs_base_statistics(self) -> bool:
        """Whether the problem reads base-model reward statistics: a normalised reward or a
        constraint relative to the base model."""
        return any(self.normalized(n) for n in self.reward_names) or any(c.relative for c in self.constraints)

    def reference(self, j: int) -> float | None:
        """The base-model mean a relative constraint ``j`` is measured from (None otherwise,
        or while unknown)."""
        c = self.constraints[j]
        stats = self.base_statistics.get(c.source) if c.relative else None
        return None if stats is None else float(stats.mean)

    def price_scales(self) -> torch.Tensor:
        """The unit each constraint's slack is priced in (m,), float64: the base model's std of
        the reward for a constraint relative to the base model, 1 for every other constraint.

        A floor relative to the base is stated in the reward's own units (``caption fidelity ≥
        base − 0.03``), while normalised rewards are in base-std units; a slack of 0.03 on a reward
        whose base std is 0.09 is a third of a std. Priced raw, such a floor's λ would grow a tenth
        as fast as a normalised constraint's for the same violation and pull a tenth as hard per unit
        of λ (measured on the flow floor recipe: λ 0.26 -> 1.26 in 28 violated steps while the
        backgrounds were repainted). The duals therefore see ``g_j / s_j`` and the primal step uses
        ``λ_j / s_j`` on the raw reward: the same constraint, the same threshold, margin, verdict
        and report, every constraint priced in base-std units. (Normalised constraints are
        already in them; a KL budget is in nats.)"""
        scales = torch.ones(len(self.constraints), dtype=torch.float64)
        for j, c in enumerate(self.constraints):
            stats = self.base_statistics.get(c.source) if c.relative else None
            if stats is not None and float(stats.std) > 1e-6:  # a reward constant on the base is priced raw
                scales[j] = float(stats.std)
        return scales

    def priced_slacks(self, slacks: torch.Tensor) -> torch.Tensor:
        """Slacks (m,) in the units the duals step on (:meth:`price_scales`)."""
        return slacks / self.price_scales().to(slacks)

    def primal_multipliers(self, multipliers: torch.Tensor) -> torch.Tensor:
        """The weights (m,) the primal step gives each constraint's raw slack: ``λ_j / s_j``
        (:meth:`price_scales`), so that ``Σ_j λ_j·g_j/s_j`` is the Lagrangian the duals price."""
        return multipliers / self.price_scales().to(multipliers)

    def reference_estimate(self, j: int) -> dict:
        """A relative constraint's reference (the base-model mean on the training prompts) with
        its normal 95% CI and image count, as the report and model card record it; {} otherwise
        or while unknown."""
        c = self.constraints[j]
        stats = self.base_statistics.get(c.source) if c.relative else None
        if stats is None:
            return {}
        mean = float(stats.mean)
        return {"reference": mean, "reference_ci95": list(ci_from_moments(mean, float(stats.std), int(stats.count))),
                "reference_n": int(stats.count)}

    def normalized(self, source: str) -> bool:
        """Whether ``source`` is used in normalised units (by the objective or a constraint)."""
        specs = [c.normalize for c in self.constraints if c.source == source]
        if self.objective.source == source:
            specs.append(self.objective.normalize)
        return any(specs)

    def values(self, kl: torch.Tensor | None, rewards: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-constraint batch means E[value] (m,), differentiable."""
        if not self.constraints:
            return torch.zeros(0)
        return torch.stack([(kl if c.is_kl else rewards[c.source]).mean() for c in self.constraints])

    def slacks(self, values: torch.Tensor) -> torch.Tensor:
        if not self.constraints:
            return values
        return torch.stack([c.slack(values[j], float(self.margins[j]), self.reference(j))
                            for j, c in enumerate(self.constraints)])

    @staticmethod
    def lagrangian(objective: torch.Tensor, slacks: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
        """``L(θ, λ) = f_0(θ) + Σ_i λ_i g_i(θ)`` (λ treated as constants in the primal step)."""
        if slacks.numel() == 0:
            return objective
        return objective + (multipliers.to(slacks) * slacks).sum()

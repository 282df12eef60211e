"""Dual variables (Lagrange multipliers) and their update rules (METHOD.md §1).

Each rule is one class with ``step(slacks)`` and ``state_dict``/``load_state_dict``,
registered in :data:`DUAL_OPTIMIZERS` and built from a config's ``DualSpec`` by its own
:meth:`DualOptimizer.from_spec` (a newly registered rule needs no edit elsewhere).
A *slack* ``g_i`` is positive when constraint i is violated (``g = b − E[r]`` for
"high", ``E[r] − b`` for "low", ``KL − max`` for a KL constraint); multipliers λ_i ≥ 0
grow while their constraint is violated and shrink toward 0 while it holds.

The tuning values of a rule (its gains, the initial λ, the warm-up's starting fraction)
have no defaults here: a run's ``DualSpec`` (:mod:`cdalign.alignment.specs`) declares
them once and :meth:`DualOptimizer.from_spec` passes them on. What is off unless asked
for (warm-up, freezing, νPI's anti-windup, a slower decrease) defaults to off."""

from __future__ import annotations

from typing import Sequence

import torch

from cdalign.registry import Registry

DUAL_OPTIMIZERS: Registry = Registry("dual optimizer")


def _as_vector(values: float | Sequence[float], n: int, what: str) -> torch.Tensor:
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.ndim == 0:
        v = v.repeat(n)
    if v.shape != (n,):
        raise ValueError(f"{what}: expected one value or {n}, got {list(v.shape)}")
    return v.clone()


def projected_ascent(multipliers: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``λ ← max(0, λ + step)``: one ascent step projected onto λ ≥ 0 (elementwise), where
    ``step`` is the gain times the slack (``η·g`` for gradient ascent). The one projected
    ascent of cdalign: the alignment duals and the thresholded composition duals use it."""
    return (multipliers + step).clamp(min=0)


class DualOptimizer:
    """Common state: multipliers λ (m,), step counter, the linear gain warm-up (gains ramp
    from ``warmup_start`` to 1 over the first ``warmup_steps`` dual steps) and the
    decrease rate ρ ∈ (0, 1]: a rule's step that lowers λ_i is taken at ρ times its size,
    ``λ_i ← λ_i + ρ·(λ'_i − λ_i)`` where ``λ'_i < λ_i`` (METHOD.md §1, "Dual updates"); ρ = 1
    is the rule itself. The rule's own state (νPI's ξ) is updated as without ρ.

    A rule subclasses this, implements :meth:`_update` (the new λ ≥ 0, via
    :func:`projected_ascent`) and, if it has gains of its own, :meth:`from_spec`."""

    def __init__(self, num_constraints: int, *, init: float | Sequence[float], warmup_steps: int = 0,
                 warmup_start: float | None = None, frozen: bool = False, decrease_rate: float = 1.0):
        if not 0.0 < decrease_rate <= 1.0:
            raise ValueError(f"dual.decrease_rate: must be in (0, 1], got {decrease_rate}")
        if warmup_steps > 0 and warmup_start is None:
            raise ValueError("dual.warmup_start: required with warmup_steps > 0 (the fraction of the gains at the "
                             "first dual step)")
        self.multipliers = _as_vector(init, num_constraints, "dual.init").clamp(min=0)
        self.warmup_steps, self.warmup_start, self.frozen = warmup_steps, warmup_start, frozen
        self.decrease_rate = float(decrease_rate)
        self.num_steps = 0

    def gain_scale(self) -> float:
        if self.warmup_steps <= 0 or self.num_steps >= self.warmup_steps:
            return 1.0
        frac = self.num_steps / self.warmup_steps
        return self.warmup_start + (1.0 - self.warmup_start) * frac

    def step(self, slacks: torch.Tensor) -> torch.Tensor:
        """Update λ from the slacks (m,) averaged over the global batch; returns λ."""
        slacks = torch.as_tensor(slacks, dtype=torch.float64).detach().cpu()
        if slacks.shape != self.multipliers.shape:
            raise ValueError(f"expected {tuple(self.multipliers.shape)} slacks, got {tuple(slacks.shape)}")
        if not self.frozen:
            proposed = self._update(slacks, self.gain_scale())
            change = proposed - self.multipliers
            self.multipliers = self.multipliers + torch.where(change < 0, self.decrease_rate * change, change)
        self.num_steps += 1
        return self.multipliers.clone()

    def _update(self, slacks: torch.Tensor, scale: float) -> torch.Tensor:
        """The new multipliers (m,), ≥ 0, from the slacks and the warm-up gain ``scale``."""
        raise NotImplementedError

    @staticmethod
    def common_kwargs(spec) -> dict:
        """The constructor arguments every rule takes from a ``DualSpec``."""
        return dict(init=spec.init, warmup_steps=spec.warmup_steps, warmup_start=spec.warmup_start, frozen=spec.freeze,
                    decrease_rate=spec.decrease_rate)

    @classmethod
    def from_spec(cls, spec, num_constraints: int) -> "DualOptimizer":
        """Build from a ``DualSpec`` (cdalign.alignment.specs). A rule with gains of its own
        overrides this to read them; the default passes the common arguments only."""
        return cls(num_constraints, **cls.common_kwargs(spec))

    def state_dict(self) -> dict:
        return {"multipliers": self.multipliers.tolist(), "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.multipliers = torch.tensor(state["multipliers"], dtype=torch.float64)
        self.num_steps = int(state["num_steps"])


@DUAL_OPTIMIZERS.register("ascent")
class ProjectedGradientAscent(DualOptimizer):
    """``λ ← max(0, λ + η·g)``."""

    def __init__(self, num_constraints: int, *, lr: float | Sequence[float], **kw):
        super().__init__(num_constraints, **kw)
        self.lr = _as_vector(lr, num_constraints, "dual.lr")

    @classmethod
    def from_spec(cls, spec, num_constraints: int) -> "ProjectedGradientAscent":
        return cls(num_constraints, lr=spec.lr, **cls.common_kwargs(spec))

    def _update(self, slacks, scale):
        return projected_ascent(self.multipliers, scale * self.lr * slacks)


@DUAL_OPTIMIZERS.register("nupi")
class NuPI(DualOptimizer):
    """νPI controller (Sohrabi et al., ICML 2024): with error ``e_t = g_t``,
    ``ξ_t = ν ξ_{t−1} + (1−ν) e_t``, ``λ ← max(0, λ + κ_i e_t + κ_p (ξ_t − ξ_{t−1}))``,
    ``ξ_{−1} = 0``. ν = 0, κ_p = 0 is gradient ascent with step κ_i.

    ``anti_windup``: conditional integration, the integral term ``κ_i e_t`` of a violated
    constraint is skipped while its error shrinks (``0 < e_t < ξ_{t−1}``), so λ grows only
    while progress stalls; decreases are never held."""

    def __init__(self, num_constraints: int, *, kappa_i: float | Sequence[float], kappa_p: float | Sequence[float],
                 nu: float, anti_windup: bool = False, **kw):
        super().__init__(num_constraints, **kw)
        self.kappa_i = _as_vector(kappa_i, num_constraints, "dual.kappa_i")
        self.kappa_p = _as_vector(kappa_p, num_constraints, "dual.kappa_p")
        self.nu = float(nu)
        self.anti_windup = bool(anti_windup)
        self.xi = torch.zeros(num_constraints, dtype=torch.float64)

    @classmethod
    def from_spec(cls, spec, num_constraints: int) -> "NuPI":
        return cls(
            num_constraints, kappa_i=spec.kappa_i, kappa_p=spec.kappa_p, nu=spec.nu, anti_windup=spec.anti_windup,
            **cls.common_kwargs(spec),
        )

    def _update(self, slacks, scale):
        xi_new = self.nu * self.xi + (1 - self.nu) * slacks
        integral = self.kappa_i * slacks
        if self.anti_windup:
            shrinking = (slacks > 0) & (slacks < self.xi)
            integral = torch.where(shrinking, torch.zeros_like(integral), integral)
        new = projected_ascent(self.multipliers, scale * (integral + self.kappa_p * (xi_new - self.xi)))
        self.xi = xi_new
        return new

    def step(self, slacks):
        xi_before = self.xi.clone()
        out = super().step(slacks)
        if self.frozen:
            self.xi = xi_before
        return out

    def state_dict(self):
        return {**super().state_dict(), "xi": self.xi.tolist()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.xi = torch.tensor(state["xi"], dtype=torch.float64)


def build_dual_optimizer(spec, num_constraints: int) -> DualOptimizer:
    """The rule ``spec.optimizer`` of :data:`DUAL_OPTIMIZERS`, built by its ``from_spec``
    from a ``DualSpec`` (cdalign.alignment.specs)."""
    return DUAL_OPTIMIZERS.get(spec.optimizer).from_spec(spec, num_constraints)


class InfeasibilityMonitor:
    """Flags constraints that look infeasible: over the last ``window`` dual steps the
    multiplier grew at every step while the slack stayed positive and did not shrink
    (second half of the window no better than the first)."""

    def __init__(self, names: Sequence[str], window: int = 8):
        self.names, self.window = list(names), window
        self.history: list[tuple[list[float], list[float]]] = []
        self.flagged: dict[str, int] = {}

    def update(self, multipliers: torch.Tensor, slacks: torch.Tensor, step: int) -> list[str]:
        self.history.append((multipliers.tolist(), slacks.tolist()))
        self.history = self.history[-(self.window + 1) :]
        newly = []
        if len(self.history) <= self.window:
            return newly
        lam = torch.tensor([h[0] for h in self.history])
        sl = torch.tensor([h[1] for h in self.history[1:]])
        half = sl.shape[0] // 2
        for j, name in enumerate(self.names):
            growing = bool((lam[1:, j] > lam[:-1, j]).all())
            violated = bool((sl[:, j] > 0).all())
            stuck = bool(sl[half:, j].mean() >= sl[:half, j].mean())
            if growing and violated and stuck and name not in self.flagged:
                self.flagged[name] = step
                newly.append(name)
        return newly

    def state_dict(self):
        return {"history": self.history, "flagged": self.flagged}

    def load_state_dict(self, state):
        self.history = [tuple(h) for h in state["history"]]
        self.flagged = dict(state["flagged"])

"""Weights of a composition and their dual ascent (METHOD.md §2).

AND (reverse KL) and OR (forward KL) composition solve the same min-max problem

    minimise_{p, t}  t   subject to   d_i(p) ≤ t   (i unthresholded),   d_j(p) ≤ b_j   (j thresholded)

with ``d_i = KL(p‖q_i)`` (AND) or the DSM / excess DSM loss of dataset i (OR). Its
multipliers are μ on the simplex (unthresholded components; stationarity in t forces
Σμ = 1) and λ_j ≥ 0 (thresholded ones). The composed model's weights are

    ω = (μ, λ) / (1 + Σλ)          (ω = λ/Σλ when every component is thresholded)

and one dual step is (``normalize``: η_k divided by max_i d_i, a scale-free step for
divergences whose size is not known in advance, e.g. the 'path' chain KL in nats) ``μ ← Proj_simplex(μ + η_k·d_U)``, ``λ ← max(0, λ + η_k·(d_C − b_C))``:
components the model is farthest from gain weight. ``η_k`` follows a step schedule."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from cdalign.core.duals import projected_ascent
from cdalign.core.statistics import slack
from cdalign.registry import Registry

STEP_SCHEDULES: Registry = Registry("dual step schedule")


@STEP_SCHEDULES.register("constant")
def constant_schedule(lr: float, k: int) -> float:
    """η_k = η (the paper: η = 1 for 5 steps)."""
    return lr


@STEP_SCHEDULES.register("inverse_sqrt")
def inverse_sqrt_schedule(lr: float, k: int) -> float:
    """η_k = η / sqrt(k + 1): the classic rate for subgradient ascent on a nonsmooth dual."""
    return lr / math.sqrt(k + 1)


@STEP_SCHEDULES.register("harmonic")
def harmonic_schedule(lr: float, k: int) -> float:
    """η_k = η / (k + 1): square-summable but not summable steps."""
    return lr / (k + 1)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``v`` (..., n) onto the probability simplex
    {w : w_i ≥ 0, Σ w_i = 1}, along the last dimension (Duchi et al., ICML 2008).

    Sort u = sort(v, descending); ρ = max{j : u_j − (Σ_{r≤j} u_r − 1)/j > 0};
    τ = (Σ_{r≤ρ} u_r − 1)/ρ; w = max(v − τ, 0)."""
    v = torch.as_tensor(v)
    if not torch.is_floating_point(v):
        v = v.double()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"project_simplex: non-finite input {v.tolist()}")
    n = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    j = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    cond = (u - css / j) > 0
    rho = cond.to(v.dtype).mul(j).argmax(-1, keepdim=True)  # last index where cond holds (cond is monotone)
    tau = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - tau).clamp(min=0)


class SimplexDual:
    """Dual variables of a min-max composition: μ on the simplex for components without a
    threshold, λ ≥ 0 for components with one (``thresholds[i]`` is None or b_i).

    ``divergences`` passed to :meth:`step` are d_i ≥ 0 in the problem's units (nats of
    chain KL for AND, loss units for OR), one per component, averaged over a batch."""

    def __init__(
        self,
        num_components: int,
        lr: float = 1.0,
        schedule: str = "constant",
        thresholds: Sequence[float | None] | None = None,
        init: Sequence[float] | None = None,
        normalize: bool = False,
    ):
        if num_components < 1:
            raise ValueError("a composition needs at least one component")
        self.n = num_components
        thresholds = list(thresholds) if thresholds is not None else [None] * num_components
        if len(thresholds) != num_components:
            raise ValueError(f"thresholds: {len(thresholds)} values for {num_components} components")
        self.thresholds = thresholds
        self.free = torch.tensor([b is None for b in thresholds])
        self.bounds = torch.tensor([0.0 if b is None else float(b) for b in thresholds], dtype=torch.float64)
        self.lr, self.schedule = float(lr), STEP_SCHEDULES.get(schedule)
        self.schedule_name = schedule
        self.normalize = bool(normalize)
        self.multipliers = torch.zeros(num_components, dtype=torch.float64)  # μ on free, λ on thresholded
        n_free = int(self.free.sum())
        if init is not None:
            init = torch.as_tensor(list(init), dtype=torch.float64)
            if init.shape != (num_components,) or bool((init < 0).any()):
                raise ValueError(f"dual init: expected {num_components} non-negative values, got {init.tolist()}")
            self.multipliers = init.clone()
            if n_free:
                self.multipliers[self.free] = project_simplex(init[self.free])
        elif n_free:
            self.multipliers[self.free] = 1.0 / n_free
        self.num_steps = 0
        self.history: list[dict] = []

    @property
    def weights(self) -> torch.Tensor:
        """ω (n,), float64, on the simplex: the composed model's weights (see module doc)."""
        lam = self.multipliers.clone()
        lam[self.free] = 0
        if bool(self.free.any()):
            return self.multipliers / (1.0 + lam.sum())
        total = float(self.multipliers.sum())
        return self.multipliers / total if total > 0 else torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)

    @property
    def averaged_weights(self) -> torch.Tensor:
        """Mean of ω over all iterates (initial, each step's, current): the ergodic average
        that subgradient theory guarantees for noisy or non-smooth dual problems."""
        past = [torch.tensor(h["weights_before"], dtype=torch.float64) for h in self.history]
        return torch.stack(past + [self.weights]).mean(0)

    def slacks(self, divergences: torch.Tensor) -> torch.Tensor:
        """d_i − b_i for thresholded components (> 0: violated); NaN for free ones."""
        d = torch.as_tensor(divergences, dtype=torch.float64)
        return torch.where(self.free, torch.full_like(d, float("nan")), slack(d, self.bounds, "low"))

    def step(self, divergences: torch.Tensor) -> torch.Tensor:
        """One projected dual ascent step from d (n,); returns the new weights ω."""
        d = torch.as_tensor(divergences, dtype=torch.float64).detach().cpu()
        if d.shape != (self.n,) or not bool(torch.isfinite(d).all()):
            raise ValueError(f"dual step: expected {self.n} finite divergences, got {d.tolist()}")
        eta = self.schedule(self.lr, self.num_steps)
        if self.normalize:  # scale-free step: η per unit of the largest divergence
            eta = eta / max(float(d.abs().max()), 1e-12)
        new = self.multipliers.clone()
        if bool(self.free.any()):
            new[self.free] = project_simplex(self.multipliers[self.free] + eta * d[self.free])
        fixed = ~self.free
        if bool(fixed.any()):
            new[fixed] = projected_ascent(self.multipliers[fixed], eta * self.slacks(d)[fixed])
        self.history.append(
            {"step": self.num_steps, "eta": eta, "divergences": d.tolist(), "weights_before": self.weights.tolist()}
        )
        self.multipliers = new
        self.num_steps += 1
        return self.weights

    def infeasible(self, divergences: torch.Tensor, patience: int = 2) -> list[int]:
        """Thresholded components that look infeasible: still violated at ``divergences``
        and their λ grew over each of the last ``patience`` steps."""
        d = torch.as_tensor(divergences, dtype=torch.float64)
        out = []
        for i in range(self.n):
            if bool(self.free[i]) or slack(float(d[i]), float(self.bounds[i]), "low") <= 0:
                continue
            recent = self.history[-patience:]
            if len(recent) == patience and all(slack(h["divergences"][i], float(self.bounds[i]), "low") > 0 for h in recent):
                out.append(i)
        return out

    def state_dict(self) -> dict:
        return {"multipliers": self.multipliers.tolist(), "num_steps": self.num_steps, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.multipliers = torch.tensor(state["multipliers"], dtype=torch.float64)
        self.num_steps = int(state["num_steps"])
        self.history = list(state.get("history", []))

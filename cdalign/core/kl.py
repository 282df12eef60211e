"""The chain KL between the trained sampler p_θ and the base sampler q (METHOD.md §1).

Both chains share the sampled path of p_θ. With DDIM η > 0 (or a flow SDE noise level
a > 0, ``cdalign.core.chains.FlowSDEChain``) each step is Gaussian with std σ_t for both
models and means differing by ``c_t·(ε̃_θ − ε̃_q)`` (velocities ṽ for a flow model; ``c_t``
is the chain's ``output_coef``), hence

    KL = Σ_t  c_t² / (2σ_t²) · E‖ε̃_θ(x_t) − ε̃_q(x_t)‖²     (sum over latent dims)

``path`` uses exactly these weights; ``uniform`` is the paper code's unweighted mean of
``(ε̃_θ − ε̃_q)²`` over steps, batch and elements. The same function serves composition,
with ε̃_μ against each component's ε̃_i."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from cdalign.console import CdalignWarning
from cdalign.core.chains import DDIMChain
from cdalign.registry import Registry


@dataclass(frozen=True)
class KLEstimator:
    """How one step's squared ε difference enters the chain KL: per-step weights (T,)
    and the reduction over latent elements (``sum`` or ``mean``)."""

    step_weights: Callable[[DDIMChain], torch.Tensor]
    reduce_elements: Callable[[torch.Tensor], torch.Tensor]


def path_step_weights(chain: DDIMChain) -> torch.Tensor:
    """Weights ``c_t²/(2σ_t²)`` per step (T,), float64 (any chain: DDIM or flow SDE); multiply the *sum* of squared ε
    differences over latent elements. Deterministic steps (σ_t = 0) get weight 0 (their
    contribution is not a density ratio); with η = 0 there is no path KL at all."""
    sigma = chain.sigma
    if bool((sigma == 0).all()):
        raise ValueError("kl_estimator='path' needs eta > 0 (with eta = 0 the chains are deterministic); use 'uniform'")
    if bool((sigma == 0).any()):
        warnings.warn("some steps are deterministic (sigma = 0); they are left out of the path KL", CdalignWarning,
                      stacklevel=2)
    w = chain.output_coef**2 / (2 * sigma**2)
    return torch.where(sigma > 0, w, torch.zeros_like(w))


def uniform_step_weights(chain: DDIMChain) -> torch.Tensor:
    """Weights 1/T per step; multiply the *mean* of squared ε differences over elements."""
    return torch.full((len(chain),), 1.0 / len(chain), dtype=torch.float64)


KL_ESTIMATORS: Registry[KLEstimator] = Registry("kl_estimator")
KL_ESTIMATORS.register("path", KLEstimator(path_step_weights, lambda sq: sq.sum(1)))
KL_ESTIMATORS.register("uniform", KLEstimator(uniform_step_weights, lambda sq: sq.mean(1)))


def step_weights(chain: DDIMChain, estimator: str) -> torch.Tensor:
    return KL_ESTIMATORS.get(estimator).step_weights(chain)


def step_kl(eps_model: torch.Tensor, eps_ref: torch.Tensor, weight: float, estimator: str) -> torch.Tensor:
    """One step's KL contribution per sample, shape (B,).

    ``path``: ``weight · Σ_elements (ε_model − ε_ref)²``; ``uniform``: ``weight · mean``."""
    sq = (eps_model.float() - eps_ref.float()).pow(2).flatten(1)
    return weight * KL_ESTIMATORS.get(estimator).reduce_elements(sq)


def choose_kl_steps(
    num_steps: int, grad_steps: set[int], value_steps: int | None = None, generator: torch.Generator | None = None
) -> dict[int, float]:
    """Steps at which the base prediction is evaluated, with their inclusion probabilities.

    Gradient steps are always included (probability 1): their KL term carries gradient.
    The other steps are all included when ``value_steps`` is None; otherwise
    ``value_steps`` of them are drawn uniformly without replacement and each has
    inclusion probability ``value_steps / #other``. Dividing each term by its inclusion
    probability (Horvitz–Thompson) keeps the KL value unbiased for the all-steps sum."""
    others = [i for i in range(num_steps) if i not in grad_steps]
    chosen = {i: 1.0 for i in grad_steps}
    if value_steps is None or value_steps >= len(others):
        chosen.update({i: 1.0 for i in others})
    elif value_steps > 0:
        pick = torch.randperm(len(others), generator=generator)[:value_steps]
        p = value_steps / len(others)
        chosen.update({others[int(j)]: p for j in pick})
    return chosen


class ChainKLAccumulator:
    """Collects the chain KL along one sampling pass, as an ``on_step`` hook of
    :func:`cdalign.core.sampling.sample_latents`: the one KL hook of cdalign (training,
    evaluation, composition and the 2D recipe).

    ``reference``: predictor evaluated on the same x_t as the sampled model: the base
    model's ε̃_q (B,C,h,w), or, with ``num_references=n``, every component's ε̃_i stacked
    (n,B,C,h,w) (composition: KL(p ‖ q_i) for each i along p's path).
    ``steps``: step -> inclusion probability (see :func:`choose_kl_steps`); None: every
    step, with probability 1.
    ``value_only``: detach both predictions (a KL that is reported, never differentiated).
    After sampling, ``per_sample`` is the KL estimate per sample, (B,) or (n,B), carrying
    gradient from the tracked steps unless ``value_only``; ``reference_calls`` counts the
    reference evaluations."""

    def __init__(
        self,
        reference,
        chain: DDIMChain,
        estimator: str,
        steps: dict[int, float] | None = None,
        gradient_checkpointing: bool = False,
        num_references: int | None = None,
        value_only: bool = False,
    ):
        self.reference, self.chain, self.estimator, self.steps = reference, chain, estimator, steps
        self.gradient_checkpointing = gradient_checkpointing
        self.num_references, self.value_only = num_references, value_only
        self.weights = step_weights(chain, estimator)
        self.per_sample: torch.Tensor | float = 0.0
        self.reference_calls = 0

    def __call__(self, i: int, x_t: torch.Tensor, eps: torch.Tensor, tracked: bool) -> None:
        p = 1.0 if self.steps is None else self.steps.get(i)
        if p is None:
            return
        t = self.chain.timesteps[i]
        if tracked and self.gradient_checkpointing:  # recompute in backward: memory flat in K
            eps_ref = _checkpoint(self.reference, x_t, t, use_reentrant=False)
        else:
            eps_ref = self.reference(x_t, t)
        self.reference_calls += 1
        if self.value_only:
            eps, eps_ref = eps.detach(), eps_ref.detach()
        weight = float(self.weights[i]) / p  # Horvitz–Thompson: unbiased for the all-steps sum
        if self.num_references is None:
            kl = step_kl(eps, eps_ref, weight, self.estimator)
        else:
            kl = torch.stack([step_kl(eps, eps_ref[k], weight, self.estimator) for k in range(self.num_references)])
        self.per_sample = self.per_sample + kl

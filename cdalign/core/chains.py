"""The step math of each sampler family: a *chain* is one schedule of Gaussian steps
``x_{i+1} = mean_i(x_i, pred) + σ_i·z`` through which a model's prediction (ε, or a flow
model's velocity) enters the mean with coefficient ``c_i`` (:attr:`output_coef`).

- :class:`DDIMChain`: DDIM with stochasticity η (SD 1.x/2.x UNets, ε or v prediction);
- :class:`FlowSDEChain`: the SDE form of a rectified-flow ODE with noise level a
  (SD3 / SD3.5 and FLUX.1 transformers, velocity prediction).

The chain KL (``cdalign.core.kl``) and the policy-gradient log-probabilities use only
``sigma``, ``output_coef`` and ``step_mean``, so they hold for both families unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


class Predictor(Protocol):
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def gaussian_step_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """``log N(x_prev; mean, std² I)`` (B,), summed over the latent elements:
    ``−‖x_prev − mean‖²/(2std²) − D·log std − (D/2)·log 2π``; ``x_prev`` is detached, the
    mean keeps its gradient. Computed in float32 at least."""
    dtype = torch.float64 if mean.dtype == torch.float64 else torch.float32
    diff = (x_prev.detach().to(dtype) - mean.to(dtype)).flatten(1)
    d = diff.shape[1]
    return -diff.pow(2).sum(1) / (2 * std * std) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


class GaussianChain:
    """What every chain shares: ``x' = step_mean(i, x, pred) + σ_i·z``, its log-density, and
    the step index of a model timestep. Subclasses define ``timesteps``, ``sigma``, ``eta``,
    ``step_mean``, ``output_coef`` and ``prediction``."""

    def __len__(self) -> int:
        return len(self.timesteps)

    def index_of(self, t) -> int:
        """The step index of model timestep ``t`` (a value of ``timesteps``)."""
        index = self.__dict__.get("_index_cache")
        if index is None:
            index = {float(v): i for i, v in enumerate(self.timesteps)}
            object.__setattr__(self, "_index_cache", index)
        return index[float(t)]

    def step(self, i: int, x_t: torch.Tensor, pred: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        mean = self.step_mean(i, x_t, pred)
        s = float(self.sigma[i])
        return mean if (s == 0.0 or noise is None) else mean + s * noise

    def log_prob(self, i: int, x_t: torch.Tensor, pred: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """``log π(x_{i+1} | x_i)`` (B,) of step ``i`` as a policy (METHOD.md §3): the density
        of ``N(step_mean(x_t, pred), σ_i² I)`` at ``x_prev``, summed over latent elements
        (:func:`gaussian_step_log_prob`). Differentiable in ``pred`` (and so in the weights
        that predicted it); refuses a deterministic step (σ_i = 0)."""
        s = float(self.sigma[i])
        if s == 0.0:
            raise ValueError(f"step {i} is deterministic (sigma = 0, eta = {self.eta}); it has no log-probability")
        return gaussian_step_log_prob(x_prev, self.step_mean(i, x_t, pred), s)


@dataclass(frozen=True)
class DDIMChain(GaussianChain):
    """DDIM sampling schedule with stochasticity ``eta`` (METHOD.md §1).

    Per step ``i`` (timestep ``t``, previous ``t'``):
    ``σ_i = η·sqrt((1−ᾱ_{t'})/(1−ᾱ_t))·sqrt(1−ᾱ_t/ᾱ_{t'})``,
    ``mean_i = sqrt(ᾱ_{t'})·(x_t − sqrt(1−ᾱ_t)·ε)/sqrt(ᾱ_t) + sqrt(1−ᾱ_{t'}−σ_i²)·ε``,
    ``x_{t'} = mean_i + σ_i·z``. All tensors have shape (T,), float64 for exact weights.
    """

    timesteps: torch.Tensor  # (T,) long, descending
    alpha_bar: torch.Tensor  # ᾱ_t
    alpha_bar_prev: torch.Tensor  # ᾱ_{t'}
    sigma: torch.Tensor  # σ_t
    eta: float
    prediction_type: str = "epsilon"

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int, eta: float) -> "DDIMChain":
        """Build from any diffusers scheduler config with ``alphas_cumprod`` (DDIM timestep
        spacing: the scheduler's own ``set_timesteps``)."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(num_inference_steps)
        timesteps = ddim.timesteps.long()
        ac = ddim.alphas_cumprod.double()
        prev = timesteps - ddim.config.num_train_timesteps // num_inference_steps
        alpha_bar = ac[timesteps]
        final = torch.as_tensor(ddim.final_alpha_cumprod, dtype=torch.float64)
        alpha_bar_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        sigma = eta * variance.clamp(min=0).sqrt()
        return cls(timesteps, alpha_bar, alpha_bar_prev, sigma, float(eta), ddim.config.prediction_type)

    @property
    def eps_coef(self) -> torch.Tensor:
        """``c_t``: the coefficient of ε in the step mean (METHOD.md, chain KL)."""
        ab, abp, s = self.alpha_bar, self.alpha_bar_prev, self.sigma
        return (1 - abp - s**2).clamp(min=0).sqrt() - abp.sqrt() * (1 - ab).sqrt() / ab.sqrt()

    @property
    def output_coef(self) -> torch.Tensor:
        """The coefficient of the chain's prediction (here ε) in the step mean: ``eps_coef``."""
        return self.eps_coef

    def to_epsilon(self, i: int, x_t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """Convert a UNet output (ε or v prediction) to ε."""
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            ab = float(self.alpha_bar[i])
            return ab**0.5 * model_output + (1 - ab) ** 0.5 * x_t
        raise ValueError(f"prediction_type {self.prediction_type!r} is not supported; use epsilon or v_prediction")

    def prediction(self, i: int, x_t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The chain's prediction variable (ε) of a model output: :meth:`to_epsilon`."""
        return self.to_epsilon(i, x_t, model_output)

    def step_mean(self, i: int, x_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab, abp, s = float(self.alpha_bar[i]), float(self.alpha_bar_prev[i]), float(self.sigma[i])
        x0 = (x_t - (1 - ab) ** 0.5 * eps) / ab**0.5
        return abp**0.5 * x0 + max(1 - abp - s**2, 0.0) ** 0.5 * eps


@dataclass(frozen=True)
class FlowSDEChain(GaussianChain):
    """The SDE form of a rectified-flow ODE (METHOD.md §4), as Flow-GRPO
    samples it (Liu et al. 2025, arXiv 2505.05470, eq. 9-12; their
    ``sd3_sde_with_logprob.py``). The flow interpolates ``x_s = (1−s)·x_0 + s·ε`` and the
    transformer predicts the velocity ``v = ε − x_0``. Per step ``i`` from flow time
    ``s = flow_sigma[i]`` to ``s' = flow_sigma_prev[i]`` (``dt = s' − s < 0``), with noise
    level ``a`` (= ``eta``) and ``g = a·sqrt(s/(1−s))`` (``s = 1`` replaced by the second
    time in the denominator, as Flow-GRPO does):

        mean_i = x·(1 + g²·dt/(2s)) + v·(1 + g²·(1−s)/(2s))·dt,   σ_i = g·sqrt(−dt),

    ``x' = mean_i + σ_i·z``. ``a = 0`` is the deterministic Euler step of the ODE
    ``x' = x + v·dt`` (what diffusers' ``FlowMatchEulerDiscreteScheduler`` does). The SDE
    has the ODE's marginals for any ``a``, so every step is Gaussian with a std shared by
    any two models on the same path, and the chain KL is exact per step.
    ``timesteps`` are the transformer's timestep inputs (``1000·s``)."""

    timesteps: torch.Tensor  # (T,) float, descending: 1000·s
    flow_sigma: torch.Tensor  # s of each step, (T,) float64
    flow_sigma_prev: torch.Tensor  # s' of each step (0 at the last)
    sigma: torch.Tensor  # σ_i, the step's noise std
    eta: float  # the noise level a
    prediction_type: str = "flow_velocity"

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int, eta: float, mu: float | None = None,
                       sigmas=None) -> "FlowSDEChain":
        """Build from a diffusers flow-matching scheduler config (its own ``set_timesteps``,
        so the pipeline's time ``shift`` is kept). A scheduler with resolution-dependent
        (dynamic) shifting (FLUX) needs the pipeline's ``mu`` (and, as ``FluxPipeline``
        passes them, its unshifted ``sigmas``): ``set_timesteps(sigmas=sigmas, mu=mu)``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        flow = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        if flow.config.get("use_dynamic_shifting", False) and mu is None:
            raise ValueError(
                "this flow scheduler uses resolution-dependent (dynamic) time shifting: its chain needs the "
                "pipeline's mu (the FLUX family computes it from the latent size); SD3 / SD3.5 use a fixed shift"
            )
        if sigmas is not None:
            flow.set_timesteps(sigmas=sigmas, mu=mu)
            if len(flow.timesteps) != num_inference_steps:
                raise ValueError(f"flow scheduler: {len(flow.timesteps)} sigmas given for {num_inference_steps} steps")
        elif mu is not None:
            flow.set_timesteps(num_inference_steps, mu=mu)
        else:
            flow.set_timesteps(num_inference_steps)
        sigmas = flow.sigmas.double()
        s, s_prev = sigmas[:-1], sigmas[1:]
        if not bool((s_prev < s).all()):
            raise ValueError("flow scheduler: its sigmas must decrease strictly")
        sigma_max = float(sigmas[1]) if len(sigmas) > 1 else 0.0
        g = eta * (s / (1 - torch.where(s >= 1, torch.full_like(s, sigma_max), s))).sqrt()
        std = g * (s - s_prev).sqrt()
        return cls(flow.timesteps.float(), s, s_prev, std, float(eta))

    @property
    def _g(self) -> torch.Tensor:
        s = self.flow_sigma
        return self.sigma / (s - self.flow_sigma_prev).sqrt()

    @property
    def output_coef(self) -> torch.Tensor:
        """``c_i = (1 + g²(1−s)/(2s))·dt``: the coefficient of the velocity in the step mean
        (negative: time runs from 1 to 0)."""
        s, dt, g = self.flow_sigma, self.flow_sigma_prev - self.flow_sigma, self._g
        return (1 + g**2 * (1 - s) / (2 * s)) * dt

    @property
    def state_coef(self) -> torch.Tensor:
        """``1 + g²·dt/(2s)``: the coefficient of x in the step mean."""
        s, dt, g = self.flow_sigma, self.flow_sigma_prev - self.flow_sigma, self._g
        return 1 + g**2 * dt / (2 * s)

    def prediction(self, i: int, x_t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The transformer's output is the velocity itself."""
        return model_output

    def step_mean(self, i: int, x_t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return float(self.state_coef[i]) * x_t + float(self.output_coef[i]) * v

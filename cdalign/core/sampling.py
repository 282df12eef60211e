"""The one sampler of cdalign: training, evaluation and composition all sample here.

Predictions come from a *predictor*: any callable ``(x_t, t) -> ε̃`` (or the velocity ṽ of
a flow model), (B,C,h,w), e.g. :class:`GuidedDenoiser` (classifier-free guidance on one
UNet or transformer) or a weighted sum of several predictors (composition). A *chain*
holds one family's step math (:mod:`cdalign.core.chains`): ``DDIMChain`` (SD 1.x/2.x, ε or v
prediction) and ``FlowSDEChain`` (rectified-flow transformers such as SD3, velocity prediction, the
SDE form of the flow ODE). Both are Gaussian per step, ``x' = mean + σ_i·z``, with the
prediction entering the mean through a coefficient ``c_i`` (:attr:`output_coef`), which is
what the chain KL (``cdalign.core.kl``) and the step log-probability need.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from cdalign.core.chains import GaussianChain, Predictor
from cdalign.core.families import Conditioning, ModelFamily, family_of, family_of_denoiser


class Trajectory:
    """What a sampling pass records for a policy-gradient update: the states
    ``states[i]`` = x at step i's input (x_T first, x_0 last, T + 1 tensors (B,C,h,w),
    detached) and ``log_probs[i]`` = ``log π(states[i+1] | states[i])`` (B,) under the
    sampling model, detached (NaN for a deterministic step)."""

    def __init__(self):
        self.states: list[torch.Tensor] = []
        self.log_probs: list[torch.Tensor] = []

    def record(self, chain, i: int, x_t: torch.Tensor, eps: torch.Tensor, x_prev: torch.Tensor) -> None:
        if not self.states:
            self.states.append(x_t.detach())
        self.states.append(x_prev.detach())
        if float(chain.sigma[i]) > 0:
            self.log_probs.append(chain.log_prob(i, x_t, eps, x_prev).detach())
        else:
            self.log_probs.append(torch.full((x_t.shape[0],), float("nan"), device=x_t.device))

def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``ε̃ = ε_u + w(ε_c − ε_u)`` (METHOD.md §1) of an unconditional and a conditional
    denoiser output of the same shape; w = 1 is the conditional output, w > 1 extrapolates past it.
    The one guidance formula: :class:`GuidedDenoiser` and the composition components use it."""
    return uncond + guidance_scale * (cond - uncond)


class GuidedDenoiser:
    """Classifier-free guided prediction ``ε̃ = ε_u + w(ε_c − ε_u)`` (or ṽ for a flow model)
    of one denoiser (UNet or transformer).

    ``cond``/``uncond``: :class:`Conditioning` (a bare (B, L, D) tensor is taken as a UNet's
    embeddings). With ``guidance_scale <= 1`` only the conditional branch runs. The output
    is the chain's prediction variable (``chain.prediction``). ``family``: how the
    denoiser is called (default: found from its class)."""

    def __init__(self, model, chain, cond, uncond, guidance_scale: float, family: ModelFamily | None = None):
        self.model, self.chain = model, chain
        self.family = family or family_of_denoiser(model)
        as_cond = lambda c: c if (c is None or isinstance(c, Conditioning)) else Conditioning(c)  # noqa: E731
        cond, uncond = as_cond(cond), as_cond(uncond)
        self.guidance_scale = guidance_scale
        self.use_cfg = guidance_scale > 1.0 and uncond is not None
        self.cond = Conditioning.cat([uncond, cond]) if self.use_cfg else cond

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x_t, x_t]) if self.use_cfg else x_t
        dtype = next(self.model.parameters()).dtype
        out = self.family.forward(self.model, x_in.to(dtype), t, self.cond.to(dtype)).to(x_t.dtype)
        if self.use_cfg:
            out_u, out_c = out.chunk(2)
            out = classifier_free_guidance(out_u, out_c, self.guidance_scale)
        return self.chain.prediction(self.chain.index_of(t), x_t, out)


StepHook = Callable[[int, torch.Tensor, torch.Tensor, bool], None]


def sample_latents(
    predictor: Predictor,
    chain: GaussianChain,
    latents: torch.Tensor,
    noise: torch.Tensor | None,
    grad_steps: Iterable[int] = (),
    gradient_checkpointing: bool = False,
    on_step: StepHook | None = None,
    trajectory: Trajectory | None = None,
    local_grad_steps: Iterable[int] = (),
) -> torch.Tensor:
    """Run ``chain`` (any :class:`~cdalign.core.chains.GaussianChain`: DDIM, the flow SDE) from
    ``latents`` (x_T, (B,C,h,w)) and return x_0.

    ``noise``: (T, B, C, h, w) step noises (None: deterministic steps). Gradient flows only
    through the step indices in ``grad_steps`` (and anything after them); predictions at
    other steps run under ``no_grad`` with their input detached. ``local_grad_steps``: steps
    whose prediction carries gradient to the model's weights at the detached state, for
    ``on_step`` alone (the chain continues from the detached prediction: a per-step term such
    as the chain KL at a fixed state). ``on_step(i, x_t, eps, tracked)`` is called after each
    prediction (e.g. to add a chain-KL term); ``tracked``: eps carries gradient.
    ``trajectory``: records every state and step log-probability (policy gradient)."""
    grad_steps, local_grad_steps = set(grad_steps), set(local_grad_steps)
    x = latents
    for i, t in enumerate(chain.timesteps):
        tracked = i in grad_steps and torch.is_grad_enabled()
        local = not tracked and i in local_grad_steps and torch.is_grad_enabled()
        if not tracked:
            x = x.detach()
        with torch.set_grad_enabled(tracked or local):
            if (tracked or local) and gradient_checkpointing:
                eps = _checkpoint(predictor, x, t, use_reentrant=False)
            else:
                eps = predictor(x, t)
            if on_step is not None:
                on_step(i, x, eps, tracked or local)
            if local:
                eps = eps.detach()
            x_prev = chain.step(i, x, eps, None if noise is None else noise[i].to(x))
            if trajectory is not None:
                trajectory.record(chain, i, x, eps, x_prev)
            x = x_prev
    return x


def vae_scaling(vae) -> float:
    """The factor between the VAE's latents and the diffusion model's (SD 1.x: 0.18215)."""
    return getattr(vae.config, "scaling_factor", 0.18215)


def vae_shift(vae) -> float:
    """The VAE latents' shift (SD3: 0.0609; SD 1.x has none: 0)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to images in [0, 1], (B,3,H,W), differentiable: the VAE sees
    ``latents / scaling + shift``."""
    dtype = next(vae.parameters()).dtype
    images = vae.decode((latents / vae_scaling(vae) + vae_shift(vae)).to(dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Diffusion latents (B,C,h,w) of images (B,3,H,W) in [-1, 1]: ``(posterior mean −
    shift) × scaling`` (the inverse of :func:`decode_latents` up to the VAE's error)."""
    dtype = next(vae.parameters()).dtype
    return (vae.encode(images.to(dtype)).latent_dist.mean - vae_shift(vae)) * vae_scaling(vae)


def initial_noise(seeds: list[int], latent_shape: tuple[int, int, int], num_steps: int, dtype=torch.float32):
    """x_T and the per-step noises of one image per seed, drawn on the CPU, so that a seed
    gives the same image on every device, batch size and process count.
    Returns (x_T (B,C,h,w), noise (T,B,C,h,w))."""
    x_T, noise = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        x_T.append(torch.randn(latent_shape, generator=g, dtype=dtype))
        noise.append(torch.randn((num_steps, *latent_shape), generator=g, dtype=dtype))
    return torch.stack(x_T), torch.stack(noise, dim=1)


class DiffusionSampler:
    """Samples images from a diffusers pipeline's components with a chosen predictor.
    Training, evaluation and composition share this object.

    The pipeline's :class:`~cdalign.core.families.ModelFamily` (by its class) picks the
    chain (DDIM for SD 1.x/2.x and SDXL UNets, the flow SDE for SD3 and FLUX transformers), the
    text encoding and its added conditioning (SDXL's time ids), the guidance (CFG, or
    FLUX.1-dev's guidance embedding) and the denoiser call.
    ``eta``: the chain's stochasticity (DDIM η, or the flow SDE's noise level a).
    ``resolution``: image side in pixels (None: the family's default latent size × VAE
    factor: the denoiser's sample size (SDXL: 128, 1024 px), or 128 for FLUX, 1024 px)."""

    def __init__(self, pipe, num_inference_steps: int, eta: float, guidance_scale: float, resolution: int | None, device):
        self.pipe, self.device = pipe, torch.device(device)
        self.family = family_of(pipe)
        self.denoiser, self.vae = self.family.denoiser_of(pipe), pipe.vae
        self.guidance_scale = guidance_scale
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = resolution or self.family.default_latent_size(self.denoiser) * factor
        multiple = factor * self.family.patch(self.denoiser)
        if side % multiple:
            raise ValueError(f"resolution={side} must be a multiple of {multiple} (VAE factor {factor}"
                             + (f" x patch size {multiple // factor})" if multiple != factor else ")"))
        self.resolution = side
        self.latent_shape = (self.family.latent_channels(self.denoiser, self.vae), side // factor, side // factor)
        # the chain after the latent shape: FLUX's time shift depends on the resolution
        self.chain = self.family.chain(pipe.scheduler, num_inference_steps, eta, self.latent_shape)
        self._uncond_cache: Conditioning | None = None

    def settings(self) -> dict:
        return {
            "num_inference_steps": len(self.chain),
            "eta": self.chain.eta,
            "guidance_scale": self.guidance_scale,
            "resolution": self.resolution,
        }

    @property
    def uses_cfg(self) -> bool:
        """Whether predictions use classifier-free guidance (an unconditional pass): the
        family guides that way (not the guidance-distilled FLUX) and ``guidance_scale > 1``."""
        return self.family.cfg and self.guidance_scale > 1.0

    @property
    def guidance_embedded(self) -> bool:
        """Whether the denoiser takes the guidance scale as an input (FLUX.1-dev's
        ``guidance_embeds``) instead of guiding by CFG."""
        return bool(getattr(self.denoiser.config, "guidance_embeds", False))

    def _complete(self, cond: Conditioning, guidance_scale: float | None) -> Conditioning:
        """``cond`` with what the family adds for this sampler's resolution (SDXL's time ids)
        and, for a guidance-distilled denoiser, ``guidance_scale`` (default: the sampler's) on every row."""
        cond = self.family.added_conditioning(self.pipe, cond, self.resolution)
        if self.guidance_embedded:
            cond = cond.with_guidance(self.guidance_scale if guidance_scale is None else guidance_scale)
        return cond

    def encode(self, prompts: list[str], guidance_scale: float | None = None) -> Conditioning:
        """The conditioning of ``prompts`` (one row each): the family's text encoding, its
        added conditioning (SDXL's time ids of this resolution) and, for a guidance-distilled
        denoiser, ``guidance_scale`` (default: the sampler's) on every row."""
        return self._complete(self.family.encode(self.pipe, list(prompts), self.device), guidance_scale)

    def uncond(self, n: int) -> Conditioning:
        """The unconditional branch's conditioning (cached), broadcast to ``n`` rows: the empty
        prompt's, or zeros where the pipeline says so (SDXL's ``force_zeros_for_empty_prompt``)."""
        if self._uncond_cache is None:
            self._uncond_cache = self._complete(self.family.encode_unconditional(self.pipe, self.device), None)
        return self._uncond_cache.expand(n)

    def guided(self, prompts: list[str], guidance_scale: float | None = None) -> GuidedDenoiser:
        """The guided predictor of the pipeline's denoiser (with whatever adapters are
        active): CFG for SD / SD3, the guidance embedding for FLUX.1-dev (no unconditional pass)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        cond = self.encode(prompts, scale)
        uncond = self.uncond(len(prompts)) if self.family.cfg else None
        return GuidedDenoiser(self.denoiser, self.chain, cond, uncond, scale, self.family)

    def sample(
        self,
        predictor: Predictor,
        seeds: list[int],
        grad_steps: Iterable[int] = (),
        gradient_checkpointing: bool = False,
        on_step: StepHook | None = None,
        decode: bool = True,
        trajectory: Trajectory | None = None,
        local_grad_steps: Iterable[int] = (),
    ) -> torch.Tensor:
        """Images (B,3,H,W) in [0,1] (or x_0 latents when ``decode=False``) for one seed each.
        Gradient flows through ``grad_steps`` and, if any, the VAE decode; ``local_grad_steps``
        see :func:`sample_latents`. ``trajectory`` records the states and step
        log-probabilities (see :class:`Trajectory`)."""
        x_T, noise = initial_noise(seeds, self.latent_shape, len(self.chain))
        x_T, noise = x_T.to(self.device), noise.to(self.device)
        latents = sample_latents(
            predictor, self.chain, x_T, noise, grad_steps, gradient_checkpointing, on_step, trajectory=trajectory,
            local_grad_steps=local_grad_steps,
        )
        if not decode:
            return latents
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(set(grad_steps))):
            return decode_latents(self.vae, latents)

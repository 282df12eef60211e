"""The one DDIM sampler of cdalign: training, evaluation and composition all sample here.

Noise predictions come from a *predictor*: any callable ``(x_t, t) -> ε̃`` (B,4,h,w), e.g.
:class:`GuidedUNet` (classifier-free guidance on one UNet) or a weighted sum of several
predictors (composition). The DDIM step math lives in :class:`DDIMChain`, including the
coefficient ``c_t`` of ε in the step mean that the chain KL (``cdalign.core.kl``) needs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint


class Predictor(Protocol):
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class DDIMChain:
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

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def eps_coef(self) -> torch.Tensor:
        """``c_t``: the coefficient of ε in the step mean (METHOD.md, chain KL)."""
        ab, abp, s = self.alpha_bar, self.alpha_bar_prev, self.sigma
        return (1 - abp - s**2).clamp(min=0).sqrt() - abp.sqrt() * (1 - ab).sqrt() / ab.sqrt()

    def to_epsilon(self, i: int, x_t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """Convert a UNet output (ε or v prediction) to ε."""
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            ab = float(self.alpha_bar[i])
            return ab**0.5 * model_output + (1 - ab) ** 0.5 * x_t
        raise ValueError(f"prediction_type {self.prediction_type!r} is not supported; use epsilon or v_prediction")

    def step_mean(self, i: int, x_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab, abp, s = float(self.alpha_bar[i]), float(self.alpha_bar_prev[i]), float(self.sigma[i])
        x0 = (x_t - (1 - ab) ** 0.5 * eps) / ab**0.5
        return abp**0.5 * x0 + max(1 - abp - s**2, 0.0) ** 0.5 * eps

    def step(self, i: int, x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        mean = self.step_mean(i, x_t, eps)
        s = float(self.sigma[i])
        return mean if (s == 0.0 or noise is None) else mean + s * noise

    def log_prob(self, i: int, x_t: torch.Tensor, eps: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """``log π(x_{t'} | x_t)`` (B,) of step ``i`` as a policy (METHOD.md §3): the density
        of ``N(mean_i(x_t, ε), σ_i² I)`` at ``x_prev``, summed over latent elements,
        ``−‖x_prev − mean‖²/(2σ²) − D·log σ − (D/2)·log 2π``. Differentiable in ``eps``
        (and so in the weights that predicted it); refuses a deterministic step (σ_i = 0)."""
        s = float(self.sigma[i])
        if s == 0.0:
            raise ValueError(f"DDIM step {i} is deterministic (sigma = 0, eta = {self.eta}); it has no log-probability")
        mean = self.step_mean(i, x_t, eps)
        dtype = torch.float64 if mean.dtype == torch.float64 else torch.float32  # float32 at least
        diff = (x_prev.detach().to(dtype) - mean.to(dtype)).flatten(1)
        d = diff.shape[1]
        return -diff.pow(2).sum(1) / (2 * s * s) - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)


class Trajectory:
    """What a sampling pass records for a policy-gradient update: the states
    ``states[i]`` = x at step i's input (x_T first, x_0 last, T + 1 tensors (B,C,h,w),
    detached) and ``log_probs[i]`` = ``log π(states[i+1] | states[i])`` (B,) under the
    sampling model, detached (NaN for a deterministic step)."""

    def __init__(self):
        self.states: list[torch.Tensor] = []
        self.log_probs: list[torch.Tensor] = []

    def record(self, chain: DDIMChain, i: int, x_t: torch.Tensor, eps: torch.Tensor, x_prev: torch.Tensor) -> None:
        if not self.states:
            self.states.append(x_t.detach())
        self.states.append(x_prev.detach())
        if float(chain.sigma[i]) > 0:
            self.log_probs.append(chain.log_prob(i, x_t, eps, x_prev).detach())
        else:
            self.log_probs.append(torch.full((x_t.shape[0],), float("nan"), device=x_t.device))

def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``ε̃ = ε_u + w(ε_c − ε_u)`` (METHOD.md §1) of an unconditional and a conditional UNet
    output of the same shape; w = 1 is the conditional output, w > 1 extrapolates past it.
    The one guidance formula: :class:`GuidedUNet` and the composition components use it."""
    return uncond + guidance_scale * (cond - uncond)


class GuidedUNet:
    """Classifier-free guided noise prediction ``ε̃ = ε_u + w(ε_c − ε_u)`` of one UNet.

    ``cond``/``uncond``: text embeddings (B, L, D). With ``guidance_scale <= 1`` only the
    conditional branch runs. Output is converted to ε with ``chain.to_epsilon``."""

    def __init__(self, unet, chain: DDIMChain, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float):
        self.unet, self.chain = unet, chain
        self.guidance_scale = guidance_scale
        self.use_cfg = guidance_scale > 1.0 and uncond is not None
        self.embeds = torch.cat([uncond, cond]) if self.use_cfg else cond
        self._index = {int(t): i for i, t in enumerate(chain.timesteps)}

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x_t, x_t]) if self.use_cfg else x_t
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(x_in.to(dtype), t, encoder_hidden_states=self.embeds.to(dtype)).sample.to(x_t.dtype)
        if self.use_cfg:
            out_u, out_c = out.chunk(2)
            out = classifier_free_guidance(out_u, out_c, self.guidance_scale)
        return self.chain.to_epsilon(self._index[int(t)], x_t, out)


def _tuner_layers(module):
    """The peft tuner layers (LoRA-wrapped linears and convolutions) inside ``module``, lazily."""
    # peft is imported here, not at the top: the math core imports torch only.
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in module.modules() if isinstance(m, BaseTunerLayer))


def _first_lora_layer(unet):
    """A peft tuner layer of ``unet`` (all share the adapter state set by UNet-level calls)."""
    return next(_tuner_layers(unet), None)


def adapter_parameters(module, adapter: str | None = None) -> list[torch.nn.Parameter]:
    """The parameters of adapter ``adapter`` (None: of every adapter) on ``module``, found
    structurally (the adapter's own sub-modules of each peft tuner layer, e.g. ``lora_A``
    and ``lora_B``), never by matching parameter names. In ``named_parameters`` order;
    empty for a module without adapters. Everything else is the base model."""
    ids = set()
    for layer in _tuner_layers(module):
        for attr in layer.adapter_layer_names:  # peft: the per-adapter dicts holding trainable weights
            holder = getattr(layer, attr)  # ModuleDict or ParameterDict keyed by adapter name
            for name in holder.keys() if adapter is None else [adapter]:
                if name in holder:
                    part = holder[name]
                    ids.update(map(id, part.parameters() if isinstance(part, torch.nn.Module) else [part]))
    return [p for p in module.parameters() if id(p) in ids]


def set_unet_state(unet, adapter: str | None) -> None:
    """Activate ``adapter`` alone on ``unet`` (None: all adapters off, the base model).
    A switch walks every module (~10% of a tiny UNet call), so an unchanged state is kept."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        if adapter is not None:
            raise ValueError(f"adapter {adapter!r} is not loaded on this UNet (it has no adapters)")
        return
    layer = _first_lora_layer(unet)
    if adapter is None:
        if layer is None or not layer.disable_adapters:
            unet.disable_adapters()
        return
    if adapter not in unet.peft_config:
        raise ValueError(f"adapter {adapter!r} is not loaded; loaded adapters: {', '.join(unet.peft_config)}")
    if layer is not None and not layer.disable_adapters and list(layer.active_adapters) == [adapter]:
        return
    unet.enable_adapters()
    unet.set_adapters([adapter])


@contextlib.contextmanager
def adapters_disabled(unet):
    """Base-model predictions from the *same* UNet: the LoRA adapters are switched off
    inside the block (never a second UNet copy in memory), and back on after it."""
    has_adapters = getattr(unet, "_hf_peft_config_loaded", False)
    layer = _first_lora_layer(unet) if has_adapters else None
    switch = layer is not None and not layer.disable_adapters
    if switch:
        unet.disable_adapters()
    try:
        yield unet
    finally:
        if switch:
            unet.enable_adapters()


class WithAdaptersDisabled:
    """Wrap a predictor so that it runs with its UNet's adapters disabled."""

    def __init__(self, predictor: GuidedUNet):
        self.predictor = predictor

    def __call__(self, x_t, t):
        with adapters_disabled(self.predictor.unet):
            return self.predictor(x_t, t)


StepHook = Callable[[int, torch.Tensor, torch.Tensor, bool], None]


def sample_latents(
    predictor: Predictor,
    chain: DDIMChain,
    latents: torch.Tensor,
    noise: torch.Tensor | None,
    grad_steps: Iterable[int] = (),
    gradient_checkpointing: bool = False,
    on_step: StepHook | None = None,
    trajectory: Trajectory | None = None,
) -> torch.Tensor:
    """Run the DDIM chain from ``latents`` (x_T, (B,4,h,w)) and return x_0.

    ``noise``: (T, B, 4, h, w) step noises (None: deterministic steps). Gradient flows only
    through the step indices in ``grad_steps`` (and anything after them); predictions at
    other steps run under ``no_grad`` with their input detached. ``on_step(i, x_t, eps,
    tracked)`` is called after each prediction (e.g. to add a chain-KL term).
    ``trajectory``: records every state and step log-probability (policy gradient)."""
    grad_steps = set(grad_steps)
    x = latents
    for i, t in enumerate(chain.timesteps):
        tracked = i in grad_steps and torch.is_grad_enabled()
        if not tracked:
            x = x.detach()
        with torch.set_grad_enabled(tracked):
            if tracked and gradient_checkpointing:
                eps = _checkpoint(predictor, x, t, use_reentrant=False)
            else:
                eps = predictor(x, t)
            if on_step is not None:
                on_step(i, x, eps, tracked)
            x_prev = chain.step(i, x, eps, None if noise is None else noise[i].to(x))
            if trajectory is not None:
                trajectory.record(chain, i, x, eps, x_prev)
            x = x_prev
    return x


def vae_scaling(vae) -> float:
    """The factor between the VAE's latents and the diffusion model's (SD 1.x: 0.18215)."""
    return getattr(vae.config, "scaling_factor", 0.18215)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to images in [0, 1], (B,3,H,W), differentiable."""
    dtype = next(vae.parameters()).dtype
    images = vae.decode((latents / vae_scaling(vae)).to(dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Diffusion latents (B,4,h,w) of images (B,3,H,W) in [-1, 1]: the VAE posterior mean
    times :func:`vae_scaling` (the inverse of :func:`decode_latents` up to the VAE's error)."""
    dtype = next(vae.parameters()).dtype
    return vae.encode(images.to(dtype)).latent_dist.mean * vae_scaling(vae)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """CLIP text embeddings (B, L, D) of ``prompts`` (padded to the tokenizer's max length)."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return text_encoder(ids)[0]


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
    """Samples images from a Stable Diffusion pipeline's components with a chosen
    predictor. Training, evaluation and composition share this object.

    ``resolution``: image side in pixels (None: the UNet's sample size × VAE factor)."""

    def __init__(self, pipe, num_inference_steps: int, eta: float, guidance_scale: float, resolution: int | None, device):
        self.pipe, self.device = pipe, torch.device(device)
        self.unet, self.vae = pipe.unet, pipe.vae
        self.guidance_scale = guidance_scale
        self.chain = DDIMChain.from_scheduler(pipe.scheduler, num_inference_steps, eta)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = resolution or self.unet.config.sample_size * factor
        if side % factor:
            raise ValueError(f"resolution={side} must be a multiple of the VAE factor {factor}")
        self.resolution = side
        self.latent_shape = (self.unet.config.in_channels, side // factor, side // factor)
        self._uncond_cache: torch.Tensor | None = None

    def settings(self) -> dict:
        return {
            "num_inference_steps": len(self.chain),
            "eta": self.chain.eta,
            "guidance_scale": self.guidance_scale,
            "resolution": self.resolution,
        }

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts, self.device)

    def guided(self, prompts: list[str], guidance_scale: float | None = None) -> GuidedUNet:
        """The CFG predictor of the pipeline's UNet (with whatever adapters are active)."""
        if self._uncond_cache is None:
            self._uncond_cache = self.encode([""])
        cond = self.encode(prompts)
        uncond = self._uncond_cache.expand(len(prompts), -1, -1)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return GuidedUNet(self.unet, self.chain, cond, uncond, scale)

    def sample(
        self,
        predictor: Predictor,
        seeds: list[int],
        grad_steps: Iterable[int] = (),
        gradient_checkpointing: bool = False,
        on_step: StepHook | None = None,
        decode: bool = True,
        trajectory: Trajectory | None = None,
    ) -> torch.Tensor:
        """Images (B,3,H,W) in [0,1] (or x_0 latents when ``decode=False``) for one seed each.
        Gradient flows through ``grad_steps`` and, if any, the VAE decode. ``trajectory``
        records the states and step log-probabilities (see :class:`Trajectory`)."""
        x_T, noise = initial_noise(seeds, self.latent_shape, len(self.chain))
        x_T, noise = x_T.to(self.device), noise.to(self.device)
        latents = sample_latents(
            predictor, self.chain, x_T, noise, grad_steps, gradient_checkpointing, on_step, trajectory=trajectory
        )
        if not decode:
            return latents
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(set(grad_steps))):
            return decode_latents(self.vae, latents)

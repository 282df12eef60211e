"""Model families: how cdalign drives each kind of diffusers pipeline.

One :class:`ModelFamily` per denoiser architecture says which pipeline attribute holds the
denoiser (``unet`` or ``transformer``), which chain samples it (:mod:`cdalign.core.chains`),
how prompts become its conditioning, how it is called, which text encoders it has, how its
LoRA is saved so that ``pipe.load_lora_weights`` loads it, and which blocks FSDP2 wraps.
:data:`MODEL_FAMILIES` is keyed by the pipeline's class name; :func:`family_of` picks the
family of a loaded pipeline (or of a bare denoiser, :func:`family_of_denoiser`), and an
unsupported pipeline class fails with a message naming the supported ones.

Families:

- ``StableDiffusionPipeline`` (SD 1.x/2.x): ``UNet2DConditionModel``, :class:`DDIMChain`,
  one CLIP text encoder;
- ``StableDiffusionXLPipeline`` (SDXL base): the same :class:`DDIMChain` (the chain and its KL are
  SD's; only the conditioning differs) on SDXL's ``UNet2DConditionModel`` (``addition_embed_type
  "text_time"``), CLIP-L + OpenCLIP-bigG token states concatenated, the pooled projection of the
  second, and the added time ids (original size, crop top-left, target size) of the sampled
  resolution (:attr:`Conditioning.time_ids`, attached by :func:`_sdxl_time_ids`); the
  unconditional branch is zeros when the pipeline says ``force_zeros_for_empty_prompt``, as
  ``StableDiffusionXLPipeline`` does. The refiner (``StableDiffusionXLImg2ImgPipeline``, or an
  SDXL pipeline without ``text_encoder``) is refused (:data:`REFUSED_PIPELINES`);
- ``StableDiffusion3Pipeline`` (SD3 / SD3.5): ``SD3Transformer2DModel``, :class:`FlowSDEChain`
  (velocity), CLIP-L + CLIP-G (+ T5 when the pipeline has it) with pooled projections;
- ``FluxPipeline`` (FLUX.1-dev / -schnell): ``FluxTransformer2DModel`` on FLUX's packed 2x2-patch
  sequence (packing and unpacking happen inside :func:`_flux_forward`, so the chain, the KL and
  the composition see ordinary (B, C, h, w) latents), :class:`FlowSDEChain` with FLUX's
  resolution-dependent time shift, CLIP (pooled) + T5 (tokens). FLUX.1-dev is guidance-distilled:
  no classifier-free guidance (``cfg=False``, no unconditional pass); the guidance scale enters
  the transformer's ``guidance`` embedding instead (:attr:`Conditioning.guidance`).
- ``ZImagePipeline`` (Z-Image, Tongyi-MAI; Z-Image-Turbo): ``ZImageTransformer2DModel``, a
  single-stream DiT over image patches and the prompt's tokens, :class:`FlowSDEChain` with
  ``ZImagePipeline``'s schedule (the same sigmas and shift as FLUX), one Qwen3 text encoder whose
  second-to-last hidden states of the prompt's own tokens (a different count per prompt) condition
  it: kept padded with :attr:`Conditioning.mask`, unpadded in :func:`_zimage_forward`, which also
  maps the time as the pipeline does (``(1000 - t)/1000``) and negates the output (the
  transformer predicts ``-v``). Its CFG is ``pos + g(pos - neg)``: cdalign's guidance scale is
  ``g + 1`` (:attr:`ModelFamily.pipeline_guidance` converts back for the pipeline's own call).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from cdalign.console import quiet_libraries
from cdalign.core.chains import DDIMChain, FlowSDEChain
from cdalign.registry import Registry


@dataclass(frozen=True)
class Conditioning:
    """The text conditioning of a batch: token embeddings ``embeds`` (B, L, D), for
    families with pooled text projections (SDXL, SD3, FLUX) ``pooled`` (B, P), for a
    guidance-distilled model (FLUX.1-dev) the guidance scale of each row, ``guidance`` (B,),
    for SDXL the added time ids of each row, ``time_ids`` (B, 6), and for a family whose
    prompts have their own token counts (Z-Image) which of the padded tokens are real,
    ``mask`` (B, L) bool. Batch operations keep the parts aligned; ``to`` changes the dtype
    of floating parts only."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _parts(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _map(self, fn) -> "Conditioning":
        return Conditioning(**{k: None if v is None else fn(v) for k, v in self._parts().items()})

    def __getitem__(self, index) -> "Conditioning":
        return self._map(lambda t: t[index])

    def expand(self, n: int) -> "Conditioning":
        """A batch-1 conditioning broadcast to ``n`` rows (a view)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def repeat(self, n: int) -> "Conditioning":
        """The batch repeated ``n`` times (``[c, c, ...]``)."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def to(self, *args, **kwargs) -> "Conditioning":
        device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))

        def move(t):
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            return t if device is None else t.to(device)  # a mask stays bool

        return self._map(move)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        by_name = [p._parts() for p in parts]
        return Conditioning(**{k: None if v is None else torch.cat([b[k] for b in by_name])
                               for k, v in by_name[0].items()})

    def with_guidance(self, scale: float) -> "Conditioning":
        """The same conditioning with the guidance embedding input ``scale`` on every row
        (float32, as ``FluxPipeline`` passes it)."""
        g = torch.full((len(self),), float(scale), device=self.embeds.device, dtype=torch.float32)
        return replace(self, guidance=g)


def _unet_forward(model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    return model(x, t, encoder_hidden_states=cond.embeds).sample


def _sdxl_forward(model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """SDXL's UNet as ``StableDiffusionXLPipeline`` calls it: the token states, and as added
    conditioning the pooled text projection and the time ids."""
    if cond.pooled is None or cond.time_ids is None:
        raise ValueError("an SDXL UNet needs the pooled text projection and the added time ids in its conditioning "
                         "(DiffusionSampler.encode attaches them)")
    added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return model(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample


def _sd3_forward(model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    timestep = torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1).expand(x.shape[0])
    return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.embeds,
                 pooled_projections=cond.pooled).sample


def _flux_pipeline_cls():
    from diffusers import FluxPipeline

    return FluxPipeline


def _flux_forward(model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """``FluxTransformer2DModel`` on unpacked latents x (B, C, h, w), as ``FluxPipeline``'s
    denoising loop calls it: x packed into the (B, hw/4, 4C) sequence of 2x2 patches, image
    ids on the (h/2, w/2) grid, zero text ids, ``timestep / 1000``, the guidance embedding
    input when the model has one (FLUX.1-dev); the velocity unpacked back to (B, C, h, w)."""
    flux = _flux_pipeline_cls()
    b, c, h, w = x.shape
    packed = flux._pack_latents(x, b, c, h, w)
    img_ids = flux._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype)
    timestep = torch.as_tensor(t, device=x.device).reshape(-1).expand(b).to(x.dtype)
    guidance = None
    if model.config.guidance_embeds:
        if cond.guidance is None:
            raise ValueError("this FLUX transformer is guidance-distilled (guidance_embeds): its conditioning "
                             "needs a guidance scale per row (DiffusionSampler.encode attaches it)")
        guidance = cond.guidance.to(device=x.device, dtype=torch.float32)
    out = model(hidden_states=packed, timestep=timestep / 1000, guidance=guidance, pooled_projections=cond.pooled,
                encoder_hidden_states=cond.embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return flux._unpack_latents(out, h, w, 1)  # vae_scale_factor 1: h, w are latent sizes already


@torch.no_grad()
def _clip_encode(pipe, prompts: list[str], device) -> Conditioning:
    tok = pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    return Conditioning(pipe.text_encoder(ids)[0])


@torch.no_grad()
def _sdxl_encode(pipe, prompts: list[str], device) -> Conditioning:
    """The pipeline's own ``encode_prompt``: the penultimate states of both CLIP encoders,
    concatenated (B, 77, 768 + 1280 for SDXL), and the second one's pooled projection, without
    its CFG doubling. The time ids come with the resolution (:func:`_sdxl_time_ids`)."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return Conditioning(embeds, pooled)


@torch.no_grad()
def _sdxl_unconditional(pipe, device) -> Conditioning:
    """The unconditional branch as ``StableDiffusionXLPipeline`` builds it without a negative
    prompt: zeros (token states and pooled) when its config says ``force_zeros_for_empty_prompt``
    (SDXL base does), else the empty prompt's encoding."""
    cond = _sdxl_encode(pipe, [""], device)
    if pipe.config.get("force_zeros_for_empty_prompt", True):
        cond = cond._map(torch.zeros_like)
    return cond


def _sdxl_time_ids(pipe, cond: Conditioning, resolution: int) -> Conditioning:
    """``cond`` with SDXL's added time ids on every row: ``(original h, w, crop top, left,
    target h, w)`` = ``(res, res, 0, 0, res, res)``, ``StableDiffusionXLPipeline``'s defaults for a
    square image of ``resolution`` px (its own ``_get_add_time_ids``, which checks that the UNet's
    added embedding has the width these ids and the pooled projection give)."""
    size = (int(resolution), int(resolution))
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.embeds.dtype,
                                 text_encoder_projection_dim=int(cond.pooled.shape[-1]))
    return replace(cond, time_ids=ids.to(cond.embeds.device).expand(len(cond), -1))


def _sdxl_refusal(pipe) -> str | None:
    """Why an SDXL pipeline cannot be aligned: the refiner's layout (no ``text_encoder``; its
    UNet conditioned on an aesthetic score instead of the crop and target size)."""
    if getattr(pipe, "text_encoder", None) is None:
        return ("it has no text_encoder: that is the SDXL refiner's layout (text_encoder_2 only, an aesthetic-score "
                "conditioned image-to-image UNet), which cdalign does not align; align the SDXL base "
                "(stabilityai/stable-diffusion-xl-base-1.0) and run the refiner on its outputs")
    unet = getattr(pipe, "unet", None)
    if unet is not None and not _is_text_time_unet(unet.config):
        return "its UNet has no text_time added embedding (addition_embed_type), so it is no SDXL base UNet"
    return None


def _is_text_time_unet(config) -> bool:
    return config.get("addition_embed_type") == "text_time"


def _no_added_conditioning(pipe, cond: Conditioning, resolution: int) -> Conditioning:
    return cond


@torch.no_grad()
def _sd3_encode(pipe, prompts: list[str], device) -> Conditioning:
    """The pipeline's own ``encode_prompt`` (CLIP-L and CLIP-G penultimate states, T5 or,
    without ``text_encoder_3``, zeros; pooled projections), without its CFG doubling."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False
    )
    return Conditioning(embeds, pooled)


@torch.no_grad()
def _flux_encode(pipe, prompts: list[str], device) -> Conditioning:
    """The pipeline's own ``encode_prompt``: T5 token states (512 tokens, FLUX's default)
    and CLIP's pooled output; the text ids it returns are zeros, rebuilt in the forward."""
    embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device)
    return Conditioning(embeds, pooled)


ZIMAGE_MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default max_sequence_length


@torch.no_grad()
def _zimage_encode(pipe, prompts: list[str], device) -> Conditioning:
    """The pipeline's own ``_encode_prompt`` (the chat template, the Qwen3 encoder's
    second-to-last hidden states of each prompt's real tokens), the per-prompt states padded
    back to (B, 512, D) with their ``mask``."""
    states = pipe._encode_prompt(prompt=list(prompts), device=device, max_sequence_length=ZIMAGE_MAX_SEQUENCE_LENGTH)
    embeds = states[0].new_zeros(len(states), ZIMAGE_MAX_SEQUENCE_LENGTH, states[0].shape[-1])
    mask = torch.zeros(len(states), ZIMAGE_MAX_SEQUENCE_LENGTH, dtype=torch.bool, device=embeds.device)
    for i, row in enumerate(states):
        embeds[i, : len(row)], mask[i, : len(row)] = row, True
    return Conditioning(embeds, mask=mask)


def _zimage_forward(model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """``ZImageTransformer2DModel`` as ``ZImagePipeline``'s loop calls it: one (C, 1, h, w)
    latent per row, the time ``(1000 - t)/1000``, each row's real prompt tokens; the velocity
    of the flow chain is minus its output."""
    if cond.mask is None:
        raise ValueError("a Z-Image transformer needs its conditioning's token mask (DiffusionSampler.encode makes it)")
    b = x.shape[0]
    timestep = (1000 - torch.as_tensor(t, device=x.device).reshape(-1).expand(b).to(x.dtype)) / 1000
    captions = [row[keep] for row, keep in zip(cond.embeds, cond.mask)]
    out = model(list(x.unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def _zimage_blocks(transformer) -> list[torch.nn.Module]:
    return [*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers]


def _flux_chain(scheduler, num_inference_steps: int, eta: float, latent_shape) -> FlowSDEChain:
    """FLUX's schedule exactly as ``FluxPipeline`` (and ``ZImagePipeline``) sets it: sigmas
    ``linspace(1, 1/n, n)`` (none with ``use_flow_sigmas``), shifted by ``mu =
    calculate_shift(image_seq_len)``, the number of 2x2 patches (h/2)(w/2), with the scheduler
    config's base/max shift and sequence lengths (a scheduler without dynamic shifting, as
    Z-Image-Turbo's, applies its fixed ``shift`` instead)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    _, h, w = latent_shape
    config = scheduler.config
    n = num_inference_steps
    sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
    mu = calculate_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256),
                         config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                         config.get("max_shift", 1.15))
    return FlowSDEChain.from_scheduler(scheduler, n, eta, mu=mu, sigmas=sigmas)


def _fixed_chain(from_scheduler):
    """A chain factory that does not depend on the resolution (DDIM, SD3's fixed shift)."""
    return lambda scheduler, num_inference_steps, eta, latent_shape: from_scheduler(scheduler, num_inference_steps, eta)


def _unet_blocks(unet) -> list[torch.nn.Module]:
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def _transformer_blocks(transformer) -> list[torch.nn.Module]:
    return list(transformer.transformer_blocks)


def _flux_blocks(transformer) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def _config_latent_channels(denoiser, vae) -> int:
    return denoiser.config.in_channels


def _config_patch(denoiser) -> int:
    return getattr(denoiser.config, "patch_size", 1)


def _config_sample_size(denoiser) -> int:
    return denoiser.config.sample_size


def _same_guidance(w):
    return w


@dataclass(frozen=True)
class ModelFamily:
    """How cdalign drives one pipeline class (see the module docstring)."""

    name: str  # short name for reports: "sd", "sd3"
    pipeline_class: str  # diffusers pipeline class name
    denoiser: str  # the pipeline attribute of the denoiser: "unet" / "transformer"
    denoiser_class: str  # its diffusers model class name
    chain: Callable  # (scheduler, num_inference_steps, eta, latent_shape (C, h, w)) -> chain
    forward: Callable  # (denoiser, x_t, t, Conditioning) -> raw model output
    encode: Callable  # (pipe, prompts, device) -> Conditioning
    text_encoders: tuple[str, ...]  # pipeline attributes of its text encoders (None ones skipped)
    lora_layers_kwarg: str  # save_lora_weights keyword of the denoiser's LoRA
    lora_metadata_kwarg: str  # and of its adapter config metadata
    convert_lora_state: bool  # convert peft keys to the old diffusers LoRA layout (UNet) before saving
    blocks: Callable  # denoiser -> the sub-modules FSDP2 shards one by one
    denoising_loss: bool  # the ε-DSM loss of the OR-composition (mixture) applies
    eta_meaning: str  # what the config's ``eta`` is for this family
    loadable_without: tuple[str, ...] = ()  # components a folder may lack (from_pretrained(..., name=None))
    cfg: bool = True  # classifier-free guidance (an unconditional pass) when guidance_scale > 1
    latent_channels: Callable = _config_latent_channels  # (denoiser, vae) -> C of the (C, h, w) latents
    patch: Callable = _config_patch  # denoiser -> latent patch side (the resolution is a multiple of VAE factor x it)
    default_latent_size: Callable = _config_sample_size  # denoiser -> latent side when no resolution is given
    # (pipe, Conditioning, resolution px) -> Conditioning with what depends on the resolution (SDXL's time ids)
    added_conditioning: Callable = _no_added_conditioning
    unconditional: Callable | None = None  # (pipe, device) -> the CFG branch's Conditioning (None: encode "")
    refusal: Callable | None = None  # pipe -> why this pipeline of the class cannot be used, or None
    denoiser_config: Callable | None = None  # denoiser config -> bool: tells families sharing a denoiser class apart
    load_kwargs: tuple[tuple[str, object], ...] = ()  # extra from_pretrained keywords (SD: no safety checker)
    pipeline_guidance: Callable = _same_guidance  # cdalign's guidance scale w -> the pipeline call's (Z-Image: w - 1)

    def denoiser_of(self, pipe):
        return getattr(pipe, self.denoiser)

    def owns_denoiser(self, model) -> bool:
        """``model`` is this family's denoiser: its class (or a base class) and, where families
        share a class (SD's and SDXL's UNet), its config."""
        if not any(cls.__name__ == self.denoiser_class for cls in type(model).__mro__):
            return False
        return self.denoiser_config is None or bool(self.denoiser_config(model.config))

    def encode_unconditional(self, pipe, device) -> Conditioning:
        """The unconditional (CFG) branch's conditioning, batch 1, without the added part."""
        if self.unconditional is not None:
            return self.unconditional(pipe, device)
        return self.encode(pipe, [""], device)

    def required_components(self) -> tuple[str, ...]:
        """The pipeline attributes a complete pipeline of this family has: the denoiser and every
        text encoder it may not lack (``loadable_without``)."""
        return (self.denoiser, *(n for n in self.text_encoders if n not in self.loadable_without))

    def text_encoder_modules(self, pipe) -> list[torch.nn.Module]:
        return [m for m in (getattr(pipe, n, None) for n in self.text_encoders) if m is not None]

    def absent_components(self, pipe) -> list[str]:
        """The optional-by-convention parts this pipeline was loaded without (an SD3 folder
        saved without T5: ``text_encoder_3``, ``tokenizer_3``), which diffusers'
        ``from_pretrained`` needs named as None to load it again."""
        return [n for n in self.loadable_without if getattr(pipe, n, None) is None]

    def modules(self, pipe) -> list[torch.nn.Module]:
        """Every network of ``pipe``: the denoiser, the VAE and the text encoders."""
        return [self.denoiser_of(pipe), pipe.vae, *self.text_encoder_modules(pipe)]

    def pipeline_type(self):
        """The diffusers pipeline class. Its first use imports the pipeline's module, which
        imports transformers' image processors: without torchvision, transformers says once
        that it falls back to the PIL ones, which is what cdalign uses anyway (it passes no
        feature extractor), so that import runs quietly."""
        import diffusers

        with quiet_libraries():
            return getattr(diffusers, self.pipeline_class)


MODEL_FAMILIES: Registry[ModelFamily] = Registry("pipeline class")
MODEL_FAMILIES.register("StableDiffusionPipeline", ModelFamily(
    name="sd", pipeline_class="StableDiffusionPipeline", denoiser="unet", denoiser_class="UNet2DConditionModel",
    chain=_fixed_chain(DDIMChain.from_scheduler), forward=_unet_forward, encode=_clip_encode, text_encoders=("text_encoder",),
    lora_layers_kwarg="unet_lora_layers", lora_metadata_kwarg="unet_lora_adapter_metadata", convert_lora_state=True,
    blocks=_unet_blocks, denoising_loss=True,
    eta_meaning="DDIM eta (0: deterministic DDIM, 1: DDPM-like)",
    denoiser_config=lambda config: not _is_text_time_unet(config),
    load_kwargs=(("safety_checker", None), ("requires_safety_checker", False)),
))
MODEL_FAMILIES.register("StableDiffusionXLPipeline", ModelFamily(
    name="sdxl", pipeline_class="StableDiffusionXLPipeline", denoiser="unet", denoiser_class="UNet2DConditionModel",
    chain=_fixed_chain(DDIMChain.from_scheduler), forward=_sdxl_forward, encode=_sdxl_encode,
    text_encoders=("text_encoder", "text_encoder_2"),
    lora_layers_kwarg="unet_lora_layers", lora_metadata_kwarg="unet_lora_adapter_metadata", convert_lora_state=True,
    blocks=_unet_blocks, denoising_loss=True,
    eta_meaning="DDIM eta (0: deterministic DDIM, 1: DDPM-like)",
    # default_latent_size: the UNet's sample_size (128: 1024 px with SDXL's 8x VAE), StableDiffusionXLPipeline's
    added_conditioning=_sdxl_time_ids, unconditional=_sdxl_unconditional, refusal=_sdxl_refusal,
    denoiser_config=_is_text_time_unet,
))
MODEL_FAMILIES.register("StableDiffusion3Pipeline", ModelFamily(
    name="sd3", pipeline_class="StableDiffusion3Pipeline", denoiser="transformer",
    denoiser_class="SD3Transformer2DModel", chain=_fixed_chain(FlowSDEChain.from_scheduler), forward=_sd3_forward,
    encode=_sd3_encode, text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    lora_layers_kwarg="transformer_lora_layers", lora_metadata_kwarg="transformer_lora_adapter_metadata",
    convert_lora_state=False, blocks=_transformer_blocks, denoising_loss=False,
    eta_meaning="the flow SDE's noise level a (0: the deterministic Euler ODE; Flow-GRPO uses 0.7)",
    loadable_without=("text_encoder_3", "tokenizer_3"),
))
MODEL_FAMILIES.register("FluxPipeline", ModelFamily(
    name="flux", pipeline_class="FluxPipeline", denoiser="transformer", denoiser_class="FluxTransformer2DModel",
    chain=_flux_chain, forward=_flux_forward, encode=_flux_encode, text_encoders=("text_encoder", "text_encoder_2"),
    lora_layers_kwarg="transformer_lora_layers", lora_metadata_kwarg="transformer_lora_adapter_metadata",
    convert_lora_state=False, blocks=_flux_blocks, denoising_loss=False,
    eta_meaning="the flow SDE's noise level a (0: the deterministic Euler ODE; Flow-GRPO uses 0.7)",
    cfg=False,  # FLUX.1 is guidance-distilled (dev: a guidance embedding; schnell: none)
    latent_channels=lambda denoiser, vae: denoiser.config.in_channels // 4,  # in_channels counts packed 2x2 patches
    patch=lambda denoiser: 2,  # the 2x2 packing
    default_latent_size=lambda denoiser: 128,  # FluxPipeline.default_sample_size: 1024 px with the 8x VAE
))
MODEL_FAMILIES.register("ZImagePipeline", ModelFamily(
    name="zimage", pipeline_class="ZImagePipeline", denoiser="transformer", denoiser_class="ZImageTransformer2DModel",
    chain=_flux_chain, forward=_zimage_forward, encode=_zimage_encode, text_encoders=("text_encoder",),
    lora_layers_kwarg="transformer_lora_layers", lora_metadata_kwarg="transformer_lora_adapter_metadata",
    convert_lora_state=False, blocks=_zimage_blocks, denoising_loss=False,
    eta_meaning="the flow SDE's noise level a (0: the deterministic Euler ODE; Flow-GRPO uses 0.7)",
    patch=lambda denoiser: denoiser.config.all_patch_size[0],
    default_latent_size=lambda denoiser: 128,  # ZImagePipeline's 1024 px default with the 8x VAE
    pipeline_guidance=lambda w: float(w) - 1.0,  # its CFG is pos + g(pos - neg): g = w - 1
))


# Pipeline classes refused with a reason of their own (beside "not one of the supported ones").
REFUSED_PIPELINES: dict[str, str] = {
    "StableDiffusionXLImg2ImgPipeline": (
        "the SDXL refiner's class (image-to-image: it refines a base model's latents, its UNet conditioned on an "
        "aesthetic score, the refiner without a text_encoder); cdalign aligns text-to-image base models: align the "
        "SDXL base (StableDiffusionXLPipeline, stabilityai/stable-diffusion-xl-base-1.0) and run the refiner on its "
        "outputs"
    ),
}


def supported_pipelines() -> str:
    return ", ".join(MODEL_FAMILIES.names())


def unsupported_class_message(class_name: str) -> str:
    """Why pipeline class ``class_name`` is not supported: its own reason where it has one
    (:data:`REFUSED_PIPELINES`), then the supported classes."""
    reason = f"{class_name} is {REFUSED_PIPELINES[class_name]}. " if class_name in REFUSED_PIPELINES else ""
    return f"{reason}cdalign samples, aligns and composes {supported_pipelines()} (see cdalign.core.families)"


def family_of(pipe) -> ModelFamily:
    """The family of a loaded pipeline, by its class (or a base class) name. A pipeline of a
    supported class that its family refuses (an SDXL pipeline without ``text_encoder``: the
    refiner's layout) raises ``ValueError`` with the reason."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in MODEL_FAMILIES:
            family = MODEL_FAMILIES.get(cls.__name__)
            why = family.refusal(pipe) if family.refusal is not None else None
            if why:
                raise ValueError(f"unsupported {family.pipeline_class}: {why}")
            return family
    raise ValueError(f"unsupported pipeline class {type(pipe).__name__}: {unsupported_class_message(type(pipe).__name__)}")


def family_of_denoiser(model) -> ModelFamily:
    """The family whose denoiser ``model`` is (a UNet or a transformer; SD's and SDXL's UNets
    told apart by their config)."""
    for name in MODEL_FAMILIES.names():
        fam = MODEL_FAMILIES.get(name)
        if fam.owns_denoiser(model):
            return fam
    raise ValueError(
        f"unsupported denoiser class {type(model).__name__}: supported are "
        + ", ".join(MODEL_FAMILIES.get(n).denoiser_class for n in MODEL_FAMILIES.names())
    )


def denoiser_of(pipe):
    """The pipeline's denoiser: its UNet (SD 1.x/2.x, SDXL) or transformer (SD3, FLUX)."""
    return family_of(pipe).denoiser_of(pipe)


def freeze_pipeline(pipe) -> None:
    """Every network of ``pipe`` frozen (no gradient) and in eval mode."""
    for module in family_of(pipe).modules(pipe):
        module.requires_grad_(False)
        module.eval()

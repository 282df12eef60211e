"""Components of a composition and the one composed noise predictor (METHOD.md §2, AND).

A component q_i is a classifier-free guided noise predictor ε̃_i(x_t) on the shared base
denoiser (a UNet or a flow transformer): a LoRA adapter (activated alone), the base model
(adapters disabled), or a concept (a prompt on the base model). The composed model is

    ε_μ(x_t) = Σ_i μ_i ε̃_i(x_t)        (μ on the simplex)

everywhere: sampling, the chain KL of the dual step, evaluation and distillation. For
concepts this is ``ε_∅ + Σ_i μ_i w (ε_{c_i} − ε_∅)`` because Σμ = 1.

Cost per denoising step: one denoiser call per distinct denoiser state (an adapter, or the base),
each batching the unconditional branch with every conditional branch that state needs.
So n adapters cost n calls (CFG batched) and any number of concepts cost one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from cdalign.core.families import Conditioning, family_of_denoiser
from cdalign.core.kl import ChainKLAccumulator
from cdalign.core.chains import GaussianChain
from cdalign.core.sampling import DiffusionSampler, classifier_free_guidance
from cdalign.models.adapters import set_denoiser_adapter
from cdalign.models.lora import LORA_WEIGHT_NAME, load_lora, lora_weights_path
from cdalign.registry import Registry

BASE = None  # the denoiser state "no adapter"
PROMPT_FIELD = "{prompt}"


@dataclass(frozen=True)
class Component:
    """One component q_i as the predictor sees it.

    ``adapter``: the peft adapter name to activate alone, or None for the base denoiser.
    ``prompt``: None = the batch's prompts; a text = that text for every image (a
    concept); a text with ``{prompt}`` = the batch prompt substituted into it."""

    name: str
    adapter: str | None = BASE
    prompt: str | None = None

    def prompts_for(self, prompts: Sequence[str]) -> list[str]:
        if self.prompt is None:
            return list(prompts)
        return [self.prompt.replace(PROMPT_FIELD, p) for p in prompts]


@dataclass(frozen=True)
class ComponentKind:
    """One kind of component: what its spec must give and how it is predicted. Called as
    ``kind(name, prompt)`` it makes the :class:`Component` (the composer loads the LoRA first).

    ``lora``: a LoRA adapter read from the spec's ``source`` (a folder or a Hub repo id, or
    trained there by its ``train_recipe``), activated alone; otherwise the base model.
    ``concept``: the base model under the spec's own ``prompt`` (required; concept sets
    replace it, in order)."""

    lora: bool = False
    concept: bool = False

    def __call__(self, name: str, prompt: str | None = None) -> Component:
        return Component(name, adapter=name if self.lora else BASE, prompt=prompt)


# A composition component's ``kind`` -> its ComponentKind.
COMPONENT_KINDS: Registry[Component] = Registry("component kind")
COMPONENT_KINDS.register("lora", ComponentKind(lora=True))
COMPONENT_KINDS.register("base", ComponentKind())
COMPONENT_KINDS.register("concept", ComponentKind(concept=True))


def lora_component_path(name: str, source: str, weight_name: str | None = None, revision: str | None = None):
    """The weights file of LoRA component ``name``, checked to exist and to be a complete
    safetensors file (``FileNotFoundError`` / ``CorruptFileError`` naming it)."""
    try:
        return lora_weights_path(source, weight_name=weight_name or LORA_WEIGHT_NAME, revision=revision,
                                 what=f"component {name!r}")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; or set the component's train_recipe to train it there first") from None


def load_lora_component(pipe, name: str, source: str, weight_name: str | None = None, revision: str | None = None):
    """Load a LoRA (diffusers format: a local folder, a .safetensors file's folder, or a
    Hub repo id) onto ``pipe`` as adapter ``name``; frozen."""
    lora_component_path(name, source, weight_name, revision)
    return load_lora(
        pipe, source, name, weight_name=weight_name or LORA_WEIGHT_NAME, revision=revision, what=f"component {name!r}"
    )


class ComponentPredictions:
    """Callable ``(x_t (B,C,h,w), t) -> (n, B, C, h, w)``: every component's guided ε̃_i.

    Built by :meth:`ComponentSet.predictor` for one batch of prompts."""

    def __init__(self, denoiser, chain: GaussianChain, groups, guidance_scale: float, n: int, family=None):
        self.denoiser, self.chain, self.groups, self.w, self.n = denoiser, chain, groups, guidance_scale, n
        self.family = family or family_of_denoiser(denoiser)
        self.denoiser_calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x_t.shape[0]
        out = [None] * self.n
        dtype = next(self.denoiser.parameters()).dtype
        for adapter, members, embeds, use_cfg in self.groups:
            set_denoiser_adapter(self.denoiser, adapter)
            reps = len(embeds) // B
            x_in = x_t.repeat(reps, 1, 1, 1)
            pred = self.family.forward(self.denoiser, x_in.to(dtype), t, embeds.to(dtype)).to(x_t.dtype)
            self.denoiser_calls += 1
            chunks = pred.split(B)
            uncond = chunks[0] if use_cfg else None
            for j, k in enumerate(members):
                cond = chunks[j + 1] if use_cfg else chunks[j]
                guided = classifier_free_guidance(uncond, cond, self.w) if use_cfg else cond
                out[k] = self.chain.prediction(self.chain.index_of(t), x_t, guided)
        return torch.stack(out)


class StackedPredictors:
    """Callable ``(x_t, t) -> (n, B, ...)``: the predictions of ``n`` separate predictors
    (any callables ``(x_t, t) -> ε``, e.g. small score networks), stacked in order. The
    components of a composition whose members are not adapters of one denoiser."""

    def __init__(self, predictors: Sequence[Callable]):
        self.predictors = list(predictors)
        self.n = len(self.predictors)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([p(x_t, t) for p in self.predictors])


class ComposedPredictor:
    """``ε_μ(x_t) = Σ_i μ_i ε̃_i(x_t)``, a predictor for ``DiffusionSampler.sample`` (or
    :func:`~cdalign.core.sampling.sample_latents`): the one composed model of cdalign.

    ``components``: callable ``(x_t, t) -> (n, B, ...)`` with an ``n`` attribute, e.g.
    :class:`ComponentPredictions` or :class:`StackedPredictors`. ``weights``: μ (n,) on the
    simplex. Every component is evaluated, also at μ_i = 0 (the dual step needs every ε̃_i
    for its KL); ``last`` holds the latest (n,B,...) component predictions, which
    :meth:`cached` hands to the KL hook (:meth:`ComponentSet.kl_hook`)."""

    def __init__(self, components, weights: torch.Tensor):
        self.components = components
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.shape != (components.n,):
            raise ValueError(f"weights: expected {components.n} values, got {list(self.weights.shape)}")
        self.last: torch.Tensor | None = None
        self._last_x: torch.Tensor | None = None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.components(x_t, t)
        self.last, self._last_x = eps, x_t
        return composed_eps(eps, self.weights)

    def cached(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The component predictions of the last call (same x_t), without recomputing."""
        if self._last_x is not x_t:
            return self.components(x_t, t)
        return self.last


def composed_eps(component_eps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i μ_i ε̃_i: ``component_eps`` (n, B, ...) and ``weights`` (n,) -> (B, ...)."""
    w = torch.as_tensor(weights, dtype=component_eps.dtype, device=component_eps.device)
    return torch.tensordot(w, component_eps, dims=1)


class ComponentKL(ChainKLAccumulator):
    """``on_step`` hook: chain KL(p ‖ q_i) for every component i along the sampled path of
    p (the composed model, or a distilled student), per sample: ``per_sample`` (n, B).

    ``reference(x_t, t) -> (n,B,C,h,w)``: the components' ε̃_i on the same x_t. This is
    :class:`cdalign.core.kl.ChainKLAccumulator` (the training KL's definition) over every
    step, value only: ``path`` Σ_t c_t²/(2σ_t²)·‖ε̃_p − ε̃_i‖² in nats per image, or
    ``uniform``."""

    def __init__(self, reference: Callable, chain: GaussianChain, estimator: str, n: int):
        super().__init__(reference, chain, estimator, num_references=n, value_only=True)
        self.n = n


class ComponentSet:
    """The components of one composition on one pipeline, in a fixed order.

    ``sampler``: the shared :class:`~cdalign.core.sampling.DiffusionSampler` (its chain and
    guidance scale define every ε̃_i)."""

    def __init__(self, sampler: DiffusionSampler, components: Sequence[Component]):
        if not components:
            raise ValueError("components: at least one component is needed")
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ValueError(f"components: names must be unique, got {names}")
        self.sampler, self.components = sampler, list(components)
        self.names = names

    def __len__(self) -> int:
        return len(self.components)

    def predictor(self, prompts: Sequence[str]) -> ComponentPredictions:
        """Component predictions for a batch of ``prompts`` (one per image)."""
        s = self.sampler
        use_cfg = s.uses_cfg
        uncond = s.uncond(len(prompts)) if use_cfg else None
        groups: dict = {}
        for k, comp in enumerate(self.components):
            groups.setdefault(comp.adapter, []).append(k)
        cache: dict[tuple, torch.Tensor] = {}
        built = []
        for adapter, members in groups.items():
            conds = []
            for k in members:
                texts = tuple(self.components[k].prompts_for(prompts))
                if texts not in cache:
                    cache[texts] = s.encode(list(texts))
                conds.append(cache[texts])
            embeds = Conditioning.cat(([uncond] if use_cfg else []) + conds)
            built.append((adapter, members, embeds, use_cfg))
        return ComponentPredictions(s.denoiser, s.chain, built, s.guidance_scale, len(self.components), s.family)

    def composed(self, prompts: Sequence[str], weights) -> ComposedPredictor:
        return ComposedPredictor(self.predictor(prompts), weights)

    def kl_hook(self, composed: ComposedPredictor, estimator: str) -> ComponentKL:
        """KL to every component along ``composed``'s own path, reusing its component
        predictions (no extra denoiser call)."""
        return ComponentKL(composed.cached, self.sampler.chain, estimator, len(self))

    def divergences(self, prompts: Sequence[str], seeds: Sequence[int], weights, estimator: str):
        """Sample ``p_μ`` for the seeds and return (images (B,3,H,W), KL (n, B))."""
        composed = self.composed(prompts, weights)
        hook = self.kl_hook(composed, estimator)
        with torch.no_grad():
            images = self.sampler.sample(composed, list(seeds), on_step=hook)
        return images, hook.per_sample

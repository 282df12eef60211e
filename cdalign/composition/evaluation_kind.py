"""Composed models as checkpoints of the evaluation harness (``kind: composed``).

A composed checkpoint is ``components`` (each a ``lora`` or ``base`` checkpoint spec) with
``weights`` μ. It is the same composed model as everywhere else in cdalign:
:class:`~cdalign.composition.components.ComposedPredictor` (``ε_μ = Σ μ_i ε̃_i``) sampled
through the shared sampler, with the chain KL reported to each component along the
composed path, reusing the component predictions the composed step already made.

Importing this module registers the kind; ``import cdalign`` does."""

from __future__ import annotations

import re

import torch

from cdalign.composition.components import BASE, Component, ComponentSet
from cdalign.core.sampling import set_unet_state
from cdalign.evaluation.harness import (
    CHECKPOINT_KINDS,
    CheckpointKind,
    CheckpointSpec,
    LoadedCheckpoint,
    LoraKind,
)
from cdalign.models.lora import load_lora


def _component_specs(spec: CheckpointSpec) -> list[CheckpointSpec]:
    if len(spec.components) < 2:
        raise ValueError(f"checkpoint {spec.name!r}: kind 'composed' needs at least 2 components")
    comps = [CheckpointSpec.from_value(c, f"checkpoint {spec.name!r}.components[{k}]") for k, c in enumerate(spec.components)]
    for k, c in enumerate(comps):
        if c.kind not in ("lora", "base"):
            raise ValueError(f"checkpoint {spec.name!r}.components[{k}]: kind {c.kind!r}; a component is 'lora' or 'base'")
    names = [c.name for c in comps]
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint {spec.name!r}: component names must be unique, got {names}")
    return comps


def _weights(spec: CheckpointSpec, n: int) -> torch.Tensor:
    mu = torch.full((n,), 1.0 / n, dtype=torch.float64) if spec.weights is None else torch.tensor(spec.weights, dtype=torch.float64)
    if mu.shape != (n,) or bool((mu < 0).any()) or abs(float(mu.sum()) - 1.0) > 1e-6:
        raise ValueError(
            f"checkpoint {spec.name!r}: weights must be {n} non-negative numbers summing to 1 (a point of the "
            f"simplex, e.g. weights.json of a compose run), got {spec.weights}"
        )
    return mu


class _ComposedLoaded(LoadedCheckpoint):
    def __init__(self, pipe, components: list[Component], weights: torch.Tensor, adapters: list[str]):
        self.pipe, self.components, self.weights, self.adapters = pipe, components, weights, adapters

    def policy(self, sampler, prompts):
        return ComponentSet(sampler, self.components).composed(prompts, self.weights)

    def references(self, sampler, prompts, policy):
        # Each component's ε̃_i on the composed path is a term of ε_μ: reuse it (no extra UNet call).
        return {c.name: (lambda x, t, k=k: policy.cached(x, t)[k]) for k, c in enumerate(self.components)}

    def unload(self):
        set_unet_state(self.pipe.unet, None)
        if self.adapters:
            self.pipe.delete_adapters(self.adapters)


@CHECKPOINT_KINDS.register("composed")
class ComposedKind(CheckpointKind):
    """``ε_μ = Σ μ_i ε̃_i`` of ``components`` with ``weights`` (default: equal weights)."""

    def identity(self, spec):
        comps = _component_specs(spec)
        lora = LoraKind()
        return {
            "kind": "composed",
            "components": [lora.identity(c) if c.kind == "lora" else {"kind": "base"} for c in comps],
            "weights": _weights(spec, len(comps)).tolist(),
        }

    def load(self, spec, pipe):
        comps = _component_specs(spec)
        mu = _weights(spec, len(comps))
        components, adapters = [], []
        for c in comps:
            if c.kind == "base":
                components.append(Component(c.name, adapter=BASE))
                continue
            adapter = "composed_" + re.sub(r"\W", "_", f"{spec.name}_{c.name}")
            load_lora(pipe, c.source, adapter, weight_name=c.weight_name, revision=c.revision,
                      what=f"checkpoint {spec.name!r}, component {c.name!r}")
            adapters.append(adapter)
            components.append(Component(c.name, adapter=adapter))
        return _ComposedLoaded(pipe, components, mu, adapters)

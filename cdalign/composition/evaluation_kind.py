"""Composed and distilled models as checkpoints of the one scoring path
(:func:`cdalign.evaluation.scoring.score_checkpoints`), and ``kind: composed`` of the
evaluation harness.

:class:`ComposedModel` is the same composed model as everywhere else in cdalign:
:class:`~cdalign.composition.components.ComposedPredictor` (``ε_μ = Σ μ_i ε̃_i``) sampled
through the shared sampler, with the chain KL reported to each component along the
composed path, reusing the component predictions the composed step already made. The
composer scores its weights with it, and the harness's composed checkpoint (``components``,
each a ``lora`` or ``base`` checkpoint spec, with ``weights`` μ) is one too, so both report
the same numbers for the same weights and items. :class:`DistilledModel` is the distilled
student LoRA, with its chain KL to every component along its own path.

Importing this module registers the kind; ``import cdalign`` does."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from cdalign.composition.components import Component, ComponentPredictions, ComponentSet
from cdalign.composition.distill import StudentPredictor
from cdalign.core.families import denoiser_of
from cdalign.evaluation.harness import CheckpointKind
from cdalign.evaluation.scoring import LoadedCheckpoint
from cdalign.evaluation.suite import CHECKPOINT_KINDS, CheckpointSpec
from cdalign.models.adapters import set_denoiser_adapter
from cdalign.models.lora import delete_adapters


def _component_specs(spec: CheckpointSpec) -> list[CheckpointSpec]:
    if len(spec.components) < 2:
        raise ValueError(f"checkpoint {spec.name!r}: kind 'composed' needs at least 2 components")
    comps = [CheckpointSpec.from_value(c, f"checkpoint {spec.name!r}.components[{k}]") for k, c in enumerate(spec.components)]
    for k, c in enumerate(comps):
        if not c.checkpoint_kind.composable:
            allowed = " or ".join(repr(n) for n in CHECKPOINT_KINDS if CHECKPOINT_KINDS.get(n).composable)
            raise ValueError(f"checkpoint {spec.name!r}.components[{k}]: kind {c.kind!r}; a component is {allowed}")
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


class ComposedModel(LoadedCheckpoint):
    """``ε_μ = Σ μ_i ε̃_i`` of ``components`` (their adapters already on the pipeline) at
    ``weights`` μ (n,), with the chain KL to every component (``kl_to_components``).

    ``pipe`` / ``adapters``: the adapters loaded for this checkpoint alone, deleted (and the
    denoiser returned to the base state) on :meth:`unload`; none for the composer's own."""

    def __init__(self, components: Sequence[Component], weights, *, kl_to_components: bool = True, pipe=None,
                 adapters: Sequence[str] = ()):
        self.components, self.weights = list(components), torch.as_tensor(weights, dtype=torch.float64)
        self.kl_to_components, self.pipe, self.adapters = kl_to_components, pipe, list(adapters)

    def policy(self, sampler, prompts):
        return ComponentSet(sampler, self.components).composed(prompts, self.weights)

    def references(self, sampler, prompts, policy):
        if not self.kl_to_components:
            return {}
        # Each component's ε̃_i on the composed path is a term of ε_μ: reuse it (no extra denoiser call).
        return {c.name: (lambda x, t, k=k: policy.cached(x, t)[k]) for k, c in enumerate(self.components)}

    def unload(self):
        if self.pipe is None:
            return
        set_denoiser_adapter(denoiser_of(self.pipe), None)
        if self.adapters:
            delete_adapters(self.pipe, self.adapters)


class _LatestPredictions:
    """Every component's ε̃_i at the latest x_t, computed once per step for all references."""

    def __init__(self, predictions: ComponentPredictions):
        self.predictions, self._x, self._eps = predictions, None, None

    def __call__(self, x_t, t):
        if self._x is not x_t:
            self._x, self._eps = x_t, self.predictions(x_t, t)
        return self._eps


class DistilledModel(LoadedCheckpoint):
    """The distilled ``student`` LoRA of :mod:`cdalign.composition.distill` (one denoiser pass per
    step), with its chain KL to every component of ``components`` along its own path (n
    extra component passes per step)."""

    def __init__(self, components: ComponentSet):
        self.components = components

    def policy(self, sampler, prompts):
        return StudentPredictor(sampler.guided(prompts))

    def references(self, sampler, prompts, policy):
        latest = _LatestPredictions(self.components.predictor(prompts))
        return {name: (lambda x, t, k=k: latest(x, t)[k]) for k, name in enumerate(self.components.names)}


@CHECKPOINT_KINDS.register("composed")
class ComposedKind(CheckpointKind):
    """``ε_μ = Σ μ_i ε̃_i`` of ``components`` with ``weights`` (default: equal weights)."""

    def identity(self, spec):
        comps = _component_specs(spec)
        return {
            "kind": "composed",
            "components": [c.checkpoint_kind().identity(c) for c in comps],
            "weights": _weights(spec, len(comps)).tolist(),
        }

    def load(self, spec, pipe):
        comps = _component_specs(spec)
        mu = _weights(spec, len(comps))
        components, adapters = [], []
        for c in comps:
            adapter = c.checkpoint_kind().load_component(c, pipe, "composed_" + re.sub(r"\W", "_", f"{spec.name}_{c.name}"),
                                                         what=f"checkpoint {spec.name!r}, component {c.name!r}")
            if adapter is not None:
                adapters.append(adapter)
            components.append(Component(c.name, adapter=adapter))
        return ComposedModel(components, mu, pipe=pipe, adapters=adapters)

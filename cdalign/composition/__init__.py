"""Constrained composition of diffusion models (METHOD.md §2).

AND (reverse KL, product): :class:`ConstrainedComposer` finds weights μ on the simplex for
``ε_μ = Σ μ_i ε̃_i`` by projected dual ascent on the chain KL to each component;
:class:`CompositionDistiller` distils ε_μ into one LoRA. OR (forward KL, mixture):
:class:`MixtureTrainer` fine-tunes on Σ μ_i·DSM_i with μ ascending on the losses. The tables of
their reports are in :mod:`cdalign.publishing.composition_tables`."""

from cdalign.composition.components import (
    COMPONENT_KINDS,
    Component,
    ComponentKind,
    ComponentKL,
    ComponentPredictions,
    ComponentSet,
    ComposedPredictor,
    StackedPredictors,
    composed_eps,
    load_lora_component,
)
from cdalign.composition.composer import ConstrainedComposer, train_missing_components
from cdalign.composition.concepts import run_concept_sets
from cdalign.composition.config import (
    ComponentSpec,
    ComposeConfig,
    ConceptSetSpec,
    DatasetSpec,
    DistillSpec,
    DualAscentSpec,
    MixtureConfig,
    load_config_file,
    parse_config,
)
from cdalign.composition.distill import CompositionDistiller
from cdalign.composition.evaluation_kind import ComposedKind
from cdalign.composition.simplex import STEP_SCHEDULES, SimplexDual, project_simplex

__all__ = [
    "COMPONENT_KINDS",
    "Component",
    "ComponentKind",
    "ComponentKL",
    "ComponentPredictions",
    "ComponentSet",
    "ComponentSpec",
    "ComposeConfig",
    "ConceptSetSpec",
    "ComposedPredictor",
    "ComposedKind",
    "CompositionDistiller",
    "ConstrainedComposer",
    "DatasetSpec",
    "DistillSpec",
    "DualAscentSpec",
    "MixtureConfig",
    "STEP_SCHEDULES",
    "SimplexDual",
    "StackedPredictors",
    "composed_eps",
    "load_config_file",
    "load_lora_component",
    "parse_config",
    "project_simplex",
    "run_concept_sets",
    "train_missing_components",
]

"""cdalign: constrained alignment and composition of diffusion models (arXiv 2508.19104).

Layout (docs/ARCHITECTURE.md): ``fields`` (typed YAML/CLI configs) and ``hub_access``
(Hub reads) ← ``core`` (the math of METHOD.md) ← ``runs`` (run infrastructure) ← ``data``
← ``models`` ← ``rewards`` ← ``publishing`` ← ``evaluation`` ← ``alignment`` ←
``composition``. This module only gathers the public names (the list of ARCHITECTURE.md's
"Public names"); importing it registers every kind. Before torch is imported it sets
``OMP_WAIT_POLICY=PASSIVE`` unless it is set: idle OpenMP threads then sleep instead of
spinning, which slowed the tiny model's UNet 10-20x on a small shared CPU, measured."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cdalign.alignment.config import ConstrainedDDPOConfig, config_from_dict, load_config_file, parse_config
from cdalign.alignment.estimators import ESTIMATORS
from cdalign.alignment.specs import ConstraintSpec, DualSpec, ObjectiveSpec
from cdalign.alignment.trainer import ConstrainedDDPOTrainer
from cdalign.composition import (  # also registers the ``composed`` checkpoint kind
    COMPONENT_KINDS,
    STEP_SCHEDULES,
    ComponentSpec,
    ComposeConfig,
    CompositionDistiller,
    ConstrainedComposer,
)
from cdalign.composition.supports import SUPPORT_LABELERS
from cdalign.core.chains import DDIMChain, FlowSDEChain
from cdalign.core.duals import DUAL_OPTIMIZERS, NuPI, ProjectedGradientAscent
from cdalign.core.families import MODEL_FAMILIES
from cdalign.core.kl import KL_ESTIMATORS
from cdalign.core.constraint_gradients import CONSTRAINT_GRADIENTS
from cdalign.core.policy_gradient import ADVANTAGES
from cdalign.core.sampling import DiffusionSampler, GuidedDenoiser
from cdalign.core.truncation import TRUNCATION_STRATEGIES
from cdalign.data.prompt_sets import PROMPT_SETS, load_prompts
from cdalign.evaluation import (
    CHECKPOINT_KINDS,
    CheckpointKind,
    CheckpointSpec,
    EvaluationSuite,
    LoadedCheckpoint,
    evaluate,
)
from cdalign.models.pipeline import EMBEDDED_MODELS, load_pipeline
from cdalign.publishing.hub import HubPushError
from cdalign.rewards import REWARDS
from cdalign.rewards.metrics import EVAL_METRICS
from cdalign.runs.report import AlignmentReport, ConstraintResult, ReportFormatError
from cdalign.runs.signals import TrainingInterrupted

__version__ = "0.1.0"

__all__ = [
    # alignment: the config, its specs, the trainer
    "ConstrainedDDPOConfig",
    "ConstrainedDDPOTrainer",
    "ConstraintSpec",
    "DualSpec",
    "ObjectiveSpec",
    "TrainingInterrupted",
    "config_from_dict",
    "load_config_file",
    "parse_config",
    # the run report
    "AlignmentReport",
    "ConstraintResult",
    "ReportFormatError",
    # sampling and the duals
    "DDIMChain",
    "DiffusionSampler",
    "FlowSDEChain",
    "GuidedDenoiser",
    "NuPI",
    "ProjectedGradientAscent",
    # models, prompts, the Hub
    "HubPushError",
    "load_pipeline",
    "load_prompts",
    # evaluation
    "CheckpointKind",
    "CheckpointSpec",
    "EvaluationSuite",
    "LoadedCheckpoint",
    "evaluate",
    # composition
    "ComponentSpec",
    "ComposeConfig",
    "CompositionDistiller",
    "ConstrainedComposer",
    # registries (ARCHITECTURE.md, "Registries")
    "ADVANTAGES",
    "CHECKPOINT_KINDS",
    "COMPONENT_KINDS",
    "CONSTRAINT_GRADIENTS",
    "DUAL_OPTIMIZERS",
    "EMBEDDED_MODELS",
    "ESTIMATORS",
    "EVAL_METRICS",
    "KL_ESTIMATORS",
    "MODEL_FAMILIES",
    "PROMPT_SETS",
    "REWARDS",
    "STEP_SCHEDULES",
    "SUPPORT_LABELERS",
    "TRUNCATION_STRATEGIES",
]

"""cdalign: constrained alignment and composition of diffusion models (arXiv 2508.19104).

Layout (docs/ARCHITECTURE.md): ``fields`` (typed YAML/CLI configs) and ``hub_access``
(Hub reads) ← ``core`` (the math of METHOD.md) ← ``runs`` (run infrastructure) ← ``data``
← ``models`` ← ``rewards`` ← ``publishing`` ← ``evaluation`` ← ``alignment`` ←
``composition``. This module only gathers the public names."""

from cdalign import composition  # noqa: F401  (registers the ``composed`` checkpoint kind)
from cdalign.alignment.config import ConstrainedDDPOConfig, load_config_file, parse_config
from cdalign.alignment.estimators import ESTIMATORS
from cdalign.alignment.specs import ConstraintSpec, DualSpec, ObjectiveSpec
from cdalign.alignment.trainer import ConstrainedDDPOTrainer
from cdalign.core.duals import DUAL_OPTIMIZERS, NuPI, ProjectedGradientAscent
from cdalign.core.kl import KL_ESTIMATORS
from cdalign.core.chains import DDIMChain
from cdalign.core.sampling import DiffusionSampler
from cdalign.data.prompt_sets import PROMPT_SETS, load_prompts
from cdalign.models.pipeline import EMBEDDED_MODELS, load_pipeline
from cdalign.runs.report import AlignmentReport, ConstraintResult, ReportFormatError
from cdalign.runs.signals import TrainingInterrupted

__version__ = "0.1.0"

__all__ = [
    "AlignmentReport",
    "ConstrainedDDPOConfig",
    "ConstrainedDDPOTrainer",
    "ConstraintResult",
    "ConstraintSpec",
    "DDIMChain",
    "DUAL_OPTIMIZERS",
    "DiffusionSampler",
    "DualSpec",
    "EMBEDDED_MODELS",
    "ESTIMATORS",
    "KL_ESTIMATORS",
    "NuPI",
    "ObjectiveSpec",
    "PROMPT_SETS",
    "ProjectedGradientAscent",
    "ReportFormatError",
    "TrainingInterrupted",
    "load_config_file",
    "load_pipeline",
    "load_prompts",
    "parse_config",
]

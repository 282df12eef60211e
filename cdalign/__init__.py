"""cdalign: constrained alignment and composition of diffusion models (arXiv 2508.19104)."""

from .config import ConstrainedDDPOConfig, ConstraintSpec, DualSpec, ObjectiveSpec, load_config_file, parse_config
from .duals import DUAL_OPTIMIZERS, NuPI, ProjectedGradientAscent
from .estimators import ESTIMATORS
from .kl import KL_ESTIMATORS
from .pipeline import EMBEDDED_MODELS, load_pipeline
from .prompts import PROMPT_SETS, load_prompts
from .sampling import DDIMChain, DiffusionSampler
from .trainer import ConstrainedDDPOTrainer, TrainingInterrupted

__version__ = "0.1.0"

__all__ = [
    "ConstrainedDDPOConfig",
    "ConstrainedDDPOTrainer",
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
    "TrainingInterrupted",
    "load_config_file",
    "load_pipeline",
    "load_prompts",
    "parse_config",
]

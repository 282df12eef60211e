"""Evaluation: score checkpoints (base, LoRA, composed) on one set of (prompt, seed)
items, with constraint verdicts and confidence intervals."""

from cdalign.evaluation.harness import CheckpointKind, EvaluationResult, evaluate
from cdalign.evaluation.scoring import (
    AdaptedModel,
    BaseModel,
    BatchStore,
    CheckpointScores,
    LoadedCheckpoint,
    score_batch,
    score_checkpoints,
)
from cdalign.evaluation.suite import CHECKPOINT_KINDS, CheckpointSpec, EvaluationSuite, load_suite

__all__ = [
    "CHECKPOINT_KINDS",
    "AdaptedModel",
    "BaseModel",
    "BatchStore",
    "CheckpointKind",
    "CheckpointScores",
    "CheckpointSpec",
    "EvaluationResult",
    "EvaluationSuite",
    "LoadedCheckpoint",
    "evaluate",
    "load_suite",
    "score_batch",
    "score_checkpoints",
]

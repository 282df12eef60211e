"""Evaluation: score checkpoints (base, LoRA, composed) on one set of (prompt, seed)
items, with constraint verdicts and confidence intervals."""

from cdalign.evaluation.harness import (
    CHECKPOINT_KINDS,
    CheckpointKind,
    CheckpointSpec,
    EvaluationResult,
    EvaluationSuite,
    LoadedCheckpoint,
    evaluate,
    evaluation_items,
    load_suite,
)
from cdalign.evaluation.scoring import (
    AdaptedModel,
    BaseModel,
    BatchStore,
    CheckpointScores,
    score_batch,
    score_checkpoints,
)

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
    "evaluation_items",
    "load_suite",
    "score_batch",
    "score_checkpoints",
]

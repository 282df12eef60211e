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

__all__ = [
    "CHECKPOINT_KINDS",
    "CheckpointKind",
    "CheckpointSpec",
    "EvaluationResult",
    "EvaluationSuite",
    "LoadedCheckpoint",
    "evaluate",
    "evaluation_items",
    "load_suite",
]

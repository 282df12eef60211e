"""Old import path of the trainer, kept for code written against cdalign 0.1
(``from cdalign.trainer import ConstrainedDDPOTrainer``). New code imports from
:mod:`cdalign.alignment.trainer` (or ``cdalign``). Nothing inside cdalign imports this."""

from cdalign.alignment.trainer import ConstrainedDDPOTrainer, TrainingInterrupted  # noqa: F401

__all__ = ["ConstrainedDDPOTrainer", "TrainingInterrupted"]

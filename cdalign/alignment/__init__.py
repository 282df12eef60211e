"""Constrained alignment (METHOD.md §1): the config, the gradient estimators and
:class:`~cdalign.alignment.trainer.ConstrainedDDPOTrainer`."""

"""Old import path of the pipeline loader, kept because published model cards say
``from cdalign.pipeline import load_pipeline``. New code imports from
:mod:`cdalign.models.pipeline` (or ``cdalign``). Nothing inside cdalign imports this."""

from cdalign.models.pipeline import EMBEDDED_MODELS, ModelNotFoundError, load_pipeline  # noqa: F401

__all__ = ["EMBEDDED_MODELS", "ModelNotFoundError", "load_pipeline"]

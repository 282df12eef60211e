"""What a cdalign command prints: cdalign's progress bars, warnings and tables, and nothing
from other libraries that a user cannot act on.

- :class:`CdalignWarning` is the category of every warning cdalign itself emits (a
  ``UserWarning``, so ``pytest.warns(UserWarning)`` and warning filters still see it).
- :func:`quiet_libraries` wraps one call of cdalign's into diffusers or transformers whose
  messages cdalign answers itself or that need no action (loading bars, an image processor's
  backend fallback, "Couldn't connect to the Hub" before cdalign's own error): for the call
  it lowers both libraries' log level to errors and turns their progress bars off, then
  restores what was set before. Nothing is silenced outside the call.
- :func:`command_output` wraps a command's run (``cdalign align``, ``recipes/align.py``, ...):
  each :class:`CdalignWarning` becomes one ``warning: <message>`` line through the ``cdalign``
  logger instead of the file, line and source line ``warnings.warn`` prints, and the
  ``cdalign`` loggers' info lines are printed as they are. Other warnings pass unchanged."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

__all__ = ["CdalignWarning", "command_output", "quiet_libraries"]

LOGGER_NAME = "cdalign"


class CdalignWarning(UserWarning):
    """A warning cdalign emits about a run (too few samples for a verdict, an infeasible
    threshold, a setting it overrode): actionable, and shown on one line by a command."""


@contextlib.contextmanager
def quiet_libraries(*, messages: bool = True, progress_bars: bool = True) -> Iterator[None]:
    """For the ``with`` block: diffusers' and transformers' loggers at ERROR (``messages``)
    and their progress bars off (``progress_bars``); what was set before is restored
    afterwards. Errors still show."""
    # heavy dependencies: imported by the call that needs them, not when cdalign is imported
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        if messages:
            lib.set_verbosity_error()
        if progress_bars:
            lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()


class _LineFormatter(logging.Formatter):
    """``warning: <message>`` (``error: ...``) for warnings and errors; info lines as they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def is_main_launch_process() -> bool:
    """Whether this is the process that speaks for a launch: the only one, or rank 0 of the
    processes a launcher (accelerate launch, torchrun) started. Bad input is the same on
    every rank, so only this one prints it."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


@contextlib.contextmanager
def command_output(stream=None) -> Iterator[logging.Logger]:
    """For a command's run: the ``cdalign`` logger prints its info, warning and error
    records to ``stream`` (default ``sys.stderr``) one line each (info and warnings from
    the main process only when several run), and a
    :class:`CdalignWarning` is logged there instead of being printed with its source line.
    Everything is restored on exit. Yields the ``cdalign`` logger."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_LineFormatter())
    saved_level, saved_propagate = logger.level, logger.propagate
    show_other = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CdalignWarning):
            logger.warning("%s", message)
        else:
            show_other(message, category, filename, lineno, file, line)

    logger.addHandler(handler)
    # Under a launcher every process runs the command: the main one (RANK 0) tells the user,
    # the others only report their errors (which name their rank).
    logger.setLevel(logging.INFO if is_main_launch_process() else logging.ERROR)
    logger.propagate = False  # one line per record, not a second one from a root handler
    warnings.showwarning = show
    try:
        yield logger
    finally:
        warnings.showwarning = show_other
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate

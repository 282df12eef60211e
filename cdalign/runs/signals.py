"""Stopping a run on SIGINT/SIGTERM between whole steps, never in the middle of one."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path


class TrainingInterrupted(Exception):
    """``train()`` stopped on SIGINT/SIGTERM after a whole optimiser step and saved
    ``checkpoint``; ``resume_from_checkpoint='latest'`` continues the run exactly."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint
        super().__init__(f"interrupted by {signal.Signals(self.signum).name} at step {step}; checkpoint at {checkpoint}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class StopSignals:
    """SIGINT/SIGTERM as a request to stop: inside :meth:`catching` they only record the
    signal (:attr:`received`), which the loop reads between steps, so no step is cut in
    half. A second Ctrl-C (SIGINT after SIGINT) raises KeyboardInterrupt at once; a SIGTERM
    after a SIGINT (what a launcher sends its workers on Ctrl-C) changes nothing."""

    def __init__(self):
        self.received: int | None = None

    def _request_stop(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    @contextlib.contextmanager
    def catching(self):
        """Catch the signals for the duration of the block, then restore the previous
        handlers. Outside the main thread (where handlers cannot be set) a no-op."""
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

"""A process's machine resources: its CPU threads (:func:`set_cpu_threads`), and running out
of memory during a training step, said the way a full disk is
(:class:`~cdalign.runs.atomic.StorageError`): one error naming the step, the batch, the
settings that lower the memory a step needs, and the checkpoint to resume from.

A step that runs out of memory raises ``torch.cuda.OutOfMemoryError`` on a GPU, and on a
CPU ``MemoryError`` or a ``RuntimeError`` whose text says so (PyTorch's CPU allocator:
"DefaultCPUAllocator: can't allocate memory: you tried to allocate ... bytes").
:func:`is_out_of_memory` recognises them; :func:`out_of_memory_error` turns one into
:class:`OutOfMemory`. Nothing of the failed step is saved; earlier checkpoints are intact."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_OOM_TEXTS = ("out of memory", "defaultcpuallocator: can't allocate memory", "cannot allocate memory")


class OutOfMemory(RuntimeError):
    """A training step ran out of (CPU or GPU) memory; the message names the step, the
    batch, the settings to lower and the checkpoint to resume from."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` (or the error it was raised from) is the allocator running out of memory."""
    for e in (err, err.__cause__, err.__context__):
        if e is None:
            continue
        if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
            return True
        if isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXTS):
            return True
    return False


def out_of_memory_error(err: BaseException, *, step: int, device, train_batch_size: int,
                        gradient_accumulation_steps: int, lower: Sequence[str], enable: Sequence[str] = (),
                        checkpoints: Sequence[Path] = ()) -> OutOfMemory:
    """The :class:`OutOfMemory` for ``err`` raised by optimiser step ``step`` (1-based) on
    ``device``: the batch it ran, the settings to ``lower`` (``train_batch_size`` first) or to
    ``enable`` (e.g. ``gradient_checkpointing: true``), and the last complete checkpoint of
    ``checkpoints`` (oldest first), or that there is none."""
    where = "the CPU" if torch.device(device).type == "cpu" else str(device)
    cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    names = [f"{n} (raising gradient_accumulation_steps keeps the global batch)" if n == "train_batch_size" else n
             for n in lower]
    fixes = "lower " + (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0])
    fixes += "".join(f", or set {e}" for e in enable)
    last = resume_advice(checkpoints, "once a setting is lowered")
    return OutOfMemory(
        f"step {step} ran out of memory on {where} ({type(err).__name__}: {cause}) with train_batch_size="
        f"{train_batch_size} (images per process per micro-batch) and gradient_accumulation_steps="
        f"{gradient_accumulation_steps}; {fixes}; {last}"
    )


def resume_advice(checkpoints: Sequence[Path], when: str = "") -> str:
    """What a failed run leaves to resume from: the last of ``checkpoints`` (oldest first) is
    intact and ``--resume_from_checkpoint latest`` continues from it (``when``: a condition
    to add), or no checkpoint was saved."""
    if not checkpoints:
        return "no checkpoint was saved before it (save_steps keeps some), so the run starts again"
    return (f"the last complete checkpoint, {str(checkpoints[-1])!r}, is intact: resume from it with "
            f"--resume_from_checkpoint latest{' ' + when if when else ''}")


def set_cpu_threads(device, requested: int | None) -> int:
    """torch's CPU threads for this process (returns the count in force): ``requested`` when
    given; else, on a CPU, the launcher's ``OMP_NUM_THREADS`` when it set one (``accelerate
    launch`` gives cores / processes), otherwise 1. A GPU run keeps torch's setting unless
    ``requested``. Why 1 on a CPU: the embedded tiny models' many small kernels pay a thread
    wake-up each, and one thread per process ran 1.6× faster than two on a 2-core machine
    (``benchmarks/bench_recipes.py``); both cores are used by two processes instead."""
    if requested:
        torch.set_num_threads(requested)
    elif torch.device(device).type == "cpu":
        launcher = os.environ.get("OMP_NUM_THREADS", "").strip()
        torch.set_num_threads(int(launcher) if launcher.isdigit() and int(launcher) > 0 else 1)
    count = torch.get_num_threads()
    logger.info("torch CPU threads per process: %d", count)
    return count

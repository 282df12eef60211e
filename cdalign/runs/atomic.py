"""Files and folders written whole or not at all.

Every file cdalign writes for later reading (reports, caches, LoRA weights) goes through
:func:`atomic_write`, and every folder (a checkpoint, a pretrained model) through
:func:`atomic_directory`: a reader, or a run killed mid-write, never sees half of one, and
an existing one is replaced only by a complete new one. The temporaries are hidden
``.<name>.tmp-<pid>`` siblings (``cdalign.runs.checkpoints.remove_stale_temporaries``
reclaims those a killed run left)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def temporary_sibling(path: str | os.PathLike) -> Path:
    """``.<name>.tmp-<pid>`` next to ``path``: hidden, unique per process, and recognised
    as a leftover by ``cdalign.runs.checkpoints.remove_stale_temporaries``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write the whole file at a temporary sibling of ``path``, then
    rename it onto ``path`` (atomic on one file system). If ``write`` raises, the
    temporary file is removed and ``path`` is left as it was. Returns ``path``."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def atomic_directory(final: str | os.PathLike):
    """Yield a temporary sibling directory; on success replace ``final`` with it. If the
    block raises, the temporary directory is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

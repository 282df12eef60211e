"""Files and folders written whole or not at all.

Every file cdalign writes for later reading (reports, caches, LoRA weights) goes through
:func:`atomic_write`, and every folder (a checkpoint, a pretrained model) through
:func:`atomic_directory`: a reader, or a run killed mid-write, never sees half of one, and
an existing one is replaced only by a complete new one. The temporaries are hidden
``.<name>.tmp-<pid>`` siblings (``cdalign.runs.checkpoints.remove_stale_temporaries``
reclaims those a killed run left).

A write that fails for lack of space or permission (``ENOSPC``, ``EDQUOT``, ``EROFS``,
``EACCES``; safetensors reports "No space left on device (os error 28)" in its own error
type) raises :class:`StorageError`: one ``OSError`` whose message names the path, what was
being written, how much of it was written and how much space is left, and says that the
earlier version is intact; the temporary is removed first."""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
_STORAGE_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "read-only file system",
                  "permission denied")


class StorageError(OSError):
    """A file or folder could not be written for lack of space or permission."""


def _storage_errno(err: BaseException) -> int | None:
    """The storage errno behind ``err`` (an OSError's, or read from another library's
    message, e.g. safetensors' ``SafetensorError``); None when it is not a storage fault."""
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno
    text = str(err).lower()
    for code, needle in zip((errno.ENOSPC, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES), _STORAGE_TEXTS):
        if needle in text:
            return code
    return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def storage_error(err: BaseException, final: Path, tmp: Path, what: str) -> StorageError | None:
    """A :class:`StorageError` describing ``err`` while ``tmp`` was being written for
    ``final``; None when ``err`` is not a storage fault (the caller re-raises it as is)."""
    code = _storage_errno(err)
    if code is None:
        return None
    written = _size(tmp)
    try:
        free = shutil.disk_usage(final.parent if final.parent.exists() else Path.cwd()).free
    except OSError:
        free = None
    cause = os.strerror(code).lower()
    space = (f"; {written / 2**20:.1f} MiB of it were written before the fault, {free / 2**20:.1f} MiB are free on that "
             "file system" if free is not None else "")
    earlier = f"the earlier {final.name} is intact" if final.exists() else f"no partial {final.name} was left behind"
    return StorageError(code, f"could not write {what} {str(final)!r}: {cause}{space}; {earlier}. "
                              "Free space (or fix the permission) and run again")


def temporary_sibling(path: str | os.PathLike) -> Path:
    """``.<name>.tmp-<pid>`` next to ``path``: hidden, unique per process, and recognised
    as a leftover by ``cdalign.runs.checkpoints.remove_stale_temporaries``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], what: str = "file") -> Path:
    """Call ``write(tmp)`` to write the whole file at a temporary sibling of ``path``, then
    rename it onto ``path`` (atomic on one file system). If ``write`` raises, the
    temporary file is removed and ``path`` is left as it was (a storage fault becomes a
    :class:`StorageError` naming ``what`` and ``path``). Returns ``path``."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        fault = storage_error(err, path, tmp, what) if isinstance(err, Exception) else None
        tmp.unlink(missing_ok=True)
        if fault is not None:
            raise fault from err
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def atomic_directory(final: str | os.PathLike, what: str = "folder"):
    """Yield a temporary sibling directory; on success replace ``final`` with it. If the
    block raises, the temporary directory is removed and ``final`` is left as it was (a
    storage fault becomes a :class:`StorageError` naming ``what`` and ``final``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as err:
        fault = storage_error(err, final, tmp, what) if isinstance(err, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if fault is not None:
            raise fault from err
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

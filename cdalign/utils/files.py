"""Files written whole or not at all, and output folders that hold no earlier run.

Every file cdalign writes for later reading (reports, caches, LoRA weights) goes through
:func:`atomic_write`: a reader, or a run killed mid-write, never sees half a file, and an
existing file is replaced only by a complete new one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable


def temporary_sibling(path: str | os.PathLike) -> Path:
    """``.<name>.tmp-<pid>`` next to ``path``: hidden, unique per process, and recognised
    as a leftover by ``cdalign.models.checkpointing.remove_stale_temporaries``."""
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


def check_no_previous_run(
    output_dir: str | os.PathLike,
    markers: Iterable[str],
    *,
    what: str = "a run",
    remedies: str = "set overwrite_output_dir=true to replace it, or choose another output_dir",
) -> None:
    """Raise ``FileExistsError`` if ``output_dir`` holds any of ``markers`` (names of the
    files or folders an earlier run leaves there, e.g. ``report.json``, ``checkpoint-4``),
    naming up to four of them, ``what`` it holds and the ``remedies``. A folder that does
    not exist holds nothing. The caller decides when the check applies (not when the run
    is to be overwritten or resumed)."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    present = [m for m in markers if (out / m).exists()]
    if present:
        raise FileExistsError(f"output_dir={str(out)!r} already holds {what} ({', '.join(present[:4])}); {remedies}")

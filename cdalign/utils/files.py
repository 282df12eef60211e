"""Output folders that hold no earlier run. (Files and folders written whole or not at
all: :mod:`cdalign.runs.atomic`.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


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

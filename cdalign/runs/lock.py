"""One run per folder: a lock file that a run holds on its ``output_dir`` for its whole life.

``acquire_run_lock(folder)`` creates ``<folder>/.cdalign-run.lock`` atomically (``O_CREAT |
O_EXCL``) holding who took it (pid, host, start time, command line). A second process that
asks for the same folder is refused at once with :class:`RunFolderLocked` (a
``FileExistsError``: scripts exit 2), naming the holder and the ways out. A lock left by a
process that is gone (same host, pid no longer running, or running but started after the
lock was written: a reused pid) is taken over with a warning that names the dead holder,
never silently. A lock from another host cannot be checked and is refused like a live one.

The process that took a lock holds it until it exits (``atexit``) or calls
:func:`release_run_lock`; asking again from the same process is a no-op, so one process may
build several runs on one folder in turn (a notebook, the tests). Under ``accelerate
launch`` only the process of rank 0 takes the lock: the others share its run."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".cdalign-run.lock"
_held: dict[Path, Path] = {}  # folder (resolved) -> its lock file, held by this process


class RunFolderLocked(FileExistsError):
    """Another live process holds the run folder's lock."""


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where /proc
    cannot tell (another OS, no permission)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime, clock ticks after boot (field 22 of proc(5))
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _holder_alive(holder: dict) -> bool:
    """Whether the process that wrote ``holder`` still runs (always True for another host,
    which this process cannot check)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    started = _process_start(pid)
    # a pid reused by a process started after the lock was written is not the holder
    return started is None or started <= float(holder.get("started", 0)) + 1.0


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    cmd = " ".join(holder.get("argv", []))[:120]
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {when}" + (f" ({cmd})" if cmd else "")


def _read(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or unreadable: a writer died mid-write (it writes a few bytes at once)


def acquire_run_lock(folder: str | os.PathLike) -> Path | None:
    """Take the run lock of ``folder`` (created if missing) for this process; returns the
    lock file, or None on a process of rank > 0 (which takes none). Raises
    :class:`RunFolderLocked` while another live process holds it."""
    if not _is_rank_zero():
        return None
    out = Path(folder)
    key = out.resolve()
    if key in _held:
        return _held[key]
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv[:8]}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(lock)
            if holder is None:
                continue  # released between our open and our read: try again
            if holder and _holder_alive(holder):
                raise RunFolderLocked(
                    f"output_dir={str(out)!r} is in use by another run ({_describe(holder)}); wait for it to finish, "
                    f"choose another output_dir, or, if that process is gone, delete {str(lock)!r}"
                )
            logger.warning("output_dir=%r: taking over the lock of a run that is gone (%s)", str(out),
                           _describe(holder) if holder else "unreadable lock file")
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(me))
        _held[key] = lock
        return lock
    raise RunFolderLocked(f"output_dir={str(out)!r}: could not take its lock {str(lock)!r}; another run keeps taking it")


def release_run_lock(folder: str | os.PathLike) -> None:
    """Give back this process's lock on ``folder`` (nothing if it holds none)."""
    lock = _held.pop(Path(folder).resolve(), None)
    if lock is None:
        return
    holder = _read(lock)
    if holder and holder.get("pid") == os.getpid():
        try:
            lock.unlink()
        except FileNotFoundError:
            pass


@atexit.register
def _release_all() -> None:
    for folder in list(_held):
        release_run_lock(folder)

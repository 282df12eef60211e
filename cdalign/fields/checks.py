"""Checks of run settings against this machine, made before a run starts (so a bad
setting fails in a second with a message naming the field, not after model loading):
the output folder is writable, the named trackers are installed, float16 is not asked
of a CPU. Each raises ``ValueError`` naming the field (or flag) ``field_name``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["TRACKER_PACKAGES", "check_mixed_precision", "check_output_dir_writable", "check_trackers_installed"]


def check_output_dir_writable(path, field_name: str = "output_dir") -> None:
    """Raise ``ValueError`` naming ``path`` unless it is a folder this process can write
    into, or one it can create (its nearest existing ancestor is a writable folder).
    Reads the file system only; creates nothing."""
    path = Path(path).expanduser()
    shown = f"{field_name}={str(path)!r}"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{shown} is a file, not a folder; choose another {field_name} (or move the file away)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"{shown} cannot be created: {str(existing)!r} is a file, not a folder; choose another {field_name}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == path else f"its parent {str(existing)!r}"
        raise ValueError(f"{shown} is not writable ({where}: permission denied); choose a folder you can write to")


# Tracker name -> (modules accelerate looks for, the package to install).
TRACKER_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "trackio": (("trackio",), "trackio"),
}


def check_trackers_installed(names, field_name: str = "report_to") -> None:
    """Raise ``ValueError`` naming the package to install for each tracker in ``names``
    that is not importable ('all' and 'none' need nothing: accelerate uses what exists)."""
    missing = [n for n in names if n in TRACKER_PACKAGES
               and not any(importlib.util.find_spec(m) for m in TRACKER_PACKAGES[n][0])]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[n][1] for n in missing)
        raise ValueError(
            f"{field_name}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
            f"`pip install {packages}`, or set {field_name} to none (metrics are written to output_dir anyway)"
        )


def check_mixed_precision(mixed_precision: str, device, field_name: str = "mixed_precision") -> None:
    """Refuse ``fp16`` (or ``float16``) on a CPU (``ValueError``): float16 is a GPU format;
    on a CPU it is slow where it runs at all, so a run would not be what was asked for."""
    if mixed_precision in ("fp16", "float16") and getattr(device, "type", str(device)) == "cpu":
        others = "'float32' or 'bfloat16'" if mixed_precision == "float16" else "'no' (float32) or 'bf16'"
        raise ValueError(
            f"{field_name}: {mixed_precision!r} needs a GPU, and this process runs on the CPU; use {others} on a CPU"
        )

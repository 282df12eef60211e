"""Loading reward-model weights safely from a resolved local folder
(:mod:`cdalign.hub_access.model_files` finds or fetches it): safetensors, or legacy
``.pt/.pth/.bin`` pickles with ``torch.load(weights_only=True)`` only; remote code is
never trusted, and a checkpoint that does not match its model is refused naming the keys."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Iterable, Mapping

import torch

from cdalign.console import quiet_libraries


def load_state_dict(path: Path, purpose: str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a pickle read with ``weights_only=True``.

    A pickle that needs arbitrary code (a whole pickled ``nn.Module``, numpy objects)
    is refused with an error that says how to convert it to a plain state dict.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"{purpose}: {path.name} cannot be loaded with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). cdalign never unpickles arbitrary objects. If the file "
            "is a trusted pickled model, convert it once in the environment that created it: "
            "`m = torch.load(path, weights_only=False); safetensors.torch.save_file("
            "{k: v.contiguous() for k, v in m.state_dict().items()}, 'model.safetensors')` "
            "and point the reward at the new file."
        ) from err
    return unwrap_state_dict(obj, path.name, purpose)


def unwrap_state_dict(obj, filename: str, purpose: str) -> dict[str, torch.Tensor]:
    """Accept ``{name: tensor}`` or a training checkpoint ``{"state_dict" | "model": {...}}``."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RuntimeError(f"{purpose}: {filename} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], purpose: str, ignore: Iterable[str] = ()) -> None:
    """``module.load_state_dict(strict=True)`` in float32, with an error that lists what
    is missing or unexpected. Keys matching a pattern of ``ignore`` are dropped first."""
    ignore = tuple(ignore)
    kept = {
        k: (v.float() if v.is_floating_point() else v)
        for k, v in state_dict.items()
        if not any(fnmatch.fnmatchcase(k, pattern) for pattern in ignore)
    }
    expected = set(module.state_dict())
    missing = sorted(expected - set(kept))
    unexpected = sorted(set(kept) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"{purpose}: the checkpoint does not match the model: "
            f"{len(missing)} missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    module.load_state_dict(kept, strict=True)


def from_pretrained_checked(cls, folder: Path, purpose: str, allow_unexpected: bool = False, **kwargs):
    """``cls.from_pretrained(folder)`` (a resolved local folder) in float32, eval mode,
    frozen; fails if any weight was missing from the checkpoint (randomly initialised)."""
    with quiet_libraries():  # per-load reports and bars: what loaded is checked below
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32, **kwargs)
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    if missing or mismatched or (unexpected and not allow_unexpected):
        raise RuntimeError(
            f"{purpose}: {cls.__name__} weights in {folder} do not match its config: missing {missing[:8]}, "
            f"mismatched {mismatched[:8]}, unexpected {unexpected[:8] if not allow_unexpected else []}"
        )
    model.requires_grad_(False)
    return model.eval()

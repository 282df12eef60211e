"""Checkpoint folders of a run: optimizer state in safetensors and JSON only, sharded
(FSDP2) tensors gathered whole and scattered back, and the ``checkpoint-<step>`` folders of
an output folder (found, resolved for a resume, rotated, their leftovers removed).

A folder is written through :func:`cdalign.runs.atomic.atomic_directory`, so a crash never
leaves a checkpoint that looks complete, and never replaces a good one."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cdalign.runs.distributed import full_tensor, like_param

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded (FSDP2 ``DTensor``) state tensor
    gathered whole. A collective on a sharded model: call it on every process."""

    sd = optimizer.state_dict()
    state = {idx: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in st.items()} for idx, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def optimizer_to_files(optimizer: torch.optim.Optimizer, directory: Path, state_dict: dict | None = None) -> None:
    """Optimizer state as ``optimizer.safetensors`` (tensors) + ``optimizer.json`` (the rest).
    ``state_dict``: a :func:`gathered_optimizer_state` taken beforehand (sharded model)."""
    sd = optimizer.state_dict() if state_dict is None else state_dict
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def optimizer_from_files(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    meta = json.loads((directory / "optimizer.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    # Sharded parameters (FSDP2 DTensors) take their per-parameter state in the same layout.
    # (Imported here: torch.distributed.tensor takes ~0.8 s to import; `import cdalign` stays light.)
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, st in state.items():
        p = params[idx] if idx < len(params) else None
        if isinstance(p, DTensor):
            for name, v in st.items():
                if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape):  # exp_avg etc.; not the step count
                    st[name] = like_param(v, p)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def copy_into_param(param: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Copy ``full`` (a whole tensor of ``param``'s shape, e.g. read from a checkpoint) into
    ``param`` in place; a sharded (FSDP2 ``DTensor``) parameter takes this process's shard."""
    # Imported here: torch.distributed.tensor takes ~0.8 s to import; `import cdalign` stays light.
    from torch.distributed.tensor import DTensor

    value = like_param(full, param)
    if isinstance(value, DTensor):
        param.to_local().copy_(value.to_local())
    else:
        param.copy_(value)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike) -> Path:
    """``spec`` is a checkpoint folder or ``latest`` (the newest in ``output_dir``)."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint='latest': no checkpoint-N folder in {str(output_dir)!r}")
        return found[-1]
    path = Path(spec)
    if not (path / "trainer_state.json").is_file() or not (path / "lora.safetensors").is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={spec!r} is not a cdalign checkpoint (expected trainer_state.json and "
            "lora.safetensors in it); give a checkpoint-N folder or 'latest'"
        )
    return path


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete half-written ``.<name>.tmp-<pid>`` folders/files a killed run left behind
    (they never look like complete checkpoints; this only reclaims the space)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    stale = [p for p in out.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name or p.name.startswith(".lora-tmp-"))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> None:
    if not keep or keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)

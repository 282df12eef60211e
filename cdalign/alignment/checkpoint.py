"""What a training checkpoint holds, and how it is restored.

``checkpoint-<step>/`` holds the LoRA weights (``lora.safetensors``, whole fp32 tensors),
AdamW's state (``optimizer.safetensors`` + ``optimizer.json``), the trainer's own state
(``trainer_state.json``: :class:`TrainerState`) and the run's ``config.yaml`` (checked on
resume). It holds no RNG state: every training draw is seeded from the run's seed and the
micro-batch counter (cdalign.core.seeding), so the counters restore the draws.
:func:`write_checkpoint` and :func:`read_checkpoint` are the pair; the folder is written
atomically (cdalign.runs.atomic, cdalign.runs.checkpoints)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cdalign.alignment.config import ConstrainedDDPOConfig, save_config
from cdalign.models.lora import check_safetensors
from cdalign.runs.atomic import atomic_directory
from cdalign.runs.checkpoints import copy_into_param, optimizer_from_files, optimizer_to_files

LORA_FILE = "lora.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class TrainerState:
    """The trainer's state besides weights and optimizer, as saved in ``trainer_state.json``.

    ``slack_sum`` / ``slack_count``: per-constraint slacks summed over the micro-batches
    since the last dual step (the dual step averages them). ``duals`` / ``monitor``: the
    ``state_dict`` of the dual optimizer and of the infeasibility monitor. ``normalizers``:
    reward name → :class:`~cdalign.core.normalization.RewardStats` fields;
    ``normalization_keys``: what they were computed for (None in checkpoints of older cdalign).
    ``history``: the logged step records. ``estimator``: the estimator's own state (the
    policy gradient's per-prompt reward statistics; empty for a stateless estimator). ``targets``:
    the confidence targets' running moments (:class:`~cdalign.core.targets.ConfidenceTargets`)
    and the per-image moment sums since the last dual step (empty in older checkpoints)."""

    global_step: int
    micro_batches_seen: int
    nonfinite_batches: int
    duals: dict
    monitor: dict
    slack_sum: list[float]
    slack_count: int
    normalizers: dict[str, dict]
    normalization_keys: dict[str, dict | None] | None
    history: list[dict]
    estimator: dict = dataclasses.field(default_factory=dict)
    targets: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> TrainerState:
        return cls(**{"normalization_keys": None, **{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}})


def check_checkpoint_files(path: str | os.PathLike) -> None:
    """The safetensors files of checkpoint folder ``path`` are complete (``CorruptFileError``
    naming the file otherwise, e.g. after a crash or a full disk while copying it)."""
    for name in (LORA_FILE, "optimizer.safetensors"):
        if (Path(path) / name).is_file():
            check_safetensors(Path(path) / name, what="resume_from_checkpoint")


def write_checkpoint(
    folder: str | os.PathLike,
    *,
    lora: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    optimizer_state: dict,
    state: TrainerState,
    config: ConstrainedDDPOConfig,
) -> Path:
    """Write checkpoint ``folder`` atomically (it replaces an older one only once complete).
    ``lora``: whole LoRA tensors by parameter name; ``optimizer_state``: a
    :func:`~cdalign.runs.checkpoints.gathered_optimizer_state` of ``optimizer``. Called
    by the main process only, after every process took part in gathering those two."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        save_file(lora, str(tmp / LORA_FILE))
        optimizer_to_files(optimizer, tmp, optimizer_state)
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
        save_config(config, tmp / CONFIG_FILE)
    return folder


def read_checkpoint(
    folder: str | os.PathLike, *, lora_params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> TrainerState:
    """Restore checkpoint ``folder`` into the LoRA parameters (a sharded parameter takes this
    process's shard) and ``optimizer``, and return its :class:`TrainerState`. Raises
    ``ValueError`` when the saved LoRA does not match ``lora_params`` (names or shapes)."""
    folder = Path(folder)
    check_checkpoint_files(folder)
    lora = load_file(str(folder / LORA_FILE))
    if set(lora) != set(lora_params):
        raise ValueError(f"checkpoint {str(folder)!r} does not match this LoRA configuration (rank/targets differ)")
    for name, p in lora_params.items():
        if lora[name].shape != p.shape:
            raise ValueError(
                f"checkpoint {str(folder)!r}: {name} has shape {tuple(lora[name].shape)}, expected {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in lora_params.items():
            copy_into_param(p, lora[name])
    optimizer_from_files(optimizer, folder)
    return TrainerState.from_dict(json.loads((folder / TRAINER_STATE_FILE).read_text()))

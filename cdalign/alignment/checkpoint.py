"""What a training checkpoint holds, and how it is restored.

``checkpoint-<step>/`` holds the LoRA weights (``lora.safetensors``, whole fp32 tensors),
AdamW's state (``optimizer.safetensors`` + ``optimizer.json``), the trainer's own state
(``trainer_state.json``: :class:`TrainerState`) and the run's ``config.yaml`` (checked on
resume). It holds no RNG state: every training draw is seeded from the run's seed and the
micro-batch counter (cdalign.core.seeding), so the counters restore the draws.
:func:`write_checkpoint` and :func:`read_checkpoint` are the pair; the folder is written
atomically (cdalign.runs.atomic, cdalign.runs.checkpoints). :func:`save_trainer_checkpoint`
and :func:`load_trainer_checkpoint` capture and restore a trainer's state through them, and
:func:`check_resume_config` compares a checkpoint's config with the run resuming it (every
field but :data:`RESUME_MAY_DIFFER`, through :func:`cdalign.runs.folders.check_resume_config`)."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cdalign.alignment.config import ConstrainedDDPOConfig, config_from_dict, config_to_dict, save_config
from cdalign.alignment.estimators import RolloutEstimator
from cdalign.console import CdalignWarning
from cdalign.core.normalization import RewardStats
from cdalign.models.lora import check_safetensors
from cdalign.rewards.remote import transport_free
from cdalign.runs import folders
from cdalign.runs.atomic import atomic_directory
from cdalign.runs.checkpoints import (
    copy_into_param,
    gathered_optimizer_state,
    optimizer_from_files,
    optimizer_to_files,
    rotate_checkpoints,
)

LORA_FILE = "lora.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
# Config fields a resumed run may change: length, cadence, destination, evaluation and
# reporting. Any other difference from the checkpoint's config changes the run itself.
RESUME_MAY_DIFFER = (
    "max_steps", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_allow_config_change",
    "logging_steps", "save_steps", "save_total_limit", "report_to", "push_to_hub", "hub_model_id", "hub_private",
    "normalization_cache_dir", "max_nonfinite_batches", "eval_prompts", "eval_batches", "eval_seed", "num_grid_images",
    "reuse_base_evaluation", "ddp_timeout", "num_threads",
)


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
    with atomic_directory(folder, what="checkpoint") as tmp:
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


def check_resume_config(path: str | os.PathLike, config: ConstrainedDDPOConfig) -> None:
    """Refuse to resume from checkpoint ``path`` when its saved config differs from
    ``config`` (the resuming run's recorded config, Hub sources pinned) in a field that
    changes the run (all but :data:`RESUME_MAY_DIFFER`, and a remote reward's
    :data:`~cdalign.rewards.remote.TRANSPORT_FIELDS`), unless
    ``resume_allow_config_change``; then warn, naming the fields
    (:func:`cdalign.runs.folders.check_resume_config`)."""
    folders.check_resume_config(
        path, _comparable(config_to_dict(config)), normalize=lambda raw: _comparable(config_to_dict(config_from_dict(raw))),
        may_differ=RESUME_MAY_DIFFER, allow_change=config.resume_allow_config_change,
    )


def _comparable(config: dict) -> dict:
    """``config`` as the resume comparison sees it: a remote reward's server address and
    transport settings may change (a server restarted elsewhere), its scorer may not."""
    return {**config, "remote_rewards": transport_free(config.get("remote_rewards") or {})}


def save_trainer_checkpoint(trainer) -> Path:
    """``output_dir/checkpoint-<step>`` of a ``ConstrainedDDPOTrainer``: its LoRA, optimizer
    and :class:`TrainerState` (counters, duals, monitor, the dual window's running sums,
    confidence targets, reward statistics and their keys, history, the estimator's state)
    and recorded config; keeps the last ``save_total_limit``. Every process calls it
    (sharded state is gathered first); the main process writes."""
    acc = trainer.accelerator
    final = trainer.output_dir / f"checkpoint-{trainer.global_step}"
    lora = trainer.lora_state()  # gathered on every process (collectives when sharded)
    optimizer_state = gathered_optimizer_state(trainer.optimizer)
    if acc.is_main_process:
        state = TrainerState(
            global_step=trainer.global_step,
            micro_batches_seen=trainer.micro_batches_seen,
            nonfinite_batches=trainer.nonfinite_batches,
            duals=trainer.duals.state_dict(),
            monitor=trainer.monitor.state_dict(),
            slack_sum=trainer.window.slack_sum.tolist(),
            slack_count=trainer.window.slack_count,
            targets={**trainer.targets.state_dict(), "moment_sum": trainer.window.moment_sum.tolist()},
            normalizers={n: s.__dict__ for n, s in trainer.normalizers.items()},
            normalization_keys={n: trainer.normalization_keys()[n] for n in trainer.normalizers},
            history=trainer.history,
            estimator=trainer.estimator.state_dict() if isinstance(trainer.estimator, RolloutEstimator) else {},
        )
        write_checkpoint(
            final, lora=lora, optimizer=trainer.optimizer, optimizer_state=optimizer_state, state=state,
            config=trainer.recorded_config(),
        )
        rotate_checkpoints(trainer.output_dir, trainer.config.save_total_limit)
    acc.wait_for_everyone()
    return final


def load_trainer_checkpoint(trainer, path: str | os.PathLike) -> None:
    """Restore checkpoint folder ``path`` into a ``ConstrainedDDPOTrainer`` (the state
    :func:`save_trainer_checkpoint` captured). Reward statistics computed for another
    reward, model or setting are dropped (recomputed, with a warning); the main process
    cuts ``log.jsonl`` back to the checkpoint's step."""
    state = read_checkpoint(path, lora_params=trainer._lora_params(), optimizer=trainer.optimizer)
    trainer.global_step = state.global_step
    trainer.micro_batches_seen = state.micro_batches_seen
    trainer.nonfinite_batches = state.nonfinite_batches
    trainer.duals.load_state_dict(state.duals)
    trainer.monitor.load_state_dict(state.monitor)
    trainer.window.slack_sum = torch.tensor(state.slack_sum, dtype=torch.float64)
    trainer.window.slack_count = state.slack_count
    trainer.targets.load_state_dict(state.targets)
    if state.targets.get("moment_sum"):
        trainer.window.moment_sum = torch.tensor(state.targets["moment_sum"], dtype=torch.float64)
    trainer.problem.margins = trainer.targets.margins()
    trainer.normalizers.clear()
    saved_keys, current = state.normalization_keys, trainer.normalization_keys()
    stale = sorted(
        n for n in state.normalizers
        if saved_keys is not None and (current.get(n) is None or saved_keys.get(n) != current.get(n))
    )
    if stale:  # statistics of another reward, model or setting: computed afresh instead (all, so none is missing)
        warnings.warn(
            f"checkpoint {str(path)!r}: the reward statistics of {', '.join(stale)} were computed for another "
            "reward, model or setting (or a user callable without cache_key); recomputing them",
            CdalignWarning, stacklevel=3,
        )
    else:
        trainer.normalizers.update({n: RewardStats(**s) for n, s in state.normalizers.items()})
    trainer.history = state.history
    if isinstance(trainer.estimator, RolloutEstimator):
        trainer.estimator.load_state_dict(state.estimator)
    if trainer.accelerator.is_main_process:  # the log continues from the checkpoint
        folders.cut_log(trainer.output_dir, trainer.global_step)

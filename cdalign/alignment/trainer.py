"""ConstrainedDDPOTrainer: constrained multi-reward alignment of a diffusion model.

Primal: LoRA weights θ minimise the Lagrangian ``f_0 + Σ λ_i g_i`` with a gradient
estimator (reward backpropagation through DDIM by default). Dual: λ ascend on the
slacks averaged over the global batch (projected ascent or νPI). See METHOD.md §1.

The shape follows TRL's old DDPO trainer: ``__init__`` wires, ``step`` is one optimiser
step, ``train`` loops, ``save_model`` writes a LoRA in the diffusers format."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm

from cdalign.alignment.checkpoint import (
    TrainerState,
    check_checkpoint_files,
    read_checkpoint,
    write_checkpoint,
)
from cdalign.alignment.config import ConstrainedDDPOConfig, config_from_dict, config_to_dict, save_config
from cdalign.alignment.estimators import ESTIMATORS, MicroBatch, RolloutEstimator, is_finite_batch
from cdalign.alignment.normalization import compute_reward_statistics
from cdalign.core.duals import InfeasibilityMonitor, build_dual_optimizer
from cdalign.core.families import denoiser_of, family_of, freeze_pipeline
from cdalign.core.normalization import RewardStats
from cdalign.core.problem import ConstrainedProblem
from cdalign.core.sampling import DiffusionSampler
from cdalign.core.seeding import (
    LORA_INIT,
    TRAIN_BATCH,
    derived_seed,
    evaluation_items,
    grouped_batch_share,
)
from cdalign.core.statistics import met_label, paired_difference, summarize
from cdalign.core.targets import ConfidenceTargets, target_of
from cdalign.data.prompt_sets import load_prompts_with_source
from cdalign.evaluation.scoring import EVAL_VALUES_FILE, AdaptedModel, BaseModel, save_eval_values, score_checkpoints
from cdalign.fields import check_mixed_precision, check_output_dir_writable, check_trackers_installed, read_yaml_mapping
from cdalign.models.adapters import model_fingerprint
from cdalign.models.lora import (
    LORA_WEIGHT_NAME,
    adapter_state_dict,
    add_lora_adapter,
    save_adapter,
)
from cdalign.models.pipeline import load_pipeline_with_source, precision_dtype
from cdalign.publishing.cards import write_model_card
from cdalign.publishing.hub import push_output_dir
from cdalign.publishing.plotting import plot_duals, save_grid
from cdalign.rewards import REWARDS
from cdalign.rewards.metrics import EVAL_METRICS
from cdalign.runs import distributed
from cdalign.runs.atomic import atomic_write_text
from cdalign.runs.checkpoints import (
    gathered_optimizer_state,
    list_checkpoints,
    remove_stale_temporaries,
    resolve_checkpoint,
    rotate_checkpoints,
)
from cdalign.runs.distributed import full_tensor
from cdalign.runs.fingerprints import callable_name, prompts_fingerprint, reward_identity
from cdalign.utils.files import check_no_previous_run

logger = logging.getLogger(__name__)

# Below this many evaluation images a constraint verdict is mostly sampling noise (measured on the
# tiny model: 16 base images read +0.15σ / +0.55σ against the base model's own statistics).
MIN_VERDICT_IMAGES = 32

RUN_MARKERS = ("config.yaml", "log.jsonl", LORA_WEIGHT_NAME, "report.json")
RUN_PICTURES = ("samples_base_vs_aligned.png", "duals.png")
# Config fields a resumed run may change: length, cadence, destination, evaluation and
# reporting. Any other difference from the checkpoint's config changes the run itself.
# Fields a Hub source pins to its resolved commit in config.yaml: known only once the model
# has been fetched, so a resume compares them after loading (everything else before).
PINNED_FIELDS = ("revision", "prompt_revision")
RESUME_MAY_DIFFER = (
    "max_steps", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_allow_config_change",
    "logging_steps", "save_steps", "save_total_limit", "report_to", "push_to_hub", "hub_model_id", "hub_private",
    "normalization_cache_dir", "max_nonfinite_batches", "eval_prompts", "eval_batches", "eval_seed", "num_grid_images",
)


class TrainingInterrupted(Exception):
    """``train()`` stopped on SIGINT/SIGTERM after a whole optimiser step and saved
    ``checkpoint``; ``resume_from_checkpoint='latest'`` continues the run exactly."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint
        super().__init__(f"interrupted by {signal.Signals(self.signum).name} at step {step}; checkpoint at {checkpoint}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class _CallableReward(torch.nn.Module):
    """Adapts a plain ``f(images, prompts) -> (B,)`` callable to the Reward interface."""

    def __init__(self, name: str, fn: Callable):
        super().__init__()
        self.name, self.fn, self.differentiable = name, fn, getattr(fn, "differentiable", True)

    def forward(self, images, prompts):
        return torch.as_tensor(self.fn(images, prompts))


class ConstrainedDDPOTrainer:
    """Constrained alignment of a Stable Diffusion pipeline with LoRA on its UNet.

    Args:
        config: a :class:`~cdalign.alignment.config.ConstrainedDDPOConfig`.
        pipeline: a loaded ``StableDiffusionPipeline``, a Hub id / local folder / embedded
            name, or None for ``config.pretrained_model_name_or_path``.
        rewards: ``{name: Reward or callable(images, prompts) -> (B,)}``; names the
            problem needs and that are missing are built from ``cdalign.rewards.REWARDS``.
            A user reward's base-model statistics are cached only if it has a ``cache_key``
            attribute (a string you change whenever the function changes); otherwise they
            are recomputed every run. ``config.yaml`` marks it in ``reward_sources``.
        prompts / eval_prompts: a list, a callable, or anything ``load_prompts`` takes;
            None uses ``config.prompts`` / ``config.eval_prompts``. A list or a callable is
            recorded in ``config.yaml`` as the list of prompts used.
        accelerator: an ``accelerate.Accelerator`` (one is made from the config if None).
        shard_unet: shard the UNet (base weights, LoRA, gradients and optimizer state) over
            the processes with FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per
            UNet block plus the root) instead of replicating it. None (default): shard when
            accelerate is configured for FSDP (``recipes/accelerate_configs/fsdp.yaml``).
            Results match the replicated run up to floating-point reduction order.
    """

    def __init__(
        self,
        config: ConstrainedDDPOConfig,
        pipeline=None,
        rewards: Mapping[str, Callable] | None = None,
        prompts: Sequence[str] | Callable | str | None = None,
        eval_prompts: Sequence[str] | Callable | str | None = None,
        accelerator=None,
        shard_unet: bool | None = None,
    ):
        config.validate()
        self.config = cfg = config
        self.problem = ConstrainedProblem.from_config(cfg)
        self.output_dir = Path(cfg.output_dir)
        self.resume_path = None
        if cfg.resume_from_checkpoint:
            self.resume_path = resolve_checkpoint(cfg.resume_from_checkpoint, self.output_dir)
            check_checkpoint_files(self.resume_path)  # a torn checkpoint fails before the model loads
        self._check_output_dir()

        check_trackers_installed(cfg.report_to_list)
        check_mixed_precision(cfg.mixed_precision, (accelerator or PartialState()).device)
        log_with = cfg.report_to_list or None
        self.accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with)
        acc = self.accelerator
        self.device = acc.device

        self.prompts, prompts_snapshot = load_prompts_with_source(
            cfg.prompts if prompts is None else prompts, cfg.prompt_column, cfg.prompt_split, cfg.prompt_revision
        )
        eval_source = eval_prompts if eval_prompts is not None else (cfg.eval_prompts or None)
        eval_snapshot = prompts_snapshot
        if eval_source is not None:
            self.eval_prompts, eval_snapshot = load_prompts_with_source(
                eval_source, cfg.prompt_column, cfg.eval_prompt_split or cfg.prompt_split, cfg.prompt_revision
            )
        else:
            self.eval_prompts = self.prompts
        # What the run read from the Hub: repo id, asked revision, resolved commit (None: not from
        # the Hub); the model's entry is filled when it loads.
        self.sources = {
            "model": None,
            "prompts": prompts_snapshot.record() if prompts_snapshot else None,
            "eval_prompts": eval_snapshot.record() if eval_snapshot else None,
        }
        self._recorded_prompts = {
            "prompts": _recordable_prompts(prompts, self.prompts),
            "eval_prompts": _recordable_prompts(eval_prompts, self.eval_prompts),
        }
        self._user_rewards = dict(rewards or {})
        self.reward_sources = {
            n: f"user callable {callable_name(fn)} (not recordable"
            + (f"; cache_key {str(fn.cache_key)!r})" if getattr(fn, "cache_key", None) is not None else ")")
            for n, fn in self._user_rewards.items()
        }
        for n, source in cfg.reward_sources.items():
            if n not in self._user_rewards:
                warnings.warn(
                    f"reward {n!r}: the config records it as {source}, which a config cannot rebuild; this run "
                    f"uses the registry reward {n!r} instead (pass the callable again with rewards= to reuse it)",
                    stacklevel=2,
                )
        if self.resume_path is not None:
            self._check_resume_config(self.resume_path)

        weight_dtype = precision_dtype(cfg.mixed_precision)
        model_snapshot = None
        if pipeline is None or isinstance(pipeline, str):
            name = cfg.pretrained_model_name_or_path if pipeline is None else pipeline
            pipeline, model_snapshot = load_pipeline_with_source(name, revision=cfg.revision, variant=cfg.variant)
            self.model_name = name
        else:
            self.model_name = getattr(pipeline, "name_or_path", None) or pipeline.config.get("_name_or_path", "pipeline")
        self.pipe = pipeline
        self.family = family_of(pipeline)  # an unsupported pipeline class fails here, naming the supported ones
        self.denoiser = self.family.denoiser_of(pipeline)
        self.sources["model"] = model_snapshot.record() if model_snapshot else None
        if self.resume_path is not None:
            self._check_resume_config(self.resume_path, pinned=True)
        distributed.check_distributed_setup(acc)
        self.sharded = distributed.wants_sharding(acc, shard_unet)
        self._prepare_models(weight_dtype)
        self.base_fingerprint = model_fingerprint(self.denoiser)  # before sharding
        if self.sharded:
            distributed.shard_unet(self.denoiser, distributed.fsdp_plugin(acc))

        self.rewards = self._build_rewards(rewards or {})
        self.sampler = DiffusionSampler(
            self.pipe, cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.resolution, self.device
        )
        self.normalizers: dict[str, RewardStats] = {}
        self.estimator = ESTIMATORS.get(cfg.estimator)(self.sampler, self.problem, self.rewards, self.normalizers, cfg)

        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        self.duals = build_dual_optimizer(cfg.dual, len(self.problem.constraints))
        self.monitor = InfeasibilityMonitor(self.problem.names)
        self.targets = self._confidence_targets()
        self.problem.margins = self.targets.margins()
        self._moment_sum = torch.zeros(len(self.problem.constraints), 3, dtype=torch.float64)
        self.update_every = cfg.dual_update_every
        self.global_step = 0
        self.micro_batches_seen = 0
        self.nonfinite_batches = 0
        self.history: list[dict] = []
        self._slack_sum = torch.zeros(len(self.problem.constraints), dtype=torch.float64)
        self._slack_count = 0
        self._normalization_keys: dict[str, dict | None] | None = None
        self._stop_signal: int | None = None
        if self.resume_path is None and cfg.overwrite_output_dir:
            if acc.is_main_process:  # only now that everything above succeeded
                self._clear_previous_run()
            acc.wait_for_everyone()
        if acc.is_main_process and log_with:
            acc.init_trackers("cdalign", config=_flat(config_to_dict(self.recorded_config())))

    # ------------------------------------------------------------------ setup
    def _check_output_dir(self):
        check_output_dir_writable(self.output_dir)  # a file, or a folder this process cannot write: refused
        if self.resume_path is not None or self.config.overwrite_output_dir:
            return
        markers = [*RUN_MARKERS, *(p.name for p in list_checkpoints(self.output_dir))]
        check_no_previous_run(
            self.output_dir, markers, remedies="set overwrite_output_dir=true to replace it, "
            "resume_from_checkpoint=latest to continue it, or choose another output_dir",
        )

    def _clear_previous_run(self) -> list[str]:
        """Before a fresh run writes into ``output_dir`` (``overwrite_output_dir``): remove
        what an earlier run wrote there, so no old checkpoint, log line or picture passes for
        this run's. Only cdalign's own files go: the run markers, ``checkpoint-N`` folders
        holding a trainer state, the pictures, a cdalign model card, stale temporaries."""
        out = self.output_dir
        if not out.is_dir():
            return []
        removed = [n for n in (*RUN_MARKERS, *RUN_PICTURES, EVAL_VALUES_FILE) if (out / n).is_file()]
        for name in removed:
            (out / name).unlink()
        card = out / "README.md"
        if card.is_file() and _is_cdalign_card(card):
            card.unlink()
            removed.append(card.name)
        for ckpt in list_checkpoints(out):
            if (ckpt / "trainer_state.json").is_file():
                shutil.rmtree(ckpt)
                removed.append(ckpt.name)
        remove_stale_temporaries(out)
        if removed:
            logger.info("overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(removed), out)
        return removed

    def recorded_config(self) -> ConstrainedDDPOConfig:
        """The config as this trainer runs it, for ``config.yaml`` and checkpoints: prompts
        passed to the trainer replace the config's sources (a list or a callable as the
        list of prompts used), and ``reward_sources`` marks rewards from user callables."""
        changes: dict = {"reward_sources": dict(self.reward_sources)}
        for key, value in self._recorded_prompts.items():
            if value is not None:
                changes[key] = value
        # Hub sources pinned to the commits they resolved to: a rerun of config.yaml reads the same files.
        if self.sources["model"]:
            changes["revision"] = self.sources["model"]["commit"]
        prompt_commits = {s["commit"] for s in (self.sources["prompts"], self.sources["eval_prompts"]) if s}
        if len(prompt_commits) == 1:
            changes["prompt_revision"] = prompt_commits.pop()
        return dataclasses.replace(self.config, **changes)

    def _check_resume_config(self, path: Path, pinned: bool = False) -> None:
        """Refuse to resume from a checkpoint whose saved config differs from this run's in a
        field that changes the run (all but :data:`RESUME_MAY_DIFFER`), unless
        ``resume_allow_config_change``; then warn, naming the fields. ``pinned``: compare
        only :data:`PINNED_FIELDS` (after the sources resolved), else all the others."""
        saved_path = Path(path) / "config.yaml"
        if not saved_path.is_file():
            warnings.warn(
                f"checkpoint {str(path)!r} holds no config.yaml (an older cdalign wrote it): cannot check that it "
                "belongs to a run with these settings",
                stacklevel=3,
            )
            return
        raw = read_yaml_mapping(saved_path)
        try:
            saved = config_to_dict(config_from_dict(raw))
        except ValueError:
            saved = raw  # a config of another cdalign version: compare the fields it has
        current = config_to_dict(self.recorded_config())
        changed = [(k, old, new) for k, old, new in _config_differences(saved, current)
                   if (top := re.split(r"[.\[]", k, maxsplit=1)[0]) not in RESUME_MAY_DIFFER
                   and (top in PINNED_FIELDS) == pinned]
        if not changed:
            return
        listing = "; ".join(f"{k}: {_short(old)} in the checkpoint, {_short(new)} now" for k, old, new in changed)
        if not self.config.resume_allow_config_change:
            raise ValueError(
                f"resume_from_checkpoint: {str(path)!r} was written by a run with other settings ({listing}); "
                "resuming would mix two runs. Resume with the checkpoint's settings (its config.yaml), start a new "
                "run (another output_dir, or overwrite_output_dir=true), or set resume_allow_config_change=true"
            )
        msg = f"resuming from {str(path)!r}, whose run had other settings: {listing} (resume_allow_config_change=true)"
        warnings.warn(msg, stacklevel=3)
        logger.warning(msg)

    def _prepare_models(self, weight_dtype):
        pipe, cfg = self.pipe, self.config
        freeze_pipeline(pipe)
        # LoRA B starts at zero: the initial model *is* the base model (chain KL = 0). A's
        # random init is drawn on the CPU from the run's seed, not from the global RNG.
        denoiser = denoiser_of(pipe)
        denoiser.to("cpu")
        add_lora_adapter(denoiser, "default", rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                         target_modules=cfg.lora_target_modules,
                         seed=derived_seed(cfg.seed, LORA_INIT))
        pipe.to(self.device)
        if weight_dtype != torch.float32:  # frozen weights in half precision
            for module in family_of(pipe).modules(pipe):
                module.to(dtype=weight_dtype)
        for p in denoiser.parameters():
            if p.requires_grad:  # trainable LoRA weights stay fp32 under mixed precision
                p.data = p.data.float()
        pipe.set_progress_bar_config(disable=True)

    def _build_rewards(self, given: Mapping[str, Callable]) -> dict:
        rewards = {}
        for name, fn in given.items():
            rewards[name] = fn if isinstance(fn, torch.nn.Module) else _CallableReward(name, fn)
        for name in self.problem.reward_names:
            if name not in rewards:
                rewards[name] = REWARDS.build(name, **self.config.reward_kwargs.get(name, {}))
        for r in rewards.values():  # whether the estimator can use each reward is the estimator's check
            r.to(self.device)
        return rewards

    def _lora_params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.denoiser.named_parameters() if p.requires_grad}

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The trainable LoRA weights as whole fp32 CPU tensors, by parameter name. On a
        sharded UNet this gathers the shards: call it on every process."""
        return {n: full_tensor(p.detach()).float().cpu().contiguous() for n, p in self._lora_params().items()}

    # ------------------------------------------------------------------ batches
    def _global_batch(self, purpose: int, index: int, prompts: list[str], size: int):
        """This process's share of a global batch: (prompts, image seeds, generator)."""
        acc, cfg = self.accelerator, self.config
        return grouped_batch_share(
            cfg.seed, purpose, index, prompts, size, cfg.images_per_prompt, acc.num_processes, acc.process_index
        )

    # ------------------------------------------------------------------ normalisation
    def normalization_keys(self) -> dict[str, dict | None]:
        """Per reward, the key of its base-model statistics: what the reward is
        (:func:`~cdalign.core.normalization.reward_identity`: registry name, kwargs, weights; or
        a user callable's ``cache_key``), the base model, prompts and sampler settings.
        None: a user callable without ``cache_key``, whose statistics are never reused."""
        if self._normalization_keys is None:
            cfg = self.config
            base_key = {
                "model": self.model_name,
                # the commit a Hub revision resolved to (a branch that moves recomputes); else as given
                "revision": self.sources["model"]["commit"] if self.sources["model"] else cfg.revision,
                "weights": self.base_fingerprint,
                "prompts": prompts_fingerprint(self.prompts),
                "sampler": self.sampler.settings(),
                "batches": cfg.normalization_batches,
                "global_batch": cfg.train_batch_size * self.accelerator.num_processes,
                "seed": cfg.seed,
            }
            keys = {}
            for n, reward in self.rewards.items():
                user = n in self._user_rewards
                identity = reward_identity(
                    n, self._user_rewards[n] if user else reward, kwargs=cfg.reward_kwargs.get(n, {}), user=user
                )
                key = {"reward": n, "reward_identity": identity, **base_key}
                # Through JSON once, so keys compare equal to the ones read back from a checkpoint.
                keys[n] = None if identity is None else json.loads(json.dumps(key, default=str))
            self._normalization_keys = keys
        return self._normalization_keys

    def compute_normalization(self) -> dict[str, RewardStats]:
        """Mean/std of every reward on base-model samples of the training prompts,
        gathered over processes and cached (reused only on a matching key; a user
        callable without ``cache_key`` is recomputed every run); see
        :func:`~cdalign.alignment.normalization.compute_reward_statistics`."""
        cfg = self.config
        self.normalizers.update(  # in place: the estimator holds this dict
            compute_reward_statistics(
                self.sampler, self.rewards, self.prompts, self.accelerator,
                keys=self.normalization_keys(), cache_dir=cfg.normalization_cache_dir,
                batches=cfg.normalization_batches, batch_size=cfg.train_batch_size, seed=cfg.seed,
            )
        )
        return dict(self.normalizers)

    def ensure_normalization(self) -> None:
        """Compute the reward statistics if the problem normalises a reward and none are
        loaded yet (from a checkpoint or an earlier call). Every process calls it."""
        if not self.normalizers and any(self.problem.normalized(n) for n in self.problem.reward_names):
            self.compute_normalization()

    # ------------------------------------------------------------------ training
    def _micro_batch(self, index: int) -> MicroBatch:
        prompts, seeds, g = self._global_batch(TRAIN_BATCH, index, self.prompts, self.config.train_batch_size)
        multipliers = self.duals.multipliers.to(torch.float32)
        with self.accelerator.autocast():
            return self.estimator(prompts, seeds, multipliers, g)

    def step(self) -> dict:
        """One optimiser step: ``gradient_accumulation_steps`` micro-batches, dual updates
        every ``update_every`` micro-batches, gradients averaged over processes.

        With a :class:`~cdalign.alignment.estimators.RolloutEstimator` (``policy_gradient``)
        one step is one round: the micro-batches are sampled without gradient (duals
        updated on the same cadence), then trained on for ``ppo_epochs`` inner epochs of
        ``ppo_updates_per_epoch`` optimiser updates each."""
        cfg, acc = self.config, self.accelerator
        self.ensure_normalization()
        self.denoiser.train()
        self.optimizer.zero_grad(set_to_none=True)
        rollouts = isinstance(self.estimator, RolloutEstimator)
        records: list[MicroBatch] = []
        for _ in range(cfg.gradient_accumulation_steps):
            with torch.no_grad() if rollouts else contextlib.nullcontext():
                mb = self._micro_batch(self.micro_batches_seen)
            self.micro_batches_seen += 1
            if distributed.on_all_processes(is_finite_batch(mb), acc):
                if not rollouts:
                    acc.backward(mb.loss / cfg.gradient_accumulation_steps)
                records.append(mb)
                self._slack_sum += mb.slacks.double().cpu()
                self._slack_count += 1
                if self.targets.active:
                    self._moment_sum += self.targets.batch_moments(self._per_image_values(mb))
            else:
                self.nonfinite_batches += 1
                warnings.warn(
                    f"step {self.global_step}: non-finite reward/KL/loss; micro-batch skipped "
                    f"({self.nonfinite_batches}/{cfg.max_nonfinite_batches} allowed)",
                    stacklevel=2,
                )
                if self.nonfinite_batches > cfg.max_nonfinite_batches:
                    raise RuntimeError(
                        f"{self.nonfinite_batches} micro-batches had non-finite rewards, KL or loss "
                        f"(max_nonfinite_batches={cfg.max_nonfinite_batches}); check the rewards and the "
                        "learning rate. The last saved checkpoint and LoRA are left as they were."
                    )
            del mb
            if self.micro_batches_seen % self.update_every == 0:
                self._dual_step()
        if rollouts:
            grad_norm, extra = self._train_on_rollouts(records)
        else:
            grad_norm, extra = self._optimizer_update(), {}
        self.global_step += 1
        return self._log_step(records, grad_norm, extra)

    def _optimizer_update(self) -> float | None:
        """Average the LoRA gradients over processes, clip them, take one AdamW step;
        returns the gradient norm before clipping (None without ``max_grad_norm``)."""
        cfg, acc = self.config, self.accelerator
        params = list(self._lora_params().values())
        if not self.sharded:  # a sharded UNet's gradients are already averaged (FSDP's reduce-scatter)
            distributed.reduce_gradients(params, acc)
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
        self.optimizer.step()
        return grad_norm

    def _train_on_rollouts(self, records: list[MicroBatch]) -> tuple[float | None, dict]:
        """``ppo_epochs`` inner epochs over the round's rollouts, each split into
        ``ppo_updates_per_epoch`` optimiser updates (micro-batches in sampling order; every
        process the same number). Returns the last update's gradient norm and the PPO
        diagnostics (``ppo/…``) for the log."""
        cfg, acc = self.config, self.accelerator
        per_update = max(1, cfg.gradient_accumulation_steps // cfg.ppo_updates_per_epoch)
        grad_norm, norms, updates = None, [], 0
        for epoch in range(cfg.ppo_epochs):
            for k in range(cfg.ppo_updates_per_epoch):
                # the update's share of the micro-batches (fewer when non-finite ones were skipped)
                chunk = records[k * per_update : (k + 1) * per_update]
                if not chunk:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                for mb in chunk:
                    for loss in self.estimator.surrogate_losses(mb, epoch, updates, acc.autocast):
                        acc.backward(loss / len(chunk))
                grad_norm = self._optimizer_update()
                updates += 1
                if grad_norm is not None:
                    norms.append(grad_norm)
        extra = {f"ppo/{k}": v for k, v in self.estimator.pop_stats().items()}
        extra["ppo/updates"] = float(updates)
        if norms:
            extra["ppo/grad_norm_mean"] = sum(norms) / len(norms)
        return grad_norm, extra

    def _confidence_targets(self) -> ConfidenceTargets:
        """The constraints' margins (:mod:`cdalign.core.targets`): from ``confidence`` (the
        verdict's held-out sample size is ``eval_batches × train_batch_size × processes``),
        or a fixed ``margin``; none for a KL constraint."""
        cfg, specs = self.config, self.config.constraints
        stats = self.normalizers
        prior = []
        # per-image std before the first dual step: 1 in base-model std units; in raw units the base
        # statistics when already loaded, else 0 (that first window aims at the threshold itself)
        for c in self.problem.constraints:
            raw = stats.get(c.source)
            prior.append(1.0 if (c.normalize or c.is_kl) else (raw.std if raw is not None else 0.0))
        num_images = max(cfg.eval_batches, 1) * cfg.train_batch_size * self.accelerator.num_processes
        return ConfidenceTargets([s.confidence for s in specs], [s.margin for s in specs], prior, num_images)

    def _per_image_values(self, mb: MicroBatch) -> list[torch.Tensor]:
        """Each constraint's per-image values (B,) in a micro-batch, in its own units."""
        out = []
        for c in self.problem.constraints:
            if c.is_kl:
                out.append(mb.kl if mb.kl is not None else torch.zeros(0))
            else:
                out.append((mb.rewards_norm if c.normalize else mb.rewards_raw)[c.source])
        return out

    def _dual_step(self):
        acc = self.accelerator
        stats = torch.cat([self._slack_sum, torch.tensor([float(self._slack_count)], dtype=torch.float64),
                           self._moment_sum.flatten()])
        if acc.num_processes > 1:
            stats = acc.reduce(stats.to(self.device), reduction="sum").cpu()
        m = len(self.problem.constraints)
        self._slack_sum.zero_()
        self._slack_count = 0
        self._moment_sum.zero_()
        count = float(stats[m])
        if count == 0 or not self.problem.constraints:
            return
        slacks = stats[:m] / count
        multipliers = self.duals.step(slacks)
        if self.targets.active:  # the next window's slacks are measured from the refreshed targets
            self.problem.margins = self.targets.update(stats[m + 1 :].reshape(m, 3))
        for name in self.monitor.update(multipliers, slacks, self.global_step):
            msg = (
                f"constraint {name!r} looks infeasible: its dual variable keeps growing while its slack "
                f"does not improve (step {self.global_step}); consider loosening its threshold"
            )
            warnings.warn(msg, stacklevel=2)
            logger.warning(msg)

    def _log_step(self, records: list[MicroBatch], grad_norm, extra: dict | None = None) -> dict:
        acc, prob = self.accelerator, self.problem
        names = list(records[0].rewards_raw) if records else []
        keys, vals = [], []

        def add(key, tensors):
            keys.append(key)
            vals.append(torch.stack([t.float().mean() for t in tensors]).mean() if tensors else torch.tensor(float("nan")))

        add("loss", [r.loss.detach() for r in records])
        add("objective", [r.objective for r in records])
        if prob.needs_kl:
            add("kl", [r.kl for r in records])
        for n in names:
            add(f"reward/{n}", [r.rewards_raw[n] for r in records])
            add(f"reward_normalized/{n}", [r.rewards_norm[n] for r in records])
        for j, c in enumerate(prob.constraints):
            add(f"value/{c.name}", [r.values[j] for r in records])
            add(f"slack/{c.name}", [r.slacks[j] for r in records])
        for key, value in (extra or {}).items():  # estimator diagnostics (PPO ratio, clip fraction): process means
            keys.append(key)
            vals.append(torch.tensor(float(value)))
        vec = torch.stack(vals).to(self.device)
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="mean")
        log = {"step": self.global_step, **{k: float(v) for k, v in zip(keys, vec.cpu())}}
        for j, c in enumerate(prob.constraints):
            log[f"dual/{c.name}"] = float(self.duals.multipliers[j])
            if self.targets.active:
                log[f"margin/{c.name}"] = float(prob.margins[j])
        log["backprop_steps"] = records[-1].num_grad_steps if records else 0
        log["skipped_micro_batches"] = self.nonfinite_batches
        if grad_norm is not None:
            log["grad_norm"] = grad_norm
        self.history.append(log)
        if acc.is_main_process:
            if self.config.logging_steps and self.global_step % self.config.logging_steps == 0:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                with open(self.output_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(log) + "\n")
            if acc.trackers:
                acc.log({k: v for k, v in log.items() if k != "step"}, step=self.global_step)
        return log

    def train(self) -> dict:
        """Run ``max_steps`` optimiser steps (continuing a resumed run), save the LoRA,
        evaluate on held-out samples and write the report, grid and plots. Last, it ends
        the run's process group and frees it (:func:`~cdalign.models.distributed.end_process_group`):
        a sharded UNet's shards cannot be gathered afterwards; the saved LoRA holds them.

        SIGINT/SIGTERM while it trains stop it after the current optimiser step: it saves
        ``checkpoint-<step>`` and raises :class:`TrainingInterrupted` (a second Ctrl-C
        interrupts at once, without a checkpoint). The previous handlers are restored."""
        cfg, acc = self.config, self.accelerator
        if cfg.eval_batches < 1:  # refused before training, not after it
            raise ValueError("eval_batches: train() ends with the evaluation its report and model card come from; "
                             "give eval_batches >= 1 (0 only for driving step() yourself)")
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.output_dir)
            save_config(self.recorded_config(), self.output_dir / "config.yaml")
        acc.wait_for_everyone()
        with self._stop_on_signals():
            saved = None  # (step, checkpoint) of the newest checkpoint holding this state
            if self.resume_path is not None:
                self.load_checkpoint(self.resume_path)
                saved = (self.global_step, self.resume_path)
            self.ensure_normalization()
            bar = tqdm(total=cfg.max_steps, initial=self.global_step, desc="constrained alignment", disable=not acc.is_main_process)
            stopping = self._stop_requested()
            while not stopping and self.global_step < cfg.max_steps:
                log = self.step()
                slacks = [v for k, v in log.items() if k.startswith("slack/")]
                post = {}
                if "kl" in log:
                    post["kl"] = f"{log['kl']:.4g}"
                if slacks:
                    post["worst_slack"] = f"{max(slacks):+.3f}"
                bar.set_postfix(post)
                bar.update(1)
                if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.global_step < cfg.max_steps:
                    saved = (self.global_step, self.save_checkpoint())
                stopping = self._stop_requested()
            bar.close()
            if stopping:
                checkpoint = saved[1] if saved and saved[0] == self.global_step else self.save_checkpoint()
                distributed.end_process_group(acc)
                raise TrainingInterrupted(self._stop_signal or signal.SIGTERM, self.global_step, checkpoint)
        self.save_model(self.output_dir)
        report = self.evaluate()
        if self.reward_sources:
            report["reward_sources"] = dict(self.reward_sources)
        if acc.is_main_process:
            atomic_write_text(self.output_dir / "report.json", json.dumps(report, indent=2))
            self._plot_history()
            self._write_model_card(report)
        if cfg.push_to_hub:
            self.push_to_hub()
        distributed.end_process_group(acc)
        return report

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While training: SIGINT/SIGTERM only set a flag, read between optimiser steps by
        :meth:`_stop_requested` (no step is cut in half); a second Ctrl-C (SIGINT after
        SIGINT) raises KeyboardInterrupt at once. A SIGTERM after a SIGINT (what a launcher
        sends its workers on Ctrl-C) changes nothing. Outside the main thread a no-op."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if signum == signal.SIGINT and self._stop_signal == signal.SIGINT:
                raise KeyboardInterrupt
            if self._stop_signal is None:
                self._stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _stop_requested(self) -> bool:
        """Whether any process was signalled to stop: all processes stop at the same step."""
        return not distributed.on_all_processes(self._stop_signal is None, self.accelerator)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, num_batches: int | None = None) -> dict:
        """Held-out evaluation with fixed seeds: base and aligned images from the same noise,
        each reward's and metric's mean with its 95% CI for both models and the *paired*
        aligned − base difference, each constraint's verdict (:meth:`Constraint.verdict
        <cdalign.core.problem.Constraint.verdict>`) on its measured values, and the chain
        KL over all steps (estimator named in the report).

        The images are :func:`~cdalign.core.seeding.evaluation_items` of ``eval_prompts``
        (``num_batches × train_batch_size`` per process, ``eval_seed``), scored by
        :func:`~cdalign.evaluation.scoring.score_checkpoints`: the evaluation harness
        scores the same images for the same prompts, count and seed."""
        cfg, acc, prob = self.config, self.accelerator, self.problem
        self.ensure_normalization()
        self.denoiser.eval()
        batches = cfg.eval_batches if num_batches is None else num_batches
        size = cfg.train_batch_size
        # batches × processes batches of train_batch_size: every process scores as many
        # (a sharded UNet needs every process in every forward).
        items = evaluation_items(self.eval_prompts, batches * size * acc.num_processes, cfg.eval_seed)
        scores = score_checkpoints(
            self.sampler, {"base": BaseModel, "aligned": AdaptedModel}, items, batch_size=size,
            rewards=self.rewards, metrics={name: EVAL_METRICS.get(name) for name in cfg.eval_metrics},
            kl_estimator=cfg.kl_estimator, stats=self.normalizers, autocast=acc.autocast,
        )
        base, aligned = scores["base"], scores["aligned"]
        n_images = aligned.n
        if n_images < MIN_VERDICT_IMAGES:
            warnings.warn(
                f"evaluation on {n_images} images: a constraint verdict from fewer than {MIN_VERDICT_IMAGES} is "
                "mostly sampling noise (raise eval_batches)",
                stacklevel=2,
            )
        report = {
            "model": self.model_name,
            "pipeline_class": self.family.pipeline_class,
            "pipeline_absent_components": self.family.absent_components(self.pipe),
            "sampler": {**self.sampler.settings(), "chain": type(self.sampler.chain).__name__,
                        "eta_meaning": self.family.eta_meaning},
            "steps": self.global_step,
            "num_eval_images": n_images,
            "eval": {"seed": cfg.eval_seed, "images": n_images, "prompts": len(self.eval_prompts), "paired": True},
        }
        rewards_report = {}
        for n in self.rewards:
            entry = {}
            for key, model in (("base", base), ("aligned", aligned)):
                s = summarize(model.rewards[n])
                entry[key] = {"mean": s["mean"], "ci95": s["ci95"]}
                if n in model.normalized:
                    s = summarize(model.normalized[n])
                    entry[key]["normalized_mean"] = s["mean"]
                    entry[key]["normalized_ci95"] = s["ci95"]
            normed = n in aligned.normalized
            treated, control = (aligned.normalized[n], base.normalized[n]) if normed else (aligned.rewards[n], base.rewards[n])
            entry["difference"] = paired_difference(treated, control)
            entry["difference"]["units"] = "base std" if normed else "raw"
            rewards_report[n] = entry
        report["rewards"] = rewards_report
        if cfg.eval_metrics:
            report["metrics"] = {}
            for k in aligned.metrics:
                aligned_v, base_v = aligned.metrics[k], base.metrics[k]
                keep = ~(aligned_v.isnan() | base_v.isnan())
                report["metrics"][k] = {
                    "base": summarize(base_v[keep]),
                    "aligned": summarize(aligned_v[keep]),
                    "difference": paired_difference(aligned_v[keep], base_v[keep]),
                }
        kl = summarize(aligned.kl["base"])
        report["kl"] = {"estimator": cfg.kl_estimator, "units": "nats", "mean": kl["mean"], "ci95": kl["ci95"], "n": n_images}
        constraints = []
        for j, c in enumerate(prob.constraints):
            values, base_values = aligned.constraint_values(c), base.constraint_values(c)
            verdict, base_verdict = c.verdict(values), c.verdict(base_values)
            constraints.append(
                {
                    "name": c.name,
                    "source": c.source,
                    "direction": c.direction,
                    "threshold": c.threshold,
                    "normalized": c.normalize,
                    "units": "kl nats (" + cfg.kl_estimator + ")" if c.is_kl else ("base std" if c.normalize else "raw"),
                    "n": verdict["n"],
                    "measured": verdict["measured"],
                    "ci95": verdict["ci95"],
                    "base_measured": base_verdict["measured"],
                    "base_ci95": base_verdict["ci95"],
                    "base_slack": base_verdict["slack"],
                    "difference": paired_difference(values, base_values),
                    "slack": verdict["slack"],
                    "satisfied": verdict["satisfied"],
                    "ci_clears_threshold": verdict["ci_clears_threshold"],
                    "met": met_label(verdict),
                    "target": target_of(c.threshold, float(prob.margins[j]), c.direction),
                    "target_from": self.targets.describe(j),
                    "dual": float(self.duals.multipliers[j]),
                    "flagged_infeasible_at_step": self.monitor.flagged.get(c.name),
                }
            )
        report["constraints"] = constraints
        obj = prob.objective
        if obj.is_kl:
            report["objective"] = {"type": "kl", "value": report["kl"]["mean"]}
        else:
            values = aligned.normalized[obj.source] if obj.normalize else aligned.rewards[obj.source]
            report["objective"] = {"type": "reward", "reward": obj.source, "value": float(values.mean())}
        # the estimator and its own settings (the model card's training table lists them)
        report["estimator"] = {"name": cfg.estimator,
                               "settings": {f: getattr(cfg, f) for f in type(self.estimator).config_fields}}
        ppo = [h for h in self.history if "ppo/ratio_mean" in h]
        if ppo:  # the policy gradient's PPO diagnostics over the run's rounds
            report["estimator"] |= {
                "rounds": len(ppo),
                "optimizer_updates": int(sum(h["ppo/updates"] for h in ppo)),
                **{k: float(sum(h[f"ppo/{k}"] for h in ppo) / len(ppo)) for k in ("ratio_mean", "clip_fraction", "approx_kl")},
                "first_update_max_abs_log_ratio": max(h["ppo/first_update_max_abs_log_ratio"] for h in ppo),
                "what": "means over rounds of each round's mean over trained steps: PPO ratio, share of clipped ratios, "
                "½·mean(log ratio)²; first_update_max_abs_log_ratio: max |log ratio| in each round's first update, "
                "before any parameter changed (0: the ratio is exactly 1 there)",
            }
        report["all_satisfied"] = all(c["satisfied"] for c in constraints)
        report["infeasible"] = sorted(self.monitor.flagged)
        report["normalization"] = {n: s.__dict__ for n, s in self.normalizers.items()}
        report["sources"] = self.sources
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # per-image values, in item order: paired comparisons across runs (benchmarks/frontier.py)
            per_image = {"kl": aligned.kl["base"]}
            for c in prob.constraints:
                per_image[f"aligned/{c.name}"] = aligned.constraint_values(c)
                per_image[f"base/{c.name}"] = base.constraint_values(c)
            for k in aligned.metrics:
                per_image[f"aligned/metric/{k}"], per_image[f"base/metric/{k}"] = aligned.metrics[k], base.metrics[k]
            save_eval_values(self.output_dir / EVAL_VALUES_FILE, per_image)
            report["eval_values"] = EVAL_VALUES_FILE
        if acc.is_main_process and cfg.num_grid_images > 0:
            k = cfg.num_grid_images
            rows = [base.images[:k].float() / 255.0, aligned.images[:k].float() / 255.0]
            save_grid(self.output_dir / "samples_base_vs_aligned.png", rows, ["base", "aligned"])
            report["sample_grid"] = "samples_base_vs_aligned.png"
        return report

    def _plot_history(self):
        if not self.history:
            return
        names = self.problem.names
        steps = [h["step"] for h in self.history]
        lam = [[h.get(f"dual/{n}", float("nan")) for n in names] for h in self.history]
        sl = [[h.get(f"slack/{n}", float("nan")) for n in names] for h in self.history]
        kl = [h["kl"] for h in self.history] if "kl" in self.history[0] else None
        plot_duals(self.output_dir / "duals.png", steps, names, lam, sl, kl)

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` (loadable with
        ``pipe.load_lora_weights(output_dir)``). Refuses non-finite weights, and replaces
        an existing file only once the new one is completely written. Call it on every
        process (a sharded UNet's weights are gathered first); the main process writes."""
        out = Path(output_dir or self.output_dir)
        main = self.accelerator.is_main_process
        # Sharded: every process takes part in gathering the weights; replicated: the writer reads its own.
        state = adapter_state_dict(self.denoiser, "default") if (self.sharded or main) else None
        if main:
            save_adapter(self.denoiser, "default", out, state=state)
        self.accelerator.wait_for_everyone()
        return out / LORA_WEIGHT_NAME

    def save_checkpoint(self) -> Path | None:
        """``output_dir/checkpoint-<step>`` (:func:`~cdalign.alignment.checkpoint.write_checkpoint`:
        LoRA, optimizer, :class:`~cdalign.alignment.checkpoint.TrainerState`, config),
        written atomically; keeps the last ``save_total_limit``. Call it on every process
        (sharded state is gathered first); the main process writes."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{self.global_step}"
        lora = self.lora_state()  # gathered on every process (collectives when sharded)
        optimizer_state = gathered_optimizer_state(self.optimizer)
        if acc.is_main_process:
            state = TrainerState(
                global_step=self.global_step,
                micro_batches_seen=self.micro_batches_seen,
                nonfinite_batches=self.nonfinite_batches,
                duals=self.duals.state_dict(),
                monitor=self.monitor.state_dict(),
                slack_sum=self._slack_sum.tolist(),
                slack_count=self._slack_count,
                targets={**self.targets.state_dict(), "moment_sum": self._moment_sum.tolist()},
                normalizers={n: s.__dict__ for n, s in self.normalizers.items()},
                normalization_keys={n: self.normalization_keys()[n] for n in self.normalizers},
                history=self.history,
                estimator=self.estimator.state_dict() if isinstance(self.estimator, RolloutEstimator) else {},
            )
            write_checkpoint(
                final, lora=lora, optimizer=self.optimizer, optimizer_state=optimizer_state, state=state,
                config=self.recorded_config(),
            )
            rotate_checkpoints(self.output_dir, self.config.save_total_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Continue from checkpoint ``path`` (a folder or ``latest``): LoRA, optimizer and
        :class:`~cdalign.alignment.checkpoint.TrainerState`; reward statistics computed for
        another reward, model or setting are dropped (recomputed, with a warning); the main
        process cuts ``log.jsonl`` back to the checkpoint's step."""
        path = resolve_checkpoint(str(path), self.output_dir)
        if self.resume_path is None or path.resolve() != Path(self.resume_path).resolve():
            self._check_resume_config(path)  # the constructor checked resume_path
            self._check_resume_config(path, pinned=True)
        state = read_checkpoint(path, lora_params=self._lora_params(), optimizer=self.optimizer)
        self.global_step = state.global_step
        self.micro_batches_seen = state.micro_batches_seen
        self.nonfinite_batches = state.nonfinite_batches
        self.duals.load_state_dict(state.duals)
        self.monitor.load_state_dict(state.monitor)
        self._slack_sum = torch.tensor(state.slack_sum, dtype=torch.float64)
        self._slack_count = state.slack_count
        self.targets.load_state_dict(state.targets)
        if state.targets.get("moment_sum"):
            self._moment_sum = torch.tensor(state.targets["moment_sum"], dtype=torch.float64)
        self.problem.margins = self.targets.margins()
        self.normalizers.clear()
        saved_keys, current = state.normalization_keys, self.normalization_keys()
        stale = sorted(
            n for n in state.normalizers
            if saved_keys is not None and (current.get(n) is None or saved_keys.get(n) != current.get(n))
        )
        if stale:  # statistics of another reward, model or setting: computed afresh instead (all, so none is missing)
            warnings.warn(
                f"checkpoint {str(path)!r}: the reward statistics of {', '.join(stale)} were computed for another "
                "reward, model or setting (or a user callable without cache_key); recomputing them",
                stacklevel=2,
            )
        else:
            self.normalizers.update({n: RewardStats(**s) for n, s in state.normalizers.items()})
        self.history = state.history
        if isinstance(self.estimator, RolloutEstimator):
            self.estimator.load_state_dict(state.estimator)
        if self.accelerator.is_main_process:  # the log continues from the checkpoint
            log = self.output_dir / "log.jsonl"
            if log.exists():
                kept = [l for l in log.read_text().splitlines() if l and json.loads(l)["step"] <= self.global_step]
                atomic_write_text(log, "".join(l + "\n" for l in kept))

    def push_to_hub(self, repo_id: str | None = None, private: bool | None = None, commit_message: str | None = None) -> str:
        """Upload ``output_dir`` (LoRA, model card, config, report, pictures; not the
        checkpoints) to the Hub in one commit, after the local save, so a failed push loses
        nothing and can be retried (``python -m cdalign.hub push <output_dir> --repo_id ...``).
        Returns the commit URL; raises :class:`cdalign.hub.HubPushError` on failure."""
        repo_id = repo_id or self.config.hub_model_id
        if not repo_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. 'your-name/sd15-constrained-lora')")
        if not (self.output_dir / LORA_WEIGHT_NAME).is_file():
            self.save_model(self.output_dir)
        url, error = "", None
        if self.accelerator.is_main_process:
            try:
                url = push_output_dir(
                    self.output_dir,
                    repo_id,
                    private=self.config.hub_private if private is None else private,
                    commit_message=commit_message or f"cdalign: constrained LoRA after {self.global_step} steps",
                )
            except Exception as err:  # re-raised after the barrier, so other ranks do not hang
                error = err
        self.accelerator.wait_for_everyone()
        if error is not None:
            raise error
        return url

    def _write_model_card(self, report: dict) -> None:
        """``output_dir/README.md`` from the config and report (cdalign.publishing.cards). A card that
        cannot be rendered warns instead of failing a finished run."""
        try:
            write_model_card(self.output_dir, repo_id=self.config.hub_model_id, report=report)
        except Exception as err:
            warnings.warn(f"model card not written to {str(self.output_dir / 'README.md')!r}: {err}", stacklevel=2)

def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def _recordable_prompts(given, resolved: list[str]):
    """What ``config.yaml`` records for a ``prompts``/``eval_prompts`` argument: None (the
    config's own source stands), the source string as given, or the list of prompts used
    (for a list, and for a callable, which a config cannot name)."""
    if given is None:
        return None
    if isinstance(given, str):
        return given
    if callable(given):
        logger.info("prompts from %s: config.yaml records the %d prompts it returned", callable_name(given), len(resolved))
    return list(resolved)


def _is_cdalign_card(path: Path) -> bool:
    """Whether ``README.md`` is a model card cdalign wrote (front matter tagged cdalign)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    head, sep, _ = text[3:].partition("\n---")
    return text.startswith("---") and bool(sep) and "- cdalign" in head


def _config_differences(old, new, path: str = "") -> list[tuple[str, object, object]]:
    """``(field path, old, new)`` for every leaf where two config dicts differ; nested specs
    as ``dual.kappa_i``, lists of specs as ``constraints[1].threshold``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _config_differences(old.get(key, "(absent)"), new.get(key, "(absent)"), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and any(isinstance(v, dict) for v in old):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _config_differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [(path, old, new)]


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

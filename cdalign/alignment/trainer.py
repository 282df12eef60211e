"""ConstrainedDDPOTrainer: constrained multi-reward alignment of a diffusion model.

Primal: LoRA weights θ minimise the Lagrangian ``f_0 + Σ λ_i g_i`` with a gradient
estimator (reward backpropagation through DDIM by default). Dual: λ ascend on the
slacks averaged over the global batch (projected ascent or νPI). See METHOD.md §1.

The shape follows TRL's old DDPO trainer: ``__init__`` wires, ``step`` is one optimiser
step, ``train`` loops, ``save_model`` writes a LoRA in the diffusers format. What is not
the loop lives beside it: the report (:mod:`cdalign.alignment.report`), checkpoint state
(:mod:`cdalign.alignment.checkpoint`), the step log (:mod:`cdalign.alignment.step_log`),
the run folder and the recorded config (:mod:`cdalign.runs.folders`), stopping on a
signal (:mod:`cdalign.runs.signals`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cdalign.alignment import checkpoint as checkpoints
from cdalign.alignment.base_evaluation import BaseEvaluationReuse
from cdalign.alignment.checkpoint import check_checkpoint_files
from cdalign.alignment.config import ConstrainedDDPOConfig, config_to_dict, save_config
from cdalign.alignment.dual_window import DualWindow, confidence_targets, fused_groups
from cdalign.alignment.estimators import ESTIMATORS, BatchEstimate, RolloutEstimator, is_finite_estimate
from cdalign.alignment.normalization import RewardNormalization
from cdalign.alignment.report import DUALS_PLOT_FILE, SAMPLE_GRID_FILE, build_report, plot_history, write_evaluation_files
from cdalign.alignment.step_log import diagnostic_means, flat_config, progress_postfix, step_record
from cdalign.console import CdalignWarning
from cdalign.core.duals import InfeasibilityMonitor, build_dual_optimizer
from cdalign.core.families import family_of
from cdalign.core.normalization import RewardStats
from cdalign.core.problem import ConstrainedProblem
from cdalign.core.sampling import DiffusionSampler
from cdalign.core.seeding import LORA_INIT, TRAIN_BATCH, derived_seed, evaluation_items, grouped_batch_share
from cdalign.data.prompt_sets import load_prompts_with_source
from cdalign.evaluation.scoring import EVAL_VALUES_FILE, AdaptedModel, BaseModel, score_checkpoints
from cdalign.fields import check_mixed_precision, check_trackers_installed
from cdalign.models.adapters import model_fingerprint
from cdalign.models.lora import LORA_WEIGHT_NAME, adapter_state_dict, prepare_lora_training, save_adapter
from cdalign.models.pipeline import load_pipeline_with_source, precision_dtype
from cdalign.publishing.cards import write_model_card_or_warn
from cdalign.publishing.hub import push_from_main_process
from cdalign.rewards.base import build_rewards
from cdalign.rewards.metrics import EVAL_METRICS
from cdalign.rewards.remote import RemoteRewardError, remote_rewards_for
from cdalign.runs import distributed, folders
from cdalign.runs.atomic import StorageError
from cdalign.runs.checkpoints import list_checkpoints, remove_stale_temporaries, resolve_checkpoint
from cdalign.runs.distributed import full_tensor
from cdalign.runs.report import REPORT_FILE, AlignmentReport
from cdalign.runs.lock import release_run_lock
from cdalign.runs.resources import is_out_of_memory, out_of_memory_error, resume_advice, set_cpu_threads
from cdalign.runs.signals import StopSignals, TrainingInterrupted

RUN_FOLDER = folders.RunFolder(
    markers=(folders.CONFIG_FILE, folders.LOG_FILE, LORA_WEIGHT_NAME, REPORT_FILE),
    outputs=(SAMPLE_GRID_FILE, DUALS_PLOT_FILE, EVAL_VALUES_FILE),
    checkpoint_state=checkpoints.TRAINER_STATE_FILE,
    remedies="set overwrite_output_dir=true to replace it, resume_from_checkpoint=latest to continue it, "
    "or choose another output_dir",
)


class ConstrainedDDPOTrainer:
    """Constrained alignment of a diffusion pipeline (SD 1.x/2.x, SD3, FLUX) with LoRA on its denoiser.

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
        shard_denoiser: shard the denoiser (base weights, LoRA, gradients and optimizer state)
            over the processes with FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per
            block of its family plus the root) instead of replicating it. None (default): shard when
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
        shard_denoiser: bool | None = None,
    ):
        config.validate()
        self.config = cfg = config
        self.problem = ConstrainedProblem.from_config(cfg)
        self.output_dir = Path(cfg.output_dir)
        self.resume_path = None
        if cfg.resume_from_checkpoint:
            self.resume_path = resolve_checkpoint(cfg.resume_from_checkpoint, self.output_dir)
            check_checkpoint_files(self.resume_path)  # a torn checkpoint fails before the model loads
        RUN_FOLDER.check(self.output_dir, fresh=self.resume_path is None and not cfg.overwrite_output_dir)

        check_trackers_installed(cfg.report_to_list)
        check_mixed_precision(cfg.mixed_precision, (accelerator or distributed.process_state(cfg.ddp_timeout)).device)
        log_with = cfg.report_to_list or None
        self._owns_accelerator = accelerator is None  # a caller's accelerator (compose, equal weights) stays its own
        self.accelerator = accelerator or distributed.make_accelerator(cfg.ddp_timeout, mixed_precision=cfg.mixed_precision,
                                                                       log_with=log_with)
        acc = self.accelerator
        self.device = acc.device
        self._given_batch_size = cfg.train_batch_size  # recorded as given: the derived one depends on the launch
        self.config = cfg = cfg.for_processes(acc.num_processes)
        set_cpu_threads(self.device, cfg.num_threads)

        self.prompts, prompts_snapshot = load_prompts_with_source(
            cfg.prompts if prompts is None else prompts, cfg.prompt_column, cfg.prompt_split, cfg.prompt_revision
        )
        eval_source = eval_prompts if eval_prompts is not None else (cfg.eval_prompts or None)
        self.eval_prompts, eval_snapshot = (self.prompts, prompts_snapshot) if eval_source is None else (
            load_prompts_with_source(eval_source, cfg.prompt_column, cfg.eval_prompt_split or cfg.prompt_split, cfg.prompt_revision))
        # What the run read from the Hub: repo id, asked revision, resolved commit (None: not from
        # the Hub); the model's entry is filled when it loads.
        self.sources = {
            "model": None,
            "prompts": prompts_snapshot.record() if prompts_snapshot else None,
            "eval_prompts": eval_snapshot.record() if eval_snapshot else None,
        }
        self._recorded_prompts = {
            "prompts": folders.recordable_prompts(prompts, self.prompts),
            "eval_prompts": folders.recordable_prompts(eval_prompts, self.eval_prompts),
        }
        self._user_rewards = dict(rewards or {})
        self.reward_sources = folders.user_reward_sources(self._user_rewards, cfg.reward_sources)

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
        self._checked_resume: set[Path] = set()
        if self.resume_path is not None:  # once the Hub sources resolved: the saved config pins their commits
            self._check_resume_config(self.resume_path)
        distributed.check_distributed_setup(acc)
        self.sharded = distributed.wants_sharding(acc, shard_denoiser)
        prepare_lora_training(self.pipe, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules,
                              seed=derived_seed(cfg.seed, LORA_INIT), device=self.device, weight_dtype=weight_dtype)
        self.base_fingerprint = model_fingerprint(self.denoiser)  # before sharding
        if self.sharded:
            distributed.shard_denoiser(self.denoiser, distributed.fsdp_plugin(acc))

        served = remote_rewards_for(self.problem.reward_names, cfg.remote_rewards)  # a user's callable comes first
        self.rewards = build_rewards({**served, **(rewards or {})}, self.problem.reward_names, cfg.reward_kwargs, self.device)
        self.sampler = DiffusionSampler(self.pipe, cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.resolution, self.device)
        self.normalizers: dict[str, RewardStats] = {}
        self.problem.base_statistics = self.normalizers  # relative constraints read the base means here (filled in place)
        # the base model in the statistics' keys: a Hub revision as the commit it resolved to (a moving branch recomputes)
        model_key = {"model": self.model_name, "revision": self.sources["model"]["commit"] if self.sources["model"]
                     else cfg.revision, "weights": self.base_fingerprint}
        self.normalization = RewardNormalization(self.normalizers, sampler=self.sampler, rewards=self.rewards,
                                                 user_rewards=self._user_rewards, prompts=self.prompts, accelerator=acc,
                                                 config=cfg, model=model_key)
        self.estimator = ESTIMATORS.get(cfg.estimator)(self.sampler, self.problem, self.rewards, self.normalizers, cfg)

        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        self.duals = build_dual_optimizer(cfg.dual, len(self.problem.constraints))
        self.monitor = InfeasibilityMonitor(self.problem.names)
        # a confidence target's margin: the verdict's held-out sample size is eval_batches × train_batch_size × processes
        num_verdict_images = max(cfg.eval_batches, 1) * cfg.train_batch_size * acc.num_processes
        self.targets = confidence_targets(self.problem, cfg.constraints, self.normalizers, num_verdict_images)
        self.problem.margins = self.targets.margins()
        self.window = DualWindow(self.problem, self.duals, self.monitor, self.targets)
        self.update_every = cfg.dual_update_every
        # a step's micro-batches between dual steps in one call per process (fuse_micro_batches; default: on a CPU)
        fuse = cfg.fuse_micro_batches if cfg.fuse_micro_batches is not None else self.device.type == "cpu"
        self.fuse = bool(fuse) and getattr(self.estimator, "fuses", False)
        self.global_step = 0
        self.micro_batches_seen = 0
        self.nonfinite_batches = 0
        self.history: list[dict] = []
        self._stop = StopSignals()
        if acc.is_main_process:  # only now that everything above succeeded: one run per folder
            RUN_FOLDER.claim(self.output_dir, fresh=self.resume_path is None and not cfg.overwrite_output_dir)
        if self.resume_path is None and cfg.overwrite_output_dir:
            if acc.is_main_process:
                RUN_FOLDER.clear(self.output_dir)
            acc.wait_for_everyone()
        if acc.is_main_process and log_with:
            acc.init_trackers("cdalign", config=flat_config(config_to_dict(self.recorded_config())))

    # ------------------------------------------------------------------ setup
    def recorded_config(self) -> ConstrainedDDPOConfig:
        """The config as this trainer runs it, for ``config.yaml`` and checkpoints
        (:func:`~cdalign.runs.folders.recorded_config`): prompts passed to the trainer
        replace the config's sources, ``reward_sources`` marks rewards from user callables,
        Hub sources are pinned to their resolved commits (the model's ``revision``; the
        prompts' ``prompt_revision`` when the training and evaluation prompts agree on one)."""
        model = self.sources["model"]
        return folders.recorded_config(dataclasses.replace(self.config, train_batch_size=self._given_batch_size), {
            "reward_sources": dict(self.reward_sources),
            **self._recorded_prompts,
            "revision": model["commit"] if model else None,
            "prompt_revision": folders.pinned_commit(self.sources["prompts"], self.sources["eval_prompts"]),
        })

    def _check_resume_config(self, path: Path) -> None:
        """The resume comparison (:func:`~cdalign.alignment.checkpoint.check_resume_config`),
        once per checkpoint: after the model loaded, so the pinned Hub commits compare too."""
        key = Path(path).resolve()
        if key not in self._checked_resume:
            checkpoints.check_resume_config(path, self.recorded_config())
            self._checked_resume.add(key)

    def _lora_params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.denoiser.named_parameters() if p.requires_grad}

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The trainable LoRA weights as whole fp32 CPU tensors, by parameter name. On a
        sharded denoiser this gathers the shards: call it on every process."""
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
        """Per reward, the key of its base-model statistics: what the reward is, the base model,
        prompts and sampler settings (:func:`~cdalign.alignment.normalization.normalization_keys`).
        None: a user callable without ``cache_key``, whose statistics are never reused."""
        return self.normalization.keys()

    def compute_normalization(self) -> dict[str, RewardStats]:
        """Mean/std of every reward on base-model samples of the training prompts, gathered
        over processes and cached (reused only on a matching key; a user callable without
        ``cache_key`` is recomputed every run); see
        :func:`~cdalign.alignment.normalization.compute_reward_statistics`."""
        return self.normalization.compute()

    def ensure_normalization(self) -> None:
        """Compute the reward statistics if the problem normalises a reward or holds a
        constraint relative to the base model, and none are loaded yet (from a checkpoint or an earlier call). Every process calls it."""
        if not self.normalizers and self.problem.needs_base_statistics:
            self.compute_normalization()

    # ------------------------------------------------------------------ training
    def _estimate_micro_batches(self, group: list[int]) -> list[BatchEstimate]:
        """The estimates of micro-batches ``group`` (global indices). Fused (several): those whose
        random draws agree (K, the KL steps) share one sampling call (``RewardBackprop.estimate``)."""
        parts = [self._global_batch(TRAIN_BATCH, i, self.prompts, self.config.train_batch_size) for i in group]
        multipliers = self.problem.primal_multipliers(self.duals.multipliers).to(torch.float32)  # λ_j / s_j
        with self.accelerator.autocast():
            if len(parts) == 1:
                return [self.estimator(*parts[0][:2], multipliers, parts[0][2])]
            draws = [self.estimator.draws(g) for _, _, g in parts]
            estimates, i = [], 0
            while i < len(parts):
                j = next((j for j in range(i + 1, len(parts)) if draws[j] != draws[i]), len(parts))
                estimates += self.estimator.estimate([(p, s) for p, s, _ in parts[i:j]], multipliers, draws[i])
                i = j
            return estimates

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
        records: list[BatchEstimate] = []
        for group in fused_groups(self.micro_batches_seen, cfg.gradient_accumulation_steps, self.update_every, self.fuse):
            with torch.no_grad() if rollouts else contextlib.nullcontext():
                estimates = self._estimate_micro_batches(group)
            self.micro_batches_seen += len(group)
            if distributed.on_all_processes(all(is_finite_estimate(e) for e in estimates), acc):
                if not rollouts:
                    acc.backward(sum(e.loss for e in estimates) / cfg.gradient_accumulation_steps)
                    for estimate in estimates:
                        self._backward_score_function(estimate)
                records += estimates
                for estimate in estimates:
                    self.window.add(estimate)
            else:
                self.nonfinite_batches += len(group)
                warnings.warn(
                    f"step {self.global_step}: non-finite reward/KL/loss; {len(group)} micro-batch(es) skipped "
                    f"({self.nonfinite_batches}/{cfg.max_nonfinite_batches} allowed)",
                    CdalignWarning, stacklevel=2,
                )
                if self.nonfinite_batches > cfg.max_nonfinite_batches:
                    raise RuntimeError(
                        f"{self.nonfinite_batches} micro-batches had non-finite rewards, KL or loss "
                        f"(max_nonfinite_batches={cfg.max_nonfinite_batches}); check the rewards and the "
                        "learning rate. The last saved checkpoint and LoRA are left as they were."
                    )
            del estimates
            if self.micro_batches_seen % self.update_every == 0:
                self.window.step(acc, self.device, self.global_step)
        if rollouts:
            grad_norm, extra = self._train_on_rollouts(records)
        else:
            grad_norm, extra = self._optimizer_update(), diagnostic_means(records)
        self.global_step += 1
        return self._log_step(records, grad_norm, extra)

    def _backward_score_function(self, estimate: BatchEstimate) -> None:
        """Backpropagate a reward-backprop micro-batch's score-function terms (constraints with
        ``gradient: score_function`` or ``hybrid``) one sampling step at a time, at the weights that sampled
        it, scaled as its loss; then drop its states (the record keeps the measurements)."""
        term, estimate.score_function = estimate.score_function, None
        if term is not None:
            for loss in term.losses(self.accelerator.autocast):
                self.accelerator.backward(loss / self.config.gradient_accumulation_steps)

    def _optimizer_update(self) -> float | None:
        """Average the LoRA gradients over processes, clip them, take one AdamW step;
        returns the gradient norm before clipping (None without ``max_grad_norm``)."""
        cfg, acc = self.config, self.accelerator
        params = list(self._lora_params().values())
        if not self.sharded:  # a sharded denoiser's gradients are already averaged (FSDP's reduce-scatter)
            distributed.reduce_gradients(params, acc)
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
        self.optimizer.step()
        return grad_norm

    def _train_on_rollouts(self, records: list[BatchEstimate]) -> tuple[float | None, dict]:
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
                for estimate in chunk:
                    for loss in self.estimator.surrogate_losses(estimate, epoch, updates, acc.autocast):
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

    def _log_step(self, records: list[BatchEstimate], grad_norm, extra: dict | None = None) -> dict:
        acc, prob = self.accelerator, self.problem
        log = step_record(self.global_step, records, prob, acc, self.device, multipliers=self.duals.multipliers,
                          margins=prob.margins if self.targets.active else None, skipped=self.nonfinite_batches,
                          grad_norm=grad_norm, extra=extra)
        self.history.append(log)
        if acc.is_main_process:
            if self.config.logging_steps and self.global_step % self.config.logging_steps == 0:
                folders.append_log(self.output_dir, log)
            if acc.trackers:
                acc.log({k: v for k, v in log.items() if k != "step"}, step=self.global_step)
        return log

    def train(self) -> AlignmentReport:
        """Run ``max_steps`` optimiser steps (continuing a resumed run), save the LoRA,
        evaluate on held-out samples and write the report, grid and plots. Last, when it made
        its own accelerator, it ends the run's process group and frees it
        (:func:`~cdalign.runs.distributed.end_process_group`): a sharded denoiser's shards cannot
        be gathered afterwards; the saved LoRA holds them.

        SIGINT/SIGTERM while it trains stop it after the current optimiser step: it saves
        ``checkpoint-<step>`` and raises :class:`TrainingInterrupted` (a second Ctrl-C
        interrupts at once, without a checkpoint). The previous handlers are restored.

        In a multi-process run, a collective that fails because another process died or did
        not answer within ``ddp_timeout`` raises :class:`~cdalign.runs.distributed.ProcessGroupFault`
        naming the ranks; a step out of memory raises :class:`~cdalign.runs.resources.OutOfMemory`."""
        try:
            return self._train()
        except RemoteRewardError as err:  # a server that cannot score: the run stops where it can resume
            advice = resume_advice(list_checkpoints(self.output_dir), "once the server answers again")
            raise RemoteRewardError(f"{err}. The run stopped at step {self.global_step}; {advice}") from None
        except RuntimeError as err:
            if self.accelerator.num_processes == 1 or not distributed.is_collective_failure(err):
                raise
            advice = resume_advice(list_checkpoints(self.output_dir))
            raise distributed.collective_failure_error(err, self.accelerator, self.config.ddp_timeout, advice) from err

    def _end_process_group(self) -> None:
        """End the process group, if this trainer made its accelerator: one passed in (the
        composition's, a script running several trainers) is its caller's to end."""
        if self._owns_accelerator:
            distributed.end_process_group(self.accelerator)

    def _train(self) -> AlignmentReport:
        cfg, acc = self.config, self.accelerator
        if cfg.eval_batches < 1:  # refused before training, not after it
            raise ValueError("eval_batches: train() ends with the evaluation its report and model card come from; "
                             "give eval_batches >= 1 (0 only for driving step() yourself)")
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.output_dir)
            save_config(self.recorded_config(), self.output_dir / folders.CONFIG_FILE)
        acc.wait_for_everyone()
        with self._stop.catching():
            saved = None  # (step, checkpoint) of the newest checkpoint holding this state
            if self.resume_path is not None:
                self.load_checkpoint(self.resume_path)
                saved = (self.global_step, self.resume_path)
            self.ensure_normalization()
            bar = tqdm(total=cfg.max_steps, initial=self.global_step, desc="constrained alignment", disable=not acc.is_main_process)
            stopping = self._stop_requested()
            try:
                while not stopping and self.global_step < cfg.max_steps:
                    bar.set_postfix(progress_postfix(self._step_or_out_of_memory()))
                    bar.update(1)
                    if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.global_step < cfg.max_steps:
                        saved = (self.global_step, self.save_checkpoint())
                    stopping = self._stop_requested()
            finally:  # the bar ends its line, also when a step fails: an error message starts a line of its own
                bar.close()
            if stopping:
                checkpoint = saved[1] if saved and saved[0] == self.global_step else self.save_checkpoint()
                self._end_process_group()
                raise TrainingInterrupted(self._stop.received or signal.SIGTERM, self.global_step, checkpoint)
        self.save_model(self.output_dir)
        report = self.evaluate()
        if self.reward_sources:
            report.reward_sources = dict(self.reward_sources)
        if acc.is_main_process:
            report.write(self.output_dir / REPORT_FILE)
            plot_history(self.output_dir, self.history, self.problem.names)
            write_model_card_or_warn(self.output_dir, repo_id=cfg.hub_model_id, report=report)
        if cfg.push_to_hub:
            self.push_to_hub()
        acc.wait_for_everyone()  # every process returns once the run's files are written (callers read them)
        self._end_process_group()
        release_run_lock(self.output_dir)  # the run is complete: the folder is free for the next one
        return report

    def _step_or_out_of_memory(self) -> dict:
        """:meth:`step`; a step that runs out of CPU or GPU memory raises
        :class:`~cdalign.runs.resources.OutOfMemory` naming the step, the batch, the settings
        to lower and the last complete checkpoint to resume from."""
        try:
            return self.step()
        except (MemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            cfg, backprop = self.config, not isinstance(self.estimator, RolloutEstimator)
            raise out_of_memory_error(
                err, step=self.global_step + 1, device=self.device, train_batch_size=cfg.train_batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                lower=["train_batch_size", "resolution", *(["backprop_steps"] if backprop else [])],
                enable=(["gradient_checkpointing: true"] if backprop and not cfg.gradient_checkpointing else [])
                + (["fuse_micro_batches: false"] if self.fuse else []),
                checkpoints=list_checkpoints(self.output_dir)) from err

    def _stop_requested(self) -> bool:
        """Whether any process was signalled to stop: all processes stop at the same step."""
        return not distributed.on_all_processes(self._stop.received is None, self.accelerator)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, num_batches: int | None = None) -> AlignmentReport:
        """Held-out evaluation with fixed seeds: base and aligned images from the same noise,
        each reward's and metric's mean with its 95% CI for both models and the *paired*
        aligned − base difference, each constraint's verdict (:meth:`Constraint.verdict
        <cdalign.core.problem.Constraint.verdict>`) on its measured values, and the chain
        KL over all steps (estimator named in the report): :func:`~cdalign.alignment.report.build_report`.

        The images are :func:`~cdalign.core.seeding.evaluation_items` of ``eval_prompts``
        (``num_batches × train_batch_size`` per process, ``eval_seed``), scored by
        :func:`~cdalign.evaluation.scoring.score_checkpoints`: the evaluation harness
        scores the same images for the same prompts, count and seed. The base model's values
        come from an earlier run's where everything that decides them matches
        (:class:`~cdalign.alignment.base_evaluation.BaseEvaluationReuse`; ``reuse_base_evaluation``)."""
        cfg, acc = self.config, self.accelerator
        self.ensure_normalization()
        self.denoiser.eval()
        batches = cfg.eval_batches if num_batches is None else num_batches
        size = cfg.train_batch_size
        # batches × processes batches of train_batch_size: every process scores as many
        # (a sharded denoiser needs every process in every forward).
        items = evaluation_items(self.eval_prompts, batches * size * acc.num_processes, cfg.eval_seed)
        metrics = {name: EVAL_METRICS.get(name) for name in cfg.eval_metrics}
        reuse = BaseEvaluationReuse(self, items, metrics)  # the base side, kept across runs (reuse_base_evaluation)
        base = reuse.load(self.normalizers)
        scores = score_checkpoints(
            self.sampler, {"aligned": AdaptedModel} if base is not None else {"base": BaseModel, "aligned": AdaptedModel}, items,
            batch_size=size, rewards=self.rewards, metrics=metrics, kl_estimator=cfg.kl_estimator,
            stats=self.normalizers, autocast=acc.autocast,
        )
        if base is None:
            reuse.save(scores["base"])
        else:
            scores["base"] = base
        report = build_report(self, scores["base"], scores["aligned"])
        if acc.is_main_process:
            write_evaluation_files(self.output_dir, report, self.problem.constraints, scores["base"], scores["aligned"],
                                   cfg.num_grid_images)
        return report

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` (loadable with
        ``pipe.load_lora_weights(output_dir)``). Refuses non-finite weights, and replaces
        an existing file only once the new one is completely written. Call it on every
        process (a sharded denoiser's weights are gathered first); the main process writes."""
        out = Path(output_dir or self.output_dir)
        main = self.accelerator.is_main_process
        # Sharded: every process takes part in gathering the weights; replicated: the writer reads its own.
        state = adapter_state_dict(self.denoiser, "default") if (self.sharded or main) else None
        if main:
            save_adapter(self.denoiser, "default", out, state=state)
        self.accelerator.wait_for_everyone()
        return out / LORA_WEIGHT_NAME

    def save_checkpoint(self) -> Path | None:
        """``output_dir/checkpoint-<step>``, written atomically, the last ``save_total_limit``
        kept (:func:`~cdalign.alignment.checkpoint.save_trainer_checkpoint`). Every process calls it.
        A full disk or an unwritable folder raises :class:`~cdalign.runs.atomic.StorageError`
        naming the folder, the space, the last complete checkpoint and how to resume."""
        try:
            return checkpoints.save_trainer_checkpoint(self)
        except StorageError as err:
            done = list_checkpoints(self.output_dir)
            last = (f"the last complete checkpoint, {str(done[-1])!r}, is intact: resume from it with "
                    "--resume_from_checkpoint latest" if done else "no earlier checkpoint exists")
            raise StorageError(err.errno, f"{err.strerror}; {last}") from err

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Continue from checkpoint ``path`` (a folder or ``latest``; refused, as on resume, when
        its config differs): :func:`~cdalign.alignment.checkpoint.load_trainer_checkpoint`."""
        path = resolve_checkpoint(str(path), self.output_dir)
        self._check_resume_config(path)
        checkpoints.load_trainer_checkpoint(self, path)

    def push_to_hub(self, repo_id: str | None = None, private: bool | None = None, commit_message: str | None = None) -> str:
        """Upload ``output_dir`` (LoRA, model card, config, report, pictures; not the
        checkpoints) to the Hub in one commit, after the local save, so a failed push loses
        nothing and can be retried (``python -m cdalign.hub push <output_dir> --repo_id ...``).
        Returns the commit URL; raises :class:`cdalign.HubPushError` on failure."""
        repo_id = repo_id or self.config.hub_model_id
        if not repo_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. 'your-name/sd15-constrained-lora')")
        if not (self.output_dir / LORA_WEIGHT_NAME).is_file():
            self.save_model(self.output_dir)
        private = self.config.hub_private if private is None else private
        message = commit_message or f"cdalign: constrained LoRA after {self.global_step} steps"
        return push_from_main_process(self.accelerator, self.output_dir, repo_id, private=private, commit_message=message)

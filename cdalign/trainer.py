"""ConstrainedDDPOTrainer: constrained multi-reward alignment of a diffusion model.

Primal: LoRA weights θ minimise the Lagrangian ``f_0 + Σ λ_i g_i`` with a gradient
estimator (reward backpropagation through DDIM by default). Dual: λ ascend on the
slacks averaged over the global batch (projected ascent or νPI). See METHOD.md §1.

The shape follows TRL's old DDPO trainer: ``__init__`` wires, ``step`` is one optimiser
step, ``train`` loops, ``save_model`` writes a LoRA in the diffusers format."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from .checkpointing import (
    atomic_directory,
    atomic_write_text,
    gathered_optimizer_state,
    list_checkpoints,
    optimizer_from_files,
    optimizer_to_files,
    remove_stale_temporaries,
    resolve_checkpoint,
    rotate_checkpoints,
)
from .config import ConstrainedDDPOConfig, config_to_dict, save_config
from .duals import InfeasibilityMonitor, build_dual_optimizer
from .estimators import ESTIMATORS, MicroBatch, is_finite_batch, mean_and_ci, score
from .kl import ChainKLAccumulator, choose_kl_steps
from .lora import LORA_WEIGHT_NAME, adapter_state_dict, full_tensor, like_param, save_adapter
from .normalization import NormalizationCache, RewardStats, prompts_fingerprint, stats_from_samples
from .pipeline import load_pipeline
from .problem import ConstrainedProblem
from .prompts import load_prompts
from .sampling import DiffusionSampler, WithAdaptersDisabled
from .seeding import batch_share, derived_seed, eval_batch_share

logger = logging.getLogger(__name__)

RUN_MARKERS = ("config.yaml", "log.jsonl", LORA_WEIGHT_NAME, "report.json")


class _CallableReward(torch.nn.Module):
    """Adapts a plain ``f(images, prompts) -> (B,)`` callable to the Reward interface."""

    def __init__(self, name: str, fn: Callable):
        super().__init__()
        self.name, self.fn, self.differentiable = name, fn, getattr(fn, "differentiable", True)

    def forward(self, images, prompts):
        return torch.as_tensor(self.fn(images, prompts))


def model_fingerprint(unet) -> str:
    """Identifies base weights for the normalisation cache, whatever their source."""
    h = hashlib.sha256()
    for name, p in sorted(unet.named_parameters()):
        if "lora" in name:
            continue
        flat = p.detach().flatten()
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class ConstrainedDDPOTrainer:
    """Constrained alignment of a Stable Diffusion pipeline with LoRA on its UNet.

    Args:
        config: a :class:`~cdalign.config.ConstrainedDDPOConfig`.
        pipeline: a loaded ``StableDiffusionPipeline``, a Hub id / local folder / embedded
            name, or None for ``config.pretrained_model_name_or_path``.
        rewards: ``{name: Reward or callable(images, prompts) -> (B,)}``; names the
            problem needs and that are missing are built from ``cdalign.rewards.REWARDS``.
        prompts / eval_prompts: a list, a callable, or anything ``load_prompts`` takes;
            None uses ``config.prompts`` / ``config.eval_prompts``.
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
        from accelerate import Accelerator

        config.validate()
        self.config = cfg = config
        self.problem = ConstrainedProblem.from_config(cfg)
        self.output_dir = Path(cfg.output_dir)
        self.resume_path = None
        if cfg.resume_from_checkpoint:
            self.resume_path = resolve_checkpoint(cfg.resume_from_checkpoint, self.output_dir)
        self._check_output_dir()

        log_with = cfg.report_to_list or None
        self.accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with)
        acc = self.accelerator
        self.device = acc.device

        self.prompts = load_prompts(cfg.prompts if prompts is None else prompts, cfg.prompt_column, cfg.prompt_split)
        eval_source = eval_prompts if eval_prompts is not None else (cfg.eval_prompts or None)
        self.eval_prompts = (
            load_prompts(eval_source, cfg.prompt_column, cfg.prompt_split) if eval_source is not None else self.prompts
        )

        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        if pipeline is None or isinstance(pipeline, str):
            name = cfg.pretrained_model_name_or_path if pipeline is None else pipeline
            pipeline = load_pipeline(name, revision=cfg.revision, variant=cfg.variant)
            self.model_name = name
        else:
            self.model_name = getattr(pipeline, "name_or_path", None) or pipeline.config.get("_name_or_path", "pipeline")
        self.pipe = pipeline
        self.sharded = self._wants_sharding(shard_unet)
        self._prepare_models(weight_dtype)
        self.base_fingerprint = model_fingerprint(self.pipe.unet)  # before sharding
        if self.sharded:
            self._shard_unet()

        self.rewards = self._build_rewards(rewards or {})
        self.sampler = DiffusionSampler(
            self.pipe, cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.resolution, self.device
        )
        self.normalizers: dict[str, RewardStats] = {}
        self.estimator = ESTIMATORS.get(cfg.estimator)(self.sampler, self.problem, self.rewards, self.normalizers, cfg)

        params = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        self.duals = build_dual_optimizer(cfg.dual, len(self.problem.constraints))
        self.monitor = InfeasibilityMonitor(self.problem.names)
        self.update_every = cfg.dual_update_every
        self.global_step = 0
        self.micro_batches_seen = 0
        self.nonfinite_batches = 0
        self.history: list[dict] = []
        self._slack_sum = torch.zeros(len(self.problem.constraints), dtype=torch.float64)
        self._slack_count = 0
        if acc.is_main_process and log_with:
            acc.init_trackers("cdalign", config=_flat(config_to_dict(cfg)))

    # ------------------------------------------------------------------ setup
    def _check_output_dir(self):
        out = self.output_dir
        if self.resume_path is not None or self.config.overwrite_output_dir or not out.is_dir():
            return
        present = [m for m in RUN_MARKERS if (out / m).exists()] + [p.name for p in list_checkpoints(out)]
        if present:
            raise FileExistsError(
                f"output_dir={str(out)!r} already holds a run ({', '.join(present[:4])}); set "
                "overwrite_output_dir=true to replace it, resume_from_checkpoint=latest to continue it, "
                "or choose another output_dir"
            )

    def _prepare_models(self, weight_dtype):
        pipe, cfg = self.pipe, self.config
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()
        # LoRA B starts at zero: the initial model *is* the base model (chain KL = 0). A's
        # random init is drawn on the CPU from the run's seed, not from the global RNG.
        pipe.unet.to("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(cfg.seed, 3))
            self._add_lora(pipe.unet)
        pipe.to(self.device)
        if weight_dtype != torch.float32:  # frozen weights in half precision
            for module in (pipe.vae, pipe.text_encoder, pipe.unet):
                module.to(dtype=weight_dtype)
        for p in pipe.unet.parameters():
            if p.requires_grad:  # trainable LoRA weights stay fp32 under mixed precision
                p.data = p.data.float()
        pipe.set_progress_bar_config(disable=True)

    def _wants_sharding(self, shard_unet: bool | None) -> bool:
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(
                "cdalign does not run under DeepSpeed: the base UNet is frozen and only the LoRA trains, so "
                "ZeRO would shard a few MB; to shard the UNet's weights use FSDP2 "
                "(accelerate launch --config_file recipes/accelerate_configs/fsdp.yaml ...)"
            )
        # accelerate sets FSDP on GPUs; on CPUs (gloo) its launcher still exports the FSDP
        # config (ACCELERATE_USE_FSDP, FSDP_*), which cdalign honours the same way.
        fsdp = acc.distributed_type == DistributedType.FSDP or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        self._fsdp_plugin = getattr(acc.state, "fsdp_plugin", None)
        if fsdp and self._fsdp_plugin is None:
            from accelerate.utils import FullyShardedDataParallelPlugin

            self._fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
        if fsdp and self._fsdp_plugin.fsdp_version != 2:
            raise ValueError(
                "cdalign shards with FSDP2: set fsdp_version: 2 in the accelerate config's fsdp_config "
                "(see recipes/accelerate_configs/fsdp.yaml)"
            )
        want = fsdp if shard_unet is None else bool(shard_unet)
        return want and acc.num_processes > 1

    def _shard_unet(self) -> None:
        """FSDP2 over the UNet: each down/mid/up block and the root become one sharding unit.
        Dtypes are the replicated run's (under mixed precision the frozen base in fp16/bf16,
        the LoRA in fp32; FSDP2 gathers each dtype on its own). Gradients are averaged by
        FSDP's reduce-scatter, so :meth:`_reduce_gradients` does nothing."""
        from torch.distributed.fsdp import fully_shard

        plugin = self._fsdp_plugin
        kwargs: dict = {}
        if plugin is not None:
            kwargs["reshard_after_forward"] = plugin.reshard_after_forward
            if plugin.cpu_offload is not None and not isinstance(plugin.cpu_offload, bool):
                kwargs["offload_policy"] = plugin.cpu_offload
        unet = self.pipe.unet
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            if block is not None:
                fully_shard(block, **kwargs)
        fully_shard(unet, **kwargs)

    def _add_lora(self, unet):
        from peft import LoraConfig

        cfg = self.config
        unet.add_adapter(
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                init_lora_weights=True,
                target_modules=list(cfg.lora_target_modules),
            )
        )

    def _build_rewards(self, given: Mapping[str, Callable]) -> dict:
        rewards = {}
        for name, fn in given.items():
            rewards[name] = fn if isinstance(fn, torch.nn.Module) else _CallableReward(name, fn)
        for name in self.problem.reward_names:
            if name not in rewards:
                from .rewards import REWARDS

                rewards[name] = REWARDS.build(name, **self.config.reward_kwargs.get(name, {}))
        for name, r in rewards.items():
            if name in self.problem.reward_names and not getattr(r, "differentiable", True) and self.config.estimator == "reward_backprop":
                raise ValueError(
                    f"reward {name!r} is not differentiable; reward_backprop cannot use it (choose a "
                    "policy-gradient estimator or another reward)"
                )
            r.to(self.device)
        return rewards

    def _lora_params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.pipe.unet.named_parameters() if p.requires_grad}

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The trainable LoRA weights as whole fp32 CPU tensors, by parameter name. On a
        sharded UNet this gathers the shards: call it on every process."""
        return {n: full_tensor(p.detach()).float().cpu().contiguous() for n, p in self._lora_params().items()}

    # ------------------------------------------------------------------ batches
    def _global_batch(self, purpose: int, index: int, prompts: list[str], size: int):
        """This process's share of a global batch: (prompts, image seeds, generator)."""
        acc = self.accelerator
        return batch_share(self.config.seed, purpose, index, prompts, size, acc.num_processes, acc.process_index)

    # ------------------------------------------------------------------ normalisation
    def compute_normalization(self) -> dict[str, RewardStats]:
        """Mean/std of every reward on base-model samples of the training prompts,
        gathered over processes and cached (reused only on a matching key)."""
        cfg = self.config
        names = list(self.rewards)
        cache = NormalizationCache(cfg.normalization_cache_dir)
        base_key = {
            "model": self.model_name,
            "revision": cfg.revision,
            "weights": self.base_fingerprint,
            "prompts": prompts_fingerprint(self.prompts),
            "sampler": self.sampler.settings(),
            "batches": cfg.normalization_batches,
            "global_batch": cfg.train_batch_size * self.accelerator.num_processes,
            "seed": cfg.seed,
        }
        keys = {n: {"reward": n, **base_key} for n in names}
        missing = []
        for n in names:
            cached = cache.load(keys[n])
            if cached is None:
                missing.append(n)
            else:
                self.normalizers[n] = cached
        if missing:
            from tqdm.auto import tqdm

            collected = {n: [] for n in missing}
            show = self.accelerator.is_main_process
            for b in tqdm(range(cfg.normalization_batches), desc="reward statistics (base model)", disable=not show):
                prompts, seeds, _ = self._global_batch(1, b, self.prompts, cfg.train_batch_size)
                with torch.no_grad(), self.accelerator.autocast():
                    predictor = WithAdaptersDisabled(self.sampler.guided(prompts))
                    images = self.sampler.sample(predictor, seeds)
                    for n in missing:
                        collected[n].append(self.rewards[n](images, prompts).float().detach())
            for n in missing:
                values = self.accelerator.gather(torch.cat(collected[n]).to(self.device)).cpu()
                self.normalizers[n] = stats_from_samples(values)
                if self.accelerator.is_main_process:
                    cache.save(keys[n], self.normalizers[n])
            self.accelerator.wait_for_everyone()
        return dict(self.normalizers)

    # ------------------------------------------------------------------ training
    def _micro_batch(self, index: int) -> MicroBatch:
        prompts, seeds, g = self._global_batch(0, index, self.prompts, self.config.train_batch_size)
        multipliers = self.duals.multipliers.to(torch.float32)
        with self.accelerator.autocast():
            return self.estimator(prompts, seeds, multipliers, g)

    def step(self) -> dict:
        """One optimiser step: ``gradient_accumulation_steps`` micro-batches, dual updates
        every ``update_every`` micro-batches, gradients averaged over processes."""
        cfg, acc = self.config, self.accelerator
        if not self.normalizers and any(self.problem.normalized(n) for n in self.problem.reward_names):
            self.compute_normalization()
        self.pipe.unet.train()
        self.optimizer.zero_grad(set_to_none=True)
        records: list[MicroBatch] = []
        for _ in range(cfg.gradient_accumulation_steps):
            mb = self._micro_batch(self.micro_batches_seen)
            self.micro_batches_seen += 1
            if self._on_all_processes(is_finite_batch(mb)):
                acc.backward(mb.loss / cfg.gradient_accumulation_steps)
                records.append(mb)
                self._slack_sum += mb.slacks.double().cpu()
                self._slack_count += 1
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
        self._reduce_gradients()
        params = list(self._lora_params().values())
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
        self.optimizer.step()
        self.global_step += 1
        return self._log_step(records, grad_norm)

    def _on_all_processes(self, flag: bool) -> bool:
        """True only if ``flag`` holds on every process: ranks skip a micro-batch together
        (and abort together), so no collective waits on a rank that bailed out."""
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() == self.accelerator.num_processes)

    def _dual_step(self):
        acc = self.accelerator
        stats = torch.cat([self._slack_sum, torch.tensor([float(self._slack_count)], dtype=torch.float64)])
        if acc.num_processes > 1:
            stats = acc.reduce(stats.to(self.device), reduction="sum").cpu()
        self._slack_sum.zero_()
        self._slack_count = 0
        count = float(stats[-1])
        if count == 0 or not self.problem.constraints:
            return
        slacks = stats[:-1] / count
        multipliers = self.duals.step(slacks)
        for name in self.monitor.update(multipliers, slacks, self.global_step):
            msg = (
                f"constraint {name!r} looks infeasible: its dual variable keeps growing while its slack "
                f"does not improve (step {self.global_step}); consider loosening its threshold"
            )
            warnings.warn(msg, stacklevel=2)
            logger.warning(msg)

    def _reduce_gradients(self):
        acc = self.accelerator
        if acc.num_processes == 1 or self.sharded:  # FSDP already averaged them (reduce-scatter)
            return
        params = list(self._lora_params().values())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        flat = acc.reduce(flat, reduction="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def _log_step(self, records: list[MicroBatch], grad_norm) -> dict:
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
        vec = torch.stack(vals).to(self.device)
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="mean")
        log = {"step": self.global_step, **{k: float(v) for k, v in zip(keys, vec.cpu())}}
        for j, c in enumerate(prob.constraints):
            log[f"dual/{c.name}"] = float(self.duals.multipliers[j])
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
        evaluate on held-out samples and write the report, grid and plots."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.output_dir)
            save_config(cfg, self.output_dir / "config.yaml")
            if self.resume_path is None and (self.output_dir / "log.jsonl").exists():
                (self.output_dir / "log.jsonl").unlink()
        acc.wait_for_everyone()
        if self.resume_path is not None:
            self.load_checkpoint(self.resume_path)
        if any(self.problem.normalized(n) for n in self.problem.reward_names) and not self.normalizers:
            self.compute_normalization()
        bar = tqdm(total=cfg.max_steps, initial=self.global_step, desc="constrained alignment", disable=not acc.is_main_process)
        while self.global_step < cfg.max_steps:
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
                self.save_checkpoint()
        bar.close()
        self.save_model(self.output_dir)
        report = self.evaluate()
        if acc.is_main_process:
            atomic_write_text(self.output_dir / "report.json", json.dumps(report, indent=2))
            self._plot_history()
            self._write_model_card(report)
        if cfg.push_to_hub:
            self.push_to_hub()
        acc.end_training()
        return report

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, num_batches: int | None = None) -> dict:
        """Held-out evaluation with fixed seeds: base vs aligned, each reward's mean and 95%
        CI, each constraint's measured value vs threshold, the chain KL over all steps."""
        cfg, acc, prob = self.config, self.accelerator, self.problem
        if not self.normalizers and any(prob.normalized(n) for n in prob.reward_names):
            self.compute_normalization()
        self.pipe.unet.eval()
        batches = cfg.eval_batches if num_batches is None else num_batches
        results = {"base": {n: [] for n in self.rewards}, "aligned": {n: [] for n in self.rewards}}
        kls, grid = [], {"base": [], "aligned": []}
        T = len(self.sampler.chain)
        for b in range(batches):
            prompts, seeds = eval_batch_share(
                cfg.eval_seed, b, self.eval_prompts, cfg.train_batch_size, acc.num_processes, acc.process_index
            )
            with acc.autocast():
                policy = self.sampler.guided(prompts)
                kl_acc = ChainKLAccumulator(
                    WithAdaptersDisabled(policy), self.sampler.chain, cfg.kl_estimator, choose_kl_steps(T, set())
                )
                aligned = self.sampler.sample(policy, seeds, on_step=kl_acc)
                base = self.sampler.sample(WithAdaptersDisabled(policy), seeds)
            kls.append(kl_acc.per_sample.float())
            for key, images in (("base", base), ("aligned", aligned)):
                grid[key].append(images.cpu())
                for n in self.rewards:
                    results[key][n].append(self.rewards[n](images, prompts).float())

        def gathered(chunks):
            return acc.gather(torch.cat(chunks).to(self.device)).cpu()

        kl_all = gathered(kls)
        report = {"model": self.model_name, "steps": self.global_step, "num_eval_images": int(kl_all.numel())}
        rewards_report = {}
        per_model = {}
        for key in ("base", "aligned"):
            per_model[key] = {}
            for n in self.rewards:
                raw = gathered(results[key][n])
                stats = self.normalizers.get(n)
                normed = stats.normalize(raw) if stats is not None else raw
                per_model[key][n] = (raw, normed)
        for n in self.rewards:
            entry = {}
            for key in ("base", "aligned"):
                raw, normed = per_model[key][n]
                m, lo_, hi_ = mean_and_ci(raw)
                entry[key] = {"mean": m, "ci95": [lo_, hi_]}
                if n in self.normalizers:
                    m, lo_, hi_ = mean_and_ci(normed)
                    entry[key]["normalized_mean"] = m
                    entry[key]["normalized_ci95"] = [lo_, hi_]
            rewards_report[n] = entry
        report["rewards"] = rewards_report
        m, lo_, hi_ = mean_and_ci(kl_all)
        report["kl"] = {"estimator": cfg.kl_estimator, "mean": m, "ci95": [lo_, hi_]}
        constraints = []
        for j, c in enumerate(prob.constraints):
            if c.is_kl:
                values, base_values = kl_all, torch.zeros_like(kl_all)
            else:
                pick = 1 if c.normalize else 0
                values, base_values = per_model["aligned"][c.source][pick], per_model["base"][c.source][pick]
            m, lo_, hi_ = mean_and_ci(values)
            slack = float(c.slack(torch.tensor(m)))
            ci_clears = (lo_ >= c.threshold) if c.direction == "high" else (hi_ <= c.threshold)
            constraints.append(
                {
                    "name": c.name,
                    "source": c.source,
                    "direction": c.direction,
                    "threshold": c.threshold,
                    "normalized": c.normalize,
                    "measured": m,
                    "ci95": [lo_, hi_],
                    "base_measured": float(base_values.double().mean()),
                    "slack": slack,
                    "satisfied": slack <= 0,
                    "ci_clears_threshold": bool(ci_clears),
                    "dual": float(self.duals.multipliers[j]),
                    "flagged_infeasible_at_step": self.monitor.flagged.get(c.name),
                }
            )
        report["constraints"] = constraints
        obj = prob.objective
        if obj.is_kl:
            report["objective"] = {"type": "kl", "value": report["kl"]["mean"]}
        else:
            raw, normed = per_model["aligned"][obj.source]
            report["objective"] = {"type": "reward", "reward": obj.source, "value": float((normed if obj.normalize else raw).mean())}
        report["all_satisfied"] = all(c["satisfied"] for c in constraints)
        report["infeasible"] = sorted(self.monitor.flagged)
        report["normalization"] = {n: s.__dict__ for n, s in self.normalizers.items()}
        if acc.is_main_process and cfg.num_grid_images > 0:
            from .plotting import save_grid

            self.output_dir.mkdir(parents=True, exist_ok=True)
            k = cfg.num_grid_images
            rows = [torch.cat(grid["base"])[:k], torch.cat(grid["aligned"])[:k]]
            save_grid(self.output_dir / "samples_base_vs_aligned.png", rows, ["base", "aligned"])
            report["sample_grid"] = "samples_base_vs_aligned.png"
        return report

    def _plot_history(self):
        from .plotting import plot_duals

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
        state = adapter_state_dict(self.pipe.unet, "default") if (self.sharded or main) else None
        if main:
            save_adapter(self.pipe.unet, "default", out, state=state)
        self.accelerator.wait_for_everyone()
        return out / LORA_WEIGHT_NAME

    def save_checkpoint(self) -> Path | None:
        """``output_dir/checkpoint-<step>``: LoRA, optimizer, duals, normalisation stats and
        counters, written atomically; keeps the last ``save_total_limit``. Call it on every
        process (sharded state is gathered first); the main process writes."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{self.global_step}"
        lora = self.lora_state()  # gathered on every process (collectives when sharded)
        optimizer_state = gathered_optimizer_state(self.optimizer)
        if acc.is_main_process:
            with atomic_directory(final) as tmp:
                save_file(lora, str(tmp / "lora.safetensors"))
                optimizer_to_files(self.optimizer, tmp, optimizer_state)
                state = {
                    "global_step": self.global_step,
                    "micro_batches_seen": self.micro_batches_seen,
                    "nonfinite_batches": self.nonfinite_batches,
                    "duals": self.duals.state_dict(),
                    "monitor": self.monitor.state_dict(),
                    "slack_sum": self._slack_sum.tolist(),
                    "slack_count": self._slack_count,
                    "normalizers": {n: s.__dict__ for n, s in self.normalizers.items()},
                    "history": self.history,
                }
                (tmp / "trainer_state.json").write_text(json.dumps(state))
            rotate_checkpoints(self.output_dir, self.config.save_total_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        from torch.distributed.tensor import DTensor

        path = resolve_checkpoint(str(path), self.output_dir)
        params = self._lora_params()
        lora = load_file(str(path / "lora.safetensors"))
        if set(lora) != set(params):
            raise ValueError(f"checkpoint {str(path)!r} does not match this LoRA configuration (rank/targets differ)")
        with torch.no_grad():
            for name, p in params.items():
                if lora[name].shape != p.shape:
                    raise ValueError(f"checkpoint {str(path)!r}: {name} has shape {tuple(lora[name].shape)}, expected {tuple(p.shape)}")
                value = like_param(lora[name], p)  # a sharded parameter keeps this process's shard
                if isinstance(value, DTensor):
                    p.to_local().copy_(value.to_local())
                else:
                    p.copy_(value)
        optimizer_from_files(self.optimizer, path)
        state = json.loads((path / "trainer_state.json").read_text())
        self.global_step = state["global_step"]
        self.micro_batches_seen = state["micro_batches_seen"]
        self.nonfinite_batches = state["nonfinite_batches"]
        self.duals.load_state_dict(state["duals"])
        self.monitor.load_state_dict(state["monitor"])
        self._slack_sum = torch.tensor(state["slack_sum"], dtype=torch.float64)
        self._slack_count = state["slack_count"]
        self.normalizers.clear()
        self.normalizers.update({n: RewardStats(**s) for n, s in state["normalizers"].items()})
        self.history = state["history"]
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
        from .hub import push_output_dir

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
        """``output_dir/README.md`` from the config and report (cdalign.cards). A card that
        cannot be rendered warns instead of failing a finished run."""
        from .cards import write_model_card

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

"""Distilling a composed model ε_μ into one LoRA (METHOD.md §2): inference then costs one
denoiser pass per step instead of n.

Objective: along the composed sampler's own path x_T … x_0 (so the student learns ε_μ
where p_μ puts its mass), regress the student's guided ε̃_s(x_t) onto ε_μ(x_t):

    L = E_{x_t ~ p_μ, t}  mean_elements (ε̃_s(x_t) − ε_μ(x_t))²

The student is a new adapter ``student`` on the shared denoiser (B initialised at zero, so
it starts as the base model); components and student never coexist as active adapters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from cdalign.composition.components import ComponentKL, ComponentSet
from cdalign.core.seeding import (
    DISTILL_BATCH,
    DISTILL_LORA_INIT,
    batch_share,
    derived_seed,
    per_process,
)
from cdalign.models.adapters import set_denoiser_adapter
from cdalign.models.lora import save_adapter, trainable_adapter

STUDENT = "student"


class StudentPredictor:
    """The student's guided ε̃_s: activates the ``student`` adapter, then the CFG predictor."""

    def __init__(self, guided):
        self.guided = guided

    def __call__(self, x_t, t):
        set_denoiser_adapter(self.guided.model, STUDENT)
        return self.guided(x_t, t)


class _PathRecorder:
    """``on_step`` hook keeping (step, x_t, ε_μ) at chosen steps of a composed chain."""

    def __init__(self, steps: set[int]):
        self.steps, self.records = steps, []

    def __call__(self, i, x_t, eps, tracked):
        if i in self.steps:
            self.records.append((i, x_t.detach(), eps.detach()))


class CompositionDistiller:
    """Trains the ``student`` LoRA to reproduce ε_μ of ``components`` at ``weights``.

    Args:
        components: the :class:`ComponentSet` (its sampler defines chain and guidance).
        weights: μ (n,) of the composed model to distil.
        prompts: training prompts (drawn uniformly per chain).
        spec: a :class:`~cdalign.composition.config.DistillSpec`.
    """

    def __init__(self, components: ComponentSet, weights, prompts: Sequence[str], spec, seed: int = 0, accelerator=None):
        self.components, self.spec, self.seed, self.accelerator = components, spec, seed, accelerator
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.prompts = list(prompts)
        self.sampler = components.sampler
        denoiser = self.denoiser = self.sampler.denoiser
        if getattr(denoiser, "_hf_peft_config_loaded", False) and STUDENT in denoiser.peft_config:
            raise ValueError(f"the denoiser already has an adapter named {STUDENT!r}")
        self.params = trainable_adapter(denoiser, STUDENT, rank=spec.lora_rank, alpha=spec.lora_alpha,
                                        target_modules=spec.lora_target_modules, seed=derived_seed(seed, DISTILL_LORA_INIT))
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.learning_rate, weight_decay=1e-4)
        self.global_step = 0
        self.history: list[dict] = []

    def _composed_path(self, prompts, seeds, steps: set[int]):
        recorder = _PathRecorder(steps)
        with torch.no_grad():
            self.sampler.sample(self.components.composed(prompts, self.weights), seeds, on_step=recorder, decode=False)
        return recorder.records

    def _regression_loss(self, prompts, records) -> torch.Tensor:
        student = StudentPredictor(self.sampler.guided(prompts))
        losses = [(student(x, self.sampler.chain.timesteps[i]) - target).pow(2).mean() for i, x, target in records]
        return torch.stack(losses).mean()

    def step(self) -> dict:
        """One optimiser step on ``spec.batch_size`` fresh composed chains."""
        spec, T = self.spec, len(self.sampler.chain)
        world, rank = (self.accelerator.num_processes, self.accelerator.process_index) if self.accelerator else (1, 0)
        share = per_process(spec.batch_size, world, "distill.batch_size")
        prompts, seeds, g = batch_share(self.seed, DISTILL_BATCH, self.global_step, self.prompts, share, world, rank)
        k = min(spec.timesteps_per_chain, T)
        steps = set(torch.randperm(T, generator=g)[:k].tolist())
        records = self._composed_path(prompts, seeds, steps)
        self.denoiser.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._regression_loss(prompts, records)
        loss.backward()
        if world > 1:  # the mean over the global batch: average the shares' gradients and losses
            for p in (p for p in self.params if p.grad is not None):
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            loss = self.accelerator.reduce(loss.detach(), reduction="mean")
        self.optimizer.step()
        self.denoiser.eval()
        self.global_step += 1
        log = {"step": self.global_step, "distill_loss": loss.item()}
        self.history.append(log)
        return log

    def train(self, steps: int | None = None, progress: bool = True) -> list[dict]:
        from tqdm.auto import tqdm

        n = self.spec.steps if steps is None else steps
        for _ in tqdm(range(n), desc="distillation", disable=not progress):
            self.step()
        return self.history

    @torch.no_grad()
    def distance(self, prompts: Sequence[str], seeds: Sequence[int]) -> float:
        """mean (ε̃_s − ε_μ)² over every step of the composed chains of ``seeds`` (the
        training objective on fixed evaluation chains)."""
        records = self._composed_path(list(prompts), list(seeds), set(range(len(self.sampler.chain))))
        return float(self._regression_loss(list(prompts), records))

    @torch.no_grad()
    def sample_with_kl(self, prompts: Sequence[str], seeds: Sequence[int], estimator: str):
        """Images of the distilled model and its chain KL to every component (n, B),
        along its own path (n extra component passes per step)."""
        student = StudentPredictor(self.sampler.guided(list(prompts)))
        hook = ComponentKL(self.components.predictor(list(prompts)), self.sampler.chain, estimator, len(self.components))
        images = self.sampler.sample(student, list(seeds), on_step=hook)
        return images, hook.per_sample

    def save(self, output_dir: str | os.PathLike) -> Path:
        """``output_dir/pytorch_lora_weights.safetensors`` in the diffusers format
        (``pipe.load_lora_weights(output_dir)`` loads the distilled model)."""
        return save_adapter(self.denoiser, STUDENT, output_dir)

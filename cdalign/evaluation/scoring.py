"""The one scoring path of cdalign: checkpoints × (prompt, seed) items -> per-image numbers.

:func:`score_checkpoints` samples every checkpoint (the base model, a LoRA, a composed
model, a distilled student: anything a :class:`LoadedCheckpoint` describes) on the *same*
items (:func:`cdalign.core.seeding.evaluation_items`) through the one
:class:`~cdalign.core.sampling.DiffusionSampler`, and returns per image, in item order:

- the image (uint8);
- each reward, raw and, where statistics are given, in base-model standard deviations;
- each evaluation metric (``cdalign.rewards.metrics.EVAL_METRICS``);
- the chain KL (``cdalign.core.kl``) to each of the checkpoint's references: the base model
  for a LoRA, every component for a composed model.

The trainer's final report, the evaluation harness and the composer all score here, so a
run's own report.json and the harness score the same images for the same checkpoint, and
the constraint verdicts are the constraint's own (:meth:`Constraint.verdict
<cdalign.core.problem.Constraint.verdict>`) on :meth:`CheckpointScores.constraint_values`.

Items are scored in batches of ``batch_size``; under ``accelerate launch`` batch b is scored
by process ``b mod N`` and every process gets every batch back. A batch is the unit of the
optional :class:`BatchStore` (the harness's resumable cache)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cdalign.core.kl import ChainKLAccumulator, choose_kl_steps
from cdalign.core.normalization import RewardStats
from cdalign.core.problem import Constraint
from cdalign.core.sampling import DiffusionSampler
from cdalign.models.adapters import WithAdaptersDisabled
from cdalign.runs.atomic import atomic_write

Item = tuple[str, int]  # (prompt, image seed)

# A run's per-image held-out values (safetensors, item order): what paired comparisons across
# runs scored on the same items read (benchmarks/frontier.py).
EVAL_VALUES_FILE = "eval_values.safetensors"


def save_eval_values(path, values: Mapping[str, torch.Tensor]) -> None:
    """Write per-image values ``{name: (N,)}`` (float64) atomically as safetensors. Each is
    copied: two names may hold the same tensor (a KL constraint's values *are* the chain KL,
    ``aligned/kl`` and ``kl``), and safetensors refuses tensors that share memory."""
    tensors = {k: torch.as_tensor(v).detach().to(device="cpu", dtype=torch.float64).clone().contiguous()
               for k, v in values.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def load_eval_values(path) -> dict[str, torch.Tensor]:
    """Read what :func:`save_eval_values` wrote."""
    return load_file(str(path))


# ---------------------------------------------------------------------------------
# What is scored
# ---------------------------------------------------------------------------------


class LoadedCheckpoint:
    """A checkpoint made active on the shared pipeline.

    ``policy(sampler, prompts)``: the predictor to sample from. ``references(sampler,
    prompts, policy)``: ``{name: predictor}`` to measure the chain KL against along the
    policy's own path (``base``; for composed models one entry per component).
    ``unload()`` restores the pipeline."""

    def policy(self, sampler: DiffusionSampler, prompts: list[str]):
        raise NotImplementedError

    def references(self, sampler: DiffusionSampler, prompts: list[str], policy) -> dict:
        return {}

    def unload(self) -> None:
        pass


class BaseModel(LoadedCheckpoint):
    """The base model: the shared denoiser with every adapter switched off. No references
    (its KL to itself is 0)."""

    def policy(self, sampler, prompts):
        return WithAdaptersDisabled(sampler.guided(prompts))


class AdaptedModel(LoadedCheckpoint):
    """The shared denoiser as it is (its active adapters, e.g. a trained or loaded LoRA), with
    the chain KL to the base model: the same denoiser with the adapters disabled."""

    def policy(self, sampler, prompts):
        return sampler.guided(prompts)

    def references(self, sampler, prompts, policy):
        return {"base": WithAdaptersDisabled(policy)}


class BatchStore(Protocol):
    """Where scored batches are kept between runs (the harness's cache). ``load`` returns
    the tensors :func:`score_batch` returned for that batch, or None."""

    def load(self, checkpoint: str, index: int, batch: Sequence[Item]) -> dict[str, torch.Tensor] | None: ...

    def save(self, checkpoint: str, index: int, batch: Sequence[Item], tensors: dict[str, torch.Tensor]) -> None: ...


# ---------------------------------------------------------------------------------
# What comes back
# ---------------------------------------------------------------------------------


@dataclass
class CheckpointScores:
    """Per-image scores of one checkpoint on N items, in item order (CPU tensors).

    ``images`` (N,3,H,W) uint8 (only the first rows, those of the sample grid, where a run
    reused the base model's values: ``cdalign.alignment.base_evaluation``); ``rewards`` name ->
    (N,) float64, raw; ``normalized`` name -> (N,) float64 in base-model std, for the rewards
    with statistics; ``metrics`` name -> (N,) float64 (NaN where a metric cannot judge an
    image); ``kl`` reference -> (N,) float64 chain KL in nats (of the estimator scored with)."""

    images: torch.Tensor
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)
    normalized: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    kl: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """The number of items: the length of the per-image values (of ``images`` without any)."""
        for values in (*self.rewards.values(), *self.metrics.values(), *self.kl.values()):
            return int(values.shape[0])
        return int(self.images.shape[0])

    def with_stats(self, stats: Mapping[str, RewardStats]) -> CheckpointScores:
        """The same scores with ``normalized`` = ``(r − m)/s`` for every reward in ``stats``."""
        normalized = {n: stats[n].normalize(v) for n, v in self.rewards.items() if n in stats}
        return replace(self, normalized=normalized)

    def constraint_values(self, constraint: Constraint) -> torch.Tensor:
        """Per-image values (N,) that ``constraint`` is judged on, in its units: the chain KL
        to the base (0 for the base model itself, which has no reference), the normalised
        reward, or the raw reward."""
        if constraint.is_kl:
            return self.kl.get("base", torch.zeros(self.n, dtype=torch.float64))
        if constraint.normalize:
            if constraint.source not in self.normalized:
                raise ValueError(f"constraint {constraint.name!r} is normalised but no statistics of "
                                 f"{constraint.source!r} exist")
            return self.normalized[constraint.source]
        return self.rewards[constraint.source]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> CheckpointScores:
        """From :func:`score_batch`'s flat layout (``images``, ``reward/<n>``, ``metric/<k>``,
        ``kl/<ref>``), e.g. batches concatenated in item order."""
        parts: dict[str, dict[str, torch.Tensor]] = {"reward": {}, "metric": {}, "kl": {}}
        for key, value in tensors.items():
            kind, _, name = key.partition("/")
            if kind in parts:
                parts[kind][name] = value
        return cls(tensors["images"], rewards=parts["reward"], metrics=parts["metric"], kl=parts["kl"])


# ---------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------


def score_batch(
    sampler: DiffusionSampler,
    loaded: LoadedCheckpoint,
    batch: Sequence[Item],
    *,
    rewards: Mapping[str, Callable],
    metrics: Mapping[str, Callable] | None = None,
    kl_estimator: str,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    kl_sampler: DiffusionSampler | None = None,
) -> dict[str, torch.Tensor]:
    """Sample one batch of items with ``loaded`` and score it: ``{"images": (B,3,H,W)
    uint8, "reward/<n>": (B,), "metric/<k>": (B,), "kl/<ref>": (B,)}`` (CPU, float64).

    ``rewards``: ``{name: callable(images (B,3,H,W) in [0,1], prompts) -> (B,)}``.
    ``metrics``: ``{name: callable(images, prompts) -> {key: (B,)}}``. ``autocast``: the
    context to sample in (mixed precision); rewards and metrics run outside it, on fp32
    images. ``kl_sampler``: a sampler on the same pipeline with a stochastic chain, along
    whose path (same seeds) the chain KL is measured instead of along the images' own:
    for deterministic sampling (ODE / DDIM η = 0), whose path has no density ratio."""
    prompts, seeds = [p for p, _ in batch], [int(s) for _, s in batch]

    def kl_hooks(s: DiffusionSampler, policy) -> dict:
        # every step, inclusion probability 1: the exact all-steps chain KL
        return {name: ChainKLAccumulator(ref, s.chain, kl_estimator, choose_kl_steps(len(s.chain), set()))
                for name, ref in loaded.references(s, prompts, policy).items()}

    def run_hooks(hooks):
        def on_step(i, x_t, eps, tracked):
            for hook in hooks.values():
                hook(i, x_t, eps, tracked)
        return on_step if hooks else None

    with torch.no_grad():
        with autocast():
            policy = loaded.policy(sampler, prompts)
            hooks = kl_hooks(sampler, policy) if kl_sampler is None else {}
            images = sampler.sample(policy, seeds, on_step=run_hooks(hooks)).float()
            if kl_sampler is not None:
                kl_policy = loaded.policy(kl_sampler, prompts)
                hooks = kl_hooks(kl_sampler, kl_policy)
                if hooks:
                    kl_sampler.sample(kl_policy, seeds, on_step=run_hooks(hooks), decode=False)
        out = {"images": (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()}
        for name, fn in rewards.items():
            out[f"reward/{name}"] = _per_image(fn(images, prompts))
        for fn in (metrics or {}).values():
            for key, values in fn(images, prompts).items():
                out[f"metric/{key}"] = _per_image(values)
        for name, hook in hooks.items():
            out[f"kl/{name}"] = _per_image(hook.per_sample)
    return out


def _per_image(values) -> torch.Tensor:
    return torch.as_tensor(values).detach().double().cpu().reshape(-1)


def score_checkpoints(
    sampler: DiffusionSampler,
    checkpoints: Mapping[str, Callable[[], LoadedCheckpoint]],
    items: Sequence[Item],
    *,
    batch_size: int,
    rewards: Mapping[str, Callable],
    metrics: Mapping[str, Callable] | None = None,
    kl_estimator: str,
    stats: Mapping[str, RewardStats] | None = None,
    store: BatchStore | None = None,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    progress: bool = False,
    kl_sampler: DiffusionSampler | None = None,
) -> dict[str, CheckpointScores]:
    """Score every checkpoint on ``items`` ((prompt, seed) per image) and return
    ``{name: CheckpointScores}`` with every image of every process, in item order.

    ``checkpoints``: ``{name: load}``, ``load()`` making the checkpoint active on the
    sampler's pipeline (called at most once, only when a batch is not in ``store``; its
    ``unload()`` runs after that checkpoint's batches). ``stats``: base-model reward
    statistics for ``normalized`` (e.g. the trainer's); None: raw only (see
    :meth:`CheckpointScores.with_stats`). ``store``: a :class:`BatchStore`; a stored batch
    is used when it holds the images and every reward asked for (the store's key must name
    whatever else decides the numbers: checkpoint, model, sampler, rewards, metrics).
    ``kl_sampler``: measure the chain KL along this stochastic sampler's path (see
    :func:`score_batch`).

    The pipeline's denoiser, VAE and text encoders are left in eval mode. Batch b
    (``batch_size`` items) is scored by process ``b mod N`` of N (accelerate);
    with a sharded denoiser every process must score as many batches as the others (make
    the number of batches a multiple of N)."""
    state = PartialState()
    rank, world = state.process_index, state.num_processes
    # Scoring is inference: a module left in training mode (a pipeline built in code) decodes
    # differently (~1e-7), and the same checkpoint must give the same numbers everywhere.
    for module in sampler.family.modules(sampler.pipe):
        module.eval()
    batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    mine = [b for b in range(len(batches)) if b % world == rank]
    wanted = [f"reward/{n}" for n in rewards]
    bar = tqdm(total=len(checkpoints) * len(mine), desc="evaluation", disable=not (progress and state.is_main_process))
    scores = {}
    for name, load in checkpoints.items():
        bar.set_postfix(checkpoint=name)
        results: dict[int, dict[str, torch.Tensor]] = {}
        loaded = None
        for b in mine:
            stored = store.load(name, b, batches[b]) if store is not None else None
            if stored is not None and "images" in stored and all(k in stored for k in wanted):
                results[b] = stored
                bar.update(1)
                continue
            if loaded is None:
                loaded = load()
            results[b] = score_batch(sampler, loaded, batches[b], rewards=rewards, metrics=metrics,
                                     kl_estimator=kl_estimator, autocast=autocast, kl_sampler=kl_sampler)
            if store is not None:
                store.save(name, b, batches[b], results[b])
            bar.update(1)
        if loaded is not None:
            loaded.unload()
        if world > 1:  # every process gets every batch's numbers
            for part in gather_object([results]):
                results.update(part)
        scores[name] = _concatenate([results[b] for b in range(len(batches))], sampler)
        if stats:
            scores[name] = scores[name].with_stats(stats)
    bar.close()
    return scores


def _concatenate(batches: list[dict[str, torch.Tensor]], sampler: DiffusionSampler) -> CheckpointScores:
    if not batches:
        side = sampler.resolution
        return CheckpointScores(torch.zeros((0, 3, side, side), dtype=torch.uint8))
    return CheckpointScores.from_tensors({k: torch.cat([b[k] for b in batches]) for k in batches[0]})

"""Gradient estimators: how one micro-batch turns into a differentiable Lagrangian.

An estimator samples through the shared :class:`~cdalign.core.sampling.DiffusionSampler`,
scores the images, adds the chain KL where the problem needs it, and returns a
:class:`BatchEstimate`. Two are registered in :data:`ESTIMATORS`: reward backpropagation
(the paper's) and a DDPO/GRPO-style policy gradient for rewards without gradients
(METHOD.md §3), a :class:`RolloutEstimator` whose micro-batches are trained on afterwards.

Each estimator class declares the config fields only it reads in its ``settings`` class
(:mod:`cdalign.alignment.estimator_settings`), lists their names in ``config_fields``
(another estimator's run refuses them) and checks how they fit the run (``check_config``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from cdalign.alignment.batch_estimate import BatchEstimate, Rollout, ScoreFunctionTerm, is_finite_estimate, score
from cdalign.alignment.estimator_settings import PolicyGradientSettings, RewardBackpropSettings, setting_names
from cdalign.core.kl import ChainKLAccumulator, choose_kl_steps, step_kl, step_weights
from cdalign.core.policy_gradient import (
    ADVANTAGES,
    PerPromptStatTracker,
    combined_advantage,
    group_centered,
    inclusion_probability,
    kl_weight,
    ppo_clipped_loss,
    reward_weights,
)
from cdalign.core.problem import ConstrainedProblem
from cdalign.core.sampling import DiffusionSampler, Trajectory
from cdalign.core.truncation import truncation_steps
from cdalign.models.adapters import WithAdaptersDisabled
from cdalign.registry import Registry

ESTIMATORS: Registry = Registry("estimator")
# what estimators return, defined beside them (cdalign.alignment.batch_estimate) and importable from here
__all__ = ["ESTIMATORS", "BatchEstimate", "Rollout", "ScoreFunctionTerm", "RewardBackprop", "PolicyGradient",
           "RolloutEstimator", "is_finite_estimate", "score"]


def _check_rewards_differentiable(rewards: dict, names: list[str]) -> None:
    for name in names:
        if not getattr(rewards[name], "differentiable", True):
            raise ValueError(
                f"reward {name!r} is not differentiable, and estimator: reward_backprop needs its gradient; set "
                "gradient: score_function on its constraint (a score-function term for that constraint alone), or "
                "estimator: policy_gradient (a score-function estimator for every term, METHOD.md §3), or use a "
                "differentiable reward"
            )


@ESTIMATORS.register("reward_backprop")
class RewardBackprop:
    """Reward backpropagation through DDIM sampling (the paper's primal estimator).

    Gradient flows through the last K steps and the VAE decode; the chain KL's value is
    estimated over all steps (``kl_value_steps`` may subsample the no-gradient steps,
    unbiasedly) with base predictions from the same denoiser, adapters disabled.

    Per constraint (``gradient``, :data:`~cdalign.core.constraint_gradients.CONSTRAINT_GRADIENTS`):
    ``whole_chain`` backpropagates its term through every step, in a second sampling pass on
    the same seeds (the first pass keeps the last K for the other terms). A constraint whose
    ``gradient`` has a score-function term (``score_function``,
    ``hybrid``) gets it at the steps its backpropagated gradient does not reach: every step
    (``score_function``: its term is not backpropagated at all) or the steps before the last
    K (``hybrid``). Its value, slack and dual step are as for any constraint, measured on the
    same images; the term (:class:`ScoreFunctionTerm`) is backpropagated step by step after
    the micro-batch's loss. Scale: the backpropagated term's gradient is
    ``−λ_j s_j ∇ mean_b r_j`` (``s_j`` = +1 for "high", −1 for "low"; r_j in the
    constraint's units, normalised when it is), whose expectation over the steps it reaches
    is ``−λ_j s_j ∇E[r_j]``. The score-function term ``−λ_j s_j mean_b[A_j(b) Σ_t log p_θ(x_{t−1}|x_t)]``
    with ``A_j(b) = r_j(b) − mean of the other images`` (``score_function_advantage:
    leave_one_out``) has the same expectation over the steps it sums, since a baseline that
    does not depend on image b leaves ``E[A ∇log p] = ∇E[r]``; both are means over the
    micro-batch, divided alike by the accumulation and averaged alike over processes. So λ_j
    prices its constraint in the same units as every other λ."""

    settings = RewardBackpropSettings
    config_fields = setting_names(settings)
    per_constraint_gradients = True  # reads ConstraintSpec.gradient (rules refuse it for other estimators)

    @staticmethod
    def check_config(cfg) -> None:
        """The truncation settings fit the chain; constraints with a score-function gradient
        have a stochastic chain and a group-free, stateless advantage."""
        _check_score_function_settings(cfg)
        T = cfg.num_inference_steps
        if cfg.backprop_steps > T:
            raise ValueError(f"backprop_steps: {cfg.backprop_steps} exceeds num_inference_steps ({T}); must be in [1, {T}]")
        if cfg.backprop_min_steps > cfg.backprop_steps:
            raise ValueError(
                f"backprop_min_steps: {cfg.backprop_min_steps} exceeds backprop_steps ({cfg.backprop_steps}); "
                f"must be in [1, {cfg.backprop_steps}]"
            )
        if cfg.backprop_strategy == "gaussian" and T < 2:
            raise ValueError(
                f"num_inference_steps: {T} is too few for backprop_strategy 'gaussian' (cut-off index in [1, T-1]); "
                "use at least 2, or backprop_strategy: fixed"
            )
        if cfg.kl_value_steps == 0:  # the last K steps are not drawn: a KL from them alone would be biased
            raise ValueError(
                "kl_value_steps: 0 is only allowed with estimator: policy_gradient (whose trained steps are drawn at "
                "random); give at least 1, or unset it for every step"
            )

    def __init__(self, sampler: DiffusionSampler, problem: ConstrainedProblem, rewards: dict, normalizers: dict, config):
        self.sampler, self.problem, self.rewards, self.normalizers = sampler, problem, rewards, normalizers
        self.config = config
        # how each constraint's term is differentiated (ConstraintSpec.gradient); the objective is backpropagated
        self.differentiation = [spec.differentiation for spec in config.constraints]
        self.score_function = [j for j, d in enumerate(self.differentiation) if d.score_function]
        self.whole_chain = [j for j, d in enumerate(self.differentiation) if d.whole_chain]
        # rewards backpropagated through the last K steps (the sampling pass) and through every step (a second pass)
        truncated = [] if problem.objective.is_kl else [problem.objective.source]
        truncated += [c.source for c, d in zip(problem.constraints, self.differentiation)
                      if not c.is_kl and d.backpropagated and not d.whole_chain]
        self.backprop_rewards = [n for n in problem.reward_names if n in truncated]
        whole = {problem.constraints[j].source for j in self.whole_chain}
        self.whole_chain_rewards = [n for n in problem.reward_names if n in whole]
        _check_rewards_differentiable(rewards, self.backprop_rewards + self.whole_chain_rewards)
        if self.score_function:
            deterministic = [i for i in range(len(sampler.chain)) if float(sampler.chain.sigma[i]) == 0]
            if deterministic:
                raise ValueError(
                    f"eta: {config.eta} leaves sampling step(s) {deterministic} deterministic, and a constraint with "
                    f"a score-function gradient needs every step's Gaussian log-probability (its gradient through a "
                    "deterministic step would be missed); use a larger eta, or gradient: backprop"
                )
            self.advantage = ADVANTAGES.get(config.score_function_advantage)
            dist = torch.distributed
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            if config.train_batch_size * world < 2:
                raise ValueError(
                    f"train_batch_size: {config.train_batch_size} on {world} process(es) gives the score-function "
                    "advantage's baseline no other image to compare with (every advantage would be 0); use a global "
                    "micro-batch of at least 2 images"
                )

    @property
    def fuses(self) -> bool:
        """Whether several micro-batches may share one sampling call (:meth:`estimate`): not
        with a score-function term, whose advantage baseline is each micro-batch's own."""
        return not self.score_function

    def draws(self, generator: torch.Generator) -> tuple[int, dict[int, float] | None]:
        """A micro-batch's random choices, from its own generator: K, the number of final steps
        with gradient, and the steps whose KL value is evaluated (None without a KL)."""
        cfg, T = self.config, len(self.sampler.chain)
        k = truncation_steps(cfg.backprop_strategy, T, cfg, generator)
        steps = choose_kl_steps(T, set(range(T - k, T)), cfg.kl_value_steps, generator) if self.problem.needs_kl else None
        return k, steps

    def __call__(self, prompts: list[str], seeds: list[int], multipliers: torch.Tensor, generator: torch.Generator) -> BatchEstimate:
        return self.estimate([(prompts, seeds)], multipliers, self.draws(generator))[0]

    def estimate(self, parts: list[tuple[list[str], list[int]]], multipliers: torch.Tensor,
                 draws: tuple[int, dict[int, float] | None]) -> list[BatchEstimate]:
        """One :class:`BatchEstimate` per micro-batch of ``parts`` ((prompts, seeds) each), all
        sampled in one call with the same ``draws`` (:meth:`draws`): each image's noise comes from
        its seed, so each part's images, values and Lagrangian are its own, as if sampled alone
        (equal up to float rounding of the larger call). Their losses share one graph: backpropagate
        their sum. More than one part only when :attr:`fuses`."""
        if len(parts) > 1 and not self.fuses:
            raise ValueError("micro-batches with a score-function term are estimated one at a time")
        cfg, T = self.config, len(self.sampler.chain)
        k, steps = draws
        prompts, seeds = [p for ps, _ in parts for p in ps], [s for _, ss in parts for s in ss]
        grad_steps = set(range(T - k, T))
        policy = self.sampler.guided(prompts)
        kl_acc = None
        if self.problem.needs_kl:
            kl_acc = ChainKLAccumulator(
                WithAdaptersDisabled(policy), self.sampler.chain, cfg.kl_estimator, steps, cfg.gradient_checkpointing
            )
        # kl_grad_steps 'all': the KL term of every other step is differentiated at its fixed state too
        local = set(range(T)) - grad_steps if (kl_acc is not None and cfg.kl_grad_steps == "all") else set()
        trajectory = Trajectory() if self.score_function else None
        images = self.sampler.sample(
            policy, seeds, grad_steps=grad_steps, gradient_checkpointing=cfg.gradient_checkpointing, on_step=kl_acc,
            local_grad_steps=local, trajectory=trajectory,
        )
        raw, norm = score(images, prompts, self.backprop_rewards, self.rewards, self.normalizers)
        with torch.no_grad():  # rewards of score-function constraints alone: their gradient is not needed
            rest = [n for n in self.problem.reward_names if n not in raw]
            raw_rest, norm_rest = score(images.detach(), prompts, rest, self.rewards, self.normalizers)
        raw, norm = {**raw, **raw_rest}, {**norm, **norm_rest}
        raw, norm = ({n: d[n] for n in self.problem.reward_names} for d in (raw, norm))  # the problem's order
        used = {n: (norm[n] if self.problem.normalized(n) else raw[n]) for n in raw}
        kl = kl_acc.per_sample if kl_acc is not None else None
        if isinstance(kl, float):  # no KL step was evaluated (kl_value_steps=0 and K=0)
            kl = torch.zeros(len(seeds))
        # terms differentiated otherwise: their values here without gradient
        kept = [d.backpropagated and not d.whole_chain for d in self.differentiation]
        whole = self._whole_chain_rewards(policy, seeds, prompts) if self.whole_chain else {}
        estimates, start = [], 0
        for _, part_seeds in parts:
            part = slice(start, start + len(part_seeds))
            start = part.stop
            part_kl = None if kl is None else kl[part]
            part_used = {n: v[part] for n, v in used.items()}
            objective = self.problem.objective.value(part_kl, part_used)
            values = self.problem.values(part_kl, part_used)
            if not all(kept):
                values = torch.where(torch.tensor(kept, device=values.device), values, values.detach())
            if whole:
                values = torch.stack([whole[c.source][part].mean().to(values) if j in self.whole_chain else values[j]
                                      for j, c in enumerate(self.problem.constraints)])
            term, diagnostics = None, {}
            if self.score_function:  # one part (see above)
                term, diagnostics = self._score_function_term(policy, trajectory, used, prompts, multipliers, grad_steps)
            slacks = self.problem.slacks(values)
            estimates.append(BatchEstimate(
                loss=self.problem.lagrangian(objective, slacks, multipliers),
                objective=objective.detach(),
                values=values.detach(),
                slacks=slacks.detach(),
                rewards_raw={n: v[part].detach() for n, v in raw.items()},
                rewards_norm={n: v[part].detach() for n, v in norm.items()},
                kl=None if part_kl is None else part_kl.detach(),
                num_grad_steps=k,
                score_function=term,
                diagnostics=diagnostics,
            ))
        return estimates

    def _whole_chain_rewards(self, policy, seeds: list[int], prompts: list[str]) -> dict[str, torch.Tensor]:
        """The whole-chain constraints' rewards (B,) in their units, with their gradient, from a second
        sampling pass that carries gradient through every step (the same seeds and noise: the same
        images as the first pass, whose truncated graph the other terms keep)."""
        cfg, T = self.config, len(self.sampler.chain)
        images = self.sampler.sample(policy, seeds, grad_steps=range(T), gradient_checkpointing=cfg.gradient_checkpointing)
        raw, norm = score(images, prompts, self.whole_chain_rewards, self.rewards, self.normalizers)
        return {n: (norm if self.problem.normalized(n) else raw)[n] for n in raw}

    def _score_function_term(self, policy, trajectory: Trajectory, used: dict, prompts: list[str],
                             multipliers: torch.Tensor, backprop_steps: set[int]):
        """The :class:`ScoreFunctionTerm` of the constraints with a score-function gradient, and
        its diagnostics: per reward, the mean |A| and the share of images whose advantage is 0
        (a 0/1 reward in a micro-batch where every image agrees), over the global micro-batch."""
        T, diagnostics, offset = len(self.sampler.chain), {}, 0
        advantages = {}  # reward name -> its advantages over the global micro-batch
        sources = {self.problem.constraints[j].source for j in self.score_function}
        for name in [n for n in self.problem.reward_names if n in sources]:  # one order on every process (gathers)
            values, all_prompts, offset = _gather(used[name].detach(), prompts)
            advantages[name] = a = self.advantage.compute(values, 1, None, all_prompts)
            diagnostics[f"score_function/mean_abs_advantage/{name}"] = float(a.abs().mean())
            diagnostics[f"score_function/zero_advantage_fraction/{name}"] = float((a == 0).double().mean())
        step_advantages = {}
        for i in range(T):
            covering = [j for j in self.score_function if i in self.differentiation[j].score_function_steps(T, backprop_steps)]
            if not covering:
                continue
            weights = reward_weights(self.problem, multipliers, constraints=covering)
            combined = sum(w * advantages[name] for name, w in weights.items())
            if bool(combined.ne(0).any()):  # the same on every process: the global batch's advantages
                step_advantages[i] = combined[offset : offset + len(prompts)].detach()
        return ScoreFunctionTerm(policy, self.sampler.chain, trajectory, step_advantages), diagnostics


def _check_score_function_settings(cfg) -> None:
    """Constraints with a score-function gradient (estimator reward_backprop): a stochastic
    chain and an advantage that needs no prompt groups and no saved state; the advantage
    setting only with such a constraint."""
    indices = [i for i, c in enumerate(cfg.constraints) if c.by_score_function]
    if not indices:
        if cfg.score_function_advantage != RewardBackpropSettings.score_function_advantage:
            raise ValueError(
                f"score_function_advantage: {cfg.score_function_advantage!r} is only read for constraints with a "
                "score-function gradient, and none has one; remove it, or set gradient: score_function (or hybrid) "
                "on a constraint"
            )
        return
    if cfg.fuse_micro_batches:
        raise ValueError(
            f"fuse_micro_batches: true cannot be used with constraints[{indices[0]}] (gradient: "
            f"{cfg.constraints[indices[0]].gradient}): its score-function advantage compares the images of one "
            "micro-batch; remove fuse_micro_batches (its default leaves such runs unfused)"
        )
    if cfg.eta == 0:
        raise ValueError(
            f"eta: 0 makes every sampling step deterministic, and constraints[{indices[0]}] (gradient: "
            f"{cfg.constraints[indices[0]].gradient}) needs each step's Gaussian log-probability; use eta > 0 (1 for "
            "DDIM, 0.7 for the flow SDE), or gradient: backprop"
        )
    kind = ADVANTAGES.get(cfg.score_function_advantage)
    if kind.needs_groups or kind.stateful:
        usable = [n for n in ADVANTAGES if not (ADVANTAGES.get(n).needs_groups or ADVANTAGES.get(n).stateful)]
        why = ("compares images of one prompt group, and reward_backprop samples one image per prompt"
               if kind.needs_groups else "keeps statistics across batches, which reward_backprop does not checkpoint")
        raise ValueError(f"score_function_advantage: {cfg.score_function_advantage!r} {why}; use one of "
                         f"{', '.join(usable)}")


class RolloutEstimator:
    """An estimator whose micro-batches are rollouts (sampled without gradient) that the
    trainer then trains on: ``ppo_epochs`` inner epochs of ``ppo_updates_per_epoch``
    optimiser updates, each backpropagating :meth:`surrogate_losses` of its micro-batches."""

    def surrogate_losses(  # pragma: no cover
        self, estimate: BatchEstimate, epoch: int, update: int, autocast=contextlib.nullcontext
    ) -> Iterator[torch.Tensor]:
        """Losses to backpropagate for the micro-batch of ``estimate`` in inner epoch
        ``epoch``, optimiser update ``update`` of the round (0: the first, before any
        parameter change); the forward passes run under ``autocast()`` (the sampling's mixed
        precision), the caller backpropagates each loss outside it."""
        raise NotImplementedError

    def pop_stats(self) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _RecordingReference:
    """A reference predictor that keeps its outputs at the steps ``keep`` (by step index),
    so that the updates reuse the sampling pass's base predictions instead of recomputing."""

    def __init__(self, reference, chain, keep: set[int]):
        self.reference, self.keep, self.outputs = reference, keep, {}
        self.chain = chain

    def __call__(self, x_t, t):
        out = self.reference(x_t, t)
        i = self.chain.index_of(t)
        if i in self.keep:
            self.outputs[i] = out.detach()
        return out


def _gather(values: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, list[str], int]:
    """The global batch's values and prompts (every process's, in process order) and the
    offset of this process's share; the local batch when not distributed."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, list(prompts), 0
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (values.detach().cpu().tolist(), list(prompts)))
    offset = sum(len(p[1]) for p in parts[: dist.get_rank()])
    all_values = torch.tensor([v for p in parts for v in p[0]], dtype=values.dtype)
    return all_values.to(values.device), [q for p in parts for q in p[1]], offset


@ESTIMATORS.register("policy_gradient")
class PolicyGradient(RolloutEstimator):
    """Constrained policy gradient (DDPO / GRPO with duals, METHOD.md §3).

    Rollout (:meth:`__call__`, no gradient): sample through the one sampler with a
    :class:`~cdalign.core.sampling.Trajectory` (every DDIM step's Gaussian log-probability
    with the chain's own σ_t), score the rewards (no gradient needed), compute the KL to
    the base (adapters disabled, same denoiser) where the problem has one, and the advantage

        A = s_0 A_0 + Σ_i λ_i s_i A_i − c_KL · (KL − baseline)

    per sample: each reward's advantage by ``advantage`` (group-relative by default),
    clipped, then weighed by the duals with the sign of its direction.

    Update (:meth:`surrogate_losses`, per trained step i of the inner epoch's subset S):
    ``(1/|S|)·[PPO_i(A) + c_KL · mean_b KL_i]``. ``PPO_i`` is the clipped surrogate on the
    exact ratio of step i's density (old = the sampling model). The KL's gradient is exact:
    ``∇ E[Σ_t KL_t(x_t)] = E[Σ_t ∇KL_t(x_t)] + E[Σ_t KL_t ∇ log p_θ(x_{T..t})]``. The first
    part is the per-step Gaussian KL ``c_t²/(2σ_t²)‖ε̃_θ − ε̃_q‖²`` differentiated with
    respect to the policy's mean at the recorded states (as Flow-GRPO and DPOK do); the
    second, the score-function part for the states' own distribution, is the per-sample
    chain KL entering the advantage as a cost, centred by its group (or batch) mean (which
    includes the sample itself, as GRPO's baseline: a bias of order 1/group size). Both
    parts, like PPO's per-step mean, carry the scale 1/(number of stochastic steps), so the
    loss is the Lagrangian's gradient estimator divided by that count.

    The KL value (the duals', the report's, the advantage's) is the chain KL over every step,
    or with ``kl_value_steps`` m the trained steps plus m others, or with 0 the trained steps
    alone, each divided by its probability of being drawn (unbiased for the sum over the
    stochastic steps; a deterministic step, σ_t = 0, is never trained, and has no path KL)."""

    settings = PolicyGradientSettings
    config_fields = setting_names(settings)

    @staticmethod
    def check_config(cfg) -> None:
        """A stochastic chain, prompt groups inside one micro-batch, updates that share the round."""
        if cfg.eta == 0:
            raise ValueError(
                "eta: 0 makes every DDIM step deterministic, and estimator policy_gradient needs each step to be a "
                "Gaussian policy with a log-probability; use eta > 0 (1 is DDPO's and the paper's)"
            )
        if cfg.train_batch_size % cfg.images_per_prompt:
            raise ValueError(
                f"train_batch_size: {cfg.train_batch_size} is not a multiple of images_per_prompt "
                f"({cfg.images_per_prompt}); a prompt group must sit in one micro-batch of one process"
            )
        if ADVANTAGES.get(cfg.advantage).needs_groups and cfg.images_per_prompt < 2:
            raise ValueError(
                f"images_per_prompt: {cfg.images_per_prompt} leaves advantage {cfg.advantage!r} nothing to compare "
                "within a prompt group (every advantage would be 0); set images_per_prompt >= 2, or advantage: "
                "batch_std or prompt_tracker"
            )
        if cfg.gradient_accumulation_steps % cfg.ppo_updates_per_epoch:
            raise ValueError(
                f"ppo_updates_per_epoch: {cfg.ppo_updates_per_epoch} does not divide gradient_accumulation_steps "
                f"({cfg.gradient_accumulation_steps}); each update takes an equal share of the round's micro-batches"
            )

    def __init__(self, sampler: DiffusionSampler, problem: ConstrainedProblem, rewards: dict, normalizers: dict, config):
        self.sampler, self.problem, self.rewards, self.normalizers = sampler, problem, rewards, normalizers
        self.config = cfg = config
        chain = sampler.chain
        self.stochastic_steps = [i for i in range(len(chain)) if float(chain.sigma[i]) > 0]
        if not self.stochastic_steps:
            raise ValueError("eta: every DDIM step is deterministic; estimator policy_gradient needs eta > 0")
        self.num_train_steps = max(1, min(len(self.stochastic_steps), round(cfg.timestep_fraction * len(self.stochastic_steps))))
        self.kind = ADVANTAGES.get(cfg.advantage)
        self.trackers = (
            {n: PerPromptStatTracker(cfg.prompt_tracker_buffer, cfg.prompt_tracker_min_count) for n in problem.reward_names}
            if self.kind.stateful else {}
        )
        self.kl_step_weights = step_weights(chain, cfg.kl_estimator) if problem.needs_kl else None
        # kl_value_steps 0: a stochastic step's probability of being trained in one of the ppo_epochs draws
        self.trained_step_probability = inclusion_probability(self.num_train_steps, len(self.stochastic_steps), cfg.ppo_epochs)
        self._stats: list[dict] = []

    # ------------------------------------------------------------------ rollout
    def _advantages(self, name: str, values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cfg = self.config
        if not self.kind.global_batch:  # prompt groups lie within this process's micro-batch
            return self.kind.compute(values, cfg.images_per_prompt, None, prompts)
        all_values, all_prompts, offset = _gather(values, prompts)
        out = self.kind.compute(all_values, cfg.images_per_prompt, self.trackers.get(name), all_prompts)
        return out[offset : offset + len(prompts)]

    def _kl_baseline(self, kl: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The per-sample KL minus its group mean (group advantages) or global-batch mean."""
        if not self.kind.global_batch:
            return group_centered(kl, self.config.images_per_prompt)
        all_kl, _, _ = _gather(kl, prompts)
        return kl - all_kl.mean()

    def __call__(self, prompts: list[str], seeds: list[int], multipliers: torch.Tensor, generator: torch.Generator) -> BatchEstimate:
        cfg, chain, prob = self.config, self.sampler.chain, self.problem
        T, n = len(chain), self.num_train_steps
        train_steps = [
            sorted(self.stochastic_steps[j] for j in torch.randperm(len(self.stochastic_steps), generator=generator)[:n].tolist())
            for _ in range(cfg.ppo_epochs)
        ]
        trained = set().union(*train_steps)
        policy = self.sampler.guided(prompts)
        trajectory = Trajectory()
        kl_acc = reference = None
        if prob.needs_kl:
            reference = _RecordingReference(WithAdaptersDisabled(policy), chain, trained)
            if cfg.kl_value_steps == 0:  # the trained steps alone, Horvitz–Thompson weighted
                steps = {i: self.trained_step_probability for i in trained}
            else:
                steps = choose_kl_steps(T, trained, cfg.kl_value_steps, generator)
            kl_acc = ChainKLAccumulator(reference, chain, cfg.kl_estimator, steps, value_only=True)
        with torch.no_grad():
            images = self.sampler.sample(policy, seeds, on_step=kl_acc, trajectory=trajectory)
            raw, norm = score(images, prompts, prob.reward_names, self.rewards, self.normalizers)
        used = {name: (norm[name] if prob.normalized(name) else raw[name]) for name in raw}
        kl = kl_acc.per_sample if kl_acc is not None else None
        if isinstance(kl, float):
            kl = torch.zeros(len(seeds))
        objective = prob.objective.value(kl, used)
        values = prob.values(kl, used)
        slacks = prob.slacks(values)
        lagrangian = prob.lagrangian(objective, slacks, multipliers)
        weights = reward_weights(prob, multipliers)
        per_reward = {name: self._advantages(name, used[name].detach(), prompts) for name in weights}
        advantages = combined_advantage(per_reward, weights, cfg.advantage_clip)
        c_kl = kl_weight(prob, multipliers) if prob.needs_kl else 0.0
        if c_kl:
            advantages = advantages - c_kl * self._kl_baseline(kl.detach().to(advantages), prompts)
        rollout = Rollout(
            prompts=list(prompts), trajectory=trajectory, advantages=advantages.detach(), train_steps=train_steps,
            kl_weight=c_kl, base_eps=reference.outputs if reference is not None else {},
        )
        return BatchEstimate(
            loss=lagrangian.detach(),
            objective=objective.detach(),
            values=values.detach(),
            slacks=slacks.detach(),
            rewards_raw={k: v.detach() for k, v in raw.items()},
            rewards_norm={k: v.detach() for k, v in norm.items()},
            kl=None if kl is None else kl.detach(),
            num_grad_steps=n,
            rollout=rollout,
        )

    # ------------------------------------------------------------------ updates
    def surrogate_losses(
        self, estimate: BatchEstimate, epoch: int, update: int = 0, autocast=contextlib.nullcontext
    ) -> Iterator[torch.Tensor]:
        """One loss per trained step of inner epoch ``epoch`` (backpropagate each at once:
        memory holds one denoiser call's graph), ``(PPO_i + c_KL·mean_b KL_i) / |S|``."""
        cfg, chain, r = self.config, self.sampler.chain, estimate.rollout
        policy = self.sampler.guided(r.prompts)
        steps = r.train_steps[epoch]
        for i in steps:
            x_t, x_prev, t = r.trajectory.states[i], r.trajectory.states[i + 1], chain.timesteps[i]
            with autocast():  # as the sampling ran, so that the first update's ratio is exactly 1
                eps = policy(x_t, t)
                log_prob = chain.log_prob(i, x_t, eps, x_prev)
                loss, stats = ppo_clipped_loss(log_prob, r.trajectory.log_probs[i], r.advantages, cfg.ppo_clip_range)
                if r.kl_weight:
                    eps_ref = r.base_eps.get(i)
                    if eps_ref is None:
                        with torch.no_grad():
                            eps_ref = WithAdaptersDisabled(policy)(x_t, t)
                    kl_i = step_kl(eps, eps_ref, float(self.kl_step_weights[i]), cfg.kl_estimator).mean()
                    loss = loss + r.kl_weight * kl_i
            self._stats.append({"update": update, **stats})
            yield loss / len(steps)

    def pop_stats(self) -> dict[str, float]:
        """PPO diagnostics since the last call, averaged over the trained steps of every
        epoch: ``ratio_mean``, ``clip_fraction``, ``approx_kl``; and
        ``first_update_max_abs_log_ratio``, over the round's first update, before any
        parameter changed (0: the update recomputes the sampling model's log-probabilities
        exactly, so its ratio is exactly 1)."""
        stats, self._stats = self._stats, []
        if not stats:
            return {}
        out = {k: sum(s[k] for s in stats) / len(stats) for k in ("ratio_mean", "clip_fraction", "approx_kl")}
        first = [s["max_abs_log_ratio"] for s in stats if s["update"] == 0]
        out["first_update_max_abs_log_ratio"] = max(first) if first else math.nan
        return out

    def state_dict(self) -> dict:
        return {"trackers": {n: t.state_dict() for n, t in self.trackers.items()}}

    def load_state_dict(self, state: dict) -> None:
        for n, t in self.trackers.items():
            t.load_state_dict(state.get("trackers", {}).get(n, {}))

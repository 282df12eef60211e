"""The rules that relate fields of a :class:`~cdalign.alignment.config.ConstrainedDDPOConfig`,
beyond each field's own type, choices and bounds (:func:`cdalign.fields.check_fields`):
a well-posed problem (:func:`_check_problem`), a sampler that fits it
(:func:`_check_sampler`), the estimator's own settings and no other estimator's
(:func:`_check_estimator`), and run-level settings (:func:`_check_run`).

Each rule raises ``ValueError`` naming the field path (``constraints[1].direction``), the
bad value and the fix. :func:`check_rules` runs them all; the config's ``validate`` calls it."""

import dataclasses

from huggingface_hub.utils import HFValidationError, validate_repo_id

from cdalign.alignment.estimators import ESTIMATORS
from cdalign.alignment.specs import DEFAULT_GRADIENT, ConstraintSpec
from cdalign.fields import did_you_mean, not_allowed
from cdalign.rewards import available_rewards
from cdalign.rewards.metrics import EVAL_METRICS

__all__ = ["REPORT_TO", "check_rules"]

REPORT_TO = ("none", "all", "tensorboard", "wandb", "trackio")


def check_rules(cfg) -> None:
    """Check the rules that relate ``cfg``'s fields (``cfg`` a ``ConstrainedDDPOConfig``
    whose fields passed ``check_fields``); raise ``ValueError`` at the first broken one.
    Pure: it reads the config and changes nothing."""
    _check_problem(cfg)
    _check_sampler(cfg)
    _check_estimator(cfg)
    _check_run(cfg)


def _known_rewards() -> list[str]:
    """Reward names of ``cdalign.rewards.available_rewards()`` (registered at import)."""
    return list(available_rewards())


def _check_reward_name(path: str, name: str, known: list[str] | None) -> None:
    if known is not None and name not in known:
        close = did_you_mean(name, known)
        hint = f"{close} " if close else ""
        raise ValueError(f"{path}: unknown reward {name!r}; {hint}available rewards: {', '.join(sorted(known))} "
                         "(a reward scored by a server is declared in remote_rewards)")


def _check_problem(cfg) -> None:
    """The objective, the constraints and the duals make a well-posed problem."""
    objective, constraints, dual = cfg.objective, cfg.constraints, cfg.dual
    if not objective.is_kl and objective.reward is None:
        raise ValueError("objective.reward: required when objective.type is 'reward'; name the reward to maximise")
    if objective.is_kl and objective.reward is not None:
        raise ValueError(
            f"objective.reward: {objective.reward!r} is only used when objective.type is 'reward'; "
            "remove it, or set objective.type: reward to maximise it"
        )

    for i, c in enumerate(constraints):
        where = f"constraints[{i}]"
        if not c.is_kl:
            if c.reward is None:
                raise ValueError(f"{where}.reward: required for a reward constraint; name the reward to bound")
            if c.threshold is None:
                raise ValueError(
                    f"{where}.threshold: required for reward constraint {c.reward!r} "
                    f"(E[r] {'>=' if c.direction == 'high' else '<='} threshold)"
                )
            if c.max is not None:
                raise ValueError(f"{where}.max: only used by kl constraints; use threshold for a reward bound")
            if c.relative_to_base and c.normalize:
                raise ValueError(
                    f"{where}.relative_to_base: a normalised threshold is already relative to the base model's mean "
                    f"(in its std units); set normalize: false to state the floor of {c.reward!r} in its own units "
                    "(e.g. threshold: -0.05 for 5 points under the base), or remove relative_to_base"
                )
            if c.relative_to_base and c.confidence is not None:
                # the verdict judges the paired difference aligned − base, whose noise training never sees (it
                # samples no base image on the same noise); the values' own spread overstates it (a 0/1 floor's
                # margin put its target above the base), so the margin is the user's, in the reward's units
                raise ValueError(
                    f"{where}.confidence: not with relative_to_base: the verdict judges the paired difference aligned "
                    "− base on the same images, whose noise the training batches cannot measure (the per-image spread "
                    "of the values overstates it and can put the floor's target above the base); give a fixed "
                    f"margin instead (e.g. margin: 0.02 to aim 0.02 past the floor, in {c.reward!r}'s units), or none"
                )
        else:
            if c.max is None:
                raise ValueError(f"{where}.max: required for a kl constraint (KL <= max, a positive number)")
            for unused in ("reward", "threshold"):
                if getattr(c, unused) is not None:
                    raise ValueError(f"{where}.{unused}: not used by kl constraints (KL <= max); remove it")
            if c.relative_to_base:
                raise ValueError(f"{where}.relative_to_base: reward constraints only (a KL budget is already "
                                 "measured from the base model); remove it")
            for unused in ("confidence", "margin"):
                if getattr(c, unused) is not None:
                    raise ValueError(f"{where}.{unused}: reward constraints only; a KL budget is aimed at as "
                                     "given (lower max to leave room); remove it")
            if c.gradient != DEFAULT_GRADIENT:
                raise ValueError(f"{where}.gradient: {c.gradient!r} is for reward constraints (a reward's "
                                 "expectation); the chain KL is a sum of per-step terms with exact gradients: set "
                                 "kl_grad_steps: all to differentiate it at every step, and remove gradient")
        if c.confidence is not None and c.margin is not None:
            raise ValueError(f"{where}.confidence: set confidence or margin, not both (confidence derives the "
                             "margin from the run's own noise estimate; margin fixes it)")

    known = _known_rewards()
    _check_remote_rewards(cfg, known)
    known = known + list(cfg.remote_rewards)
    if not objective.is_kl:
        _check_reward_name("objective.reward", objective.reward, known)
    for i, c in enumerate(constraints):
        if not c.is_kl:
            _check_reward_name(f"constraints[{i}].reward", c.reward, known)

    for name in cfg.reward_kwargs:
        _check_reward_name(f"reward_kwargs.{name}", name, known)

    kl_indices = [i for i, c in enumerate(constraints) if c.is_kl]
    if len(kl_indices) > 1:
        raise ValueError(
            f"constraints[{kl_indices[1]}].type: more than one kl constraint (constraints{kl_indices}); "
            "keep only the one with the smallest max"
        )
    if objective.is_kl and kl_indices:
        # min KL s.t. KL <= max: the bound is either inactive or makes the problem infeasible.
        raise ValueError(
            f"constraints[{kl_indices[0]}].type: a kl constraint with objective.type 'kl' is pointless (the "
            "objective already minimises the KL; the bound can only be inactive or infeasible); remove it, or "
            "set objective.type: reward to maximise a reward under the KL budget"
        )
    if not constraints and objective.is_kl:
        raise ValueError(
            "constraints: empty with objective.type 'kl', a trivial problem (the base model itself is the "
            "optimum); add reward constraints, or set objective.type: reward for plain reward fine-tuning"
        )
    _check_repeated_rewards(constraints)

    if isinstance(dual.init, list) and len(dual.init) != len(constraints):
        raise ValueError(
            f"dual.init: has {len(dual.init)} values but there are {len(constraints)} constraints; give one "
            "value per constraint, or a single number for all"
        )
    if dual.anti_windup and dual.optimizer != "nupi":
        raise ValueError(
            f"dual.anti_windup: conditional integration needs the smoothed error of 'nupi', but dual.optimizer "
            f"is {dual.optimizer!r}; set dual.optimizer: nupi, or remove anti_windup"
        )
    if dual.optimizer == "nupi" and not dual.freeze and dual.kappa_i == 0 and dual.kappa_p == 0:
        raise ValueError(
            "dual.kappa_i: kappa_i and kappa_p are both 0, so λ would never move; set a gain, or dual.freeze: true "
            "to keep λ at dual.init on purpose"
        )


def _check_remote_rewards(cfg, registered: list[str]) -> None:
    """Each remote reward's spec holds (URL, numbers, encoding), its name is not a registered
    reward's (which one a constraint meant would be ambiguous), and it takes no reward_kwargs
    (its server is configured where it runs)."""
    for name, spec in cfg.remote_rewards.items():
        where = f"remote_rewards.{name}"
        if not name.strip():
            raise ValueError(f"{where}: a remote reward needs a name")
        if name in registered:
            raise ValueError(f"{where}: {name!r} is a registered reward; give the served one its own name "
                             f"(e.g. {name}_served) and use that name in the constraints")
        spec.validate(where)
        if name in cfg.reward_kwargs:
            raise ValueError(f"reward_kwargs.{name}: {name!r} is a remote reward, scored by its server; configure the "
                             "scorer where the server runs, and remove these kwargs")


def _check_repeated_rewards(constraints: list[ConstraintSpec]) -> None:
    """One constraint per (reward, direction); a high and a low bound on one reward must
    leave a non-empty interval (a two-sided band is fine, equal bounds pin E[r]). Bounds
    in different units (normalize differs) cannot be compared here and are allowed."""
    seen: dict[tuple[str, str], int] = {}
    for i, c in enumerate(constraints):
        if c.is_kl:
            continue
        key = (c.reward, c.direction)
        if key in seen:
            j = seen[key]
            other = constraints[j]
            if (other.normalize, other.relative_to_base) == (c.normalize, c.relative_to_base):
                tighter = max if c.direction == "high" else min
                keep = j if tighter(other.threshold, c.threshold) == other.threshold else i
                advice = f"keep the tighter one, constraints[{keep}] (threshold {constraints[keep].threshold})"
            else:
                advice = "keep one (their thresholds are in different units: normalize or relative_to_base differs)"
            raise ValueError(
                f"constraints[{i}]: repeats reward {c.reward!r} with direction {c.direction!r} of constraints[{j}] "
                f"(redundant, and both would be named {c.name!r}); {advice} and remove the other"
            )
        seen[key] = i
    for (reward, direction), i in seen.items():
        j = seen.get((reward, "low"))
        if direction != "high" or j is None:
            continue
        high, low = constraints[i], constraints[j]
        same_units = (high.normalize, high.relative_to_base) == (low.normalize, low.relative_to_base)
        if same_units and high.threshold > low.threshold:
            raise ValueError(
                f"constraints[{j}].threshold: reward {reward!r} must be >= {high.threshold} (constraints[{i}]) and "
                f"<= {low.threshold} (constraints[{j}]), an empty feasible set; make the low threshold at least "
                "the high one, or drop one of them"
            )


def _check_sampler(cfg) -> None:
    """Sampling, truncation and KL settings fit together."""
    T = cfg.num_inference_steps
    if cfg.kl_value_steps is not None and cfg.kl_value_steps > T:
        raise ValueError(f"kl_value_steps: {cfg.kl_value_steps} exceeds num_inference_steps ({T}); must be in [1, {T}]")
    if cfg.uses_kl and cfg.kl_estimator == "path" and cfg.eta == 0:
        raise ValueError(
            "eta: 0 makes DDIM deterministic, so the exact chain KL (kl_estimator 'path') is undefined; "
            "use eta > 0 (the paper: 1), or kl_estimator: uniform"
        )


def _check_estimator(cfg) -> None:
    """The estimator's own fields fit together (its ``check_config``), and no field of another
    estimator is set away from its default (it would be silently ignored): each estimator of
    :data:`~cdalign.alignment.estimators.ESTIMATORS` lists its fields in ``config_fields``."""
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cfg)}
    for name in ESTIMATORS:
        if name == cfg.estimator:
            continue
        for key in ESTIMATORS.get(name).config_fields:
            if getattr(cfg, key) != defaults[key]:
                raise ValueError(
                    f"{key}: {getattr(cfg, key)!r} is only used by estimator: {name} (this run uses "
                    f"{cfg.estimator}); remove it, or set estimator: {name}"
                )
    estimator = ESTIMATORS.get(cfg.estimator)
    if not getattr(estimator, "per_constraint_gradients", False):
        for i, c in enumerate(cfg.constraints):
            if c.gradient != DEFAULT_GRADIENT:
                raise ValueError(
                    f"constraints[{i}].gradient: {c.gradient!r} is a setting of estimator reward_backprop (how one "
                    f"constraint's term is differentiated); estimator {cfg.estimator} does not read it (policy_gradient "
                    "already estimates every term by the score function); remove it, or set estimator: reward_backprop"
                )
    estimator.check_config(cfg)


def _check_run(cfg) -> None:
    """Run-level settings: normalisation sample size, trackers, Hub, LoRA targets."""
    normalized = (not cfg.objective.is_kl and cfg.objective.normalize) or any(
        not c.is_kl and c.normalize for c in cfg.constraints
    )
    per_batch = cfg.global_batch_size or cfg.train_batch_size  # per process without a global batch: at least this
    if normalized and cfg.normalization_batches * per_batch < 2:
        raise ValueError(
            f"normalization_batches: {cfg.normalization_batches} batch(es) of {per_batch} image(s) "
            "cannot estimate a standard deviation; use at least 2 images in total"
        )
    if not cfg.lora_target_modules:
        raise ValueError("lora_target_modules: empty; name at least one denoiser module, e.g. to_q to_k to_v to_out.0")
    for i, name in enumerate(cfg.lora_target_modules):
        if not name.strip():
            raise ValueError(f"lora_target_modules[{i}]: empty module name")
    names = [n.strip() for n in cfg.report_to.split(",")]
    for name in names:
        if name not in REPORT_TO:
            raise not_allowed("report_to", name, REPORT_TO)
    if len(names) > 1 and ({"none", "all"} & set(names)):
        raise ValueError(f"report_to: {cfg.report_to!r}; 'none' and 'all' must stand alone")
    if len(set(names)) != len(names):
        raise ValueError(f"report_to: {cfg.report_to!r} names a tracker twice")
    if cfg.push_to_hub and cfg.hub_model_id is None:
        raise ValueError("hub_model_id: required when push_to_hub is true; set it to 'user/repo'")
    if cfg.hub_model_id is not None:
        try:
            validate_repo_id(cfg.hub_model_id)
        except HFValidationError as err:
            raise ValueError(f"hub_model_id: {cfg.hub_model_id!r} is not a valid Hub repo id ({err}); use 'user/name'") from None
    for i, name in enumerate(cfg.eval_metrics):
        if name not in EVAL_METRICS:
            raise not_allowed(f"eval_metrics[{i}]", name, EVAL_METRICS.names())

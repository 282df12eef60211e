"""What a training step logs (``log.jsonl``, the trackers, ``trainer.history``): each
quantity's mean over the step's micro-batches, averaged over processes, and the config as
the flat mapping trackers take."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from cdalign.alignment.estimators import BatchEstimate
from cdalign.core.problem import ConstrainedProblem


def step_means(
    records: Sequence[BatchEstimate], problem: ConstrainedProblem, accelerator, device, extra: Mapping | None = None
) -> dict[str, float]:
    """Means over the step's finite micro-batches (NaN without any), then over processes:
    ``loss``, ``objective``, ``kl`` (when the problem uses it), ``reward/<name>`` and
    ``reward_normalized/<name>``, ``value/<constraint>`` and ``slack/<constraint>``, and the
    estimator's diagnostics ``extra`` (each already this process's mean). Every process calls it."""
    names = list(records[0].rewards_raw) if records else []
    keys, vals = [], []

    def add(key, tensors):
        keys.append(key)
        vals.append(torch.stack([t.float().mean() for t in tensors]).mean() if tensors else torch.tensor(float("nan")))

    add("loss", [r.loss.detach() for r in records])
    add("objective", [r.objective for r in records])
    if problem.needs_kl:
        add("kl", [r.kl for r in records])
    for n in names:
        add(f"reward/{n}", [r.rewards_raw[n] for r in records])
        add(f"reward_normalized/{n}", [r.rewards_norm[n] for r in records])
    for j, c in enumerate(problem.constraints):
        add(f"value/{c.name}", [r.values[j] for r in records])
        add(f"slack/{c.name}", [r.slacks[j] for r in records])
    for key, value in (extra or {}).items():  # estimator diagnostics (PPO ratio, clip fraction): process means
        keys.append(key)
        vals.append(torch.tensor(float(value)))
    vec = torch.stack(vals).to(device)
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec, reduction="mean")
    return {k: float(v) for k, v in zip(keys, vec.cpu())}


def diagnostic_means(records: Sequence[BatchEstimate]) -> dict[str, float]:
    """Each estimator diagnostic (``BatchEstimate.diagnostics``) averaged over the step's
    micro-batches that report it: this process's means, for :func:`step_means`' ``extra``."""
    sums: dict[str, list[float]] = {}
    for r in records:
        for key, value in r.diagnostics.items():
            sums.setdefault(key, []).append(float(value))
    return {key: sum(v) / len(v) for key, v in sums.items()}


def step_record(
    step: int, records: Sequence[BatchEstimate], problem: ConstrainedProblem, accelerator, device, *, multipliers,
    margins, skipped: int, grad_norm: float | None, extra: Mapping | None = None,
) -> dict:
    """One step's record: ``step``, the :func:`step_means`, each constraint's λ
    (``dual/<name>``, from ``multipliers``: the dual variable itself, in base-std units for a floor
    relative to the base, whose slack the duals see divided by the std; the report gives the
    price per unit of the bound, λ / std) and, for confidence targets, its margin
    (``margin/<name>``; ``margins`` None: none), the backpropagated sampling steps of the
    last micro-batch, the micro-batches ``skipped`` so far and the gradient norm (if clipped)."""
    log = {"step": step, **step_means(records, problem, accelerator, device, extra)}
    for j, c in enumerate(problem.constraints):
        log[f"dual/{c.name}"] = float(multipliers[j])
        if margins is not None:
            log[f"margin/{c.name}"] = float(margins[j])
    log["backprop_steps"] = records[-1].num_grad_steps if records else 0
    log["skipped_micro_batches"] = skipped
    if grad_norm is not None:
        log["grad_norm"] = grad_norm
    return log


def flat_config(d: Mapping, prefix: str = "") -> dict:
    """A nested config dict as trackers take it: ``dual.kappa_i`` keys, lists as JSON strings."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def progress_postfix(log: Mapping[str, float]) -> dict[str, str]:
    """What the progress bar shows of a step's record: its chain KL and its worst slack."""
    slacks = [v for k, v in log.items() if k.startswith("slack/")]
    post = {}
    if "kl" in log:
        post["kl"] = f"{log['kl']:.4g}"
    if slacks:
        post["worst_slack"] = f"{max(slacks):+.3f}"
    return post

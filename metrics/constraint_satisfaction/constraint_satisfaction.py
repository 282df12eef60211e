"""Constraint satisfaction: cdalign's verdict on a requirement ``E[r] ≥ b`` or ``E[r] ≤ b``
from per-image reward values, as a Hugging Face ``evaluate`` metric.

The numbers are :meth:`cdalign.core.problem.Constraint.verdict`'s, the one function cdalign's
trainer report, evaluation harness and composer judge constraints with: the mean, its normal
95% CI (mean ± 1.96·s/√n, Bessel-corrected s), the slack (positive = violated), whether the
mean meets the threshold (ties count) and whether the whole CI does."""

import math

import datasets
import evaluate
import torch

from cdalign.core.problem import Constraint

_CITATION = """\
@inproceedings{khalafi2025composition,
  title     = {Composition and Alignment of Diffusion Models using Constrained Learning},
  author    = {Khalafi, Shervin and others},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2025},
  eprint    = {2508.19104},
  archivePrefix = {arXiv}
}
"""

_DESCRIPTION = """\
Judges constraints on the expected value of per-image rewards, E[r_i] >= b_i ("high") or
E[r_i] <= b_i ("low"), the way cdalign does: mean with a normal-approximation 95% confidence
interval, slack (positive = violated), satisfied (the mean is on the allowed side) and
ci_clears_threshold (the whole interval is). Computed by cdalign.core.problem.Constraint.verdict,
so the numbers equal those of cdalign's training reports and evaluation harness.
"""

_KWARGS_DESCRIPTION = """
Args:
    values: one entry per image: a list of m reward values (one per constraint), or one
        number when there is a single constraint. Values are in the units the thresholds are
        given in (raw reward, or base-model standard deviations if you normalised them).
    thresholds: the bounds b_i: m numbers (or one number for a single constraint).
    directions: "high" (E[r] >= b) or "low" (E[r] <= b) per constraint (or one string).
    names: optional names of the constraints (default "constraint_0", ...).
Returns:
    names, means, ci95 ([lo, hi] per constraint), slack, satisfied, ci_clears_threshold
    (lists, one entry per constraint), n (images) and all_satisfied.
Examples:
    >>> metric = evaluate.load("metrics/constraint_satisfaction")
    >>> metric.compute(values=[0.61, 0.55, 0.72, 0.58], thresholds=0.5, directions="high")["satisfied"]
    [True]
"""


def _as_list(value, m: int, what: str) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value] * m
    if len(items) != m:
        raise ValueError(f"{what}: {len(items)} given for {m} constraints; give one per constraint")
    return items


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ConstraintSatisfaction(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"values": datasets.Sequence(datasets.Value("float64"))}),
                datasets.Features({"values": datasets.Value("float64")}),
            ],
            reference_urls=["https://arxiv.org/abs/2508.19104"],
        )

    def _compute(self, values, thresholds, directions, names=None):
        rows = [v if isinstance(v, (list, tuple)) else [v] for v in values]
        if not rows:
            raise ValueError("values: no images given; pass at least one value per constraint")
        m = len(rows[0])
        if m == 0 or any(len(r) != m for r in rows):
            raise ValueError(f"values: every image needs the same number of values (one per constraint); got "
                             f"{sorted({len(r) for r in rows})}")
        thresholds = [float(b) for b in _as_list(thresholds, m, "thresholds")]
        directions = _as_list(directions, m, "directions")
        names = _as_list(names, m, "names") if names is not None else [f"constraint_{i}" for i in range(m)]
        for i, (b, d) in enumerate(zip(thresholds, directions)):
            if d not in ("high", "low"):
                raise ValueError(f"directions[{i}]: {d!r}; use 'high' (E[r] >= threshold) or 'low' (E[r] <= threshold)")
            if not math.isfinite(b):
                raise ValueError(f"thresholds[{i}]: {b} is not a finite number")
        table = torch.tensor(rows, dtype=torch.float64)  # (n images, m constraints)
        if not bool(torch.isfinite(table).all()):
            raise ValueError("values: NaN or infinite values; drop those images or fix the reward")
        verdicts = [Constraint(str(name), str(name), d, b).verdict(table[:, i])
                    for i, (name, d, b) in enumerate(zip(names, directions, thresholds))]
        return {
            "names": [str(n) for n in names],
            "means": [v["measured"] for v in verdicts],
            "ci95": [v["ci95"] for v in verdicts],
            "slack": [v["slack"] for v in verdicts],
            "satisfied": [v["satisfied"] for v in verdicts],
            "ci_clears_threshold": [v["ci_clears_threshold"] for v in verdicts],
            "n": int(table.shape[0]),
            "all_satisfied": all(v["satisfied"] for v in verdicts),
        }

"""Markdown for reports and model cards: escaping user strings, code fences, the one
"mean [lo, hi]" formatter (:func:`format_ci`) and the checkpoint comparison table. Pure
functions of plain dicts (``evaluation.json``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Sequence

from cdalign.core.statistics import MET_MARKS, met_label


def md(text: Any) -> str:
    """A user string made safe for Markdown text or a table cell (one line, escaped)."""
    s = " ".join(str(text).split())
    for ch in ("\\", "|", "`", "*", "_", "[", "]"):
        s = s.replace(ch, "\\" + ch)
    return s.replace("<", "&lt;").replace(">", "&gt;")


def _longest_backtick_run(text: str) -> int:
    """Length of the longest run of consecutive backticks in ``text`` (0 if none)."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest


def md_code(text: Any) -> str:
    """A user string as one inline code span (one line; the fence outlasts any backtick run)."""
    s = " ".join(str(text).split())
    ticks = "`" * (_longest_backtick_run(s) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{ticks}{pad}{s}{pad}{ticks}"


def fence(text: str, lang: str = "") -> str:
    """``text`` in a fenced block whose fence outlasts any backtick run inside it."""
    ticks = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def format_ci(mean: float, ci: Sequence[float], fmt: str | Callable[[float], str] = "+.3f", *,
              non_finite: str | None = None) -> str:
    """A mean and its 95% CI as ``"mean [lo, hi]"``, every number written by ``fmt``: a format
    spec (``"+.3f"``: signed, 3 decimals; ``".3g"``; ``"+.4g"``) or a function of the number.
    ``non_finite``: what to show instead when a number is NaN or infinite (None: write them).
    A mean of None (a quantity that applies to nothing measured) reads "n/a"."""
    if mean is None or ci is None:
        return "n/a"
    if non_finite is not None and not all(math.isfinite(x) for x in (mean, *ci)):
        return non_finite
    one = fmt if callable(fmt) else (lambda x: format(x, fmt))
    return f"{one(mean)} [{one(ci[0])}, {one(ci[1])}]"


def comparison_table(data: dict) -> str:
    """Markdown table: one row per checkpoint; rewards (normalised where possible) with
    95% CIs, chain KL to the base, and each constraint ✓/✗ (✓✓: the CI clears it)."""
    ckpts = data["checkpoints"]
    if not ckpts:
        return ""
    first = next(iter(ckpts.values()))
    rewards = list(first["rewards"])
    cons = [c["name"] for c in first["constraints"]]
    head = ["checkpoint"]
    for n in rewards:
        head.append(f"{n} (σ)" if "normalized_mean" in first["rewards"][n] else n)
    head.append(f"KL to base ({data['sampler']['kl_estimator']})")
    for c in first["constraints"]:
        op = "≥" if c["direction"] == "high" else "≤"
        head.append(f"{c['name']} {op} {c['threshold']:g}")
    lines = ["| " + " | ".join(md(h) for h in head) + " |", "|" + "---|" * len(head)]
    for name, e in ckpts.items():
        row = [md(name)]
        for n in rewards:
            r = e["rewards"][n]
            mean, ci = (r["normalized_mean"], r["normalized_ci95"]) if "normalized_mean" in r else (r["mean"], r["ci95"])
            row.append(format_ci(mean, ci, non_finite="n/a"))
        kl = e["kl"].get("base")
        row.append(format_ci(kl["mean"], kl["ci95"], non_finite="n/a") if kl else "n/a")
        by_name = {c["name"]: c for c in e["constraints"]}
        for cn in cons:
            c = by_name.get(cn)
            row.append("n/a" if c is None else MET_MARKS[met_label(c)])
        lines.append("| " + " | ".join(row) + " |")
    legend = ("\nRewards: mean [95% CI]; (σ) columns are in base-model standard deviations. Constraints: ✓ the mean "
              "meets the threshold, ✓✓ the whole 95% CI does, ✗ violated.") if cons else (
              "\nRewards: mean [95% CI]; (σ) columns are in base-model standard deviations.")
    return "\n".join(lines) + "\n" + legend + "\n"

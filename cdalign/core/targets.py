"""Where a constraint aims: its threshold plus a margin, so that a verdict of "met" survives a
fresh sample of new prompts.

A constraint ``E[r] ≥ b`` trained to sit *on* b lands on either side of it on a fresh held-out
sample: the held-out mean of n images scatters by ``s/√n`` (s the per-image std of the
constraint's value under the trained model). A constraint that asks for ``confidence c`` is
trained toward the *target*

    b + z_c · s / √n        ("high";  b − z_c · s / √n for "low"),   z_c = Φ⁻¹(c)

so that, if the run lands on its target, a fresh n-image sample reads a mean on the allowed
side of b with probability c (one-sided). ``s`` is the run's own estimate: an exponentially
weighted std of the per-image values of its training batches (all processes), refreshed at
every dual step; n is the number of images the run's held-out verdict is read on. A fixed
``margin`` (in the constraint's units) is the same with the margin given instead.

The margin moves only the dual step's slack, ``g = target − E[r]``; the primal gradient of
``λ·g`` does not depend on it. Reports judge the *threshold*, and say the target apart."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import torch


def confidence_z(confidence: float) -> float:
    """The one-sided normal quantile ``Φ⁻¹(confidence)`` (1.645 at 0.95)."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(confidence)


def confidence_margin(confidence: float, std: float, num_images: int) -> float:
    """``z_c · s / √n``: how far above the threshold a mean of ``num_images`` images with
    per-image std ``std`` must sit for a fresh sample of as many to read on the allowed
    side of the threshold with probability ``confidence``."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    return confidence_z(confidence) * float(std) / math.sqrt(num_images)


def target_of(threshold: float, margin: float, direction: str) -> float:
    """The value a constraint is trained toward: ``threshold + margin`` for 'high',
    ``threshold − margin`` for 'low'."""
    if direction == "high":
        return threshold + margin
    if direction == "low":
        return threshold - margin
    raise ValueError(f"direction must be 'high' or 'low', got {direction!r}")


class ConfidenceTargets:
    """The margins (m,) of a problem's constraints, kept up to date from the training
    batches' per-image values.

    ``confidences[j]``: constraint j's confidence (None: no confidence target);
    ``fixed[j]``: a fixed margin (None: none). At most one of the two per constraint.
    ``prior_std[j]``: the per-image std assumed before any batch was seen (1.0 for a reward
    in base-model std units). ``num_images``: the held-out sample size the verdict uses.
    ``decay``: weight kept by the running moments at each dual step (0.9: about the last
    10 dual steps count)."""

    def __init__(self, confidences: Sequence[float | None], fixed: Sequence[float | None],
                 prior_std: Sequence[float], num_images: int, decay: float = 0.9):
        self.confidences, self.fixed = list(confidences), list(fixed)
        self.prior_std = [float(s) for s in prior_std]
        self.num_images, self.decay = int(num_images), float(decay)
        m = len(self.confidences)
        # decayed sums of 1, v and v² per constraint (what the std is estimated from)
        self.moments = torch.zeros(m, 3, dtype=torch.float64)

    @property
    def active(self) -> bool:
        """Whether any constraint has a margin (fixed or from a confidence)."""
        return any(c is not None for c in self.confidences) or any(f is not None for f in self.fixed)

    def std(self) -> list[float]:
        """Per constraint, the running std of its per-image values (the prior before any)."""
        out = []
        for j, (w, s1, s2) in enumerate(self.moments.tolist()):
            if w < 2:
                out.append(self.prior_std[j])
                continue
            mean = s1 / w
            var = max(s2 / w - mean * mean, 0.0) * w / (w - 1)  # Bessel on the effective count
            out.append(math.sqrt(var))
        return out

    def margins(self) -> torch.Tensor:
        """The current margins (m,), in each constraint's units, ≥ 0."""
        std = self.std()
        out = []
        for j, (conf, fixed) in enumerate(zip(self.confidences, self.fixed)):
            if fixed is not None:
                out.append(float(fixed))
            elif conf is not None:
                out.append(confidence_margin(conf, std[j], self.num_images))
            else:
                out.append(0.0)
        return torch.tensor(out, dtype=torch.float64)

    @staticmethod
    def batch_moments(per_image: Sequence[torch.Tensor]) -> torch.Tensor:
        """The sums (m, 3) of 1, v and v² of one micro-batch's per-image values (one (B,)
        tensor per constraint): what :meth:`update` takes, summed over micro-batches and
        processes."""
        rows = [torch.stack([torch.tensor(float(v.numel())), v.double().sum(), (v.double() ** 2).sum()])
                for v in (t.detach().double().cpu().flatten() for t in per_image)]
        return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)

    def update(self, sums: torch.Tensor) -> torch.Tensor:
        """Fold one dual step's sums (m, 3) into the running moments; returns the margins."""
        self.moments = self.decay * self.moments + torch.as_tensor(sums, dtype=torch.float64)
        return self.margins()

    def describe(self, j: int) -> dict:
        """What constraint j aims at and why, for the report: ``margin``, ``confidence``,
        ``std`` and ``num_images`` (for a confidence target), or ``fixed``."""
        margin = float(self.margins()[j])
        if self.fixed[j] is not None:
            return {"margin": margin, "from": "fixed margin"}
        if self.confidences[j] is not None:
            return {"margin": margin, "confidence": self.confidences[j], "z": confidence_z(self.confidences[j]),
                    "std": self.std()[j], "num_images": self.num_images,
                    "from": "z·s/√n: one-sided normal quantile of the confidence × the running per-image std of the "
                            "training batches / √(held-out images of the verdict)"}
        return {"margin": 0.0, "from": "none (aims at the threshold)"}

    def state_dict(self) -> dict:
        return {"moments": self.moments.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("moments"):
            self.moments = torch.tensor(state["moments"], dtype=torch.float64)

"""How estimator reward_backprop differentiates one reward constraint's term ``λ_j g_j`` of
the Lagrangian (``ConstraintSpec.gradient``), as data: :data:`CONSTRAINT_GRADIENTS`.

Reward backpropagation sends the gradient through the last K sampling steps with the state
x_K before them held fixed: exactly the gradient of ``E[r | x_K]``, blind to what the weights
do at the earlier steps (where, on some models, a reward hack is made). A constraint can
reach those steps two ways. Pathwise: backpropagate its term through the whole chain (a
second sampling pass with gradient at every step; the other terms keep the last K). By the
score function: ``∇E[r] = E[(r − b)·Σ_t ∇log p_θ(x_{t−1} | x_t)]`` over the steps it covers,
needing no reward gradient; added to the truncated pathwise gradient for the steps before
the last K, the sum is unbiased for the whole chain (:class:`ConstraintGradient`)."""

from __future__ import annotations

from dataclasses import dataclass

from cdalign.registry import Registry

__all__ = ["ConstraintGradient", "CONSTRAINT_GRADIENTS"]


@dataclass(frozen=True)
class ConstraintGradient:
    """How one reward constraint's term is differentiated.

    ``backpropagated``: pathwise, through the last K sampling steps and the VAE, as every
    other term (with ``whole_chain``: through every step instead, in a second sampling pass).
    ``score_function``: a score-function term at the steps the pathwise gradient does not
    reach: every step when it is not backpropagated (no reward gradient needed), the steps
    before the last K when it is."""

    backpropagated: bool
    score_function: bool = False
    whole_chain: bool = False

    def __post_init__(self):
        if not (self.backpropagated or self.score_function):
            raise ValueError("a constraint's gradient must be backpropagated, a score function, or both")
        if self.whole_chain and not (self.backpropagated and not self.score_function):
            raise ValueError("whole_chain is a pathwise gradient through every step: it needs backpropagated and leaves "
                             "no step to a score function")

    def score_function_steps(self, num_steps: int, backprop_steps: set[int]) -> set[int]:
        """The sampling steps whose score-function term this constraint gets, when the
        pathwise gradient flows through ``backprop_steps``."""
        if not self.score_function:
            return set()
        return set(range(num_steps)) - (backprop_steps if self.backpropagated else set())


CONSTRAINT_GRADIENTS: Registry[ConstraintGradient] = Registry("constraint gradient")
CONSTRAINT_GRADIENTS.register("backprop", ConstraintGradient(backpropagated=True))
CONSTRAINT_GRADIENTS.register("whole_chain", ConstraintGradient(backpropagated=True, whole_chain=True))
CONSTRAINT_GRADIENTS.register("score_function", ConstraintGradient(backpropagated=False, score_function=True))
CONSTRAINT_GRADIENTS.register("hybrid", ConstraintGradient(backpropagated=True, score_function=True))

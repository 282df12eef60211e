"""The math core of METHOD.md: the sampler and its chain, the chain KL, the dual updates,
the constrained problem (slack, Lagrangian, verdict), statistics with confidence
intervals, seed derivation, truncation strategies and reward normalisation. Imports torch,
:mod:`cdalign.registry` and :mod:`cdalign.utils` (standard library only) and nothing
else of cdalign; everything else in cdalign builds on it."""

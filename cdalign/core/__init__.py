"""The math core of METHOD.md: the sampler and its chain, the chain KL, the dual updates,
the constrained problem (slack, Lagrangian, verdict), statistics with confidence
intervals, seed derivation and reward normalisation. Imports torch and
:mod:`cdalign.registry` only; everything else in cdalign builds on it."""

"""The math core of METHOD.md: the sampler and its chain, the chain KL, the dual updates,
the constrained problem (slack, Lagrangian, verdict), statistics with confidence
intervals, seed derivation, truncation strategies and reward normalisation. Imports torch
and :mod:`cdalign.registry` and nothing else of cdalign, and no adapter, Hub or process
library (peft, huggingface_hub, accelerate): switching adapters is :mod:`cdalign.models`'
job, caches, checkpoints and processes are :mod:`cdalign.runs`'. Everything else in cdalign
builds on it."""

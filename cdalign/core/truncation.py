"""Truncated backpropagation through the sampler (METHOD.md §1, primal step): how many
final denoising steps K carry gradient in one batch.

Each strategy is a function ``(num_steps, config, generator) -> K`` registered in
:data:`TRUNCATION_STRATEGIES` under the name a config's ``backprop_strategy`` gives; it
reads its own settings from the config and draws only from ``generator`` (the batch's
derived generator, so K is the same on every process and after a resume). A newly
registered strategy is accepted by the config and used by the trainer with no other edit."""

from __future__ import annotations

import torch

from cdalign.registry import Registry

TRUNCATION_STRATEGIES: Registry[int] = Registry("backprop_strategy")


@TRUNCATION_STRATEGIES.register("fixed")
def fixed_truncation(num_steps: int, config, generator: torch.Generator) -> int:
    """K = ``backprop_steps`` (at most T)."""
    return min(config.backprop_steps, num_steps)


@TRUNCATION_STRATEGIES.register("uniform")
def uniform_truncation(num_steps: int, config, generator: torch.Generator) -> int:
    """K ~ U{``backprop_min_steps`` .. min(``backprop_steps``, T)}."""
    lo, hi = config.backprop_min_steps, min(config.backprop_steps, num_steps)
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


@TRUNCATION_STRATEGIES.register("gaussian")
def gaussian_truncation(num_steps: int, config, generator: torch.Generator) -> int:
    """The paper's: cut-off index ~ N(``backprop_gaussian_mean``·T, ``backprop_gaussian_std``),
    rounded and clipped to [1, T−1]; K = T − cut-off."""
    z = float(torch.randn((1,), generator=generator))
    cut = round(config.backprop_gaussian_mean * num_steps + config.backprop_gaussian_std * z)
    cut = min(max(cut, 1), num_steps - 1)
    return num_steps - cut


def truncation_steps(strategy: str, num_steps: int, config, generator: torch.Generator) -> int:
    """K, the number of final denoising steps that carry gradient, by the registered
    ``strategy`` (an unknown name raises ``ValueError`` listing the registered ones)."""
    return TRUNCATION_STRATEGIES.get(strategy)(num_steps, config, generator)

"""The reward interface and its registry.

A reward maps a batch of RGB images in [0, 1] (and their prompts) to one float32 score
per image; higher is "more" of the property. Constraint directions (``>=`` / ``<=``)
are chosen by the caller, never by flipping a reward's sign here."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from cdalign.registry import Registry


class Reward(torch.nn.Module):
    """Base class of every reward.

    ``forward(images, prompts) -> scores``:

    - ``images``: ``(B, 3, H, W)`` float tensor, RGB, values in ``[0, 1]``; it may
      require grad.
    - ``prompts``: ``B`` strings (ignored by prompt-free rewards).
    - returns ``(B,)`` float32 scores. When ``differentiable`` is True the scores are
      differentiable with respect to ``images``; when False they are detached and only
      score-function (policy-gradient) estimators may use them.

    Model-based rewards are frozen: parameters never require grad, and the module
    stays in eval mode even when a parent calls ``.train()`` (dropout in a reward head
    would make the reward noisy).
    """

    name: str = ""
    differentiable: bool = True

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def train(self, mode: bool = True):
        # A reward is a fixed function: never switch dropout on.
        return super().train(False)

    def freeze(self) -> "Reward":
        """Make every parameter non-trainable and switch to eval mode; returns self."""
        self.requires_grad_(False)
        return self.eval()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


def check_inputs(images: torch.Tensor, prompts: Sequence[str] | None, needs_prompts: bool = False) -> int:
    """Validate the ``(images, prompts)`` pair of ``Reward.forward``; returns the batch size B."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor of RGB values in [0, 1]; got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor in [0, 1]; got dtype {images.dtype}")
    batch = images.shape[0]
    if needs_prompts:
        if prompts is None or isinstance(prompts, str):
            raise ValueError("prompts must be a list of B strings (one per image)")
        if len(prompts) != batch:
            raise ValueError(f"got {batch} images but {len(prompts)} prompts; give one prompt per image")
    return batch


REWARDS: Registry[Callable[..., Reward]] = Registry("reward")


def build_reward(name: str, **kwargs) -> Reward:
    """Build the reward registered as ``name`` with ``kwargs`` passed to its factory.
    An unknown name raises ValueError listing the registered names."""
    return REWARDS.build(name, **kwargs)


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards."""
    return REWARDS.names()


class CallableReward(torch.nn.Module):
    """Adapts a plain ``f(images, prompts) -> (B,)`` callable to the Reward interface."""

    def __init__(self, name: str, fn: Callable):
        super().__init__()
        self.name, self.fn, self.differentiable = name, fn, getattr(fn, "differentiable", True)

    def forward(self, images, prompts):
        return torch.as_tensor(self.fn(images, prompts))


def build_rewards(given: Mapping[str, Callable], needed: Sequence[str], reward_kwargs: Mapping[str, dict], device) -> dict:
    """A run's rewards on ``device``: those ``given`` (a plain callable wrapped in
    :class:`CallableReward`), then each ``needed`` name not given built from :data:`REWARDS`
    with its ``reward_kwargs``."""
    rewards = {}
    for name, fn in given.items():
        rewards[name] = fn if isinstance(fn, torch.nn.Module) else CallableReward(name, fn)
    for name in needed:
        if name not in rewards:
            rewards[name] = REWARDS.build(name, **reward_kwargs.get(name, {}))
    for r in rewards.values():  # whether the estimator can use each reward is the estimator's check
        r.to(device)
    return rewards

"""Rewards: image statistics and learned preference models, selected by name.

    from cdalign.rewards import build_reward, available_rewards
    reward = build_reward("saturation")
    scores = reward(images, prompts)        # images (B, 3, H, W) in [0, 1] -> (B,) float32

Every reward is a ``Reward`` (a frozen ``torch.nn.Module``) registered in ``REWARDS``.
Registration happens when the submodules listed in ``_REWARD_MODULES`` are imported
below; they import only torch at module level (transformers, PIL and weights are loaded
inside constructors), so importing this package downloads nothing.

To add a reward: write a module in this package that registers a factory with
``@REWARDS.register("<name>")`` and add the module to ``_REWARD_MODULES``.
"""

from __future__ import annotations

import importlib

from cdalign.rewards.base import (
    REWARDS,
    Reward,
    available_rewards,
    build_reward,
    check_inputs,
)

# Submodules whose import registers rewards. Add new reward modules here.
_REWARD_MODULES: tuple[str, ...] = (
    "image_stats",
    "fidelity",
    "aesthetic",
    "clipscore",
    "pickscore",
    "hps",
    "imagereward",
    "mps",
    "shapes_match",
)

for _module in _REWARD_MODULES:
    importlib.import_module(f"{__name__}.{_module}")
del _module

__all__ = ["REWARDS", "Reward", "available_rewards", "build_reward", "check_inputs"]

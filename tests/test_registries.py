"""Registries, not strings: a newly registered truncation strategy or dual optimiser is
accepted by the config and used by the trainer with no edit anywhere else."""

import pytest
import torch
from tiny_configs import tiny_config

from cdalign import ConstrainedDDPOTrainer
from cdalign.alignment.config import config_from_dict, config_to_dict
from cdalign.core.duals import (
    DUAL_OPTIMIZERS,
    DualOptimizer,
    build_dual_optimizer,
    projected_ascent,
)
from cdalign.core.truncation import TRUNCATION_STRATEGIES, truncation_steps


@pytest.fixture
def register():
    """``register(registry, name, factory)``, undone after the test."""
    added = []

    def add(registry, name, factory):
        registry.register(name, factory)
        added.append((registry, name))
        return factory

    yield add
    for registry, name in added:
        registry._factories.pop(name)


def recipe(**changes) -> dict:
    """A valid minimal recipe mapping with ``changes``."""
    return {
        "objective": {"type": "kl"},
        "constraints": [{"reward": "saturation", "direction": "high", "threshold": 0.0}],
        **changes,
    }


def last_step_only(num_steps, config, generator):
    return 1


class Halving(DualOptimizer):
    """λ ← max(0, λ/2 + rate·g): a rule whose gain the spec's ``lr`` carries."""

    def __init__(self, num_constraints, rate=1.0, **kw):
        super().__init__(num_constraints, **kw)
        self.rate = rate

    @classmethod
    def from_spec(cls, spec, num_constraints):
        return cls(num_constraints, rate=spec.lr, **cls.common_kwargs(spec))

    def _update(self, slacks, scale):
        return projected_ascent(self.multipliers / 2, scale * self.rate * slacks)


def test_builtin_truncation_strategies_are_registered_under_the_config_names():
    assert TRUNCATION_STRATEGIES.names() == ["fixed", "gaussian", "uniform"]
    cfg = config_from_dict(recipe(backprop_strategy="fixed", backprop_steps=3))
    assert truncation_steps("fixed", 10, cfg, torch.Generator().manual_seed(0)) == 3


def test_unknown_truncation_strategy_lists_the_registered_ones():
    with pytest.raises(ValueError, match="allowed values: fixed, gaussian, uniform"):
        truncation_steps("normal", 10, None, torch.Generator())


def test_registered_truncation_strategy_is_accepted_by_the_config(register):
    with pytest.raises(ValueError, match="backprop_strategy"):
        config_from_dict(recipe(backprop_strategy="last_step_only"))
    register(TRUNCATION_STRATEGIES, "last_step_only", last_step_only)
    cfg = config_from_dict(recipe(backprop_strategy="last_step_only"))
    cfg.validate()
    assert config_to_dict(cfg)["backprop_strategy"] == "last_step_only"


def test_registered_dual_optimizer_builds_itself_from_the_spec(register):
    register(DUAL_OPTIMIZERS, "halving", Halving)
    cfg = config_from_dict(recipe(dual={"optimizer": "halving", "lr": 0.25, "init": 1.0}))
    cfg.validate()
    dual = build_dual_optimizer(cfg.dual, 1)
    assert isinstance(dual, Halving) and dual.rate == 0.25
    assert dual.step(torch.tensor([2.0])).tolist() == [1.0]  # 1/2 + 0.25·2


def test_trainer_uses_a_registered_strategy_and_dual_optimizer(register, tmp_path):
    register(TRUNCATION_STRATEGIES, "last_step_only", last_step_only)
    register(DUAL_OPTIMIZERS, "halving", Halving)
    cfg = tiny_config(tmp_path, backprop_strategy="last_step_only", backprop_steps=3,
                      dual={"optimizer": "halving", "lr": 1e-9, "init": 0.8}, max_steps=1)
    trainer = ConstrainedDDPOTrainer(cfg)
    log = trainer.step()
    assert log["backprop_steps"] == 1
    assert isinstance(trainer.duals, Halving)
    assert trainer.duals.multipliers.tolist() == pytest.approx([0.4, 0.4], abs=1e-6)  # rate ≈ 0: λ halves

"""Specification of cdalign.alignment.estimator_settings: each gradient estimator declares the
settings only it reads, and the flat config fields are those declarations."""

import dataclasses

import pytest

from cdalign.alignment.config import ConstrainedDDPOConfig, config_from_dict
from cdalign.alignment.estimator_settings import PolicyGradientSettings, RewardBackpropSettings, setting_names
from cdalign.alignment.estimators import ESTIMATORS
from cdalign.fields import field_types

ESTIMATOR_NAMES = ESTIMATORS.names()


@pytest.mark.parametrize("name", ESTIMATOR_NAMES)
def test_an_estimators_config_fields_are_the_settings_it_declares(name):
    estimator = ESTIMATORS.get(name)
    assert estimator.config_fields == setting_names(estimator.settings)


@pytest.mark.parametrize("name", ESTIMATOR_NAMES)
def test_the_config_carries_each_setting_flat_as_declared(name):
    settings = ESTIMATORS.get(name).settings
    declared = {f.name: f for f in dataclasses.fields(settings)}
    config = {f.name: f for f in dataclasses.fields(ConstrainedDDPOConfig)}
    config_types, settings_types = field_types(ConstrainedDDPOConfig), field_types(settings)
    for key, f in declared.items():
        assert config[key].default == f.default and config[key].default_factory == f.default_factory, key
        assert config[key].metadata == f.metadata, key
        assert config_types[key] == settings_types[key], key


def test_no_setting_is_declared_by_two_estimators():
    names = [key for name in ESTIMATOR_NAMES for key in ESTIMATORS.get(name).config_fields]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("settings", [RewardBackpropSettings, PolicyGradientSettings])
def test_every_setting_has_help(settings):
    for f in dataclasses.fields(settings):
        assert len(f.metadata.get("help", "")) > 10, f"{settings.__name__}.{f.name} has no help text"


def test_an_estimators_settings_stay_flat_keys_of_a_recipe():
    cfg = config_from_dict({
        "objective": {"type": "reward", "reward": "brightness"}, "estimator": "policy_gradient",
        "images_per_prompt": 2, "ppo_clip_range": 0.1, "train_batch_size": 2,
    })
    assert (cfg.images_per_prompt, cfg.ppo_clip_range) == (2, 0.1)
    cfg = config_from_dict({"objective": {"type": "reward", "reward": "brightness"}, "backprop_steps": 3})
    assert cfg.backprop_steps == 3

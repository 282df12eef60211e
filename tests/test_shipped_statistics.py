"""The base-model reward statistics shipped with cdalign (cdalign/data/base_statistics.json):
served behind the user cache on an exact key match only, never when one field of the key
differs or when an entry fails the checks a cached entry passes."""

import json
import math
import tomllib
from pathlib import Path

import pytest
from tiny_configs import tiny_config

from cdalign import ConstrainedDDPOTrainer, load_config_file
from cdalign.alignment.shipped_statistics import stale_entries
from cdalign.core.normalization import RewardStats
from cdalign.data.base_statistics import REGENERATE_COMMAND, SHIPPED_RECIPES, SHIPPED_STATISTICS_FILE, shipped_statistics
from cdalign.runs.normalization_cache import NormalizationCache, ShippedStatistics, entry_of


def _no_sampling(*args, **kwargs):
    raise AssertionError("sampled: the statistics were not served")


@pytest.fixture(scope="module")
def main_recipe(tmp_path_factory):
    """The trainer of ``tiny/multi_reward`` as a first run builds it (nothing sampled), with an empty user cache."""
    tmp = tmp_path_factory.mktemp("main-recipe")
    cfg = load_config_file("tiny/multi_reward")
    cfg.output_dir, cfg.normalization_cache_dir = str(tmp / "run"), str(tmp / "cache")
    return ConstrainedDDPOTrainer(cfg)


def test_shipped_statistics_match_the_keys_the_main_recipe_computes(main_recipe, monkeypatch):
    """Every reward of ``tiny/multi_reward`` finds its statistics in the shipped file under the
    full key today's trainer computes, and a first run uses them without sampling. This test
    FAILS when someone changes a reward's code (its source file is in the key), the embedded
    model, the prompts or the recipe without regenerating the file with
    ``python -m cdalign.alignment.shipped_statistics --refresh``."""
    shipped = shipped_statistics()
    keys = main_recipe.normalization_keys()
    stale = [n for n, key in keys.items() if shipped.load(key) is None]
    assert not stale, (f"{SHIPPED_STATISTICS_FILE} has no entry for {stale} under the key tiny/multi_reward computes "
                       f"today (a reward's code, the model, the prompts or the recipe changed): regenerate it with "
                       f"`{REGENERATE_COMMAND}`")
    monkeypatch.setattr(main_recipe.sampler, "sample", _no_sampling)
    stats = main_recipe.compute_normalization()
    assert stats == {n: shipped.load(keys[n]) for n in keys}
    assert stats["colorfulness"].count == 128 and stats["colorfulness"].std > 0
    assert not list(NormalizationCache(main_recipe.config.normalization_cache_dir).directory.glob("*.json"))  # not copied


def test_every_shipped_recipe_finds_its_statistics():
    """The check of ``python -m cdalign.alignment.shipped_statistics`` (no sampling): every reward
    of every shipped recipe is served under the key its trainer computes today. Fails after a
    change to a reward, a model, a prompt set or a recipe until the file is regenerated with
    ``python -m cdalign.alignment.shipped_statistics --refresh``."""
    stale = stale_entries(SHIPPED_RECIPES)
    assert stale == [], f"stale shipped statistics {stale}: regenerate them with `{REGENERATE_COMMAND}`"


def test_every_shipped_recipe_runs_an_embedded_model_with_local_rewards():
    for recipe in SHIPPED_RECIPES:
        cfg = load_config_file(recipe)
        assert cfg.pretrained_model_name_or_path in ("cdalign/tiny-shapes-sd", "cdalign/tiny-shapes-sd3"), recipe
        assert not cfg.remote_rewards, recipe


def _changed(value):
    if isinstance(value, bool) or value is None:
        return "other"
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return {"changed": True}


def test_a_key_differing_in_any_one_field_is_not_served(main_recipe):
    shipped = shipped_statistics()
    key = main_recipe.normalization_keys()["colorfulness"]
    assert shipped.load(key) is not None
    variants = {f: {**key, f: _changed(v)} for f, v in key.items()}
    for f in ("code", "weights", "kwargs", "class"):  # what the reward is: its source file, weights, kwargs, class
        identity = {**key["reward_identity"], f: _changed(key["reward_identity"][f])}
        variants[f"reward_identity.{f}"] = {**key, "reward_identity": identity}
    variants["sampler.guidance_scale"] = {**key, "sampler": {**key["sampler"], "guidance_scale": 2.5}}
    variants["extra field"] = {**key, "mixed_precision": "bf16"}
    served = [name for name, k in variants.items() if shipped.load(k) is not None]
    assert served == []


def _with_shipped(trainer, path, entries):
    """``trainer`` reading its shipped statistics from ``path``, a file of ``entries`` (stored form)."""
    path.write_text(json.dumps({"format": 1, "regenerate": REGENERATE_COMMAND, "entries": entries}))
    trainer.normalization.shipped = ShippedStatistics(path)
    return trainer


FAKE = RewardStats(0.5, 0.25, 64)


def test_an_exact_match_is_served_without_sampling(tmp_path, monkeypatch):
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path))
    _with_shipped(trainer, tmp_path / "shipped.json", [entry_of(k, FAKE) for k in trainer.normalization_keys().values()])
    monkeypatch.setattr(trainer.sampler, "sample", _no_sampling)
    assert trainer.compute_normalization() == {n: FAKE for n in trainer.rewards}


@pytest.fixture
def computed(tmp_path):
    """The tiny run's statistics measured with no shipped file."""
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path / "plain"))
    trainer.normalization.shipped = None
    return trainer.compute_normalization()


def test_a_key_differing_in_the_seed_is_recomputed_and_cached(tmp_path, computed):
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path / "run"))
    keys = trainer.normalization_keys()
    _with_shipped(trainer, tmp_path / "shipped.json", [entry_of({**k, "seed": k["seed"] + 1}, FAKE) for k in keys.values()])
    assert trainer.compute_normalization() == computed  # measured, as without a shipped file
    assert {n: NormalizationCache(trainer.config.normalization_cache_dir).load(keys[n]) for n in keys} == computed


@pytest.mark.parametrize("stats", [{"mean": math.nan, "std": 0.2, "count": 8}, {"mean": 0.1, "std": math.inf, "count": 8},
                                   {"mean": 0.1, "std": 0.0, "count": 8}, {"mean": 0.1, "std": -0.2, "count": 8},
                                   {"mean": 0.1, "count": 8}, "not statistics"],
                         ids=["nan-mean", "inf-std", "zero-std", "negative-std", "no-std", "not-a-mapping"])
def test_a_corrupt_shipped_entry_is_ignored(stats, tmp_path):
    key = {"reward": "saturation", "model": "m", "seed": 0}
    good, bad = entry_of(key, FAKE), {**entry_of(key, FAKE), "stats": stats}
    (tmp_path / "good.json").write_text(json.dumps({"format": 1, "entries": [good]}))
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "entries": [bad]}, allow_nan=True))
    assert ShippedStatistics(tmp_path / "good.json").load(key) == FAKE
    assert ShippedStatistics(tmp_path / "bad.json").load(key) is None


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": 99, "entries": []}), json.dumps([1, 2]),
                                  json.dumps({"format": 1, "entries": [None, 3, {"key_fields": 1}]})],
                         ids=["not-json", "other-format", "not-an-object", "malformed-entries"])
def test_an_unreadable_shipped_file_serves_nothing(text, tmp_path):
    path = tmp_path / "shipped.json"
    path.write_text(text)
    assert ShippedStatistics(path).load({"reward": "saturation"}) is None


def test_a_non_finite_shipped_entry_of_the_run_is_recomputed(tmp_path, computed):
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path / "run"))
    entries = [entry_of(k, RewardStats(math.nan, 0.25, 64)) for k in trainer.normalization_keys().values()]
    _with_shipped(trainer, tmp_path / "shipped.json", entries)
    assert trainer.compute_normalization() == computed


def test_the_user_cache_comes_before_the_shipped_layer(tmp_path, monkeypatch):
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path))
    keys = trainer.normalization_keys()
    _with_shipped(trainer, tmp_path / "shipped.json", [entry_of(k, FAKE) for k in keys.values()])
    mine = RewardStats(0.1, 0.3, 16)
    for key in keys.values():
        NormalizationCache(trainer.config.normalization_cache_dir).save(key, mine)
    monkeypatch.setattr(trainer.sampler, "sample", _no_sampling)
    assert trainer.compute_normalization() == {n: mine for n in trainer.rewards}


def test_the_shipped_file_is_package_data():
    """pyproject's package-data takes ``data/*``: a wheel carries the file beside its module."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "data/*" in pyproject["tool"]["setuptools"]["package-data"]["cdalign"]
    assert SHIPPED_STATISTICS_FILE.parent.name == "data" and SHIPPED_STATISTICS_FILE.is_file()
    data = json.loads(SHIPPED_STATISTICS_FILE.read_text())
    assert data["regenerate"] == REGENERATE_COMMAND and len(data["entries"]) >= 2
    assert all(math.isfinite(e["stats"]["mean"]) and e["stats"]["std"] > 0 for e in data["entries"])

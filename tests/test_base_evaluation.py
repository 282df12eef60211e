"""The base model's side of a run's final evaluation, kept across runs
(cdalign.alignment.base_evaluation): a second evaluation served from the cache writes the
report, the per-image values and the grid of a recomputed one, bit for bit; any change to
what decides the base values, a torn file or ``reuse_base_evaluation: false`` scores the base
model again."""

import dataclasses
import json

import pytest
import torch
from tiny_configs import tiny_config

from cdalign import ConstrainedDDPOTrainer
from cdalign.alignment.base_evaluation import base_evaluation_key
from cdalign.core.seeding import evaluation_items
from cdalign.evaluation.scoring import BaseModel
from cdalign.rewards.metrics import EVAL_METRICS
from cdalign.runs.base_evaluation_cache import BaseEvaluationCache

OUTPUTS = ("report.json", "eval_values.safetensors", "samples_base_vs_aligned.png")


def _base_not_sampled(*args, **kwargs):
    raise AssertionError("the base model was sampled: its values were not reused")


def _evaluate(trainer) -> dict[str, bytes]:
    report = trainer.evaluate()
    report.write(trainer.output_dir / "report.json")
    return {name: (trainer.output_dir / name).read_bytes() for name in OUTPUTS}


def _trainer(tmp_path, **overrides):
    return ConstrainedDDPOTrainer(tiny_config(tmp_path, eval_metrics=["shapes_accuracy"], eval_batches=2, **overrides))


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CDALIGN_CACHE", str(tmp_path / "cdalign-cache"))
    return tmp_path / "cdalign-cache" / "base_evaluation"


def test_a_second_evaluation_reuses_the_base_values_and_writes_the_same_outputs(tmp_path, cache_root, monkeypatch):
    trainer = _trainer(tmp_path / "run")
    trainer.step()  # the aligned model differs from the base
    first = _evaluate(trainer)
    assert len(list(cache_root.glob("*.safetensors"))) == 1
    monkeypatch.setattr(BaseModel, "policy", _base_not_sampled)
    second = _evaluate(trainer)
    assert second == first  # report.json, the per-image values and the grid, byte for byte
    assert json.loads(second["report.json"])["rewards"]["saturation"]["difference"]["mean"] != 0.0


def test_another_run_of_the_same_base_reuses_it_with_its_own_statistics(tmp_path, cache_root, monkeypatch):
    """A second run (another learning rate, its own statistics cache) reuses the first run's base
    values; its report equals the one it computes with reuse off."""
    _evaluate(_trainer(tmp_path / "first"))
    reused_run = _trainer(tmp_path / "second", learning_rate=3e-2)
    reused_run.step()
    with monkeypatch.context() as patch:
        patch.setattr(BaseModel, "policy", _base_not_sampled)
        reused = _evaluate(reused_run)
    reused_run.config.reuse_base_evaluation = False
    assert _evaluate(reused_run) == reused


def test_reuse_off_neither_reads_nor_writes_the_cache(tmp_path, cache_root, monkeypatch):
    trainer = _trainer(tmp_path / "run", reuse_base_evaluation=False)
    _evaluate(trainer)
    assert not cache_root.exists()
    _evaluate(_trainer(tmp_path / "on"))
    monkeypatch.setattr(BaseModel, "policy", _base_not_sampled)
    with pytest.raises(AssertionError, match="base model was sampled"):
        trainer.evaluate()


def _key(trainer):
    cfg = trainer.config
    items = evaluation_items(trainer.eval_prompts, cfg.eval_batches * cfg.train_batch_size, cfg.eval_seed)
    return base_evaluation_key(trainer, items, cfg.eval_metrics, {n: EVAL_METRICS.get(n) for n in cfg.eval_metrics})


def test_the_key_changes_with_everything_that_decides_the_base_values(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path / "run")
    cfg, base = trainer.config, _key(trainer)
    changes = {
        "eval_seed": (cfg, "eval_seed", 7), "eval_batches": (cfg, "eval_batches", 3),
        "eval_metrics": (cfg, "eval_metrics", []), "mixed_precision": (cfg, "mixed_precision", "bf16"),
        "train_batch_size": (cfg, "train_batch_size", 1), "reward_kwargs": (cfg, "reward_kwargs", {"saturation": {"eps": 1}}),
        "guidance_scale": (trainer.sampler, "guidance_scale", 4.0),
        "eta": (trainer.sampler, "chain", dataclasses.replace(trainer.sampler.chain, eta=0.5)),
        "denoiser weights": (trainer.normalization, "model", {**trainer.normalization.model, "weights": "0" * 16}),
        "scheduler": (trainer.pipe.scheduler, "_internal_dict", {**trainer.pipe.scheduler.config, "steps_offset": 7}),
    }
    unchanged = []
    for name, (target, attribute, value) in changes.items():
        with monkeypatch.context() as patch:
            patch.setattr(target, attribute, value)
            if _key(trainer) == base:
                unchanged.append(name)
    assert unchanged == []
    assert _key(trainer) == base


def test_a_user_reward_without_cache_key_is_not_kept(tmp_path, cache_root):
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path / "run"),
                                     rewards={"saturation": lambda images, prompts: images.mean((1, 2, 3))})
    assert _key(trainer) is None
    _evaluate(trainer)
    assert not cache_root.exists()


def test_a_torn_file_is_recomputed_and_replaced(tmp_path, cache_root):
    trainer = _trainer(tmp_path / "run")
    first = _evaluate(trainer)
    (path,) = cache_root.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    assert BaseEvaluationCache().load(_key(trainer)) is None
    assert _evaluate(trainer) == first
    assert BaseEvaluationCache().load(_key(trainer)) is not None


def test_an_entry_without_the_grid_images_asked_for_is_recomputed(tmp_path, cache_root, monkeypatch):
    _trainer(tmp_path / "no-grid", num_grid_images=0).evaluate()
    trainer = _trainer(tmp_path / "grid")
    monkeypatch.setattr(BaseModel, "policy", _base_not_sampled)
    with pytest.raises(AssertionError, match="base model was sampled"):
        trainer.evaluate()


def test_a_file_written_for_another_key_is_not_served(tmp_path, cache_root):
    cache = BaseEvaluationCache()
    mine, other = {"model": "m", "seed": 0}, {"model": "m", "seed": 1}
    cache.save(mine, {"reward/r": torch.arange(4.0)}, 4)
    assert torch.equal(cache.load(mine)[0]["reward/r"], torch.arange(4.0)) and cache.load(mine)[1] == 4
    cache.save(other, {"reward/r": torch.zeros(4)}, 4)
    cache.path(other).replace(cache.path(mine))  # another key's file where this key's belongs
    assert cache.load(mine) is None


def test_a_cache_that_cannot_be_written_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("CDALIGN_CACHE", str(blocked))
    trainer = _trainer(tmp_path / "run")
    with pytest.warns(UserWarning, match="could not be kept for later runs"):
        outputs = _evaluate(trainer)
    assert set(outputs) == set(OUTPUTS)

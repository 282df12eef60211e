"""Bad inputs give a clear message and leave no partial output behind."""

import math

import pytest
import torch

from cdalign import ConstrainedDDPOTrainer
from cdalign.config import config_from_dict


def config(tmp_path, **kw):
    base = dict(
        pretrained_model_name_or_path="cdalign/tiny-random-sd",
        prompts="shapes",
        output_dir=str(tmp_path / "run"),
        normalization_cache_dir=str(tmp_path / "cache"),
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[],
        num_inference_steps=3,
        backprop_steps=1,
        resolution=32,
        train_batch_size=2,
        max_steps=3,
        eval_batches=0,
        num_grid_images=0,
    )
    base.update(kw)
    return config_from_dict(base)


def test_empty_prompt_set_is_refused(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        ConstrainedDDPOTrainer(config(tmp_path, prompts=str(empty)))
    assert not (tmp_path / "run").exists()


def test_resume_path_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(FileNotFoundError, match="not a cdalign checkpoint"):
        ConstrainedDDPOTrainer(config(tmp_path, resume_from_checkpoint=str(tmp_path / "not-a-checkpoint")))


def test_resume_latest_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        ConstrainedDDPOTrainer(config(tmp_path, resume_from_checkpoint="latest"))


def test_checkpoint_from_another_lora_configuration_is_refused(tmp_path):
    first = ConstrainedDDPOTrainer(config(tmp_path, lora_rank=4))
    first.step()
    ckpt = first.save_checkpoint()
    other = ConstrainedDDPOTrainer(config(tmp_path, lora_rank=2, resume_from_checkpoint=str(ckpt)))
    with pytest.raises(ValueError, match="shape"):
        other.load_checkpoint(ckpt)


def _nan_every(k):
    calls = {"n": 0}

    def reward(images, prompts):
        calls["n"] += 1
        values = images.mean(dim=(1, 2, 3))
        return values * float("nan") if calls["n"] % k == 0 else values

    return reward


def test_nonfinite_reward_batches_are_skipped_with_a_warning(tmp_path):
    trainer = ConstrainedDDPOTrainer(config(tmp_path, max_nonfinite_batches=5), rewards={"saturation": _nan_every(2)})
    before = {k: v.detach().clone() for k, v in trainer._lora_params().items()}
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.step()  # finite batch
        trainer.step()  # NaN batch: skipped
    assert trainer.nonfinite_batches == 1
    assert all(torch.isfinite(v).all() for v in trainer._lora_params().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer._lora_params().items())


def test_too_many_nonfinite_batches_abort_without_touching_saved_weights(tmp_path):
    trainer = ConstrainedDDPOTrainer(config(tmp_path, max_nonfinite_batches=1), rewards={"saturation": _nan_every(1)})
    with pytest.raises(RuntimeError, match="max_nonfinite_batches=1"), pytest.warns(UserWarning):
        trainer.train()
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


def test_lora_whose_shapes_do_not_fit_the_base_is_refused(tmp_path):
    from peft import LoraConfig

    from cdalign.lora import load_lora, save_adapter
    from cdalign.pipeline import load_pipeline
    from cdalign.tiny import build_tiny_pipeline

    wide = build_tiny_pipeline(seed=0, sample_size=32)
    # Another architecture: cross-attention width 16 instead of 32.
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**dict(wide.unet.config), "cross_attention_dim": 16})
    other.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
    save_adapter(other, "default", tmp_path / "foreign-lora")
    pipe = load_pipeline("cdalign/tiny-random-sd")
    with pytest.raises(ValueError, match="does not fit this base model"):
        load_lora(pipe, str(tmp_path / "foreign-lora"), "foreign")

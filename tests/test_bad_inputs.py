"""Bad inputs give a clear message and leave no partial output behind."""

import os
from pathlib import Path

import pytest
import torch

from cdalign import ConstrainedDDPOTrainer
from cdalign.alignment.config import config_from_dict


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
    # refused before the model loads, naming the setting that differs
    with pytest.raises(ValueError, match=r"lora_rank: 4 in the checkpoint, 2 now"):
        ConstrainedDDPOTrainer(config(tmp_path, lora_rank=2, resume_from_checkpoint=str(ckpt)))
    # and if the user insists, the tensors themselves do not fit
    other = ConstrainedDDPOTrainer(
        config(tmp_path, lora_rank=2, resume_from_checkpoint=str(ckpt), resume_allow_config_change=True)
    )
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


def test_train_without_an_evaluation_is_refused_before_training(tmp_path):
    trainer = ConstrainedDDPOTrainer(config(tmp_path))  # eval_batches=0: for driving step() only
    with pytest.raises(ValueError, match="eval_batches: train\\(\\) ends with the evaluation"):
        trainer.train()
    assert trainer.global_step == 0


def test_too_many_nonfinite_batches_abort_without_touching_saved_weights(tmp_path):
    trainer = ConstrainedDDPOTrainer(config(tmp_path, max_nonfinite_batches=1, eval_batches=1),
                                     rewards={"saturation": _nan_every(1)})
    with pytest.raises(RuntimeError, match="max_nonfinite_batches=1"), pytest.warns(UserWarning):
        trainer.train()
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


def test_lora_whose_shapes_do_not_fit_the_base_is_refused(tmp_path):
    from peft import LoraConfig

    from cdalign.models.lora import load_lora, save_adapter
    from cdalign.models.pipeline import load_pipeline
    from cdalign.models.tiny import build_tiny_pipeline

    wide = build_tiny_pipeline(seed=0, sample_size=32)
    # Another architecture: cross-attention width 16 instead of 32.
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**dict(wide.unet.config), "cross_attention_dim": 16})
    other.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
    save_adapter(other, "default", tmp_path / "foreign-lora")
    pipe = load_pipeline("cdalign/tiny-random-sd")
    with pytest.raises(ValueError, match="does not fit this base model"):
        load_lora(pipe, str(tmp_path / "foreign-lora"), "foreign")


# -- refused before the model loads ---------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the base model is loaded: these refusals must come first."""
    import cdalign.alignment.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the bad input was refused")

    monkeypatch.setattr(cdalign.alignment.trainer, "load_pipeline_with_source", refuse)


def test_output_dir_that_is_a_file_is_refused_naming_it(tmp_path, no_model_load):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ValueError, match=r"output_dir='.*run' is a file, not a folder"):
        ConstrainedDDPOTrainer(config(tmp_path))
    with pytest.raises(ValueError, match=r"output_dir='.*run/sub' cannot be created: '.*run' is a file"):
        ConstrainedDDPOTrainer(config(tmp_path, output_dir=str(tmp_path / "run" / "sub")))


def test_output_dir_that_is_not_writable_is_refused_naming_it(tmp_path, no_model_load, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: make the folder read-only for this process
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    try:
        with pytest.raises(ValueError, match=r"output_dir='.*locked/run' is not writable \(its parent '.*locked': permission denied\)"):
            ConstrainedDDPOTrainer(config(tmp_path, output_dir=str(locked / "run")))
    finally:
        locked.chmod(0o700)
    assert not (locked / "run").exists()


def test_tracker_that_is_not_installed_is_refused_naming_the_package(tmp_path, no_model_load):
    import importlib.util

    from cdalign.fields import TRACKER_PACKAGES

    missing = [n for n, (modules, _) in TRACKER_PACKAGES.items() if not any(importlib.util.find_spec(m) for m in modules)]
    if not missing:
        pytest.skip("every tracker is installed here")
    with pytest.raises(ValueError, match=rf"report_to: {missing[0]} is not installed; `pip install {TRACKER_PACKAGES[missing[0]][1]}`"):
        ConstrainedDDPOTrainer(config(tmp_path, report_to=missing[0]))
    assert not (tmp_path / "run").exists()


def test_fp16_on_a_cpu_is_refused(tmp_path, no_model_load):
    with pytest.raises(ValueError, match=r"mixed_precision: 'fp16' needs a GPU.*'no' \(float32\) or 'bf16'"):
        ConstrainedDDPOTrainer(config(tmp_path, mixed_precision="fp16"))


def test_misspelt_embedded_model_gets_a_suggestion(tmp_path):
    with pytest.raises(OSError, match=r"'cdalign/tiny-shape-sd'.*Did you mean the embedded model 'cdalign/tiny-shapes-sd'"):
        ConstrainedDDPOTrainer(config(tmp_path, pretrained_model_name_or_path="cdalign/tiny-shape-sd"))
    assert not (tmp_path / "run").exists()


def test_uncached_hub_model_offline_names_it_and_the_download_command():
    from cdalign.models.pipeline import ModelNotFoundError, load_pipeline

    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline("someone/no-such-model", revision="v1")
    message = str(err.value)
    assert "pretrained_model_name_or_path='someone/no-such-model'" in message and "HF_HUB_OFFLINE" in message
    assert "`hf download someone/no-such-model --revision v1`" in message and "huggingface-cli" not in message
    assert "Did you mean" not in message


def test_invalid_hub_model_id_is_refused_at_load():
    with pytest.raises(ValueError, match=r"hub_model_id: 'me/a/b' is not a valid Hub repo id"):
        config_from_dict({"objective": {"type": "reward", "reward": "saturation"}, "hub_model_id": "me/a/b"})


# -- corrupt or truncated safetensors files -----------------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished tiny run (LoRA) and a checkpoint, made once."""
    tmp = tmp_path_factory.mktemp("saved-run")
    trainer = ConstrainedDDPOTrainer(config(tmp, max_steps=1))
    trainer.step()
    ckpt = trainer.save_checkpoint()
    trainer.save_model(tmp / "run")
    return tmp / "run", ckpt


def test_truncated_checkpoint_is_refused_before_the_model_loads(saved_run, tmp_path, monkeypatch):
    import shutil

    import cdalign.alignment.trainer

    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(saved_run[1], ckpt)
    _truncate(ckpt / "lora.safetensors")
    monkeypatch.setattr(cdalign.alignment.trainer, "load_pipeline_with_source", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: '.*checkpoint-1/lora.safetensors' is corrupt or truncated"):
        ConstrainedDDPOTrainer(config(tmp_path, resume_from_checkpoint=str(ckpt)))


def _corrupt_lora_copy(saved_run, tmp_path):
    import shutil

    folder = tmp_path / "corrupt-lora"
    shutil.copytree(saved_run[0], folder)
    _truncate(folder / "pytorch_lora_weights.safetensors")
    return folder


def test_corrupt_lora_in_evaluation_fails_up_front_naming_the_file(saved_run, tmp_path, monkeypatch):
    import cdalign.evaluation.harness
    from cdalign.evaluation import CheckpointSpec, EvaluationSuite, evaluate
    from cdalign.models.lora import CorruptFileError

    folder = _corrupt_lora_copy(saved_run, tmp_path)
    monkeypatch.setattr(cdalign.evaluation.harness, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    suite = EvaluationSuite(checkpoints=[CheckpointSpec("torn", source=str(folder))], num_inference_steps=2, num_prompts=1)
    with pytest.raises(CorruptFileError, match=r"checkpoint 'torn': '.*corrupt-lora/pytorch_lora_weights.safetensors' is corrupt or truncated"):
        evaluate(suite, tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval").exists()  # no batch ran, nothing was cached


def test_corrupt_lora_component_is_refused_before_the_model_loads(saved_run, tmp_path, monkeypatch):
    import cdalign.composition.composer
    from cdalign.composition import ConstrainedComposer
    from cdalign.composition.components import load_lora_component
    from cdalign.composition.config import config_from_dict as compose_config
    from cdalign.models.lora import CorruptFileError

    folder = _corrupt_lora_copy(saved_run, tmp_path)
    cfg = compose_config({"components": [{"name": "torn", "source": str(folder)}, {"name": "base", "kind": "base"}],
                          "output_dir": str(tmp_path / "compose")})
    monkeypatch.setattr(cdalign.composition.composer, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(CorruptFileError, match=r"component 'torn': .*corrupt or truncated"):
        ConstrainedComposer(cfg)
    from cdalign.models.tiny import build_tiny_pipeline

    with pytest.raises(CorruptFileError, match=r"component 'torn'"):
        load_lora_component(build_tiny_pipeline(seed=0), "torn", str(folder))
    assert not (tmp_path / "compose").exists()


def test_composition_inputs_are_checked_before_any_component_trains(tmp_path):
    from cdalign.composition import train_missing_components
    from cdalign.composition.config import config_from_dict as compose_config

    data = {"components": [
        {"name": "ok", "source": str(tmp_path / "ok"), "train_recipe": "cdalign/recipes_data/compose/tiny_adapter_brightness.yaml"},
        {"name": "typo", "source": str(tmp_path / "typo"), "train_recipe": str(tmp_path / "no-such-recipe.yaml")},
    ], "output_dir": str(tmp_path / "compose")}
    with pytest.raises(ValueError, match=r"components\[1\]\.train_recipe.*no-such-recipe.yaml: config file not found"):
        train_missing_components(compose_config(data))
    assert not (tmp_path / "ok").exists()  # the first component was not trained in vain
    with pytest.raises(ValueError, match=r"mixed_precision: 'fp16' needs a GPU"):
        train_missing_components(compose_config({**data, "mixed_precision": "fp16"}))


def test_float16_evaluation_on_a_cpu_is_refused(tmp_path):
    from cdalign.evaluation import EvaluationSuite, evaluate

    with pytest.raises(ValueError, match=r"dtype: 'float16' needs a GPU.*'float32' or 'bfloat16'"):
        evaluate(EvaluationSuite(dtype="float16"), tmp_path / "eval", device="cpu", progress=False)
    assert not (tmp_path / "eval").exists()

"""End to end on the seeded tiny pipeline: the trainer changes the LoRA, moves the duals
the right way, writes its outputs, and the saved LoRA reproduces the trained model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import tiny_config

from cdalign import ConstrainedDDPOTrainer, load_pipeline
from cdalign.core.sampling import DiffusionSampler


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp))
    before = {k: v.detach().clone() for k, v in trainer._lora_params().items()}
    report = trainer.train()
    return trainer, before, report


def test_training_changes_the_lora(trained):
    trainer, before, _ = trained
    after = trainer._lora_params()
    changed = [k for k in before if not torch.equal(before[k], after[k].detach())]
    assert len(changed) > 0
    assert trainer.global_step == 3


def test_duals_rise_for_violated_and_fall_for_satisfied_constraints(trained):
    trainer, _, _ = trained
    violated, satisfied = trainer.duals.multipliers.tolist()
    assert violated > 0.5
    assert satisfied < 0.5


def test_kl_is_zero_at_initialisation_and_positive_after_a_step(trained):
    trainer, _, report = trained
    assert trainer.history[0]["kl"] == 0.0  # LoRA B starts at zero: the model is the base
    assert report["kl"]["mean"] > 0.0


def test_run_writes_its_outputs(trained):
    trainer, _, report = trained
    out = trainer.output_dir
    for name in ["pytorch_lora_weights.safetensors", "config.yaml", "log.jsonl", "report.json",
                 "samples_base_vs_aligned.png", "duals.png"]:
        assert (out / name).is_file(), name
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ["loss", "kl", "reward/saturation", "reward_normalized/saturation",
                "slack/saturation_high", "dual/saturation_high", "slack/local_contrast_high"]:
        assert key in rows[0]
    saved = json.loads((out / "report.json").read_text())
    sat = saved["constraints"][0]
    assert sat["name"] == "saturation_high" and sat["threshold"] == 20.0
    assert sat["satisfied"] is False and saved["constraints"][1]["satisfied"] is True
    assert sat["dual"] == pytest.approx(trainer.duals.multipliers[0].item())


def test_saved_lora_reproduces_the_trained_model_in_a_fresh_pipeline(trained):
    trainer, _, _ = trained
    state = load_file(str(trainer.output_dir / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("unet.") and "lora" in k for k in state)
    fresh = load_pipeline("cdalign/tiny-random-sd")
    fresh.load_lora_weights(str(trainer.output_dir))
    prompts, seeds = ["a red circle", "a blue square"], [11, 12]
    cfg = trainer.config
    ours = DiffusionSampler(fresh, cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.resolution, "cpu")
    with torch.no_grad():
        expected = trainer.sampler.sample(trainer.sampler.guided(prompts), seeds)
        got = ours.sample(ours.guided(prompts), seeds)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_output_dir_holding_a_run_is_refused(trained, tmp_path):
    trainer, _, _ = trained
    cfg = tiny_config(tmp_path, output_dir=str(trainer.output_dir))
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        ConstrainedDDPOTrainer(cfg)


def test_reward_statistics_are_cached_and_reused_only_on_matching_key(tmp_path):
    from cdalign.runs.normalization_cache import NormalizationCache
    from cdalign.core.normalization import RewardStats

    cache = NormalizationCache(tmp_path)
    key = {"reward": "saturation", "model": "m", "sampler": {"num_inference_steps": 6}}
    cache.save(key, RewardStats(0.5, 0.1, 8))
    assert cache.load(key) == RewardStats(0.5, 0.1, 8)
    assert cache.load({**key, "sampler": {"num_inference_steps": 7}}) is None
    assert cache.load({**key, "model": "other"}) is None


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    straight = ConstrainedDDPOTrainer(tiny_config(tmp_path / "a", max_steps=3, eval_batches=0, num_grid_images=0))
    for _ in range(3):
        straight.step()
    first = ConstrainedDDPOTrainer(tiny_config(tmp_path / "b", max_steps=3, save_steps=2, eval_batches=0, num_grid_images=0))
    first.compute_normalization()
    for _ in range(2):
        first.step()
    first.save_checkpoint()
    resumed = ConstrainedDDPOTrainer(
        tiny_config(tmp_path / "b", max_steps=3, eval_batches=0, num_grid_images=0, resume_from_checkpoint="latest")
    )
    resumed.load_checkpoint(resumed.resume_path)
    resumed.step()
    assert resumed.duals.multipliers.tolist() == straight.duals.multipliers.tolist()
    for k, v in straight._lora_params().items():
        torch.testing.assert_close(resumed._lora_params()[k], v, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads = []
    for ckpt in (False, True):
        trainer = ConstrainedDDPOTrainer(
            tiny_config(tmp_path / str(ckpt), gradient_checkpointing=ckpt, eval_batches=0, num_grid_images=0)
        )
        trainer.compute_normalization()
        estimate = trainer._estimate_micro_batches([0])[0]
        estimate.loss.backward()
        grads.append({k: p.grad.clone() for k, p in trainer._lora_params().items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-8)


def test_a_confidence_target_trains_toward_a_tighter_target_and_the_report_names_both(tmp_path):
    """Same seed, same samples: asking constraint 0 for confidence 0.95 moves its first dual
    step's slack by exactly the prior margin z·1/√n (n = eval_batches × train_batch_size = 2), so
    its λ rises by lr × that margin more; the report gives the threshold and the target."""
    from cdalign.core.targets import confidence_margin

    constraints = [{"reward": "saturation", "direction": "high", "threshold": 0.0},
                   {"reward": "local_contrast", "direction": "high", "threshold": -20.0}]
    plain = ConstrainedDDPOTrainer(tiny_config(tmp_path / "plain", constraints=constraints, max_steps=1))
    plain_report = plain.train()
    asked = [{**constraints[0], "confidence": 0.95}, constraints[1]]
    confident = ConstrainedDDPOTrainer(tiny_config(tmp_path / "confident", constraints=asked, max_steps=1))
    report = confident.train()
    margin = confidence_margin(0.95, 1.0, 2)
    assert confident.history[0]["slack/saturation_high"] == pytest.approx(plain.history[0]["slack/saturation_high"] + margin, abs=1e-6)
    assert confident.history[0]["margin/saturation_high"] > 0  # refreshed from the batch's own spread
    lam_plain, lam_confident = plain.duals.multipliers[0].item(), confident.duals.multipliers[0].item()
    assert lam_confident == pytest.approx(lam_plain + 0.05 * margin, abs=1e-6)  # ascent lr 0.05
    entry = report["constraints"][0]
    assert entry["threshold"] == 0.0 and entry["target"] > entry["threshold"]
    assert entry["target_from"]["confidence"] == 0.95 and entry["target_from"]["num_images"] == 2
    assert entry["met"] in {"CI", "mean", "no"}
    assert plain_report["constraints"][0]["target"] == 0.0
    assert "confidence" not in plain_report["constraints"][0]["target_from"]


def test_confidence_and_margin_together_or_on_a_kl_constraint_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"constraints\[0\]\.confidence: set confidence or margin, not both"):
        tiny_config(tmp_path, constraints=[{"reward": "saturation", "threshold": 0.0, "confidence": 0.9, "margin": 0.1}])
    with pytest.raises(ValueError, match=r"constraints\[0\]\.confidence: reward constraints only"):
        tiny_config(tmp_path, objective={"type": "reward", "reward": "saturation"},
                    constraints=[{"type": "kl", "max": 1.0, "confidence": 0.9}])


def test_per_image_values_that_are_one_tensor_under_two_names_are_written(tmp_path):
    from cdalign.evaluation.scoring import load_eval_values, save_eval_values

    kl = torch.rand(4, dtype=torch.float64)  # already float64 on the CPU: .double().cpu() would not copy it
    save_eval_values(tmp_path / "values.safetensors", {"kl": kl, "aligned/kl": kl, "base/kl": torch.zeros(4)})
    values = load_eval_values(tmp_path / "values.safetensors")
    assert torch.equal(values["kl"], kl) and torch.equal(values["aligned/kl"], kl)


def test_a_run_with_a_kl_constraint_writes_its_per_image_values(tmp_path):
    # The KL constraint's per-image values are the chain KL itself: `kl` and `aligned/kl` were
    # one tensor, and safetensors refused to write them (the run crashed after training).
    cfg = tiny_config(tmp_path, max_steps=1, num_grid_images=0,
                      objective={"type": "reward", "reward": "saturation", "normalize": False},
                      constraints=[{"type": "kl", "max": 1.0}])
    report = ConstrainedDDPOTrainer(cfg).train()
    values = load_file(str(tmp_path / "run" / "eval_values.safetensors"))
    assert report.constraints[0].source == "kl"
    assert torch.equal(values["aligned/kl"], values["kl"])
    assert torch.equal(values["base/kl"], torch.zeros_like(values["kl"]))

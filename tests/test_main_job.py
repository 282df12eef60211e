"""The main job's claim, as specifications: paired statistics, the equal-weights baselines
(the same trainer with λ frozen), and a short constrained run on the embedded shapes model
whose violated constraint measurably improves on held-out prompts."""

import json
import math
from pathlib import Path

import pytest
import torch

from cdalign import ConstrainedDDPOTrainer
from cdalign.alignment.config import config_from_dict
from cdalign.core.statistics import constraint_decision, mean_and_ci, paired_difference
from cdalign.evaluation import equal_weights as ew
from cdalign.publishing.summaries import equal_weights_table
from cdalign.rewards.metrics import EVAL_METRICS, shapes_accuracy


def test_paired_difference_matches_a_hand_computed_case():
    treated = torch.tensor([1.0, 2.0, 3.0, 4.0])
    control = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # differences 1, 2, 2, 3: mean 2, sample std sqrt(2/3), half-width 1.959964 · sqrt(2/3) / 2
    half = 1.959964 * math.sqrt(2 / 3) / 2
    d = paired_difference(treated, control)
    assert d["n"] == 4
    assert d["mean"] == pytest.approx(2.0)
    assert d["ci95"] == pytest.approx([2.0 - half, 2.0 + half])


def test_paired_difference_is_narrower_than_the_unpaired_intervals_when_samples_share_noise():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(64, generator=g)
    base, aligned = shared, shared + 0.2 + 0.05 * torch.randn(64, generator=g)
    _, lo, hi = mean_and_ci(aligned)
    d = paired_difference(aligned, base)
    assert d["ci95"][1] - d["ci95"][0] < 0.2 * (hi - lo)
    assert d["ci95"][0] > 0  # the shift is resolved although the unpaired intervals overlap


def test_paired_difference_refuses_unequal_sample_counts():
    with pytest.raises(ValueError, match="equal sample counts"):
        paired_difference(torch.zeros(3), torch.zeros(4))


def test_constraint_decision_sides():
    assert constraint_decision(0.6, (0.55, 0.65), 0.5, "high") == {"slack": pytest.approx(-0.1), "satisfied": True, "ci_clears_threshold": True}
    assert constraint_decision(0.6, (0.4, 0.8), 0.5, "high")["ci_clears_threshold"] is False
    assert constraint_decision(-0.2, (-0.3, -0.1), -0.25, "low")["satisfied"] is False


def test_shapes_accuracy_reads_rendered_scenes_correctly():
    import numpy as np

    from cdalign.data.shapes import caption, render_scenes, sample_scenes, scene_records

    scenes = sample_scenes(np.random.default_rng(0), 8)
    images = torch.from_numpy(render_scenes(scenes)).permute(0, 3, 1, 2).float() / 255
    prompts = [caption(r["shape"], r["color"]) for r in scene_records(scenes)]
    acc = shapes_accuracy(images, prompts)
    assert float(acc["color_accuracy"].mean()) == 1.0
    assert float(acc["shape_accuracy"].mean()) >= 0.75
    wrong = shapes_accuracy(images, ["a " + ("blue" if r["color"] != "blue" else "red") + " circle" for r in scene_records(scenes)])
    assert float(wrong["color_accuracy"].mean()) == 0.0
    assert "shapes_accuracy" in EVAL_METRICS


def test_unknown_eval_metric_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match=r"eval_metrics\[0\].*did you mean 'shapes_accuracy'"):
        config_from_dict(
            {"output_dir": str(tmp_path), "constraints": [{"reward": "saturation", "threshold": 0.5}], "eval_metrics": ["shape_accuracy"]}
        )


# ------------------------------------------------------------------ equal weights


def _report(sat_measured, lc_measured, kl, duals=(1.0, 2.0)):
    cons = []
    for name, m, thr, direction, lam in (
        ("saturation_high", sat_measured, 0.5, "high", duals[0]),
        ("local_contrast_low", lc_measured, -0.25, "low", duals[1]),
    ):
        cons.append(
            {
                "name": name, "source": name.split("_")[0], "direction": direction, "threshold": thr, "units": "base std",
                "measured": m, "ci95": [m - 0.1, m + 0.1], "base_measured": 0.0, "base_ci95": [-0.1, 0.1],
                "satisfied": (m >= thr) if direction == "high" else (m <= thr), "dual": lam,
            }
        )
    return {
        "constraints": cons, "all_satisfied": all(c["satisfied"] for c in cons), "num_eval_images": 64,
        "kl": {"estimator": "uniform", "mean": kl, "ci95": [kl * 0.9, kl * 1.1]},
    }


def test_baseline_multipliers_are_the_initial_value_and_the_mean_final_value(tmp_path):
    config = config_from_dict(
        {"output_dir": str(tmp_path), "constraints": [{"reward": "saturation", "threshold": 0.5}], "dual": {"init": 0.2}}
    )
    lam = ew.baseline_multipliers(config, _report(0.6, -0.3, 0.01, duals=(1.0, 3.0)))
    assert lam == {"init": 0.2, "final_mean": 2.0}


def test_equal_weights_baseline_is_the_same_trainer_with_frozen_duals(tmp_path):
    config = config_from_dict(
        dict(
            pretrained_model_name_or_path="cdalign/tiny-random-sd", prompts="shapes", output_dir=str(tmp_path / "run"),
            normalization_cache_dir=str(tmp_path / "cache"),
            constraints=[{"reward": "saturation", "direction": "high", "threshold": 20.0}],
            dual={"optimizer": "nupi", "kappa_i": 1.0, "init": 0.3, "warmup_steps": 3},
            num_inference_steps=4, backprop_steps=1, resolution=32, train_batch_size=2, max_steps=2,
            normalization_batches=1, eval_batches=1, num_grid_images=0,
        )
    )
    cfg = ew.baseline_config(config, "final_mean", 0.75, tmp_path / "run")
    assert cfg.dual.freeze and cfg.dual.init == 0.75 and cfg.output_dir == str(tmp_path / "run" / "equal_weights" / "final_mean")
    # everything that defines the run is the constrained run's
    for field in ("max_steps", "seed", "prompts", "eval_seed", "learning_rate", "constraints", "num_inference_steps"):
        assert getattr(cfg, field) == getattr(config, field)
    trainer = ConstrainedDDPOTrainer(cfg)
    assert type(trainer) is ConstrainedDDPOTrainer
    trainer.train()
    lam = [json.loads(line)["dual/saturation_high"] for line in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines()]
    assert lam == [0.75, 0.75]  # violated by far, yet λ never moves


def test_claim_holds_only_if_every_baseline_misses_a_constraint_or_pays_more_kl():
    constrained = _report(0.6, -0.3, 0.010)
    holds = ew.compare({"init": _report(0.2, -0.3, 0.002), "final_mean": _report(0.7, -0.4, 0.030), "constrained": constrained})
    assert holds["claim_holds"] is True
    assert "misses saturation_high" in holds["reasons"][0] and "larger chain KL" in holds["reasons"][1]
    cheaper = ew.compare({"init": _report(0.2, -0.3, 0.002), "final_mean": _report(0.7, -0.4, 0.005), "constrained": constrained})
    assert cheaper["claim_holds"] is False
    # a larger KL inside the noise (overlapping 95% CIs) proves nothing
    noisy = ew.compare({"init": _report(0.2, -0.3, 0.002), "final_mean": _report(0.7, -0.4, 0.0105), "constrained": constrained})
    assert noisy["claim_holds"] is False and "the 95% CIs overlap" in noisy["reasons"][1]
    failed = ew.compare({"init": _report(0.2, -0.3, 0.002), "final_mean": _report(0.2, -0.3, 0.002), "constrained": _report(0.3, -0.3, 0.01)})
    assert failed["claim_holds"] is False and "constrained run misses" in failed["reasons"][0]
    table = equal_weights_table(holds)
    assert "chain KL to base (nats, uniform)" in table and "Claim holds" in table


# ------------------------------------------------------------------ a short run that must move


@pytest.mark.slow
def test_short_run_moves_the_violated_constraint_beyond_noise_and_prices_it(tmp_path):
    """On the embedded shapes model: colorfulness ≥ +0.5σ is violated by the base model
    (its λ rises), local contrast ≤ +3σ holds (its λ falls to 0); after 10 steps the held-out
    aligned − base colorfulness difference, paired over the same 32 images, is positive
    with its whole 95% CI (the margin is the measured spread, not a constant)."""
    config = config_from_dict(
        dict(
            pretrained_model_name_or_path="cdalign/tiny-shapes-sd", prompts="shapes_world", eval_prompts="shapes_eval",
            output_dir=str(tmp_path / "run"), normalization_cache_dir=str(tmp_path / "cache"),
            constraints=[
                {"reward": "colorfulness", "direction": "high", "threshold": 0.5, "normalize": True},
                {"reward": "local_contrast", "direction": "low", "threshold": 3.0, "normalize": True},
            ],
            dual={"optimizer": "nupi", "kappa_i": 0.5, "init": 0.5},
            num_inference_steps=6, backprop_steps=3, guidance_scale=3.0, train_batch_size=8, max_steps=10,
            learning_rate=5e-3, kl_estimator="uniform", normalization_batches=4, eval_batches=4, num_grid_images=0, eval_metrics=["shapes_accuracy"],
        )
    )
    report = ConstrainedDDPOTrainer(config).train()
    color, lc = report["constraints"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lam = [line["dual/colorfulness_high"] for line in log]
    assert log[0]["slack/colorfulness_high"] > 0 and lam[0] > 0.5  # violated at first: its price rose
    assert max(lam) > 0.5
    assert lc["dual"] == 0.0 and lc["satisfied"]
    assert color["n"] == 32
    assert color["base_slack"] > 0  # the base model violates it
    assert color["difference"]["ci95"][0] > 0, color["difference"]
    assert color["measured"] - color["base_measured"] == pytest.approx(color["difference"]["mean"], abs=1e-9)
    assert set(report["metrics"]) == {"color_accuracy", "shape_accuracy", "background_accuracy"}

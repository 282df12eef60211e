"""Fidelity floors: a reward constraint relative to the base model (``relative_to_base``),
the differentiable ``caption_fidelity`` a reward-backprop run can hold it on, and the
non-differentiable ``shapes_match`` through the policy gradient."""

import dataclasses
import math

import pytest
import torch
from tiny_configs import tiny_config

from cdalign import ConstrainedDDPOTrainer
from cdalign.core.normalization import RewardStats
from cdalign.core.problem import ConstrainedProblem, Constraint, Objective
from cdalign.data.shapes import BACKGROUNDS, COLORS
from cdalign.publishing.cards import constraints_table
from cdalign.publishing.summaries import summary_table
from cdalign.rewards import build_reward

FLOOR = {"reward": "caption_fidelity", "direction": "high", "threshold": -0.05, "normalize": False,
         "relative_to_base": True}


# ----------------------------------------------------------------------------- config rules
@pytest.mark.parametrize("constraint, message", [
    ({**FLOOR, "normalize": True}, r"constraints\[2\]\.relative_to_base: a normalised threshold is already relative"),
    ({"type": "kl", "max": 0.1, "relative_to_base": True}, r"constraints\[2\]\.relative_to_base: reward constraints only"),
])
def test_config_refuses_a_floor_that_cannot_mean_what_it_says(tmp_path, constraint, message):
    cons = [{"reward": "saturation", "direction": "high", "threshold": 1.0},
            {"reward": "local_contrast", "direction": "high", "threshold": -1.0}, constraint]
    objective = {"type": "reward", "reward": "brightness"} if constraint.get("type") == "kl" else {"type": "kl"}
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, constraints=cons, objective=objective)


def test_an_absolute_and_a_relative_bound_on_one_reward_are_not_compared(tmp_path):
    # 0.5 (absolute) and base − 0.05 are in different units: no "empty feasible set" error
    cfg = tiny_config(tmp_path, constraints=[
        {"reward": "caption_fidelity", "direction": "high", "threshold": -0.05, "normalize": False, "relative_to_base": True},
        {"reward": "caption_fidelity", "direction": "low", "threshold": -0.5, "normalize": False}])
    assert [c.relative_to_base for c in cfg.constraints] == [True, False]


# ----------------------------------------------------------------------------- the math, by hand
def test_a_relative_constraint_measures_its_slack_from_the_base_mean():
    c = Constraint("f_high", "f", "high", -0.05, relative=True)
    with pytest.raises(ValueError, match="no base-model mean of 'f'"):
        c.slack(torch.tensor(0.8))
    assert float(c.slack(torch.tensor(0.8), reference=0.9)) == pytest.approx(0.05)  # needs ≥ 0.85: 0.05 short
    assert float(c.slack(torch.tensor(0.8), margin=0.02, reference=0.9)) == pytest.approx(0.07)  # aims at 0.87
    problem = ConstrainedProblem(Objective("kl"), [c])
    problem.base_statistics = {"f": RewardStats(0.9, 0.1, 100)}
    assert problem.reference(0) == 0.9 and problem.needs_base_statistics
    assert float(problem.slacks(torch.tensor([0.8]))[0]) == pytest.approx(0.05)


def test_a_relative_floor_is_priced_in_the_base_models_std():
    floor = Constraint("f_high", "f", "high", -0.05, relative=True)
    plain = Constraint("g_high", "g", "high", 0.5, normalize=True)
    problem = ConstrainedProblem(Objective("kl"), [floor, plain])
    assert problem.price_scales().tolist() == [1.0, 1.0]  # no statistics yet: nothing to price in
    problem.base_statistics = {"f": RewardStats(0.9, 0.08, 100), "g": RewardStats(0.3, 0.5, 100)}
    assert problem.price_scales().tolist() == pytest.approx([0.08, 1.0])  # normalised: already in std units
    raw = problem.slacks(torch.tensor([0.8, 0.2]))
    assert raw.tolist() == pytest.approx([0.05, 0.3])  # the slack itself stays in the reward's units
    assert problem.priced_slacks(raw.double()).tolist() == pytest.approx([0.05 / 0.08, 0.3])
    assert problem.primal_multipliers(torch.tensor([2.0, 3.0], dtype=torch.float64)).tolist() == pytest.approx([25.0, 3.0])
    problem.base_statistics["f"] = RewardStats(1.0, 1e-6, 100)  # constant on the base: priced raw
    assert problem.price_scales().tolist() == [1.0, 1.0]


def test_a_floors_dual_steps_on_its_slack_in_base_std_units(tmp_path):
    cfg = _floor_run(tmp_path, max_steps=1, dual={"optimizer": "ascent", "lr": 0.05, "init": 0.5},
                     gradient_accumulation_steps=1)
    trainer = ConstrainedDDPOTrainer(cfg)
    seen = []
    estimator = trainer.estimator
    trainer.estimator = lambda prompts, seeds, multipliers, g: seen.append(multipliers.clone()) or estimator(
        prompts, seeds, multipliers, g)
    trainer.step()
    std = trainer.normalizers["caption_fidelity"].std
    assert 0 < std < 0.5
    assert seen[0].tolist() == pytest.approx([0.5, 0.5 / std], rel=1e-6)  # the primal weight of the floor is λ/s
    slack = trainer.history[-1]["slack/caption_fidelity_high"]  # logged in the reward's own units
    assert float(trainer.duals.multipliers[1]) == pytest.approx(max(0.0, 0.5 + 0.05 * slack / std), rel=1e-5)


def test_a_relative_verdict_is_the_paired_difference_against_the_offset():
    c = Constraint("f_high", "f", "high", -0.05, relative=True)
    base = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    aligned = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # one image lost: −0.125
    d = (aligned - base).double()
    half = 1.959963984540054 * float(d.std()) / math.sqrt(8)
    v = c.verdict(aligned, base)
    assert v["measured"] == pytest.approx(0.625)  # the aligned mean, as printed
    assert v["slack"] == pytest.approx(-0.05 - (-0.125))  # judged on the difference
    assert v["satisfied"] is False and v["ci_clears_threshold"] is False
    assert v["judged_on"].startswith("aligned − base")
    same = c.verdict(base, base)
    assert same["satisfied"] and same["ci_clears_threshold"] and same["slack"] == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="needs the base model's values"):
        c.verdict(aligned)
    assert -0.125 - half < -0.05  # (the CI of the difference straddles the offset: the hand check above)


# ----------------------------------------------------------------------------- caption_fidelity
def _scene(background, color=None):
    img = torch.tensor(BACKGROUNDS[background], dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32).clone() / 255
    if color:
        img[:, 10:22, 10:22] = torch.tensor(COLORS[color], dtype=torch.float32).view(3, 1, 1) / 255
    return img


def test_caption_fidelity_reads_the_colour_and_the_background_the_prompt_names():
    reward = build_reward("caption_fidelity")
    images = torch.stack([_scene("gray", "red"), _scene("white", "red"), _scene("gray", "blue"), _scene("black", "red")])
    prompts = ["a red square on a gray background", "a red square on a gray background",
               "a red square on a gray background", "a red square"]
    scores = reward(images, prompts)
    assert scores[0] > 0.95  # both right
    assert scores[1] == pytest.approx(1 - 0.5 * (3 * (117 / 255) ** 2) ** 0.5 / 3 ** 0.5, abs=0.02)  # white, not gray
    assert scores[2] == pytest.approx(0.5, abs=0.02)  # background right, colour wrong
    assert scores[3] > 0.95  # no background named: the colour alone
    assert float(reward(_scene("white")[None], ["a picture"])[0]) == 1.0  # nothing named, nothing broken


def test_caption_fidelity_pushes_a_lightened_background_back():
    reward = build_reward("caption_fidelity")
    grads = []
    for lift in (0.15, 0.45):  # a brightness hack: a black background lightened part way, or all the way to gray
        lighter = (_scene("black", "red") + lift).clamp(0, 1).requires_grad_(True)
        score = reward(lighter[None], ["a red square on a black background"])[0]
        score.backward()
        grads.append(float(lighter.grad[:, 0, :].mean()))
        assert score < 0.95
    assert grads[0] < 0 and grads[1] == pytest.approx(grads[0], rel=0.05)  # darkening pulls back, however far it went


# ----------------------------------------------------------------------------- through the trainer
def _floor_run(tmp_path, **kw):
    cons = [{"reward": "brightness", "direction": "high", "threshold": 0.5}, dict(FLOOR)]
    return tiny_config(tmp_path, constraints=cons, prompts=["a red circle on a gray background",
                                                             "a blue square on a black background"], **kw)


def test_a_reward_backprop_run_holds_a_floor_relative_to_the_base(tmp_path):
    trainer = ConstrainedDDPOTrainer(_floor_run(tmp_path))
    report = trainer.train()
    stats = trainer.normalizers["caption_fidelity"]
    floor = report.constraints[1]
    assert floor.relative_to_base and floor.reference == pytest.approx(stats.mean)
    half = 1.959963984540054 * stats.std / math.sqrt(stats.count)  # the reference's own CI, recorded
    assert floor.reference_ci95 == pytest.approx([stats.mean - half, stats.mean + half]) and floor.reference_n == stats.count
    # the price per unit of the floor's own bound: λ (in base-std units) over the std
    assert floor.dual == pytest.approx(float(trainer.duals.multipliers[1]) / stats.std)
    assert report.constraints[0].dual == pytest.approx(float(trainer.duals.multipliers[0]))
    assert floor.judged_on.startswith("aligned − base")
    # the verdict is the paired difference against −0.05
    assert floor.slack == pytest.approx(-0.05 - floor.difference.mean)
    table = summary_table(report)
    assert ">=b-0.05" in table.replace(" ", "") and "judged on its aligned − base column" in table
    card = (tmp_path / "run" / "README.md").read_text()
    assert "caption\\_fidelity ≥ base − 0.05" in card or "caption_fidelity ≥ base − 0.05" in card
    assert f"base on the training prompts {stats.mean:+.4g}" in card and f"{stats.count} images" in card
    at_base = dataclasses.replace(floor, target=0.0, target_from={"margin": 0.05, "from": "fixed margin"})
    assert "aimed at the base for a fixed margin" in constraints_table(dataclasses.replace(report, constraints=[at_base]))


def test_a_policy_gradient_run_holds_a_non_differentiable_floor(tmp_path):
    cons = [{"reward": "jpeg_compressibility", "direction": "high", "threshold": 0.5},
            {"reward": "shapes_match", "direction": "high", "threshold": -0.05, "normalize": False, "relative_to_base": True}]
    cfg = tiny_config(tmp_path, estimator="policy_gradient", images_per_prompt=2, backprop_steps=4, constraints=cons,
                      max_steps=1)
    trainer = ConstrainedDDPOTrainer(cfg)
    report = trainer.train()
    floor = report.constraints[1]
    assert floor.relative_to_base and floor.reference == pytest.approx(trainer.normalizers["shapes_match"].mean)
    assert all(math.isfinite(h["slack/shapes_match_high"]) for h in trainer.history)


def test_a_reward_backprop_run_refuses_a_non_differentiable_floor(tmp_path):
    cons = [{"reward": "brightness", "direction": "high", "threshold": 0.5},
            {"reward": "shapes_match", "direction": "high", "threshold": -0.05, "normalize": False, "relative_to_base": True}]
    with pytest.raises(ValueError, match="shapes_match"):
        ConstrainedDDPOTrainer(tiny_config(tmp_path, constraints=cons))

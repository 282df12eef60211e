"""Constraints differentiated by the score function inside estimator reward_backprop
(``ConstraintSpec.gradient``: ``score_function``, ``hybrid``): the config rules, the score-function
term's gradient against the exact pathwise gradient on DDIM and flow chains, its wiring in the
estimator (advantages, signs, λ, no backpropagated gradient left), a tiny run whose binding,
non-differentiable floor raises its λ, and an exact resume."""

import pytest
import torch
from tiny_configs import tiny_config

from cdalign import CONSTRAINT_GRADIENTS, ConstrainedDDPOTrainer
from cdalign.alignment.estimators import ScoreFunctionTerm
from cdalign.core.chains import DDIMChain, FlowSDEChain
from cdalign.core.policy_gradient import ADVANTAGES, batch_centered, leave_one_out
from cdalign.core.sampling import Trajectory, sample_latents

FLOOR = {"reward": "shapes_match", "direction": "high", "threshold": -0.05, "normalize": False,
         "relative_to_base": True, "gradient": "score_function"}
PROMPTS = ["a red circle on a gray background", "a blue square on a black background"]


# ----------------------------------------------------------------------------- config rules
@pytest.mark.parametrize("overrides, message", [
    ({"objective": {"type": "reward", "reward": "brightness"},
      "constraints": [{"type": "kl", "max": 0.1, "gradient": "score_function"}]},
     r"constraints\[0\]\.gradient: 'score_function' is for reward constraints.*kl_grad_steps: all"),
    ({"estimator": "policy_gradient", "images_per_prompt": 2, "backprop_steps": 4, "constraints": [FLOOR]},
     r"constraints\[0\]\.gradient: 'score_function' is a setting of estimator reward_backprop.*"
     r"estimator policy_gradient does not read it"),
    ({"objective": {"type": "reward", "reward": "brightness"},
      "constraints": [{"type": "kl", "max": 0.1, "gradient": "whole_chain"}]},
     r"constraints\[0\]\.gradient: 'whole_chain' is for reward constraints"),
    ({"eta": 0.0, "kl_estimator": "uniform", "constraints": [{**FLOOR, "gradient": "hybrid", "reward": "caption_fidelity"}]},
     r"eta: 0 makes every sampling step deterministic, and constraints\[0\] \(gradient: hybrid\)"),
    ({"constraints": [FLOOR], "score_function_advantage": "group_std"},
     r"score_function_advantage: 'group_std' compares images of one prompt group.*use one of batch_mean, batch_std, "
     r"leave_one_out"),
    ({"constraints": [FLOOR], "score_function_advantage": "prompt_tracker"},
     r"score_function_advantage: 'prompt_tracker' keeps statistics across batches"),
    ({"score_function_advantage": "batch_mean"},
     r"score_function_advantage: 'batch_mean' is only read for constraints with a score-function gradient"),
    ({"constraints": [{**FLOOR, "gradient": "sideways"}]}, r"gradient"),
    ({"constraints": [{**FLOOR, "confidence": 0.95}]},
     r"constraints\[0\]\.confidence: not with relative_to_base.*give a fixed margin instead \(e\.g\. margin: 0\.02"),
])
def test_config_refuses_a_score_function_gradient_where_it_cannot_work(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **overrides)


def test_a_non_differentiable_floor_is_refused_by_backprop_and_accepted_by_the_score_function(tmp_path):
    cons = [{"reward": "brightness", "direction": "high", "threshold": 0.5}, {**FLOOR, "gradient": "backprop"}]
    with pytest.raises(ValueError, match="reward 'shapes_match' is not differentiable.*set gradient: score_function"):
        ConstrainedDDPOTrainer(tiny_config(tmp_path / "a", constraints=cons))
    with pytest.raises(ValueError, match="reward 'shapes_match' is not differentiable"):  # hybrid backpropagates too
        ConstrainedDDPOTrainer(tiny_config(tmp_path / "b", constraints=[cons[0], {**FLOOR, "gradient": "hybrid"}]))
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path / "c", constraints=[cons[0], FLOOR]))
    assert trainer.estimator.backprop_rewards == ["brightness"] and trainer.estimator.score_function == [1]


def test_the_registry_names_what_each_gradient_covers():
    assert CONSTRAINT_GRADIENTS.names() == ["backprop", "hybrid", "score_function", "whole_chain"]
    trained = {4, 5}
    assert CONSTRAINT_GRADIENTS.get("backprop").score_function_steps(6, trained) == set()
    assert CONSTRAINT_GRADIENTS.get("whole_chain").score_function_steps(6, trained) == set()
    assert CONSTRAINT_GRADIENTS.get("score_function").score_function_steps(6, trained) == set(range(6))
    assert CONSTRAINT_GRADIENTS.get("hybrid").score_function_steps(6, trained) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- baselines
def test_leave_one_out_subtracts_the_mean_of_the_other_values():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert leave_one_out(r).tolist() == pytest.approx([1 - 2 / 3, 1 - 2 / 3, 0 - 1.0, 1 - 2 / 3])
    assert batch_centered(r).tolist() == pytest.approx([0.25, 0.25, -0.75, 0.25])
    assert not leave_one_out(torch.ones(4)).any()  # every image agrees: no signal, and no bias
    with pytest.raises(ValueError, match="train_batch_size >= 2"):
        leave_one_out(torch.ones(1))
    for name in ("leave_one_out", "batch_mean"):
        kind = ADVANTAGES.get(name)
        assert not kind.needs_groups and kind.global_batch and not kind.stateful


# ----------------------------------------------------------------------------- the gradient, exactly
def _flow_chain():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowSDEChain.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), 10, 0.7)


def _ddim_chain():
    from cdalign.models.tiny import sd_ddim_scheduler

    return DDIMChain.from_scheduler(sd_ddim_scheduler(), 10, eta=1.0)


@pytest.mark.parametrize("make_chain, n", [(_flow_chain, 20_000), (_ddim_chain, 200_000)], ids=["flow_sde", "ddim"])
@pytest.mark.parametrize("gradient", ["score_function", "hybrid"])
def test_the_score_function_term_estimates_the_pathwise_gradient_with_its_sign_and_scale(make_chain, n, gradient):
    """A two-parameter predictor on a 10-step chain and a smooth reward: the score-function
    term's gradient (leave-one-out advantages, summed over its steps) is minus the exact
    pathwise gradient of mean r (the loss is −E[r]'s), within 10%. 'hybrid' adds the pathwise
    gradient of the last 3 steps with the state before them held fixed (what reward_backprop's
    truncation computes) to the score function of the 7 steps before. A wrong sign, a missing
    sum over steps (÷10) or a standardised advantage (÷ std r ≈ 0.3) fails it."""
    chain = make_chain()
    T = len(chain)
    g = torch.Generator().manual_seed(0)
    theta = torch.nn.Parameter(0.3 * torch.randn(2, 2, 1, 1, generator=g, dtype=torch.float64))
    w = torch.randn(2, 2, 2, generator=g, dtype=torch.float64)

    def predictor(x, t):
        return theta[0] + theta[1] * torch.tanh(x) * (float(t) / 1000)

    def reward(x0):
        return torch.tanh(2 * (x0 * w).flatten(1).mean(1))

    x_T = torch.randn(n, 2, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(T, n, 2, 2, 2, generator=g, dtype=torch.float64)
    (exact,) = torch.autograd.grad(reward(sample_latents(predictor, chain, x_T, noise, grad_steps=range(T))).mean(), [theta])

    trained = set(range(T - 3, T)) if gradient == "hybrid" else set()
    trajectory = Trajectory()
    x0 = sample_latents(predictor, chain, x_T, noise, grad_steps=trained, trajectory=trajectory)
    r = reward(x0)
    estimate = torch.zeros_like(theta)
    if trained:
        (estimate,) = torch.autograd.grad(-r.mean(), [theta])  # the backpropagated term of λ·g, λ = 1
    steps = CONSTRAINT_GRADIENTS.get(gradient).score_function_steps(T, trained)
    advantages = leave_one_out(r.detach())
    term = ScoreFunctionTerm(predictor, chain, trajectory, {i: advantages for i in steps})
    for loss in term.losses():
        estimate = estimate + torch.autograd.grad(loss, [theta])[0]
    assert float((estimate + exact).norm() / exact.norm()) < 0.1, (estimate.flatten(), -exact.flatten())


# ----------------------------------------------------------------------------- inside the estimator
def test_the_estimator_weighs_each_constraints_advantages_by_its_dual_and_direction(tmp_path):
    """Two score-function constraints, 'high' (λ 0.7) and 'low' (λ 0.3), in base-model std units:
    every step's advantage is 0.7·LOO(brightness) − 0.3·LOO(saturation) of the batch's normalised
    values, their values carry no gradient, and their terms alone move the LoRA."""
    cons = [{"reward": "brightness", "direction": "high", "threshold": 5.0, "gradient": "score_function"},
            {"reward": "saturation", "direction": "low", "threshold": -5.0, "gradient": "score_function"}]
    cfg = tiny_config(tmp_path, constraints=cons, dual={"optimizer": "ascent", "lr": 0.05, "init": [0.7, 0.3]},
                      train_batch_size=4, eval_batches=0, num_grid_images=0)
    trainer = ConstrainedDDPOTrainer(cfg)
    trainer.compute_normalization()
    estimate = trainer._estimate_micro_batches([0])[0]
    term = estimate.score_function
    expected = 0.7 * leave_one_out(estimate.rewards_norm["brightness"]) - 0.3 * leave_one_out(estimate.rewards_norm["saturation"])
    assert sorted(term.step_advantages) == list(range(cfg.num_inference_steps))
    for a in term.step_advantages.values():
        torch.testing.assert_close(a, expected)
    assert len(term.trajectory.states) == cfg.num_inference_steps + 1
    params = list(trainer._lora_params().values())
    # the objective is the KL (0 with zero gradient at initialisation): nothing else is backpropagated
    grads = torch.autograd.grad(estimate.loss, params, allow_unused=True)
    assert all(gr is None or not gr.any() for gr in grads)
    trainer._backward_score_function(estimate)
    assert estimate.score_function is None and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert set(estimate.diagnostics) == {f"score_function/{k}/{n}" for k in ("mean_abs_advantage", "zero_advantage_fraction")
                                         for n in ("brightness", "saturation")}


def test_a_hybrid_constraint_is_backpropagated_and_scored_at_the_earlier_steps_only(tmp_path):
    cons = [{"reward": "brightness", "direction": "high", "threshold": 5.0, "gradient": "hybrid"}]
    cfg = tiny_config(tmp_path, constraints=cons, num_inference_steps=6, backprop_steps=2, eval_batches=0, num_grid_images=0)
    trainer = ConstrainedDDPOTrainer(cfg)
    trainer.compute_normalization()
    estimate = trainer._estimate_micro_batches([0])[0]
    assert sorted(estimate.score_function.step_advantages) == [0, 1, 2, 3]  # not the last K = 2
    grads = torch.autograd.grad(estimate.loss, list(trainer._lora_params().values()), allow_unused=True)
    assert any(gr is not None and gr.any() for gr in grads)  # the last K steps' pathwise gradient is kept


def test_a_whole_chain_constraint_gets_the_gradient_of_backpropagation_through_every_step(tmp_path):
    """Brightness with gradient: whole_chain while K = 2 of 6 steps: its term's gradient is the one
    a run backpropagating everything through all 6 steps computes (same seeds, same images), and
    not the truncated one; its value and slack are the first pass's."""
    grads, logs = {}, {}
    for label, gradient, k in (("whole", "whole_chain", 2), ("all_steps", "backprop", 6), ("truncated", "backprop", 2)):
        cons = [{"reward": "brightness", "direction": "high", "threshold": 5.0, "gradient": gradient}]
        trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path / label, constraints=cons, backprop_steps=k,
                                                     eval_batches=0, num_grid_images=0))
        trainer.compute_normalization()
        estimate = trainer._estimate_micro_batches([0])[0]
        params = list(trainer._lora_params().values())
        grads[label] = torch.cat([g.flatten() for g in torch.autograd.grad(estimate.loss, params)])
        logs[label] = (estimate.values, estimate.slacks, estimate.num_grad_steps)
    assert grads["all_steps"].abs().sum() > 0
    torch.testing.assert_close(grads["whole"], grads["all_steps"], rtol=1e-4, atol=1e-8)
    assert not torch.allclose(grads["truncated"], grads["all_steps"], rtol=1e-2, atol=0)
    torch.testing.assert_close(logs["whole"][0], logs["truncated"][0])
    assert logs["whole"][2] == 2


def test_a_binding_non_differentiable_floor_raises_its_dual(tmp_path):
    """Reward backprop with a shapes_match floor 0.5 above the base (the tiny random model's images
    never match: the floor binds): its slack is measured like any constraint's and its λ rises at
    every dual step, while brightness is backpropagated."""
    cons = [{"reward": "brightness", "direction": "high", "threshold": 0.5}, {**FLOOR, "threshold": 0.5}]
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path, constraints=cons, prompts=PROMPTS, max_steps=3))
    report = trainer.train()
    lam = [h["dual/shapes_match_high"] for h in trainer.history]
    assert lam[0] > 0.5 and lam[0] < lam[1] < lam[2]  # ascent from init 0.5 on a positive slack
    assert all(h["slack/shapes_match_high"] > 0 for h in trainer.history)
    assert all(h["score_function/zero_advantage_fraction/shapes_match"] == 1.0 for h in trainer.history)
    floor = report.constraints[1]
    assert floor.relative_to_base and floor.judged_on.startswith("aligned − base")


def test_resume_continues_a_mixed_run_exactly(tmp_path):
    cons = [{"reward": "saturation", "direction": "high", "threshold": 20.0},
            {"reward": "brightness", "direction": "high", "threshold": 20.0, "gradient": "score_function"}]
    kw = dict(constraints=cons, max_steps=3, eval_batches=0, num_grid_images=0, backprop_strategy="uniform")
    straight = ConstrainedDDPOTrainer(tiny_config(tmp_path / "a", **kw))
    for _ in range(3):
        straight.step()
    first = ConstrainedDDPOTrainer(tiny_config(tmp_path / "b", save_steps=2, **kw))
    first.compute_normalization()
    for _ in range(2):
        first.step()
    first.save_checkpoint()
    resumed = ConstrainedDDPOTrainer(tiny_config(tmp_path / "b", resume_from_checkpoint="latest", **kw))
    resumed.load_checkpoint(resumed.resume_path)
    resumed.step()
    assert resumed.duals.multipliers.tolist() == straight.duals.multipliers.tolist()
    assert resumed.history[-1] == straight.history[-1]
    for k, v in straight._lora_params().items():
        torch.testing.assert_close(resumed._lora_params()[k], v, rtol=0, atol=0)

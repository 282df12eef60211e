"""The policy-gradient estimator (METHOD.md §3): each DDIM step's log-probability, its
gradient, PPO's ratio and clipped objective, group-relative advantages, the duals'
combination, a 1D problem with a known answer, the config rules, the trl adapter, and the
estimator inside the trainer on the tiny model."""

import math
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_config

from cdalign.alignment.config import config_from_dict, load_config_file
from cdalign.core.duals import ProjectedGradientAscent
from cdalign.core.policy_gradient import (
    ADVANTAGES,
    PerPromptStatTracker,
    combined_advantage,
    group_standardized,
    kl_weight,
    ppo_clipped_loss,
    reward_weights,
)
from cdalign.core.problem import ConstrainedProblem, Constraint, Objective
from cdalign.core.chains import DDIMChain
from cdalign.core.sampling import GuidedDenoiser, Trajectory, sample_latents
from cdalign.core.seeding import TRAIN_BATCH, batch_share, grouped_batch_share


@pytest.fixture(scope="module")
def chain():
    from cdalign.models.tiny import sd_ddim_scheduler

    return DDIMChain.from_scheduler(sd_ddim_scheduler(), 4, eta=1.0)


# ----------------------------------------------------------------------------- log-probabilities
def test_step_log_prob_is_the_normal_log_density_summed_over_latent_elements(chain):
    g = torch.Generator().manual_seed(0)
    x_t, eps, x_prev = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    for i in range(len(chain)):
        mean = chain.step_mean(i, x_t, eps)
        expected = torch.distributions.Normal(mean, float(chain.sigma[i])).log_prob(x_prev).flatten(1).sum(1)
        assert torch.allclose(chain.log_prob(i, x_t, eps, x_prev), expected, rtol=1e-5, atol=1e-3)


def test_a_deterministic_step_has_no_log_probability():
    from cdalign.models.tiny import sd_ddim_scheduler

    ddim = DDIMChain.from_scheduler(sd_ddim_scheduler(), 4, eta=0.0)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="deterministic"):
        ddim.log_prob(0, x, x, x)


def test_trajectory_records_every_state_and_the_sampling_log_probs(chain):
    g = torch.Generator().manual_seed(1)
    x_T, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(len(chain), 2, 4, 3, 3, generator=g)

    def predictor(x, t):
        return 0.1 * x

    traj = Trajectory()
    x0 = sample_latents(predictor, chain, x_T, noise, trajectory=traj)
    assert len(traj.states) == len(chain) + 1 and torch.equal(traj.states[0], x_T) and torch.equal(traj.states[-1], x0)
    for i in range(len(chain)):
        lp = chain.log_prob(i, traj.states[i], predictor(traj.states[i], None), traj.states[i + 1])
        assert torch.equal(traj.log_probs[i], lp)
        # the state is the step's mean plus σ_i times the recorded noise
        mean = chain.step_mean(i, traj.states[i], predictor(traj.states[i], None))
        assert torch.allclose(traj.states[i + 1], mean + float(chain.sigma[i]) * noise[i], atol=1e-6)


def test_log_prob_gradient_in_the_lora_matches_finite_differences(chain):
    from cdalign.models.adapters import adapter_parameters
    from cdalign.models.lora import add_lora_adapter
    from cdalign.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline(seed=0, sample_size=8).unet
    add_lora_adapter(unet, "default", rank=2, alpha=2, target_modules=["to_q", "to_v"], seed=0)
    unet.double().eval()
    params = adapter_parameters(unet, "default")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # B = 0 at init would make the gradient in A vanish
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)
    predictor = GuidedDenoiser(unet, chain, cond, torch.zeros_like(cond), guidance_scale=3.0)
    i = 1
    x_t = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    x_prev = chain.step_mean(i, x_t, predictor(x_t, chain.timesteps[i])).detach() + 0.05 * torch.randn(
        2, 4, 8, 8, generator=g, dtype=torch.float64)

    def log_prob_sum():
        return chain.log_prob(i, x_t, predictor(x_t, chain.timesteps[i]), x_prev).sum()

    p = params[0]
    p.requires_grad_(True)
    (grad,) = torch.autograd.grad(log_prob_sum(), [p])
    h = 1e-6
    for idx in [(0, 0), (1, 3), (0, 5)]:
        idx = idx[: p.ndim]
        with torch.no_grad():
            old = p[idx].item()
            p[idx] = old + h
            up = log_prob_sum().item()
            p[idx] = old - h
            down = log_prob_sum().item()
            p[idx] = old
        fd = (up - down) / (2 * h)
        assert grad[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-6), idx


# ----------------------------------------------------------------------------- PPO
def test_ppo_clipped_objective_matches_a_hand_computation():
    log_prob = torch.tensor([0.0, math.log(1.5), math.log(0.5), math.log(1.1)])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 2.0, -1.0, -3.0])
    loss, stats = ppo_clipped_loss(log_prob, old, adv, clip_range=0.2)
    # per sample max(-A ρ, -A clip(ρ)): ρ = 1, 1.5, 0.5, 1.1 -> clip 1, 1.2, 0.8, 1.1
    by_hand = [max(-1 * 1.0, -1 * 1.0), max(-2 * 1.5, -2 * 1.2), max(1 * 0.5, 1 * 0.8), max(3 * 1.1, 3 * 1.1)]
    assert loss.item() == pytest.approx(sum(by_hand) / 4)
    assert stats["clip_fraction"] == pytest.approx(0.5)  # 1.5 and 0.5 lie outside [0.8, 1.2]
    assert stats["ratio_mean"] == pytest.approx((1 + 1.5 + 0.5 + 1.1) / 4)
    assert stats["approx_kl"] == pytest.approx(0.5 * float((log_prob**2).mean()))


def test_ppo_gradient_at_ratio_one_is_the_score_function_gradient():
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    log_prob = theta * torch.tensor([1.0, 2.0])
    adv = torch.tensor([0.5, -1.0])
    loss, stats = ppo_clipped_loss(log_prob, log_prob.detach(), adv, clip_range=0.2)
    loss.backward()
    assert stats["ratio_mean"] == 1.0 and stats["max_abs_log_ratio"] == 0.0
    assert torch.allclose(theta.grad, -adv * torch.tensor([1.0, 2.0]) / 2)


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_are_standardised_within_each_prompt_group():
    values = torch.tensor([1.0, 3.0, 10.0, 30.0, 5.0, 5.0])
    adv = group_standardized(values, 2)
    for g in adv.view(3, 2):
        assert abs(float(g.mean())) < 1e-6
    assert torch.allclose(adv[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5)  # scale-free within a group
    assert torch.equal(adv[4:], torch.zeros(2))  # a group of equal rewards carries no signal


def test_prompt_groups_of_a_global_batch_are_the_same_on_one_and_two_processes():
    prompts = [f"p{k}" for k in range(10)]
    one_p, one_s, _ = grouped_batch_share(0, TRAIN_BATCH, 3, prompts, 8, 4, 1, 0)
    halves = [grouped_batch_share(0, TRAIN_BATCH, 3, prompts, 4, 4, 2, r) for r in range(2)]
    assert halves[0][0] + halves[1][0] == one_p and halves[0][1] + halves[1][1] == one_s
    assert one_p[:4] == [one_p[0]] * 4 and one_p[4:] == [one_p[4]] * 4 and len(set(one_s)) == 8
    values = torch.randn(8, generator=torch.Generator().manual_seed(0))
    for kind in ("group_std", "group_mean"):
        whole = ADVANTAGES.get(kind).compute(values, 4, None, one_p)
        split = torch.cat([ADVANTAGES.get(kind).compute(values[4 * r : 4 * r + 4], 4, None, halves[r][0]) for r in range(2)])
        assert torch.equal(whole, split)
    # one image per prompt is the old draw exactly
    assert grouped_batch_share(0, TRAIN_BATCH, 3, prompts, 4, 1)[:2] == batch_share(0, TRAIN_BATCH, 3, prompts, 4)[:2]


def test_per_prompt_tracker_uses_batch_statistics_until_a_prompt_has_enough_rewards():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker(torch.tensor([1.0, 2.0, 3.0]), ["a", "a", "b"])
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(first.double(), (v - v.mean()) / (v.std(correction=0) + 1e-6))
    second = tracker(torch.tensor([4.0]), ["a"])  # "a" now holds 1, 2, 4
    held = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert second.item() == pytest.approx(float((4 - held.mean()) / (held.std(correction=0) + 1e-6)))
    clone = PerPromptStatTracker(4, 3)
    clone.load_state_dict(tracker.state_dict())
    assert clone.state_dict() == tracker.state_dict()


def test_inclusion_probability_of_a_trained_step_matches_simulated_draws():
    from cdalign.core.policy_gradient import inclusion_probability

    g = torch.Generator().manual_seed(0)
    n, N, epochs, trials = 3, 10, 2, 4000
    hits = sum(0 in set(torch.randperm(N, generator=g)[:n].tolist()) | set(torch.randperm(N, generator=g)[:n].tolist())
               for _ in range(trials))
    p = inclusion_probability(n, N, epochs)
    assert p == pytest.approx(1 - 0.7**2) and hits / trials == pytest.approx(p, abs=0.03)


def test_kl_value_steps_0_is_refused_with_reward_backprop(tmp_path):
    with pytest.raises(ValueError, match=r"^kl_value_steps: 0 is only allowed with estimator: policy_gradient"):
        tiny_config(tmp_path, kl_value_steps=0)


def test_advantages_combine_through_the_duals_with_each_direction_sign():
    problem = ConstrainedProblem(
        Objective("aesthetic"),
        [Constraint("jpeg_high", "jpeg", "high", 0.0), Constraint("sat_low", "sat", "low", 0.0),
         Constraint("kl", "kl", "low", 1.0)],
    )
    lam = torch.tensor([0.5, 2.0, 3.0])
    w = reward_weights(problem, lam)
    assert w == {"aesthetic": 1.0, "jpeg": 0.5, "sat": -2.0}
    assert kl_weight(problem, lam) == 3.0
    adv = {"aesthetic": torch.tensor([1.0, -1.0]), "jpeg": torch.tensor([10.0, 0.0]), "sat": torch.tensor([1.0, 1.0])}
    # jpeg's 10 is clipped to 5 before λ weighs it
    assert torch.allclose(combined_advantage(adv, w, clip=5.0), torch.tensor([1 + 2.5 - 2, -1 + 0 - 2]))


# ----------------------------------------------------------------------------- a known answer
@pytest.mark.parametrize("kind", ["group_mean", "group_std"])
def test_constrained_policy_gradient_on_a_1d_gaussian_reaches_the_known_optimum(kind):
    """max E[−x²] s.t. E[x] ≥ 1, x ~ N(μ, σ²): μ* = 1 and λ* = 2 in the Lagrangian's units
    (centred advantages); standardised advantages rescale each reward, λ* = 2·std(x)/std(x²)."""
    sigma, n = 0.5, 256
    problem = ConstrainedProblem(Objective("neg_square"), [Constraint("x_high", "x", "high", 1.0)])
    duals = ProjectedGradientAscent(1, lr=0.05, init=0.0)
    mu = torch.tensor([0.0], requires_grad=True)
    opt = torch.optim.SGD([mu], lr=0.02)
    g = torch.Generator().manual_seed(0)
    tail_mu, tail_lam = [], []
    for it in range(1500):
        with torch.no_grad():
            x = mu + sigma * torch.randn(n, generator=g)
        rewards = {"neg_square": -(x**2), "x": x}
        values = problem.values(None, rewards)
        lam = duals.multipliers.float()
        weights = reward_weights(problem, lam)
        adv = combined_advantage({k: ADVANTAGES.get(kind).compute(v, n, None, []) for k, v in rewards.items()}, weights)
        log_prob = torch.distributions.Normal(mu, sigma).log_prob(x)
        loss, _ = ppo_clipped_loss(log_prob, log_prob.detach(), adv, clip_range=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        duals.step(problem.slacks(values))
        if it >= 1000:
            tail_mu.append(mu.item())
            tail_lam.append(float(duals.multipliers[0]))
    lam_star = 2.0 if kind == "group_mean" else 2 * sigma / math.sqrt(4 * sigma**2 + 2 * sigma**4)
    assert sum(tail_mu) / len(tail_mu) == pytest.approx(1.0, abs=0.05)
    assert sum(tail_lam) / len(tail_lam) == pytest.approx(lam_star, rel=0.1)


# ----------------------------------------------------------------------------- config rules
def _pg(tmp_path, **kw):
    base = dict(estimator="policy_gradient", images_per_prompt=2, backprop_steps=4,  # tiny_config's 2: reward_backprop's
                constraints=[{"reward": "jpeg_compressibility", "direction": "high", "threshold": 0.5}])
    base.update(kw)
    return tiny_config(tmp_path, **base)


def test_policy_gradient_refuses_a_deterministic_chain(tmp_path):
    with pytest.raises(ValueError, match=r"^eta: 0 .*policy_gradient"):
        _pg(tmp_path, eta=0.0, kl_estimator="uniform")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(images_per_prompt=3), r"^train_batch_size: 2 is not a multiple of images_per_prompt"),
        (dict(images_per_prompt=1), r"^images_per_prompt: 1 leaves advantage 'group_std'"),
        (dict(gradient_accumulation_steps=3, ppo_updates_per_epoch=2), r"^ppo_updates_per_epoch: 2 does not divide"),
        (dict(backprop_steps=3), r"^backprop_steps: 3 is only used by estimator: reward_backprop"),
        (dict(gradient_checkpointing=True), r"^gradient_checkpointing: True is only used by estimator: reward_backprop"),
    ],
)
def test_policy_gradient_config_rules_name_the_field_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _pg(tmp_path, **overrides)


def test_policy_gradient_fields_are_refused_with_reward_backprop(tmp_path):
    with pytest.raises(ValueError, match=r"^ppo_epochs: 2 is only used by estimator: policy_gradient"):
        tiny_config(tmp_path, ppo_epochs=2)


def test_defaults_leave_a_reward_backprop_config_as_it_was(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.estimator == "reward_backprop" and cfg.images_per_prompt == 1
    recipe = load_config_file("tiny/multi_reward")
    assert recipe.estimator == "reward_backprop" and recipe.images_per_prompt == 1


# ----------------------------------------------------------------------------- trl adapter
def test_trl_reward_and_prompt_functions_work_unchanged():
    from cdalign.alignment.trl_compat import TRLRewardFunction, prompts_from_trl

    calls = iter(["a cat", "a dog", "a cat"])

    def prompt_fn():
        p = next(calls)
        return p, {"animal": p.split()[-1]}

    prompts, metadata = prompts_from_trl(prompt_fn, 3)
    assert prompts == ["a cat", "a dog"] and metadata["a dog"] == {"animal": "dog"}

    seen = {}

    def reward_fn(images, prompts, prompt_metadata):
        seen["meta"] = prompt_metadata
        return images.mean(dim=(1, 2, 3)) * 10, {"n": len(prompts)}

    reward = TRLRewardFunction(reward_fn, metadata)
    images = torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(reward(images, ["a cat", "a dog"]), torch.tensor([5.0, 5.0]))
    assert seen["meta"] == ({"animal": "cat"}, {"animal": "dog"}) and reward.last_metadata == {"n": 2}
    assert reward.differentiable is False


def test_ddpo_config_fields_map_to_a_valid_policy_gradient_config(tmp_path):
    from cdalign.alignment.trl_compat import DDPO_FIELD_MAP, ddpo_config_fields

    ddpo = dict(num_epochs=3, sample_num_steps=6, sample_batch_size=2, sample_num_batches_per_epoch=4, train_batch_size=2,
                train_gradient_accumulation_steps=2, train_num_inner_epochs=2, train_clip_range=1e-4,
                per_prompt_stat_tracking=True, mixed_precision="no", train_learning_rate=3e-4, log_with=None)
    fields = ddpo_config_fields(ddpo, latent_elements=1024)
    assert fields["ppo_updates_per_epoch"] == 2 and fields["gradient_accumulation_steps"] == 4
    assert fields["advantage"] == "prompt_tracker" and fields["ppo_clip_range"] == pytest.approx(0.1024)
    cfg = tiny_config(tmp_path, **{k: v for k, v in fields.items() if k != "output_dir"}, backprop_steps=4,
                      constraints=[{"reward": "jpeg_compressibility", "direction": "high", "threshold": 0.5}])
    assert cfg.estimator == "policy_gradient" and cfg.ppo_epochs == 2
    mapped = {v for v in DDPO_FIELD_MAP.values() if v}
    assert mapped <= set(cfg.__dataclass_fields__)
    with pytest.raises(ValueError, match=r"^DDPOConfig.train_use_8bit_adam"):
        ddpo_config_fields({"train_use_8bit_adam": True}, 1024)


# ----------------------------------------------------------------------------- in the trainer
def test_reward_backprop_refuses_a_non_differentiable_reward_naming_policy_gradient(tmp_path):
    from cdalign import ConstrainedDDPOTrainer

    cfg = tiny_config(tmp_path, constraints=[{"reward": "jpeg_compressibility", "direction": "high", "threshold": 0.5}])
    with pytest.raises(ValueError, match=r"'jpeg_compressibility' is not differentiable.*estimator: policy_gradient"):
        ConstrainedDDPOTrainer(cfg)


def test_first_update_recomputes_the_sampling_log_probs_exactly(tmp_path):
    from cdalign import ConstrainedDDPOTrainer

    trainer = ConstrainedDDPOTrainer(_pg(tmp_path, ppo_epochs=2, num_inference_steps=3))
    log = trainer.step()
    assert log["ppo/first_update_max_abs_log_ratio"] == 0.0  # ratio exactly 1 before any parameter change
    assert log["ppo/updates"] == 2.0
    assert log["ppo/approx_kl"] > 0  # the second epoch saw the updated LoRA


@pytest.mark.slow
def test_a_violated_non_differentiable_constraint_raises_its_dual(tmp_path):
    from cdalign import ConstrainedDDPOTrainer

    cfg = _pg(tmp_path, num_inference_steps=3, max_steps=3, dual={"optimizer": "ascent", "lr": 0.1, "init": 0.0},
              constraints=[{"reward": "jpeg_compressibility", "direction": "high", "threshold": 20.0},
                           {"reward": "saturation", "direction": "low", "threshold": 20.0}])
    report = ConstrainedDDPOTrainer(cfg).train()
    lam = [h["dual/jpeg_compressibility_high"] for h in report_history(tmp_path)]
    assert lam[0] > 0 and all(b > a for a, b in zip(lam, lam[1:]))  # +20σ stays out of reach: λ rises every step
    assert [h["dual/saturation_low"] for h in report_history(tmp_path)] == [0.0] * 3  # met: λ stays at 0
    assert report["estimator"]["name"] == "policy_gradient" and report["estimator"]["optimizer_updates"] == 3
    assert report["constraints"][0]["satisfied"] is False and report["constraints"][0]["dual"] == lam[-1]


def report_history(tmp_path):
    import json

    return [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- benchmark rows
def _bench(name: str):
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_bench_dir(tmp_path_factory):
    import json

    from cdalign.models.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-bench-small")
    build_tiny_pipeline(seed=0, sample_size=8).save_pretrained(str(path))
    (path / _bench("tinybench").PROMPTS_FILE).write_text(json.dumps(["a red circle", "a blue square"]))
    return str(path)


SMALL_BENCH = {"num_inference_steps": 4, "backprop_steps": 2, "batch_size": 2}


@pytest.mark.parametrize("row", ["pg_reward_only", "pg_kl_all_steps", "pg_kl_sampled", "pg_kl_trained"])
def test_policy_gradient_benchmark_rows_step(row, small_bench_dir, tmp_path):
    bench_step, tb = _bench("bench_step"), _bench("tinybench")
    trainer = bench_step.build_trainer(row, small_bench_dir, str(tmp_path), SMALL_BENCH)
    assert trainer.config.estimator == "policy_gradient" and trainer.estimator.num_train_steps == 2  # as trl's fraction
    counter = tb.DenoiserCallCounter(trainer.pipe.unet)
    log = trainer.step()
    assert log["ppo/first_update_max_abs_log_ratio"] == 0.0 and log["ppo/updates"] == 1.0
    # 4 sampling calls + 2 trained calls, plus the base model's for the KL (all 4, the 2 trained + 1 sampled,
    # or the 2 trained alone)
    assert counter.total == {"pg_reward_only": 6, "pg_kl_all_steps": 10, "pg_kl_sampled": 9, "pg_kl_trained": 8}[row]


def test_trl_ddpo_row_or_skip(small_bench_dir):
    peers = _bench("bench_peers")
    if not peers.trl_ready():
        pytest.skip("benchmarks/.venv-trl with trl 0.23.1 is missing (created by benchmarks/bench_peers.py)")
    cmd = peers.row_command("trl_ddpo", Path(small_bench_dir), 1, 0, 1, [f"{k}={v}" for k, v in SMALL_BENCH.items()])
    res = peers.run_child(cmd, timeout=300)
    assert res["trl_version"] == "0.23.1" and res["timesteps_trained"] == 2
    assert res["unet_calls_per_step"] == 4 + 2  # sampling + trained steps, as cdalign's pg_reward_only


@pytest.mark.parametrize("path", ["cdalign/recipes_data/tiny/policy_gradient.yaml", "recipes/sd15/policy_gradient_aesthetic_jpeg.yaml"])
def test_policy_gradient_recipes_train_on_jpeg_compressibility_with_another_constraint(path):
    from cdalign.alignment.config import load_config_file

    cfg = load_config_file(Path(__file__).parents[1] / path)
    assert cfg.estimator == "policy_gradient" and cfg.eta > 0
    rewards = [c.reward for c in cfg.constraints if not c.is_kl]
    assert "jpeg_compressibility" in rewards and len(cfg.constraints) >= 2


def test_a_trl_reward_and_prompt_function_train_through_the_adapter(tmp_path):
    """The README's "coming from trl's DDPOTrainer" snippet at tiny size: trl-style functions,
    DDPOConfig fields, a user reward name; one round trains and the reward saw the metadata."""
    from cdalign import ConstrainedDDPOTrainer
    from cdalign.alignment.trl_compat import (
        TRLRewardFunction,
        ddpo_config_fields,
        declare_user_reward,
        prompts_from_trl,
    )

    captions = iter(["a red circle", "a blue square"] * 8)

    def prompt_fn():
        p = next(captions)
        return p, {"colour": p.split()[1]}

    seen = []

    def reward_fn(images, prompts, prompt_metadata):
        seen.extend(m["colour"] for m in prompt_metadata)
        return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2)), {}  # redness, no gradient needed

    declare_user_reward("redness")
    fields = ddpo_config_fields(dict(num_epochs=1, sample_num_steps=3, sample_batch_size=2, sample_num_batches_per_epoch=2,
                                     train_batch_size=2, mixed_precision="no", log_with=None), latent_elements=4 * 4 * 4)
    fields.update(pretrained_model_name_or_path="cdalign/tiny-random-sd", resolution=32, output_dir=str(tmp_path / "run"),
                  objective={"type": "reward", "reward": "redness", "normalize": False},
                  constraints=[{"type": "kl", "max": 1.0}], normalization_batches=1, eval_batches=1)
    prompts, metadata = prompts_from_trl(prompt_fn, 4)
    trainer = ConstrainedDDPOTrainer(config_from_dict(fields), prompts=prompts,
                                     rewards={"redness": TRLRewardFunction(reward_fn, metadata)})
    log = trainer.step()
    assert log["ppo/updates"] == 2.0 and math.isfinite(log["reward/redness"]) and "kl" in log
    assert set(seen) <= {"red", "blue"} and len(seen) == 4
    with pytest.raises(ValueError, match="declared for a user callable"):
        ConstrainedDDPOTrainer(config_from_dict({**fields, "output_dir": str(tmp_path / "other")}), prompts=prompts)

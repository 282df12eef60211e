"""The DDIM chain, the chain KL (METHOD.md §1) and the sampler they share."""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler

from cdalign.core.kl import (
    ChainKLAccumulator,
    choose_kl_steps,
    path_step_weights,
    step_kl,
    step_weights,
)
from cdalign.core.chains import DDIMChain
from cdalign.core.sampling import sample_latents


def sd_scheduler():
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def test_chain_step_equals_diffusers_ddim_step():
    sched = sd_scheduler()
    chain = DDIMChain.from_scheduler(sched, 10, eta=1.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for i, t in enumerate(sched.timesteps):
        ours = chain.step(i, x, eps, z)
        theirs = sched.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_path_weight_matches_hand_computation():
    # ᾱ_t = 0.5, ᾱ_{t'} = 0.8, η = 1: σ² = (0.2/0.5)(1 − 0.5/0.8) = 0.15,
    # c = sqrt(1 − 0.8 − 0.15) − sqrt(0.8)·sqrt(0.5)/sqrt(0.5) = sqrt(0.05) − sqrt(0.8),
    # weight = c²/(2σ²) = 0.45/0.3 = 1.5.
    ab, abp = torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.8], dtype=torch.float64)
    sigma = ((1 - abp) / (1 - ab) * (1 - ab / abp)).sqrt()
    chain = DDIMChain(torch.tensor([500]), ab, abp, sigma, eta=1.0)
    assert float(sigma[0] ** 2) == pytest.approx(0.15)
    assert float(path_step_weights(chain)[0]) == pytest.approx(1.5)


def test_path_kl_equals_gaussian_kl_of_the_two_steps():
    chain = DDIMChain.from_scheduler(sd_scheduler(), 8, eta=0.7)
    weights = step_weights(chain, "path")
    g = torch.Generator().manual_seed(1)
    x, eps_a, eps_b = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    for i in range(len(chain)):
        s = float(chain.sigma[i])
        mean_a, mean_b = chain.step_mean(i, x, eps_a), chain.step_mean(i, x, eps_b)
        exact = torch.distributions.kl_divergence(
            torch.distributions.Normal(mean_a.double(), s), torch.distributions.Normal(mean_b.double(), s)
        ).flatten(1).sum(1)
        torch.testing.assert_close(step_kl(eps_a, eps_b, float(weights[i]), "path").double(), exact, rtol=1e-4, atol=1e-6)


def test_uniform_kl_is_mean_squared_difference_over_steps_and_elements():
    chain = DDIMChain.from_scheduler(sd_scheduler(), 5, eta=1.0)
    diff = [torch.full((2, 4, 3, 3), float(i)) for i in range(5)]
    total = sum(step_kl(d, torch.zeros_like(d), float(w), "uniform") for d, w in zip(diff, step_weights(chain, "uniform")))
    assert total.tolist() == pytest.approx([sum(i * i for i in range(5)) / 5] * 2)


def test_path_kl_refuses_deterministic_chain():
    with pytest.raises(ValueError, match="eta > 0"):
        path_step_weights(DDIMChain.from_scheduler(sd_scheduler(), 5, eta=0.0))


def test_subsampled_kl_steps_are_unbiased_for_the_all_steps_sum():
    """Averaging the Horvitz–Thompson estimate over every equally likely subset gives the
    all-steps value exactly; the sampler's draws hit each step with the stated probability."""
    T, grad, m = 8, {6, 7}, 3
    terms = torch.arange(1.0, T + 1) ** 2
    exact = float(terms.sum())
    others = [i for i in range(T) if i not in grad]
    p = m / len(others)
    estimates = [
        float(sum(terms[i] for i in grad) + sum(terms[i] / p for i in subset))
        for subset in itertools.combinations(others, m)
    ]
    assert sum(estimates) / len(estimates) == pytest.approx(exact)
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(T)
    for _ in range(2000):
        chosen = choose_kl_steps(T, grad, m, g)
        assert all(chosen[i] == 1.0 for i in grad)
        assert all(chosen[i] == pytest.approx(p) for i in chosen if i not in grad)
        for i in chosen:
            hits[i] += 1
    assert (hits[others] / 2000 - p).abs().max() < 0.05
    assert choose_kl_steps(T, grad, None, g) == {i: 1.0 for i in range(T)}


def test_sampler_gradient_flows_only_through_tracked_steps():
    chain = DDIMChain.from_scheduler(sd_scheduler(), 6, eta=1.0)
    w = torch.tensor(0.5, requires_grad=True)
    seen = []

    def predictor(x, t):
        seen.append(torch.is_grad_enabled())
        return w * x

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 4, 4, generator=g)
    noise = torch.randn(6, 2, 4, 4, 4, generator=g)
    out = sample_latents(predictor, chain, x_T, noise, grad_steps={4, 5})
    assert seen == [False] * 4 + [True] * 2
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad)


def test_kl_accumulator_is_zero_for_identical_models_and_counts_reference_calls():
    chain = DDIMChain.from_scheduler(sd_scheduler(), 6, eta=1.0)
    model = lambda x, t: 0.3 * x  # noqa: E731
    acc = ChainKLAccumulator(model, chain, "path", choose_kl_steps(6, {5}, 2, torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(0)
    sample_latents(model, chain, torch.randn(2, 4, 4, 4, generator=g), torch.randn(6, 2, 4, 4, 4, generator=g), {5}, on_step=acc)
    assert acc.reference_calls == 3
    assert torch.equal(acc.per_sample, torch.zeros(2))


def test_local_grad_steps_give_the_kl_its_gradient_at_fixed_states_without_changing_the_chain():
    """kl_grad_steps 'all': an untracked step's prediction carries gradient to the weights for
    the KL term alone, at its detached state; the chain's latents are the same numbers, and the
    KL gradient equals the sum of each step's closed-form gradient at those fixed states."""
    chain = DDIMChain.from_scheduler(sd_scheduler(), 6, eta=1.0)
    g = torch.Generator().manual_seed(0)
    x_T, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(6, 2, 4, 4, 4, generator=g)
    base = lambda x, t: 0.3 * x  # noqa: E731

    def run(local):
        w = torch.tensor(0.5, requires_grad=True)
        model = lambda x, t: w * x  # noqa: E731
        acc = ChainKLAccumulator(base, chain, "uniform")
        out = sample_latents(model, chain, x_T, noise, grad_steps={5}, on_step=acc, local_grad_steps=local)
        acc.per_sample.sum().backward()
        return out.detach(), acc.per_sample.detach(), w.grad.clone(), acc

    out_t, kl_t, grad_t, _ = run(set())
    out_a, kl_a, grad_a, _ = run({0, 1, 2, 3, 4})
    assert torch.equal(out_t, out_a) and torch.equal(kl_t, kl_a)
    # by hand: d/dw Σ_i weight_i · mean((w − 0.3)² x_i²) = Σ_i weight_i · 2(w − 0.3) mean(x_i²), at the recorded x_i
    states, x = [], x_T
    for i, t in enumerate(chain.timesteps):
        states.append(x)
        x = chain.step(i, x, 0.5 * x, noise[i])
    weights = step_weights(chain, "uniform")
    expected_all = sum(float(weights[i]) * 2 * 0.2 * float((s ** 2).flatten(1).mean(1).sum()) for i, s in enumerate(states))
    expected_last = float(weights[5]) * 2 * 0.2 * float((states[5] ** 2).flatten(1).mean(1).sum())
    assert float(grad_a) == pytest.approx(expected_all, rel=1e-5)
    assert float(grad_t) == pytest.approx(expected_last, rel=1e-5)

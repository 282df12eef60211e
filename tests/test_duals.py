"""Dual updates: the math of METHOD.md §1 and convergence on a problem with a known answer."""


import pytest
import torch

from cdalign.alignment.specs import DualSpec
from cdalign.core.duals import (
    DUAL_OPTIMIZERS,
    InfeasibilityMonitor,
    NuPI,
    ProjectedGradientAscent,
    build_dual_optimizer,
)


def test_projected_ascent_raises_violated_and_lowers_satisfied_multipliers():
    dual = ProjectedGradientAscent(2, lr=0.5, init=1.0)
    lam = dual.step(torch.tensor([0.4, -0.6]))
    assert lam.tolist() == pytest.approx([1.2, 0.7])


def test_projection_keeps_multipliers_nonnegative():
    dual = ProjectedGradientAscent(1, lr=1.0, init=0.1)
    assert dual.step(torch.tensor([-5.0])).tolist() == [0.0]


def test_nupi_matches_its_recursion_by_hand():
    kappa_i, kappa_p, nu = 0.3, 0.5, 0.2
    dual = NuPI(1, kappa_i=kappa_i, kappa_p=kappa_p, nu=nu, init=0.0)
    lam, xi = 0.0, 0.0
    for e in [1.0, 0.5, -0.25, 2.0]:
        xi_new = nu * xi + (1 - nu) * e
        lam = max(0.0, lam + kappa_i * e + kappa_p * (xi_new - xi))
        xi = xi_new
        assert float(dual.step(torch.tensor([e]))[0]) == pytest.approx(lam)


def test_nupi_without_proportional_term_is_gradient_ascent():
    a = NuPI(1, kappa_i=0.1, kappa_p=0.0, nu=0.0, init=0.3)
    b = ProjectedGradientAscent(1, lr=0.1, init=0.3)
    for e in [0.5, -1.0, 2.0, -0.2]:
        assert a.step(torch.tensor([e])).tolist() == pytest.approx(b.step(torch.tensor([e])).tolist())


def test_warmup_ramps_gains_linearly():
    dual = ProjectedGradientAscent(1, lr=1.0, init=0.0, warmup_steps=4, warmup_start=0.2)
    increments = []
    for _ in range(6):
        before = float(dual.multipliers[0])
        increments.append(float(dual.step(torch.tensor([1.0]))[0]) - before)
    assert increments == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_frozen_multipliers_do_not_move():
    dual = NuPI(2, kappa_i=1.0, kappa_p=0.0, nu=0.1, init=0.2, frozen=True)
    for _ in range(3):
        lam = dual.step(torch.tensor([1.0, -1.0]))
    assert lam.tolist() == pytest.approx([0.2, 0.2])


@pytest.mark.parametrize("name", ["ascent", "nupi"])
def test_state_dict_round_trip_continues_identically(name):
    kw = {"ascent": dict(lr=0.3), "nupi": dict(kappa_i=0.3, kappa_p=0.2, nu=0.5)}[name]
    a = DUAL_OPTIMIZERS.get(name)(2, init=0.1, **kw)
    for e in ([1.0, -0.5], [0.2, 0.3]):
        a.step(torch.tensor(e))
    b = DUAL_OPTIMIZERS.get(name)(2, init=0.7, **kw)
    b.load_state_dict(a.state_dict())
    for e in ([0.4, -0.1], [-2.0, 1.0]):
        assert a.step(torch.tensor(e)).tolist() == b.step(torch.tensor(e)).tolist()


def _gaussian_primal_dual(dual, steps=3000, lr=0.05):
    """minimise KL(N(m, s²) ‖ N(0, 1)) s.t. E[x] >= 1, by gradient descent-ascent.

    KL = (s² + m² − 1)/2 − log s; slack g = 1 − m. KKT: m = λ, so λ* = 1, m* = 1, s* = 1."""
    m = torch.tensor(0.0, requires_grad=True)
    log_s = torch.tensor(0.5, requires_grad=True)
    opt = torch.optim.SGD([m, log_s], lr=lr)
    for _ in range(steps):
        s = log_s.exp()
        kl = (s**2 + m**2 - 1) / 2 - log_s
        slack = 1 - m
        lagrangian = kl + dual.multipliers[0].float() * slack
        opt.zero_grad()
        lagrangian.backward()
        opt.step()
        dual.step(slack.detach().reshape(1))
    return float(m.detach()), float(log_s.detach().exp()), float(dual.multipliers[0])


@pytest.mark.parametrize(
    "dual",
    [ProjectedGradientAscent(1, lr=0.05, init=0.0), NuPI(1, kappa_i=0.05, kappa_p=0.2, nu=0.3, init=0.0)],
    ids=["ascent", "nupi"],
)
def test_dual_updates_converge_to_known_lagrange_multiplier(dual):
    m, s, lam = _gaussian_primal_dual(dual)
    assert m == pytest.approx(1.0, abs=1e-2)
    assert s == pytest.approx(1.0, abs=1e-2)
    assert lam == pytest.approx(1.0, abs=1e-2)


def test_monitor_flags_growing_multiplier_with_stuck_slack():
    mon = InfeasibilityMonitor(["reachable", "impossible"], window=4)
    flagged = []
    for k in range(8):
        lam = torch.tensor([0.1, 0.1 * (k + 1)])
        slack = torch.tensor([0.5 / (k + 1), 1.0])  # first shrinks, second stuck
        flagged += mon.update(lam, slack, k)
    assert flagged == ["impossible"]


def test_init_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="dual.init"):
        ProjectedGradientAscent(3, lr=0.05, init=[0.1, 0.2])


def test_nupi_anti_windup_holds_the_integral_while_a_violation_shrinks():
    # slacks 1.0 then 0.5: ξ after step 1 is (1−ν)·1 = 0.5, and 0.5 is not below it, so step 2
    # integrates; step 3's 0.3 < ξ_1 = 0.5 → its κ_i term is skipped, only the proportional term moves λ
    kw = dict(kappa_i=0.1, kappa_p=0.5, nu=0.5, init=0.0)
    plain, held = NuPI(1, **kw), NuPI(1, anti_windup=True, **kw)
    for g in (1.0, 0.5):
        plain.step(torch.tensor([g]))
        held.step(torch.tensor([g]))
    assert torch.allclose(plain.multipliers, held.multipliers)
    xi = held.xi.clone()
    lam = held.multipliers.clone()
    held.step(torch.tensor([0.3]))
    plain.step(torch.tensor([0.3]))
    xi_new = 0.5 * xi + 0.5 * 0.3
    assert torch.allclose(held.multipliers, (lam + 0.5 * (xi_new - xi)).clamp(min=0))
    assert torch.allclose(plain.multipliers - held.multipliers, torch.tensor([0.1 * 0.3], dtype=torch.float64))
    # a met constraint (negative slack) still unwinds at the full integral rate
    before = held.multipliers.clone()
    xi = held.xi.clone()
    held.step(torch.tensor([-0.4]))
    xi_new = 0.5 * xi + 0.5 * -0.4
    assert torch.allclose(held.multipliers, (before + 0.1 * -0.4 + 0.5 * (xi_new - xi)).clamp(min=0))



def test_a_rules_tuning_values_are_declared_once_by_the_spec():
    with pytest.raises(TypeError, match="kappa_i"):
        NuPI(1, init=0.0)
    with pytest.raises(TypeError, match="lr"):
        ProjectedGradientAscent(1, init=0.0)
    spec = DualSpec()
    nupi = build_dual_optimizer(spec, 2)
    assert (nupi.kappa_i.tolist(), nupi.kappa_p.tolist(), nupi.nu) == ([spec.kappa_i] * 2, [spec.kappa_p] * 2, spec.nu)
    assert nupi.multipliers.tolist() == [spec.init] * 2 and nupi.warmup_start == spec.warmup_start
    ascent = build_dual_optimizer(DualSpec(optimizer="ascent"), 1)
    assert ascent.lr.tolist() == [spec.lr]


def test_a_warmup_needs_its_starting_fraction():
    with pytest.raises(ValueError, match="dual.warmup_start: required with warmup_steps > 0"):
        ProjectedGradientAscent(1, lr=0.1, init=0.0, warmup_steps=3)


def test_a_decrease_rate_slows_only_the_steps_that_lower_a_price():
    # ascent with lr 0.5 from λ = 1: slack +0.4 raises by 0.2 (whole), slack −0.6 lowers by 0.3 × ρ
    dual = ProjectedGradientAscent(2, lr=0.5, init=1.0, decrease_rate=0.25)
    assert dual.step(torch.tensor([0.4, -0.6])).tolist() == pytest.approx([1.2, 1.0 - 0.25 * 0.3])
    # the projection is the rule's: a step to below 0 goes a quarter of the way to 0
    low = ProjectedGradientAscent(1, lr=1.0, init=0.4, decrease_rate=0.25)
    assert low.step(torch.tensor([-5.0])).tolist() == pytest.approx([0.3])
    # νPI: λ follows the slowed step, ξ is updated as without ρ
    kw = dict(kappa_i=0.3, kappa_p=0.5, nu=0.2, init=1.0)
    plain, slow = NuPI(1, **kw), NuPI(1, decrease_rate=0.5, **kw)
    lam = 1.0
    for e in [1.0, -0.5, -0.25, 2.0]:
        plain.step(torch.tensor([e]))
        xi_before = float(slow.xi[0])
        step = kw["kappa_i"] * e + kw["kappa_p"] * (0.2 * xi_before + 0.8 * e - xi_before)
        lam = max(0.0, lam + step) if step > 0 else lam + 0.5 * (max(0.0, lam + step) - lam)
        assert float(slow.step(torch.tensor([e]))[0]) == pytest.approx(lam)
        assert slow.xi.tolist() == pytest.approx(plain.xi.tolist())


def test_a_decrease_rate_keeps_the_rules_fixed_point():
    m, s, lam = _gaussian_primal_dual(ProjectedGradientAscent(1, lr=0.05, init=3.0, decrease_rate=0.3), steps=6000)
    assert (m, s, lam) == pytest.approx((1.0, 1.0, 1.0), abs=1e-2)


def test_a_decrease_rate_outside_its_range_is_an_error():
    with pytest.raises(ValueError, match="dual.decrease_rate"):
        ProjectedGradientAscent(1, lr=0.1, init=0.0, decrease_rate=0.0)
    assert build_dual_optimizer(DualSpec(decrease_rate=0.2), 1).decrease_rate == 0.2
